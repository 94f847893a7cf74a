"""``vbhal train`` / ``python -m vbhal.train``: train the reference GPT on local text.

Examples::

    vbhal train --config tiny --epochs 5                 # stdlib sources, 2-core CPU, < 60 s
    vbhal train --config medium --compile --max-steps 2000 --data corpus/
    vbhal train --config small --resume output           # continue the newest good checkpoint
    vbhal train --config small --nproc 2                 # DDP via torchrun (gloo on CPU, NCCL on GPU)
    torchrun --nproc_per_node=8 -m vbhal.train --config large --strategy fsdp

Exit codes: 0 done (or stopped by --stop-after-steps), 1 unexpected error, 2 bad input (message says
what to change), 3 NaN loss (last good state saved), 130 / 143 stopped by SIGINT / SIGTERM (saved).
"""

from __future__ import annotations

import argparse
import sys

from vbhal.train._errors import VbhalError
from vbhal.train.config import TRAIN_PRESETS, TrainConfig, load_config_file
from vbhal.train.model import PRESETS

__all__ = ["main", "build_parser", "config_from_args"]

_EPILOG = """An epoch is one pass over the training split's non-overlapping windows of --seq-length tokens.
The default corpus is this Python's standard library sources (*.py), byte-level tokens, capped per
preset (tiny: 192 KiB). Outputs in --output-dir: checkpoints/, best_model.pt, metrics.jsonl,
loss_curve.png, training_<time>.log, tensorboard/ (when tensorboard is installed)."""


def _bool_flag(p, name, help):
    p.add_argument(name, action=argparse.BooleanOptionalAction, default=None, help=help)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vbhal train", description="Train the reference GPT with vbhal.",
                                epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--config", choices=list(PRESETS), default=None,
                   help="model + training preset (default tiny): " + ", ".join(
                       f"{k}={v.hidden_size}x{v.num_layers}" for k, v in PRESETS.items()))
    g.add_argument("--config-file", default=None, help="YAML or JSON file of settings; flags override it")
    for name, typ in (("--vocab-size", int), ("--hidden-size", int), ("--num-layers", int),
                      ("--num-heads", int), ("--num-kv-heads", int), ("--seq-length", int),
                      ("--mlp-ratio", float), ("--dropout", float)):
        g.add_argument(name, type=typ, default=None)
    _bool_flag(g, "--tie-embeddings", "tie lm_head to the token embedding (default on)")
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", default=None,
                   help="text files/folders, .jsonl with a 'text' field, or one uint16 .bin (default: stdlib)")
    g.add_argument("--max-corpus-bytes", type=int, default=None, help="cap on the text read (whole files)")
    g.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (default: sized to the machine)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=None, help="micro-batch per rank")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps (instead of --epochs)")
    g.add_argument("--learning-rate", "--lr", type=float, default=None, dest="learning_rate")
    g.add_argument("--min-lr-ratio", type=float, default=None)
    g.add_argument("--warmup-steps", type=int, default=None)
    g.add_argument("--lr-schedule", choices=("cosine", "linear", "constant"), default=None)
    g.add_argument("--weight-decay", type=float, default=None)
    g.add_argument("--gradient-accumulation-steps", type=int, default=None)
    g.add_argument("--max-grad-norm", type=float, default=None, help="0 disables clipping")
    g.add_argument("--mixed-precision", choices=("auto", "bf16", "fp16", "no"), default=None)
    _bool_flag(g, "--gradient-checkpointing", "recompute block activations in backward")
    _bool_flag(g, "--compile", "torch.compile the model")
    g.add_argument("--compile-mode", default=None,
                   choices=("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead"),
                   help="torch.compile mode with --compile (max-autotune*: Triton GEMM autotuning and "
                        "epilogue fusion, minutes more compile time)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--sdpa-backend", choices=("auto", "cudnn", "flash", "efficient", "math"), default=None,
                   help="PyTorch SDPA backend to try first on CUDA (default: torch's own order)")
    g = p.add_argument_group("vbhal features (through vbhal.optimize)")
    _bool_flag(g, "--use-fp4", "FP4 weights (frozen) for the Linear layers")
    g.add_argument("--fp4-format", choices=("mxfp4", "nvfp4"), default=None)
    _bool_flag(g, "--use-flash-attn", "vbhal's fused attention kernel")
    g.add_argument("--mode", choices=("full", "speed", "memory", "balanced"), default=None,
                   help="vbhal.optimize mode. memory: the offload engine streams the blocks through the "
                        "device and runs AdamW on the host (one group: weight decay on every parameter), "
                        "with this run's LR schedule, accumulation, clipping and checkpoints; not with "
                        "--nproc/torchrun (DDP/FSDP), --compile, --mixed-precision fp16 or --use-fp4")
    g.add_argument("--vgpu-auto", action="store_true", default=None,
                   help="let vbhal.estimate plan mode, micro-batch and accumulation (offload included, in a "
                        "single process)")
    g.add_argument("--estimate-resources", action="store_true", default=None,
                   help="print the memory estimate for this run and exit")
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--output-dir", default=None)
    g.add_argument("--log-interval", type=int, default=None)
    g.add_argument("--val-interval", type=int, default=None, help="steps between validations (default: each epoch)")
    g.add_argument("--val-batches", type=int, default=None)
    g.add_argument("--save-steps", type=int, default=None, help="steps between checkpoints (default: each epoch)")
    g.add_argument("--keep-checkpoints", type=int, default=None)
    _bool_flag(g, "--checkpoints", "write training checkpoints (default on; --no-checkpoints for benchmarks)")
    g.add_argument("--resume", default=None, metavar="PATH", help="checkpoint file, or an --output-dir to continue")
    g.add_argument("--stop-after-steps", type=int, default=None,
                   help="save and stop after this many steps of this job (the schedule keeps its length)")
    g.add_argument("--overwrite", action="store_true", help="delete checkpoints an earlier run left in --output-dir")
    _bool_flag(g, "--progress", "tqdm progress bar")
    _bool_flag(g, "--tensorboard", "TensorBoard logs when tensorboard is installed")
    g = p.add_argument_group("devices and distribution")
    g.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:1")
    g.add_argument("--nproc", type=int, default=None, help="launch N processes with torchrun")
    g.add_argument("--strategy", choices=("ddp", "fsdp"), default=None)
    g.add_argument("--lr-scaling", choices=("linear", "sqrt", "none"), default=None)
    return p


