"""Training throughput of `vbhal train` against a plain PyTorch loop, same model, same device, one run.

Peers are given as ``--peers`` specs, ``kind[:key=value...]`` separated by commas; kind is

* ``pytorch`` -- the baseline a PyTorch user writes: SDPA attention (torch's default backend), bf16
  autocast, ``torch.compile(model)`` (default mode), fused AdamW with decay groups, clip_grad_norm_,
  batches already on the device (no data loader: favours it), no host sync inside the timed window;
* ``vbhal``   -- `vbhal.train.loop.run` (the CLI's loop: data loader, warmup+cosine schedule, on-device
  NaN guard, logging, clipping folded into the fused AdamW) with ``--compile``.

Keys: ``heads``, ``seq``, ``batch`` (model shape and micro-batch; default the preset's), ``compile``
(a torch.compile mode, or ``off``), and for vbhal ``sdpa`` (--sdpa-backend), ``fa=1`` (--use-flash-attn:
vbhal's attention kernel). Each vbhal peer is compared with the pytorch peer of the same heads/seq/batch.

Tokens/s are taken over the steady-state steps (after `--warmup` steps that include compilation); MFU
uses the PaLM FLOP count (`GPT.flops_per_token`, which depends on seq) and the device's dense bf16 peak.

    python benchmarks/bench_train.py --preset medium --peers pytorch,vbhal,vbhal:compile=max-autotune-no-cudagraphs
    python benchmarks/bench_train.py --preset tiny --steps 6 --warmup 2 --no-compile   # CPU smoke run

Writes a table to stdout, and JSON <--out>/train-<device>.json and the table <--out>/train-table.txt after
every peer (so a run cut short keeps what it measured).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vbhal.train.config import TRAIN_PRESETS, TrainConfig  # noqa: E402
from vbhal.train.loop import build_optimizer, peak_flops, run  # noqa: E402
from vbhal.train.model import GPT, GPTConfig  # noqa: E402

_KINDS = ("pytorch", "vbhal")
# rep=N only labels a repeat of the same peer (to see run-to-run noise in one run).
_KEYS = {"heads": int, "seq": int, "batch": int, "compile": str, "sdpa": str, "fa": int, "rep": int}
_VBHAL_ONLY = ("sdpa", "fa")


@dataclasses.dataclass
class Peer:
    spec: str
    kind: str
    heads: int
    seq: int
    batch: int
    compile: str          # "default", a torch.compile mode, or "off"
    sdpa: str = "auto"
    fa: int = 0
    rep: int = 1

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.heads, self.seq, self.batch)


def parse_peer(spec: str, model_cfg: GPTConfig, batch: int, compile_default: str) -> Peer:
    """'vbhal:heads=6:compile=max-autotune-no-cudagraphs' -> Peer (ValueError names a bad key or value)."""
    kind, *pairs = spec.strip().split(":")
    if kind not in _KINDS:
        raise ValueError(f"peer {spec!r}: kind must be one of {_KINDS}")
    p = Peer(spec.strip(), kind, model_cfg.num_heads, model_cfg.seq_length, batch, compile_default)
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or key not in _KEYS:
            raise ValueError(f"peer {spec!r}: {pair!r} is not key=value with key in {sorted(_KEYS)}")
        if kind == "pytorch" and key in _VBHAL_ONLY:
            raise ValueError(f"peer {spec!r}: {key} is a vbhal option (the baseline stays plain)")
        setattr(p, key, _KEYS[key](value))
    TrainConfig(compile=p.compile != "off", compile_mode="default" if p.compile == "off" else p.compile,
                sdpa_backend=p.sdpa).check()   # same validation as the CLI
    dataclasses.replace(model_cfg, num_heads=p.heads, seq_length=p.seq).validate()
    return p


def device_slug(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _compiled(model, mode: str):
    if mode == "off":
        return model
    return torch.compile(model) if mode == "default" else torch.compile(model, mode=mode)


def bench_pytorch(model_cfg: GPTConfig, peer: Peer, steps: int, warmup: int, device, precision: str) -> dict:
    torch.manual_seed(0)
    model = GPT(model_cfg).to(device)
    cfg = TrainConfig(learning_rate=6e-4).with_preset_defaults()
    opt = build_optimizer(model, cfg, 6e-4, device)
    fwd = _compiled(model, peer.compile)
    gen = torch.Generator(device="cpu").manual_seed(1)
    data = [torch.randint(0, 256, (peer.batch, model_cfg.seq_length + 1), generator=gen).to(device)
            for _ in range(4)]
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
    tps = peer.batch * model_cfg.seq_length / step_s
    out = {"tokens_per_s": tps, "step_ms": step_s * 1e3, "first_losses": losses[:3],
           "last_loss": losses[-1], "warmup_s": t_compile}
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def bench_vbhal(preset: str, model_cfg: GPTConfig, peer: Peer, steps: int, warmup: int, device, precision: str,
                log_interval: int) -> dict:
    out_dir = tempfile.mkdtemp(prefix="bench_train_")
    cfg = TrainConfig(config=preset, hidden_size=model_cfg.hidden_size, num_layers=model_cfg.num_layers,
                      num_heads=model_cfg.num_heads, seq_length=model_cfg.seq_length, batch_size=peer.batch,
                      max_steps=warmup + steps, warmup_steps=min(10, warmup), compile=peer.compile != "off",
                      compile_mode="default" if peer.compile == "off" else peer.compile,
                      mixed_precision=precision, output_dir=out_dir, progress=False, tensorboard=False,
                      log_interval=log_interval, val_batches=0, save_steps=0,
                      use_flash_attn=True if peer.fa else None, device=str(device), max_corpus_bytes=8 << 20,
                      keep_checkpoints=1, sdpa_backend=peer.sdpa, checkpoints=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    try:
        res = run(cfg)
        wall = time.perf_counter() - t0
        recs = [json.loads(line) for line in open(Path(out_dir) / "metrics.jsonl")]
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    # each record covers the log_interval steps before it: keep windows that start after the warmup
    train = [r for r in recs if r["kind"] == "train" and r["step"] - log_interval >= warmup]
    if not train:
        raise RuntimeError("no steady-state metrics recorded; raise --steps")
    tps = statistics.median(r["tokens_per_s"] for r in train)
    out = {"tokens_per_s": tps, "step_ms": peer.batch * model_cfg.seq_length / tps * 1e3,
           "first_losses": res.losses[:3], "last_loss": res.losses[-1], "wall_s": wall}
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def _check_cudnn_attention(cfg: GPTConfig, batch: int, device) -> None:
    """Raise (so the peer is reported as unavailable) when cuDNN attention cannot run these shapes."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q = torch.randn(batch, cfg.num_heads, cfg.seq_length, cfg.head_dim, device=device, dtype=torch.bfloat16,
                    requires_grad=True)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
    torch.cuda.synchronize(device)


