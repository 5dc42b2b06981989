"""CG-FedLLM's ``[method]`` options: federated LoRA (fedit's), then the autoencoder,
its training (TGAP) and the checks of what clients claim about it (FAF)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from fedbits.compress.registry import parse_stages
from fedbits.methods.fedit import FedITOptions

LatentFormat = Literal["fp32", "fp16", "bf16", "int8", "int4"]
_FORMATS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


class CGFedLLMOptions(FedITOptions):
    sparsifies_uplink: ClassVar[bool] = True  # the autoencoder is lossy: error feedback applies
    tgap_fraction: float = Field(
        0.3, gt=0, lt=1, description="TGAP: this fraction of run.rounds (at least one round) "
        "runs plain federated LoRA while the server gathers updates to train the autoencoder"
    )
    latent_ratio: float = Field(
        1 / 64, gt=0, le=1, description="latent values per update value, 1/F for a whole F "
        "(the paper's 1/64); chunk must be a multiple of F"
    )
    chunk: int = Field(
        4096, ge=1, le=1 << 20, description="the update is coded in chunks of this many "
        "values, each with a float32 scale (4 bytes per chunk on top of the latent)"
    )
    depth: int = Field(3, ge=1, le=16, description="convolutions in the encoder (and decoder)")
    channels: int = Field(16, ge=1, le=1024, description="hidden channels of the convolutions")
    kernel: int = Field(5, ge=1, le=63, description="taps per convolution (odd)")
    latent_format: LatentFormat = Field(
        "fp32", description="value format of the latent codes (the chunk scales stay float32)"
    )
    ae_epochs: int = Field(20, ge=1, le=10_000, description="passes over the ensemble when "
                           "training the autoencoder")
    ae_lr: float = Field(2e-4, gt=0, description="Adam's rate for the autoencoder (the paper's)")
    ae_batch: int = Field(64, ge=1, le=1 << 16, description="chunks per training step")
    ensemble_chunks: int = Field(
        1024, ge=1, le=1 << 20, description="the temporal ensemble: at most this many chunks "
        "of the decoded updates, sampled uniformly over clients and rounds (a seeded "
        "reservoir, kept in the checkpoint: 4·chunk bytes each)"
    )
    refresh_every: int = Field(
        0, ge=0, description="retrain the autoencoder every this many FAF rounds on the "
        "ensemble with the dense audit uploads added, as a new version every client "
        "downloads again; 0 never"
    )
    audit_fraction: float = Field(
        0.1, ge=0, le=1, description="in FAF rounds, each client is asked with this "
        "probability (seeded) to upload its update dense as well, to check its reconstruction "
        "claims and feed refreshes"
    )
    audit_tolerance: float = Field(
        1e-3, gt=0, le=1, description="a claimed cosine or relative error further than this "
        "from what the server computes from the client's audit upload rejects the client"
    )
    max_holders: int = Field(
        1 << 16, ge=1, le=1 << 24, description="the server remembers this many clients that "
        "hold the current autoencoder; a client it forgot downloads it again (counted)"
    )

    @model_validator(mode="after")
    def _autoencoder_fits(self) -> CGFedLLMOptions:
        fold = self.fold
        if abs(fold * self.latent_ratio - 1) > 1e-9 or fold > 4096:
            raise ValueError(f"method.latent_ratio = {self.latent_ratio!r} is not 1/F for a "
                             "whole F up to 4096 (e.g. 0.015625 = 1/64)")
        if self.chunk % fold:
            raise ValueError(f"method.chunk = {self.chunk} is not a multiple of "
                             f"1/latent_ratio = {fold}")
        if self.kernel % 2 == 0:
            raise ValueError(f"method.kernel = {self.kernel} must be odd")
        stages = parse_stages(self.uplink, "method.uplink")
        if len(stages.bytes) != len(stages.spec):  # a registry role: plugins' stages too
            raise ValueError(f"method.uplink: {self.uplink!r}: cgfedllm sends the dense TGAP "
                             "updates in wire_dtype and the FAF latents in latent_format; "
                             "list only byte stages such as 'zstd'")
        return self

    @property
    def fold(self) -> int:
        return round(1 / self.latent_ratio)

    def autoencoder_entry(self) -> str:
        """The ``autoencoder`` chain entry these options spell."""
        return (f"autoencoder:ratio=1/{self.fold},chunk={self.chunk},depth={self.depth},"
                f"channels={self.channels},kernel={self.kernel},latent={self.latent_format}")

    def tgap_entries(self) -> list[str]:
        """The dense uplink of the TGAP rounds: every value in ``wire_dtype``."""
        return [_FORMATS[self.wire_dtype], *self.uplink]

    def faf_entries(self) -> list[str]:
        """The FAF uplink: the autoencoder, then the byte stages."""
        return [self.autoencoder_entry(), *self.uplink]

    def faf_tail(self) -> list[str]:
        """What follows top-k when it is measured at the latent's bytes: the latent's
        value format and the same byte stages."""
        return [self.latent_format, *self.uplink]

    def tgap_rounds(self, rounds: int) -> int:
        """TGAP's rounds out of ``rounds``: the fraction, rounded, at least one."""
        return max(1, int(self.tgap_fraction * rounds + 0.5))
