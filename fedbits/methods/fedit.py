"""FedIT (Shepherd): federated LoRA through peft; A and B travel both ways, dense.

The base model stays frozen and identical on every node; only the adapter moves.
Final output is a PEFT adapter loadable with ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import ClassVar

import torch
from pydantic import Field
from torch import nn

from fedbits.errors import ConfigError
from fedbits.frozen import copy_none
from fedbits.methods._dense import DenseClient, DenseOptions, DenseServer
from fedbits.methods.base import MethodSpec
from fedbits.methods.registry import register


class FedITOptions(DenseOptions):
    privacy_refusal: ClassVar[str | None] = None  # DenseServer clips and noises
    lora_r: int = Field(16, ge=1, description="LoRA rank r")
    lora_alpha: float = Field(16, gt=0, description="LoRA scale: the adapter adds (alpha / r)·B·A")
    lora_dropout: float = Field(
        0.05, ge=0, lt=1, description="dropout on the LoRA path while training"
    )
    target_modules: list[str] | None = Field(
        None, description="module names to adapt; None = peft's default for the architecture"
    )
    lora_seed: int = Field(0, description="initialises LoRA A (B starts at zero)")


def add_lora(model: nn.Module, opts: FedITOptions) -> nn.Module:
    from peft import LoraConfig, get_peft_model  # heavy: imported where used (fedbits.methods)

    config = LoraConfig(
        r=opts.lora_r,
        lora_alpha=opts.lora_alpha,  # type: ignore[arg-type]  # peft says int; any scale works
        lora_dropout=opts.lora_dropout,
        target_modules=opts.target_modules,
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft probes a transformers attribute that is deprecated; nothing for users to do
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        torch.manual_seed(opts.lora_seed)
        try:
            return get_peft_model(model, config)
        except ValueError as e:  # peft's NoMatchingPeftModuleError: a name that is not there
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                             if isinstance(m, nn.Linear)})
            raise ConfigError(f"method.target_modules={opts.target_modules}: {e} "
                              f"(this model's linear layers: {', '.join(linear)})") from None


register(
    MethodSpec(
        name="fedit",
        options=FedITOptions,
        server=lambda ctx: DenseServer(ctx, partial(add_lora, opts=ctx.options),
                                       copied=copy_none),
        client=lambda ctx: DenseClient(ctx, partial(add_lora, opts=ctx.options),
                                       copied=copy_none),
        summary="federated LoRA (FedIT): adapters both ways, sample-weighted mean",
    )
)
