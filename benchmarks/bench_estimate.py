"""Validation of `vbhal.estimate`: predicted vs measured peak memory of real training steps.

For each configuration (vbhal presets and Hugging Face GPT-2 / Llama configs built from config
objects -- nothing is downloaded -- across batch, sequence, precision, checkpointing, FP4,
attention kernel and optimizer) this script

1. predicts the step's peak with `vbhal.estimate` (a meta-tensor trace, no GPU memory);
2. runs real training steps on the device and reads ``torch.cuda.max_memory_allocated()`` and
   ``max_memory_reserved()``;
3. puts the peers beside it on the same model: accelerate's ``estimate-memory`` ("Training using
   Adam": `accelerate.commands.estimate.estimate_training_usage`, which takes the *max* of
   model/gradients/optimizer/step) when accelerate is installed, and DeepSpeed's ZeRO-2 / ZeRO-3
   model-state estimators (``estimate_zero{2,3}_model_states_mem_needs``; DeepSpeed is not
   installed on the GPU machine, so their published formulas are re-implemented here and labelled
   so). Both peers cover model states only -- no activations -- which the table shows.

Then the planner check: for a few configurations and memory caps (8 GB among them, applied with
``torch.cuda.set_per_process_memory_fraction``) the planner's batch size must train without OOM and
batch+1 must not fit.

Prints tables and writes JSON to benchmarks/results/estimate-<device>.json (or --out).
Usage: python benchmarks/bench_estimate.py [--quick] [--out FILE] [--budget SECONDS]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vbhal.estimate import estimate, plan  # noqa: E402

GB = 10**9


# ----------------------------------------------------------------------------------------------- models

def gpt2_config(**kw):
    from transformers import GPT2Config

    base = dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    base.update(kw)
    return GPT2Config(**base)


def llama_config(**kw):
    from transformers import LlamaConfig

    base = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
    base.update(kw)
    return LlamaConfig(**base)


def vbhal_config(preset, **kw):
    from vbhal.train.model import GPTConfig

    return GPTConfig.from_preset(preset, **kw)


def what_to_estimate(c):
    kind, cfg = c["model"]
    return cfg  # a GPTConfig or a transformers PretrainedConfig: estimate builds it on meta itself


def build_real(c, device):
    """The same model, really allocated on the device."""
    kind, cfg = c["model"]
    if kind == "vbhal":
        from vbhal.train.model import GPT

        with torch.device(device):
            model = GPT(cfg)
    else:
        from transformers import AutoModelForCausalLM

        impl = "eager" if c.get("attention") == "eager" else "sdpa"
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation=impl)
    if c["precision"] == "bf16-true":
        model = model.to(torch.bfloat16)
    if c.get("ckpt"):
        if kind == "hf":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable()
    if c.get("fp4"):
        swap_fp4_emulated(model, c["fp4"])
    model.train()
    return model


# ----------------------------------------------------------------------------------------------- FP4 (emulated)

_E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
_BLOCK = {"mxfp4": 32, "nvfp4": 16}


def _dequant(codes, scales, fmt, k, dtype, out=None):
    """Row-chunked dequantization into one (N, K) buffer: the only large temporary is the output."""
    n = codes.shape[0]
    block = _BLOCK[fmt]
    lut = torch.tensor(_E2M1, device=codes.device, dtype=torch.float32)
    w = torch.empty(n, k, dtype=dtype, device=codes.device) if out is None else out
    step = 256
    for r in range(0, n, step):
        c = codes[r:r + step]
        vals = torch.stack([lut[(c & 0xF).long()], lut[(c >> 4).long()]], dim=-1).reshape(c.shape[0], -1)
        s = torch.exp2(scales[r:r + step].float() - 127.0) if fmt == "mxfp4" else scales[r:r + step].float()
        vals = (vals.view(c.shape[0], -1, block) * s.unsqueeze(-1)).reshape(c.shape[0], -1)
        w[r:r + step] = vals[:, :k].to(dtype)
    return w


class _EmuFP4Fn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, codes, scales, fmt, k):
        ctx.save_for_backward(x, codes, scales)
        ctx.fmt, ctx.k, ctx.has_bias = fmt, k, bias is not None
        w = _dequant(codes, scales, fmt, k, x.dtype)
        out = torch.nn.functional.linear(x, w, bias)
        del w
        return out

    @staticmethod
    def backward(ctx, g):
        x, codes, scales = ctx.saved_tensors
        w = _dequant(codes, scales, ctx.fmt, ctx.k, g.dtype)
        gx = g @ w
        del w
        gb = g.sum(tuple(range(g.dim() - 1))) if ctx.has_bias else None
        return gx, gb, None, None, None, None


class EmuFP4Linear(nn.Module):
    """FP4 weights stored packed (uint8 codes + 8-bit block scales), frozen; the bias trains.

    Memory stand-in for vbhal's FP4Linear reference path (dequantize, then matmul)."""

    def __init__(self, lin: nn.Linear, fmt: str):
        super().__init__()
        n, k = lin.weight.shape
        block = _BLOCK[fmt]
        kp = (k + block - 1) // block * block
        dev = lin.weight.device
        self.register_buffer("codes", torch.randint(0, 255, (n, kp // 2), dtype=torch.uint8, device=dev))
        self.register_buffer("scales", torch.full((n, kp // block), 120, dtype=torch.uint8, device=dev))
        self.bias = lin.bias
        self.fmt, self.k, self.n = fmt, k, n

    def forward(self, x):
        if torch.is_autocast_enabled("cuda") and x.is_cuda:
            x = x.to(torch.get_autocast_dtype("cuda"))
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return _EmuFP4Fn.apply(x, bias, self.codes, self.scales, self.fmt, self.k)


def swap_fp4_emulated(model, fmt):
    from vbhal.estimate import _fp4_linears

    for name, lin in _fp4_linears(model, fmt):
        if type(lin) is not nn.Linear:
            continue  # (transformers Conv1D: not emulated here)
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], EmuFP4Linear(lin, fmt))


# ----------------------------------------------------------------------------------------------- training steps

def make_optimizer(c, model):
    params = [p for p in model.parameters() if p.requires_grad]
    opt, impl = c.get("optimizer", "adamw"), c.get("impl", "foreach")
    kw = dict(foreach=impl == "foreach") if impl != "fused" else dict(fused=True)
    if opt == "adamw":
        return torch.optim.AdamW(params, lr=1e-4, **kw)
    if opt == "sgd":
        return torch.optim.SGD(params, lr=1e-2, **kw)
    if opt == "sgd-momentum":
        return torch.optim.SGD(params, lr=1e-2, momentum=0.9, **kw)
    raise ValueError(opt)


def train_steps(c, model, opt, device, steps=3):
    """Real steps, as the estimator models them: forward+loss under autocast, backward, step,
    zero_grad(set_to_none=True); nothing of a step is kept into the next."""
    import contextlib

    kind, cfg = c["model"]
    vocab = cfg.vocab_size
    b, s = c["batch"], c["seq"]
    ids = torch.randint(0, vocab, (b, s), device=device)
    labels = torch.randint(0, vocab, (b, s), device=device)
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if c["precision"] == "bf16-mixed"
           else contextlib.nullcontext())
    if c.get("attention") == "math":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kctx = lambda: sdpa_kernel(SDPBackend.MATH)  # noqa: E731
    else:
        kctx = contextlib.nullcontext
    losses = []
    for _ in range(steps):
        with kctx():
            with amp:
                if kind == "hf":
                    loss = model(input_ids=ids, labels=labels, use_cache=False).loss
                else:
                    loss = model(ids, labels)[1]
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        del loss
    return losses


def clean(device):
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear:
        clear()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)


def measure(c, device, steps=2):
    clean(device)
    base_a, base_r = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
    model = build_real(c, device)
    opt = make_optimizer(c, model)
    after_model = torch.cuda.memory_allocated(device) - base_a
    t = time.perf_counter()
    losses = train_steps(c, model, opt, device, steps)
    torch.cuda.synchronize(device)
    dt = (time.perf_counter() - t) / steps
    out = dict(peak_allocated=torch.cuda.max_memory_allocated(device) - base_a,
               peak_reserved=torch.cuda.max_memory_reserved(device) - base_r,
               after_model=after_model, step_seconds=dt, loss=losses[-1])
    del model, opt
    clean(device)
    return out


def probe_workspace(device):
    """Bytes the framework allocates beside the tensors of a matmul forward+backward (cuBLAS
    workspaces of the forward and the autograd thread) -- the estimator's `workspace`."""
    clean(device)
    a = torch.randn(512, 512, device=device, requires_grad=True)
    b = torch.randn(512, 512, device=device, requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        c = a @ b
    c.float().sum().backward()
    torch.cuda.synchronize(device)
    live = sum(t.untyped_storage().nbytes() for t in (a, b, c, a.grad, b.grad))
    extra = torch.cuda.memory_allocated(device) - live
    del a, b, c
    clean(device)
    return extra


def fits_real(c, device, cap_bytes, steps=2, info=None):
    """True when `steps` training steps run under a per-process cap of `cap_bytes`; `info` (a dict)
    receives what was live before, the peaks under the cap, and the OOM message."""
    clean(device)
    info = {} if info is None else info
    info["before_allocated"] = torch.cuda.memory_allocated(device)
    info["before_reserved"] = torch.cuda.memory_reserved(device)
    total = torch.cuda.get_device_properties(device).total_memory
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total), index)
    model = opt = None
    try:
        model = build_real(c, device)
        opt = make_optimizer(c, model)
        train_steps(c, model, opt, device, steps)
        ok = True
    except torch.OutOfMemoryError as e:
        ok = False
        info["oom"] = str(e).split("See documentation")[0][:300]
    finally:
        info["peak_allocated"] = torch.cuda.max_memory_allocated(device)
        info["peak_reserved"] = torch.cuda.max_memory_reserved(device)
        del model, opt
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0, index)
    clean(device)
    return ok