def format_table(payload: dict) -> str:
    """The compact table of a results JSON (also used by gpu/train.sh on a cut-short run)."""
    res = payload["results"]
    # The baseline of a shape is the mean over its pytorch repeats (rep=N); the spread is printed too.
    reps: dict = {}
    for r in res.values():
        if r.get("kind") == "pytorch" and r.get("status") == "ok":
            reps.setdefault(tuple(r["shape"]), []).append(r["tokens_per_s"])
    base = {k: sum(v) / len(v) for k, v in reps.items()}
    lines = [f"{payload['device']}, preset {payload['preset']} (hidden {payload['model']['hidden_size']} x "
             f"{payload['model']['num_layers']} layers), {payload['precision']}, torch {payload['torch']}, "
             f"peak {payload['peak_flops'] / 1e12 if payload['peak_flops'] else float('nan'):.0f} TFLOP/s"]
    hdr = (f"{'peer':<44} {'hd':>4} {'seq':>5} {'mb':>3} {'tokens/s':>10} {'step ms':>8} {'MFU':>6} "
           f"{'vs pt':>6} {'GiB':>5} {'sec':>5}")
    lines += [hdr, "-" * len(hdr)]
    for name, r in res.items():
        if r.get("status") != "ok":
            lines.append(f"{name:<44} {r.get('status')}"[:160])
            continue
        h, s, b = r["shape"]
        hd = payload["model"]["hidden_size"] // h
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        b0 = base.get(tuple(r["shape"]))
        rel = f"{r['tokens_per_s'] / b0:.3f}" if b0 else "-"
        mem = f"{r['peak_mem_gib']:.1f}" if "peak_mem_gib" in r else "-"
        lines.append(f"{name:<44} {hd:>4} {s:>5} {b:>3} {r['tokens_per_s']:>10,.0f} {r['step_ms']:>8.1f} "
                     f"{mfu:>6} {rel:>6} {mem:>5} {r['seconds']:>5.0f}")
    for k, v in reps.items():
        if len(v) > 1:
            lines.append(f"pytorch baseline at hd/seq/mb {k}: {len(v)} runs, spread {(max(v) - min(v)) / base[k]:.1%}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="medium")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--peers", default="pytorch,vbhal", help="comma-separated peer specs (see the docstring)")
    ap.add_argument("--no-compile", action="store_true", help="default compile=off for every peer")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)

    device = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    base_cfg = GPTConfig.from_preset(args.preset)
    batch = args.batch_size or TRAIN_PRESETS[args.preset]["batch_size"]
    precision = "bf16" if device.type == "cuda" else "no"
    peers = [parse_peer(s, base_cfg, batch, "off" if args.no_compile else "default")
             for s in args.peers.split(",") if s.strip()]
    names = [p.spec for p in peers]
    if len(set(names)) != len(names):
        ap.error(f"--peers lists a peer twice: {names}")
    peak = peak_flops(device)
    results: dict = {}
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

    def payload() -> dict:
        return {
            "benchmark": "train", "device": dev_name, "torch": torch.__version__, "preset": args.preset,
            "model": base_cfg.to_dict(), "batch_size": batch, "steps": args.steps, "warmup": args.warmup,
            "precision": precision, "peak_flops": peak, "results": results,
            "notes": "tokens/s over steady-state steps after warmup (compilation); MFU = flops_per_token(seq) * "
                     "tokens/s / peak (PaLM formula, dense bf16 peak); pytorch peer: batches pre-loaded on "
                     "the device, no per-step host sync; shape = [heads, seq, micro-batch]",
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def write_json() -> Path:
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"train-{device_slug(device)}.json"
        data = payload()
        path.write_text(json.dumps(data, indent=2))
        (out_dir / "train-table.txt").write_text(format_table(data) + "\n")
        return path

    for peer in peers:
        t0 = time.perf_counter()
        model_cfg = dataclasses.replace(base_cfg, num_heads=peer.heads, seq_length=peer.seq)
        with torch.device("meta"):
            flops_tok = GPT(model_cfg).flops_per_token()
        # A fresh Dynamo cache per peer: a compiled GPT graph can be reused across model instances, and the
        # SDPA backend choice is baked in at trace time. (Inductor's on-disk caches stay: identical graphs
        # of a later peer compile in seconds, which is what a user's second run sees too.)
        torch._dynamo.reset()
        try:
            if peer.sdpa == "cudnn" and device.type == "cuda":
                _check_cudnn_attention(model_cfg, peer.batch, device)
            if peer.kind == "pytorch":
                r = bench_pytorch(model_cfg, peer, args.steps, args.warmup, device, precision)
            else:
                r = bench_vbhal(args.preset, model_cfg, peer, args.steps, args.warmup, device, precision,
                                log_interval=10)
            r["mfu"] = flops_tok * r["tokens_per_s"] / peak if peak else None
            r["status"] = "ok"
        except Exception as exc:  # a failing peer is reported, the others still run
            r = {"status": f"error: {type(exc).__name__}: {exc}"[:400]}
            traceback.print_exc()
        r.update(kind=peer.kind, shape=list(peer.shape), compile=peer.compile, flops_per_token=flops_tok,
                 seconds=time.perf_counter() - t0)
        results[peer.spec] = r
        print(f"[{peer.spec}] {r.get('status')} in {r['seconds']:.1f}s"
              + (f": {r['tokens_per_s']:,.0f} tok/s" if r.get("status") == "ok" else ""), flush=True)
        path = write_json()   # after every peer, so a time limit keeps what was measured
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print()
    print(format_table(payload()))
    path = write_json()
    print(f"\nwrote {path}")
    return 0 if all(r.get("status") == "ok" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