_NOT_CONFIG = {"config_file", "overwrite"}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults < --config-file < flags (only flags actually given override)."""
    values: dict = {}
    if args.config_file:
        values.update(load_config_file(args.config_file))
    given = {k: v for k, v in vars(args).items() if v is not None and k not in _NOT_CONFIG}
    # A flag given for the epoch budget replaces the file's other one (they are alternatives).
    if "epochs" in given and "max_steps" not in given:
        values.pop("max_steps", None)
    if "max_steps" in given and "epochs" not in given:
        values.pop("epochs", None)
    values.update(given)
    extra = values.pop("extra", {})
    cfg = TrainConfig(**values)
    cfg.extra = extra
    if cfg.config not in PRESETS:
        from vbhal.train._errors import ConfigError
        raise ConfigError(f"unknown preset {cfg.config!r} (from the config file); choose one of "
                          f"{', '.join(TRAIN_PRESETS)}.")
    return cfg


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        if cfg.nproc is not None and cfg.nproc > 1:
            import os
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                from vbhal.train._errors import ConfigError
                raise ConfigError("--nproc is for launching; this process already runs under torchrun.")
            checked = cfg.with_preset_defaults()
            checked.check()   # bad input fails here, not N times in the ranks
            from vbhal.train.data import load_corpus
            load_corpus(checked.data, max_bytes=checked.max_corpus_bytes)   # checks --data, warms the cache
            from vbhal.train.distributed import launch_torchrun
            child = []
            skip = False
            for i, a in enumerate(argv):
                if skip:
                    skip = False
                    continue
                if a == "--nproc":
                    skip = True
                    continue
                if a.startswith("--nproc="):
                    continue
                child.append(a)
            return launch_torchrun(cfg.nproc, child)
        from vbhal.train.loop import run
        result = run(cfg, overwrite=args.overwrite)
        return result.exit_code
    except VbhalError as exc:
        print(f"vbhal train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vbhal train: aborted (no checkpoint written for the step in flight).", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