# ----------------------------------------------------------------------------------------------- peers

def peer_accelerate(model_meta, precision):
    """accelerate's estimate-memory "Training using Adam" on the same (meta) model, or None."""
    try:
        from accelerate.commands.estimate import calculate_maximum_sizes, estimate_training_usage
    except ImportError:
        return None
    total_size, _largest = calculate_maximum_sizes(model_meta)
    mp = {"fp32": "float32", "bf16-mixed": "bfloat16", "bf16-true": "bfloat16"}[precision]
    usage = estimate_training_usage(total_size, mp)
    return max(usage.values())  # what the CLI prints: the max over model/optimizer/gradients/step


def peer_deepspeed(model_meta):
    """DeepSpeed's model-state estimators (formulas re-implemented from
    deepspeed/runtime/zero/stage_1_and_2.py and stage3.py; deepspeed is not installed there),
    1 GPU, no offload: ZeRO-2 gpu = 4P + 16P/gpus; ZeRO-3 gpu = 4*largest_layer + 18P/gpus."""
    seen, total = set(), 0
    largest = 0
    for m in model_meta.modules():
        n = sum(p.numel() for p in m.parameters(recurse=False))
        largest = max(largest, n)
    for p in model_meta.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    gpus = 1
    zero2 = 4 * total + int(16 * total / gpus)
    zero3 = 4 * largest + int(18 * total / gpus)
    return zero2, zero3


