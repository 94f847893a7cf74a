"""`vbhal estimate`: predict the memory of a training step and plan what fits.

Examples::

    vbhal estimate --config medium --batch-size 16 --seq-length 1024
    vbhal estimate --config medium --batch-size 16 --gpu-mem 8GB --cpu-mem 32GB --disk 100GB
    vbhal estimate --hf path/to/config.json --batch-size 4 --checkpointing --json

With a budget (--gpu-mem, --cpu-mem, --disk or --plan) the planner also recommends the mode, the
largest micro-batch that fits, gradient accumulation for --global-batch and the tier plan.
"""

from __future__ import annotations

import argparse
import json
import sys

from vbhal.errors import EstimateError


def _parser() -> argparse.ArgumentParser:
    from vbhal.estimate import ATTENTIONS, OPTIMIZERS, PRECISIONS

    p = argparse.ArgumentParser(prog="vbhal estimate", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Sizes: 8GB = 8*10^9 bytes, 8GiB or 8G = 8*2^30 bytes.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="a vbhal preset (tiny, small, medium, large) or a path to a HF config.json")
    src.add_argument("--hf", help="path to a Hugging Face config.json (or the folder holding it)")
    p.add_argument("--batch-size", type=int, default=1, help="micro-batch per device (default 1)")
    p.add_argument("--seq-length", type=int, default=None, help="tokens per sample (default: the model's context)")
    p.add_argument("--precision", default="bf16-mixed",
                   help=f"one of {', '.join(PRECISIONS)} (default bf16-mixed; 'bf16' = bf16-mixed)")
    p.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS)
    p.add_argument("--optimizer-impl", default="foreach", choices=("foreach", "fused", "for-loop"))
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing of the repeated blocks")
    p.add_argument("--fp4", nargs="?", const="mxfp4", default=None, choices=("mxfp4", "nvfp4"),
                   help="frozen FP4 linear weights (default format mxfp4)")
    p.add_argument("--attention", default="flash", choices=ATTENTIONS)
    p.add_argument("--offload", action="store_true", help="keep weights/optimizer state in host memory (mode memory)")
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--distributed", default="ddp", choices=("ddp", "fsdp"))
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="what the step runs on (cuda adds cuBLAS workspace and allocator overhead)")
    p.add_argument("--gpu-mem", help="device memory budget, e.g. 8GB")
    p.add_argument("--cpu-mem", help="host memory budget, e.g. 32GB")
    p.add_argument("--disk", help="disk budget for the spill tier, e.g. 100GB")
    p.add_argument("--plan", action="store_true", help="run the planner even without budgets (detects them)")
    p.add_argument("--global-batch", type=int, default=None, help="target global batch for gradient accumulation")
    p.add_argument("--allow-fp4", action="store_true", help="let the planner freeze linear weights in FP4")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from vbhal.estimate import estimate, format_estimate, format_plan, plan

    model = args.hf if args.hf else args.config
    budgets = dict(gpu_mem=args.gpu_mem, cpu_mem=args.cpu_mem, disk=args.disk)
    try:
        est = estimate(model, batch_size=args.batch_size, seq_length=args.seq_length, precision=args.precision,
                       optimizer=args.optimizer, optimizer_impl=args.optimizer_impl,
                       gradient_checkpointing=args.checkpointing, fp4=args.fp4, attention=args.attention,
                       offload=args.offload, world_size=args.world_size, distributed=args.distributed,
                       device=args.device, **budgets)
        p = None
        if args.plan or any(v is not None for v in budgets.values()):
            p = plan(model, seq_length=args.seq_length, global_batch=args.global_batch, precision=args.precision,
                     optimizer=args.optimizer, optimizer_impl=args.optimizer_impl, allow_fp4=args.allow_fp4,
                     world_size=args.world_size, device=args.device, **budgets)
    except EstimateError as e:
        print(f"vbhal estimate: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"estimate": est.to_dict(), "plan": p.to_dict() if p else None}, indent=1, default=str))
    else:
        print(format_estimate(est))
        if p is not None:
            print()
            print(format_plan(p))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
