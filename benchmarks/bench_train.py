"""Training throughput of `vbhal train` against a plain PyTorch loop, same model, same device, one run.

Peers (all train the same `GPT` preset with bf16 autocast on GPU, fp32 on CPU, same micro-batch):

* ``pytorch``        — the baseline a PyTorch user writes: SDPA attention, autocast, torch.compile, fused
                       AdamW, grad clipping, batches already on the device (no data loader: favours it);
* ``vbhal-train``    — `vbhal.train.loop.run` (the CLI's loop: data loader, scheduler, one host sync per
                       step for the NaN guard, logging) with ``--compile``, SDPA attention;
* ``vbhal-train-cudnn`` — the same with ``--sdpa-backend cudnn`` (PyTorch's cuDNN attention tried first);
* ``vbhal-train-fa`` — the same with ``--use-flash-attn`` (vbhal.optimize binds vbhal's attention kernel).

Tokens/s are taken over the steady-state steps (after `--warmup` steps that include compilation); MFU
uses the PaLM FLOP count (`GPT.flops_per_token`) and the device's dense bf16 peak.

    python benchmarks/bench_train.py --preset medium --steps 40        # on the GPU
    python benchmarks/bench_train.py --preset tiny --steps 6 --warmup 2 --no-compile   # CPU smoke run

Writes a table to stdout and JSON to benchmarks/results/train-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vbhal.train.config import TrainConfig  # noqa: E402
from vbhal.train.loop import build_optimizer, peak_flops, run  # noqa: E402
from vbhal.train.model import GPT, GPTConfig  # noqa: E402


def device_slug(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_pytorch(model_cfg: GPTConfig, batch: int, steps: int, warmup: int, device, compile_: bool,
                  precision: str) -> dict:
    torch.manual_seed(0)
    model = GPT(model_cfg).to(device)
    cfg = TrainConfig(learning_rate=6e-4).with_preset_defaults()
    opt = build_optimizer(model, cfg, 6e-4, device)
    fwd = torch.compile(model) if compile_ else model
    gen = torch.Generator(device="cpu").manual_seed(1)
    data = [torch.randint(0, 256, (batch, model_cfg.seq_length + 1), generator=gen).to(device) for _ in range(4)]
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
           else torch.autocast(device.type, enabled=False))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # Timed as a user would run it: no host sync inside the timed window (losses read at the end).
    losses = []
    t_compile = 0.0
    t0 = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t_compile = time.perf_counter() - t0
            t0 = time.perf_counter()
        w = data[i % len(data)]
        x, y = w[:, :-1], w[:, 1:]
        with amp:
            _, loss = fwd(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    _sync(device)
    step_s = (time.perf_counter() - t0) / steps
    losses = [float(v) for v in losses]
    tps = batch * model_cfg.seq_length / step_s
    out = {"tokens_per_s": tps, "step_ms": step_s * 1e3, "first_losses": losses[:3],
           "last_loss": losses[-1], "warmup_s": t_compile}
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def bench_vbhal(preset: str, model_cfg: GPTConfig, batch: int, steps: int, warmup: int, device, compile_: bool,
                precision: str, flash: bool, log_interval: int, sdpa_backend: str = "auto") -> dict:
    out_dir = tempfile.mkdtemp(prefix="bench_train_")
    cfg = TrainConfig(config=preset, hidden_size=model_cfg.hidden_size, num_layers=model_cfg.num_layers,
                      num_heads=model_cfg.num_heads, seq_length=model_cfg.seq_length, batch_size=batch,
                      max_steps=warmup + steps, warmup_steps=min(10, warmup), compile=compile_,
                      mixed_precision=precision, output_dir=out_dir, progress=False, tensorboard=False,
                      log_interval=log_interval, val_batches=0, save_steps=0, use_flash_attn=True if flash else None,
                      device=str(device), max_corpus_bytes=8 << 20, keep_checkpoints=1, sdpa_backend=sdpa_backend,
                      checkpoints=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    res = run(cfg)
    wall = time.perf_counter() - t0
    recs = [json.loads(line) for line in open(Path(out_dir) / "metrics.jsonl")]
    # each record covers the log_interval steps before it: keep windows that start after the warmup
    train = [r for r in recs if r["kind"] == "train" and r["step"] - log_interval >= warmup]
    if not train:
        raise RuntimeError("no steady-state metrics recorded; raise --steps")
    tps = statistics.median(r["tokens_per_s"] for r in train)
    out = {"tokens_per_s": tps, "step_ms": batch * model_cfg.seq_length / tps * 1e3,
           "first_losses": res.losses[:3], "last_loss": res.losses[-1], "wall_s": wall,
           "best_val_loss": res.best_val_loss}
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    import shutil
    shutil.rmtree(out_dir, ignore_errors=True)
    return out


def _check_cudnn_attention(cfg: GPTConfig, batch: int, device) -> None:
    """Raise (so the peer is reported as unavailable) when cuDNN attention cannot run these shapes."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q = torch.randn(batch, cfg.num_heads, cfg.seq_length, cfg.head_dim, device=device, dtype=torch.bfloat16,
                    requires_grad=True)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
    torch.cuda.synchronize(device)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="medium")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--peers", default="pytorch,vbhal-train,vbhal-train-cudnn,vbhal-train-fa")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)

    device = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    from vbhal.train.config import TRAIN_PRESETS
    model_cfg = GPTConfig.from_preset(args.preset)
    batch = args.batch_size or TRAIN_PRESETS[args.preset]["batch_size"]
    precision = "bf16" if device.type == "cuda" else "no"
    compile_ = not args.no_compile
    peak = peak_flops(device)
    with torch.device("meta"):
        flops_tok = GPT(model_cfg).flops_per_token()
    results = {}

    def write_json() -> Path:
        payload = {
            "benchmark": "train", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "preset": args.preset, "model": model_cfg.to_dict(), "batch_size": batch,
            "steps": args.steps, "warmup": args.warmup, "precision": precision, "compile": compile_,
            "flops_per_token": flops_tok, "peak_flops": peak, "results": results,
            "notes": "tokens/s over steady-state steps after warmup (compilation); MFU = flops_per_token * "
                     "tokens/s / peak (PaLM formula, dense bf16 peak); pytorch peer: batches pre-loaded on "
                     "the device, no per-step host sync",
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        p = out_dir / f"train-{device_slug(device)}.json"
        p.write_text(json.dumps(payload, indent=2))
        return p

    for peer in [p.strip() for p in args.peers.split(",") if p.strip()]:
        t0 = time.perf_counter()
        # A fresh Dynamo cache per peer: a compiled GPT graph can be reused across model instances, and the
        # SDPA backend choice is baked in at trace time, so the cuDNN peer must be traced anew.
        torch._dynamo.reset()
        try:
            if peer.endswith("-cudnn") and device.type == "cuda":
                _check_cudnn_attention(model_cfg, batch, device)
            if peer == "pytorch":
                r = bench_pytorch(model_cfg, batch, args.steps, args.warmup, device, compile_, precision)
            elif peer in ("vbhal-train", "vbhal-train-fa", "vbhal-train-cudnn"):
                r = bench_vbhal(args.preset, model_cfg, batch, args.steps, args.warmup, device, compile_, precision,
                                flash=peer.endswith("-fa"), log_interval=10,
                                sdpa_backend="cudnn" if peer.endswith("-cudnn") else "auto")
            else:
                raise ValueError(f"unknown peer {peer}")
            r["mfu"] = flops_tok * r["tokens_per_s"] / peak if peak else None
            r["status"] = "ok"
        except Exception as exc:  # a failing peer is reported, the others still run
            r = {"status": f"error: {type(exc).__name__}: {exc}"[:400]}
            traceback.print_exc()
        r["seconds"] = time.perf_counter() - t0
        results[peer] = r
        print(f"[{peer}] {r.get('status')} in {r['seconds']:.1f}s", flush=True)
        path = write_json()   # after every peer, so a time limit keeps what was measured
        if device.type == "cuda":
            torch.cuda.empty_cache()

    base = results.get("pytorch", {}).get("tokens_per_s")
    print()
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, preset {args.preset} "
          f"({model_cfg.hidden_size}x{model_cfg.num_layers}, seq {model_cfg.seq_length}), micro-batch {batch}, "
          f"precision {precision}, compile {compile_}, {flops_tok / 1e6:.0f} MFLOP/token, "
          f"peak {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s")
    hdr = f"{'peer':<16} {'tokens/s':>12} {'step ms':>9} {'MFU':>7} {'vs pytorch':>10} {'peak GiB':>9} {'loss@1':>8}"
    print(hdr)
    print("-" * len(hdr))
    for peer, r in results.items():
        if r.get("status") != "ok":
            print(f"{peer:<16} {r['status']}")
            continue
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        rel = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        mem = f"{r['peak_mem_gib']:.1f}" if "peak_mem_gib" in r else "-"
        print(f"{peer:<16} {r['tokens_per_s']:>12,.0f} {r['step_ms']:>9.1f} {mfu:>7} {rel:>10} {mem:>9} "
              f"{r['first_losses'][0]:>8.3f}")
    path = write_json()
    print(f"\nwrote {path}")
    return 0 if all(r.get("status") == "ok" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