def meta_model(c):
    """The whole model on the meta device, for the peers (which count its parameters)."""
    kind, cfg = c["model"]
    with torch.device("meta"):
        if kind == "vbhal":
            from vbhal.train.model import GPT

            return GPT(cfg)
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_config(cfg)


# ----------------------------------------------------------------------------------------------- configurations

def configs(quick=False):
    v_med = ("vbhal", None)
    cs = [
        dict(name="vbhal-medium b8 s1024 bf16", model=("vbhal", "medium"), batch=8, seq=1024, precision="bf16-mixed"),
        dict(name="vbhal-medium b8 s1024 bf16 ckpt", model=("vbhal", "medium"), batch=8, seq=1024,
             precision="bf16-mixed", ckpt=True),
        dict(name="vbhal-medium b4 s1024 fp32", model=("vbhal", "medium"), batch=4, seq=1024, precision="fp32"),
        dict(name="vbhal-medium b8 s1024 bf16 math-attn", model=("vbhal", "medium"), batch=8, seq=1024,
             precision="bf16-mixed", attention="math"),
        dict(name="vbhal-large b4 s1024 bf16 fused", model=("vbhal", "large"), batch=4, seq=1024,
             precision="bf16-mixed", impl="fused"),
        dict(name="vbhal-large b8 s1024 bf16 ckpt+fp4", model=("vbhal", "large"), batch=8, seq=1024,
             precision="bf16-mixed", ckpt=True, fp4="mxfp4"),
        dict(name="vbhal-small b32 s256 bf16-true sgd", model=("vbhal", "small"), batch=32, seq=256,
             precision="bf16-true", optimizer="sgd-momentum"),
        dict(name="gpt2 b8 s1024 bf16", model=("hf", "gpt2"), batch=8, seq=1024, precision="bf16-mixed"),
        dict(name="gpt2 b8 s1024 bf16 ckpt", model=("hf", "gpt2"), batch=8, seq=1024, precision="bf16-mixed",
             ckpt=True),
        dict(name="gpt2 b4 s512 bf16 eager", model=("hf", "gpt2"), batch=4, seq=512, precision="bf16-mixed",
             attention="eager"),
        dict(name="gpt2 b4 s1024 fp32", model=("hf", "gpt2"), batch=4, seq=1024, precision="fp32"),
        dict(name="llama-0.3B b8 s1024 bf16", model=("hf", "llama"), batch=8, seq=1024, precision="bf16-mixed"),
        dict(name="llama-0.3B b8 s2048 bf16 ckpt", model=("hf", "llama"), batch=8, seq=2048,
             precision="bf16-mixed", ckpt=True),
        dict(name="llama-0.3B b4 s1024 bf16 nvfp4", model=("hf", "llama"), batch=4, seq=1024,
             precision="bf16-mixed", fp4="nvfp4"),
        dict(name="llama-0.3B b4 s1024 bf16-true fused", model=("hf", "llama"), batch=4, seq=1024,
             precision="bf16-true", impl="fused"),
    ]
    del v_med
    for c in cs:
        kind, which = c["model"]
        if kind == "vbhal":
            c["model"] = ("vbhal", vbhal_config(which))
        elif which == "gpt2":
            c["model"] = ("hf", gpt2_config())
        else:
            c["model"] = ("hf", llama_config())
    return cs[:4] if quick else cs


