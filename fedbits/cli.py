"""The ``fedbits`` command line: run, report, compare, data, model, models, methods, flower.

User errors (a :class:`~fedbits.errors.FedbitsError`) are printed as one clear
message and exit with status 2; a traceback means a bug in fedbits.

A command's result (a table, a path) is printed; a run's progress is logged
(:mod:`fedbits.logs`), plain lines and ``warning: ...`` ones on standard output.
``-q`` keeps only the warnings and errors, ``-v`` adds the debug lines.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from fedbits import __version__
from fedbits.errors import FedbitsError, NoUpdateAccepted
from fedbits.logs import configure

logger = logging.getLogger(__name__)


def _cmd_run(args: argparse.Namespace) -> None:
    from fedbits.resolve import load_config
    from fedbits.runtime import run_experiment

    cfg = load_config(args.config, args.set)
    run_experiment(cfg, resume=args.resume, overwrite=args.overwrite)


def _cmd_report(args: argparse.Namespace) -> None:
    from fedbits.report import write_report

    print(write_report(Path(args.run)))


def _cmd_compare(args: argparse.Namespace) -> None:
    from fedbits.report import compare_runs

    # --out stays a string: a trailing "/" (write into that directory) is lost in a Path
    table, png = compare_runs([Path(r) for r in args.runs], args.out)
    print(table)
    print(f"plot: {png}")


def _cmd_data(args: argparse.Namespace) -> None:
    from fedbits.data.examples import load_examples
    from fedbits.data.partition import describe_partitions, partition, split_eval
    from fedbits.resolve import load_config

    cfg = load_config(args.config, args.set)
    logger.info("loading %s ...", cfg.data.source)
    examples = load_examples(
        cfg.data.source, seed=cfg.run.seed, builtin_per_task=cfg.data.builtin_per_task,
        max_examples=cfg.data.max_examples,
    )
    train, held_out = split_eval(examples, cfg.data, cfg.run.seed)
    logger.info("partitioning %d training examples into %d clients (%s) ...", len(train),
                cfg.data.num_clients, cfg.data.partition)
    parts = partition(train, cfg.data, cfg.run.seed)
    print(f"{cfg.data.source}: {len(examples)} examples, {len(train)} train, "
          f"{len(held_out)} held out")
    print(f"{'client':>6}  {'size':>7}  {'tasks':>5}  largest tasks")
    for row in describe_partitions(parts):
        print(f"{row['client']:>6}  {row['size']:>7}  {row['tasks']:>5}  {row['largest']}")


def _cmd_model(args: argparse.Namespace) -> None:
    from fedbits.config import ModelSection
    from fedbits.models import load_model

    model, tokenizer = load_model(ModelSection(name=args.name, dtype=args.dtype))
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.name}: {type(model).__name__}, {n:,} parameters, vocab {len(tokenizer)}, "
          f"chat template: {'yes' if tokenizer.chat_template else 'no'}")


def _cmd_models(args: argparse.Namespace) -> None:
    from fedbits.models import BUILTIN_MODELS, RANDOM_PRESETS

    for name, builtin in BUILTIN_MODELS.items():
        print(f"{name:18s} {builtin.description}")
    for name, preset in RANDOM_PRESETS.items():
        print(f"{name:18s} {preset.description}: {preset.parameters / 1e6:.0f}M parameters")
        print(f"{'':18s}   {preset.describe()}")
    print("random architectures take the [model] size keys hidden_size, num_layers, "
          "intermediate_size, num_heads, num_kv_heads, vocab_size (docs/models-random.md)")


def _cmd_methods(args: argparse.Namespace) -> None:
    from fedbits.methods import available_methods, describe_options, get_method

    for name in available_methods():
        spec = get_method(name)
        print(f"{name:12s} {spec.summary}")
        if args.verbose:
            for line in describe_options(spec.options):
                print(f"    {line}")
            for key, value in spec.client_defaults.items():
                print(f"    [clients] {key} = {value!r} (this method's default)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedbits", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"fedbits {__version__}")
    p.add_argument("--debug", action="store_true",
                   help="show the full traceback of an error instead of one line")
    loudness = p.add_mutually_exclusive_group()
    # dests differ from `methods -v`: a subcommand's default would overwrite a shared one
    loudness.add_argument("-v", "--verbose", dest="log_verbose", action="store_true",
                          help="also log debug lines (per-client bytes and timings)")
    loudness.add_argument("-q", "--quiet", dest="log_quiet", action="store_true",
                          help="log only warnings and errors (no progress lines or bars)")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("config", help="TOML run configuration (see examples/)")
        sp.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (repeatable)")

    run = sub.add_parser("run", help="run a federated fine-tuning experiment")
    with_config(run)
    run.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    run.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    run.set_defaults(func=_cmd_run)

    rep = sub.add_parser("report", help="write report.md and plots for a run directory")
    rep.add_argument("run")
    rep.set_defaults(func=_cmd_report)

    cmp_ = sub.add_parser("compare", help="compare runs: table + quality-vs-bytes plot")
    cmp_.add_argument("runs", nargs="+")
    cmp_.add_argument("--out", metavar="FILE|DIR/",
                      help="plot file (.png, .svg or .pdf), or a directory to hold compare.png "
                      "(default: compare.png in the directory holding the runs)")
    cmp_.set_defaults(func=_cmd_compare)

    data = sub.add_parser("data", help="load a config's data and show its partitions")
    with_config(data)
    data.set_defaults(func=_cmd_data)

    model = sub.add_parser("model", help="load a model (caches the built-in one) and describe it")
    model.add_argument("name")
    from fedbits.config import DTYPES

    model.add_argument("--dtype", default="float32", choices=list(DTYPES))
    model.set_defaults(func=_cmd_model)

    models = sub.add_parser("models", help="list the built-in models and random architectures")
    models.set_defaults(func=_cmd_models)

    methods = sub.add_parser("methods", help="list the registered methods")
    methods.add_argument("-v", "--verbose", action="store_true", help="show each method's options")
    methods.set_defaults(func=_cmd_methods)

    from fedbits.runtime.flower.cli import add_flower_parser

    add_flower_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    configure(logging.DEBUG if args.log_verbose else
              logging.WARNING if args.log_quiet else logging.INFO)
    if not sys.stderr.isatty():  # library progress bars only clutter logs and CI output
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")  # flwr-datasets' bars take no switch
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        args.func(args)
    except BrokenPipeError:  # `fedbits data … | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # for the exit flush
        return 1
    except NoUpdateAccepted as e:  # the run itself failed, not its input
        if args.debug:
            raise
        print(f"fedbits: error: {e}", file=sys.stderr)
        return 1
    except FedbitsError as e:
        if args.debug:
            raise
        print(f"fedbits: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a permission: the user's to fix, named in one line
        if args.debug:
            raise
        print(f"fedbits: error: {e} (--debug shows where)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fedbits: interrupted (completed rounds are checkpointed; use --resume)",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