def predict(c, device_kind="cuda"):
    return estimate(what_to_estimate(c), batch_size=c["batch"], seq_length=c["seq"], precision=c["precision"],
                    optimizer=c.get("optimizer", "adamw"), optimizer_impl=c.get("impl", "foreach"),
                    gradient_checkpointing=bool(c.get("ckpt")), fp4=c.get("fp4"),
                    attention=c.get("attention", "flash"), device=device_kind,
                    fp4_dequant_temp=True)


# ----------------------------------------------------------------------------------------------- main

def fmt_gib(n):
    return "-" if n is None else f"{n / 2**30:.2f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--budget", type=float, default=140.0, help="seconds; stops starting new work after it")
    ap.add_argument("--skip-plan", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark measures GPU memory; tests/estimate has the CPU check")
        return 0
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    dev_slug = name.replace(" ", "-").lower()
    versions = {"torch": torch.__version__}
    for mod in ("transformers", "accelerate"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = None
    print(f"device: {name}; " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    rows, results = [], []
    path = Path(args.out) if args.out else Path(__file__).parent / "results" / f"estimate-{dev_slug}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = dict(device=name, versions=versions, results=results, planner=[], partial=True)

    def save():  # after every record: a run cut short by its time limit still leaves its numbers
        path.write_text(json.dumps(partial, indent=1, default=str))

    workspace = probe_workspace(device)
    partial["workspace_probe"] = workspace
    print(f"framework workspace after a bf16 matmul fwd+bwd: {workspace / 2**20:.2f} MiB")
    for c in configs(args.quick):
        if time.perf_counter() - t0 > args.budget * 0.55:
            print(f"budget: skipping {c['name']}")
            continue
        rec = dict(name=c["name"])
        try:
            t = time.perf_counter()
            est = predict(c)
            rec["estimate_seconds"] = time.perf_counter() - t
            rec["pred_allocated"], rec["pred_reserved"] = est.peak_allocated, est.peak_reserved
            rec["pred_breakdown"] = dict(parameters=est.parameters, gradients=est.gradients,
                                         optimizer_state=est.optimizer_state, activations=est.activations,
                                         autocast_copies=est.autocast_copies, temporaries=est.temporaries,
                                         workspace=est.workspace, phase=est.peak_phase)
            mm = meta_model(c)
            rec["accelerate"] = peer_accelerate(mm, c["precision"])
            rec["deepspeed_zero2"], rec["deepspeed_zero3"] = peer_deepspeed(mm)
            del mm
            rec.update(measure(c, device))
            rec["err_allocated"] = rec["pred_allocated"] / rec["peak_allocated"] - 1
            rec["err_reserved"] = rec["pred_reserved"] / rec["peak_reserved"] - 1
        except Exception as e:  # keep going: one broken config must not hide the others
            rec["error"] = f"{type(e).__name__}: {e}"[:400]
            print(f"{c['name']}: {rec['error']}")
        results.append(rec)
        save()
        if "err_allocated" in rec:
            acc = rec.get("accelerate")
            rows.append([c["name"], fmt_gib(rec["peak_allocated"]), fmt_gib(rec["pred_allocated"]),
                         f"{100 * rec['err_allocated']:+.1f}%", fmt_gib(rec["peak_reserved"]),
                         fmt_gib(rec["pred_reserved"]), f"{100 * rec['err_reserved']:+.1f}%",
                         fmt_gib(acc) + ("" if acc is None else f" ({100 * (acc / rec['peak_allocated'] - 1):+.0f}%)"),
                         fmt_gib(rec["deepspeed_zero2"])
                         + f" ({100 * (rec['deepspeed_zero2'] / rec['peak_allocated'] - 1):+.0f}%)",
                         fmt_gib(rec["deepspeed_zero3"]), rec["pred_breakdown"]["phase"],
                         f"{rec['estimate_seconds']:.2f}"])
    headers = ["config", "meas alloc GiB", "pred alloc", "err", "meas resv", "pred resv*", "err",
               "accelerate (Adam)", "DS zero2*", "DS zero3*", "peak in", "est s"]
    try:
        from vbhal._table import format_table
        print(format_table(headers, rows, title="predicted vs measured peak (GiB = 2^30 B)"))
    except ImportError:  # pragma: no cover
        for r in rows:
            print(r)
    print("* reserved without a cap: replay through the estimator's model of the caching allocator. "
          "DS: DeepSpeed formulas re-implemented (deepspeed not "
          "installed), model states only, no activations; accelerate: max(model, grads, optimizer, step), "
          "model states only")
    errs = [abs(r["err_allocated"]) for r in results if "err_allocated" in r]
    summary = {}
    if errs:
        summary = dict(n=len(errs), max_abs_err=max(errs), median_abs_err=statistics.median(errs),
                       within_10pct=sum(e <= 0.10 for e in errs))
        print(f"allocated: {summary['within_10pct']}/{len(errs)} within 10%, median |err| "
              f"{100 * summary['median_abs_err']:.1f}%, max {100 * summary['max_abs_err']:.1f}%")

    plan_results = partial["planner"]
    partial["summary"] = summary
    if not args.skip_plan:
        planner_check(device, t0, args.budget, plan_results, save)
    out = dict(device=name, versions=versions, workspace_probe=workspace, results=results, summary=summary,
               planner=plan_results,
               seconds=time.perf_counter() - t0)
    path.write_text(json.dumps(out, indent=1, default=str))
    print(f"wrote {path} in {out['seconds']:.0f} s")
    return 0


def planner_check(device, t0, budget, out, save=lambda: None):
    """The planner's batch size trains under the cap and batch+1 does not (records appended to `out`)."""
    checks = [
        ("vbhal-medium s1024 @8GB", ("vbhal", vbhal_config("medium")), 1024, 8 * GB),
        ("gpt2 s1024 @8GB", ("hf", gpt2_config()), 1024, 8 * GB),
        ("llama-0.3B s2048 @12GB", ("hf", llama_config()), 2048, 12 * GB),
        ("vbhal-large s1024 @10GB", ("vbhal", vbhal_config("large")), 1024, 10 * GB),
        ("gpt2 s1024 @16GB", ("hf", gpt2_config()), 1024, 16 * GB),
        ("llama-0.3B s1024 @8GB", ("hf", llama_config()), 1024, 8 * GB),
    ]
    rows = []
    for name, model, seq, cap in checks:
        if time.perf_counter() - t0 > budget - 9:
            print(f"budget: skipping planner check {name}")
            continue
        rec = dict(name=name, cap=cap)
        try:
            t = time.perf_counter()
            p = plan(model[1], gpu_mem=cap, cpu_mem="64GB", disk="50GB", seq_length=seq, max_batch_size=64,
                     explain=False)
            rec["plan_seconds"] = time.perf_counter() - t
            rec.update(mode=p.mode, batch=p.batch_size, fits=p.fits, ckpt=p.gradient_checkpointing,
                       pred_need=p.estimate.device_need if p.estimate else None,
                       pred_allocated=p.estimate.peak_allocated if p.estimate else None)
            if p.fits and not p.offload:
                base = dict(name=name, model=model, seq=seq, precision="bf16-mixed", ckpt=p.gradient_checkpointing,
                            fp4=p.fp4_format if p.fp4 else None)
                rec["at_b"], rec["at_b_plus_1"] = {}, {}
                rec["ok_at_b"] = fits_real({**base, "batch": p.batch_size}, device, cap, info=rec["at_b"])
                rec["ok_at_b_plus_1"] = fits_real({**base, "batch": p.batch_size + 1}, device, cap,
                                                  info=rec["at_b_plus_1"])
                rec["pass"] = bool(rec["ok_at_b"] and not rec["ok_at_b_plus_1"])
        except Exception as e:
            rec["error"] = f"{type(e).__name__}: {e}"[:400]
            print(f"{name}: {rec['error']}")
        out.append(rec)
        save()
        rows.append([name, rec.get("mode"), rec.get("batch"), rec.get("ckpt"), fmt_gib(rec.get("pred_need")),
                     rec.get("ok_at_b"), rec.get("ok_at_b_plus_1"), rec.get("pass"),
                     f"{rec.get('plan_seconds', 0):.1f}"])
    from vbhal._table import format_table
    print(format_table(["planner check", "mode", "batch", "ckpt", "pred resv@cap", "b trains", "b+1 trains",
                        "pass", "plan s"], rows))
    done = [r for r in out if "pass" in r]
    print(f"planner: {sum(r['pass'] for r in done)}/{len(done)} checks pass (b trains, b+1 runs out of memory)")
    return out


if __name__ == "__main__":
    sys.exit(main())
