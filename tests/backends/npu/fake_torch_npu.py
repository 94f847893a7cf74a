"""A stand-in ``torch_npu`` for CONTRACT TESTS on CPU: it verifies our calls, not the NPU.

Each op checks its arguments against what torch_npu 2.13 / Ascend op-plugin document
(``docs/context/torch_npu-npu_fusion_attention.md``, ``torch_npu-npu_weight_quant_batchmatmul.md``,
``op_plugin/config/op_plugin_functions.yaml``) and raises ``FakeOpError`` on anything the documentation
rules out; then it computes what the documentation says the op computes, with plain torch ops on CPU
(differentiable where the real op has a backward). Every call is recorded in ``CALLS`` so tests can
assert on the exact arguments.

Nothing here says anything about the numbers a real Ascend chip produces.
"""

from __future__ import annotations

import types

import torch

CALLS: list[tuple[str, dict]] = []

# npu_fusion_attention keyword defaults: the schema in torch_npu 2.13.0's
# csrc/aten/npu_native_functions_by_codegen.yaml.
_FA_DEFAULTS = dict(pse=None, padding_mask=None, atten_mask=None, scale=1.0, keep_prob=1.0, pre_tockens=2147483647,
                    next_tockens=2147483647, inner_precise=0, prefix=None, actual_seq_qlen=None,
                    actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True, sync=False, softmax_layout="",
                    sink=None, dropout_mask=None, seed=0, offset=0)
_FA_LAYOUTS = ("BSH", "SBH", "BSND", "BNSD", "TND")
_FA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: Stand-in for torch_npu.float4_e2m1fn_x2 (a dtype object torch_npu adds).
float4_e2m1fn_x2 = getattr(torch, "float4_e2m1fn_x2", "float4_e2m1fn_x2")


class FakeOpError(RuntimeError):
    """The call breaks the documented contract of the op."""


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise FakeOpError(msg)


def reset() -> None:
    CALLS.clear()


# --------------------------------------------------------------------------------------------------
# npu_fusion_attention
# --------------------------------------------------------------------------------------------------


def npu_fusion_attention(query, key, value, head_num, input_layout, **kwargs):
    unknown = set(kwargs) - set(_FA_DEFAULTS)
    _need(not unknown, f"npu_fusion_attention has no argument(s) {sorted(unknown)}")
    a = {**_FA_DEFAULTS, **kwargs}
    CALLS.append(("npu_fusion_attention", dict(query=query, key=key, value=value, head_num=head_num,
                                               input_layout=input_layout, **a)))
    _need(isinstance(head_num, int), f"head_num must be an int, got {type(head_num).__name__}")
    _need(input_layout in _FA_LAYOUTS, f"input_layout {input_layout!r} not in {_FA_LAYOUTS}")
    _need(query.dtype == key.dtype == value.dtype, "query/key/value dtypes must be equal")
    _need(query.dtype in _FA_DTYPES, f"dtype {query.dtype} not supported")
    _need(key.shape == value.shape, "key and value shapes must be equal")
    _need(all(a[n] is None for n in ("pse", "padding_mask", "prefix", "sink", "dropout_mask")),
          "pse/padding_mask/prefix/sink/dropout_mask are not modelled by this stand-in")
    _need(a["softmax_layout"] == "", "softmax_layout not modelled")
    _need(0 < a["keep_prob"] <= 1, "keep_prob must be in (0, 1]")
    _need(a["keep_prob"] == 1.0, "this stand-in models no dropout (vbhal passes keep_prob=1.0)")
    _need(isinstance(a["scale"], float), f"scale must be a float, got {type(a['scale']).__name__}")
    mode = a["sparse_mode"]
    _need(mode in (0, 1, 2, 3, 4, 5, 6, 7, 8), f"sparse_mode {mode} invalid")
    _need(mode in (0, 2, 3), f"sparse_mode {mode} not modelled by this stand-in")
    mask = a["atten_mask"]
    if mask is not None:
        _need(mask.dtype in (torch.bool, torch.uint8), f"atten_mask dtype {mask.dtype} must be bool or uint8")
        mask = mask.bool()
    if mode in (2, 3) and mask is not None:
        n = 2048
        _need(tuple(mask.shape) == (n, n), f"sparse_mode {mode} takes the compressed {n}x{n} mask, got {tuple(mask.shape)}")
        _need(torch.equal(mask, torch.ones(n, n, dtype=torch.bool).triu(1)),
              "the compressed mask must be triu(ones(2048, 2048), diagonal=1) with True = masked out")

    if input_layout == "BNSD":
        _need(query.dim() == 4 and key.dim() == 4, "BNSD takes 4-D tensors")
        b, n1, sq, d = query.shape
        n2, sk = key.shape[1], key.shape[2]
        _need(a["actual_seq_qlen"] is None and a["actual_seq_kvlen"] is None, "actual_seq_* are for TND only")
        docs = [(slice(None), slice(None))]
    elif input_layout == "TND":
        _need(query.dim() == 3 and key.dim() == 3, "TND takes 3-D tensors")
        t, n1, d = query.shape
        n2 = key.shape[1]
        qlen, kvlen = a["actual_seq_qlen"], a["actual_seq_kvlen"]
        _need(qlen is not None and kvlen is not None, "TND needs actual_seq_qlen and actual_seq_kvlen")
        for name, lens, total in (("actual_seq_qlen", qlen, t), ("actual_seq_kvlen", kvlen, key.shape[0])):
            _need(isinstance(lens, (list, tuple)) and all(isinstance(x, int) for x in lens), f"{name} must be a list of int")
            _need(1 <= len(lens) <= 1024, f"{name} length {len(lens)} outside 1..1024 (varlen)")
            _need(lens[0] > 0, f"{name} is cumulative WITHOUT the leading 0, got {list(lens[:3])}...")
            _need(all(x <= y for x, y in zip(lens, lens[1:])), f"{name} must be non-decreasing cumulative sums")
            _need(lens[-1] == total, f"{name} ends at {lens[-1]}, expected T={total}")
        _need(len(qlen) == len(kvlen), "actual_seq_qlen and actual_seq_kvlen must have one entry per batch")
        if mask is not None and mode == 0:
            _need(mask.dim() == 2, "varlen takes only an SS atten_mask")
        starts_q, starts_k = [0, *qlen[:-1]], [0, *kvlen[:-1]]
        docs = [(slice(a0, a1), slice(b0, b1)) for a0, a1, b0, b1 in zip(starts_q, qlen, starts_k, kvlen)]
    else:
        raise FakeOpError(f"layout {input_layout} not modelled by this stand-in")
    _need(head_num == n1, f"head_num {head_num} must equal the query's head count {n1}")
    _need(1 <= n1 <= 256, "Nq must be in 1..256")
    _need(n2 > 0 and n1 % n2 == 0, f"Nq={n1} must be a multiple of Nkv={n2}")
    _need(query.shape[-1] == key.shape[-1] and key.shape[-1] >= value.shape[-1], "need Dq == Dk >= Dv")
    _need(1 <= d <= 768, f"head dim {d} outside 1..768")

    outs = []
    for qs, ks in docs:
        if input_layout == "BNSD":
            q4, k4, v4 = query, key, value
        else:  # (t, N, D) -> (1, N, t, D)
            q4, k4, v4 = (x[s].transpose(0, 1).unsqueeze(0) for x, s in ((query, qs), (key, ks), (value, ks)))
        sq, sk = q4.shape[2], k4.shape[2]
        qf, kf, vf = q4.float(), k4.float(), v4.float()
        if n1 != n2:
            kf, vf = kf.repeat_interleave(n1 // n2, 1), vf.repeat_interleave(n1 // n2, 1)
        s = (qf @ kf.transpose(-2, -1)) * a["scale"]
        if mask is not None:
            if mode == 0:
                m = mask if input_layout == "BNSD" else mask[:sq, :sk]
                _need(m.dim() in (2, 4), "atten_mask must be SS, 11SS, B1SS or BNSS")
                if m.dim() == 4:
                    _need(m.shape[0] in (1, q4.shape[0]) and m.shape[1] in (1, n1), f"bad atten_mask shape {tuple(m.shape)}")
                _need(tuple(m.shape[-2:]) == (sq, sk), f"atten_mask must end in (Sq, Sk)=({sq}, {sk}), got {tuple(m.shape)}")
                masked = m
            else:
                i = torch.arange(sq)[:, None]
                j = torch.arange(sk)[None, :]
                masked = j > i if mode == 2 else j > i + (sk - sq)  # 2: top-left, 3: bottom-right
            s = s.masked_fill(masked, float("-inf"))
        o = torch.softmax(s, dim=-1) @ vf
        outs.append(o if input_layout == "BNSD" else o[0].transpose(0, 1))
    out = (outs[0] if input_layout == "BNSD" else torch.cat(outs, 0)).to(query.dtype)
    stats = torch.zeros(1, dtype=torch.float32)
    return out, stats, stats, torch.empty(0, dtype=query.dtype), 0, 0, 0


# --------------------------------------------------------------------------------------------------
# npu_weight_quant_batchmatmul
# --------------------------------------------------------------------------------------------------

_WQ_DEFAULTS = dict(antiquant_offset=None, quant_scale=None, quant_offset=None, bias=None, antiquant_group_size=0,
                    inner_precise=0, weight_dtype=None)


def npu_weight_quant_batchmatmul(x, weight, antiquant_scale, *args, **kwargs):
    _need(not args, "pass the optional arguments by keyword (vbhal always does)")
    unknown = set(kwargs) - set(_WQ_DEFAULTS)
    _need(not unknown, f"npu_weight_quant_batchmatmul has no argument(s) {sorted(unknown)}")
    a = {**_WQ_DEFAULTS, **kwargs}
    CALLS.append(("npu_weight_quant_batchmatmul", dict(x=x, weight=weight, antiquant_scale=antiquant_scale, **a)))
    # The op is inference-only: it has no backward. Calls must come without autograd.
    _need(not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, a["bias"]))),
          "npu_weight_quant_batchmatmul has no backward; call it with grad disabled")
    _need(x.dim() == 2, f"x must be 2-D (M, K), got {tuple(x.shape)}")
    _need(x.dtype in (torch.float16, torch.bfloat16), f"x dtype {x.dtype} must be float16/bfloat16")
    _need(x.numel() > 0, "empty tensors are not supported")
    _need(weight.dim() == 2, "weight must be 2-D")
    m, k = x.shape
    group = a["antiquant_group_size"]
    if a["weight_dtype"] is None:
        _need(weight.dtype == torch.int8, f"weight dtype {weight.dtype}: this stand-in models int8 weights")
        _need(tuple(weight.shape)[0] == k, f"weight must be (K, N) with K={k}, got {tuple(weight.shape)}")
        n = weight.shape[1]
        _need(antiquant_scale.dtype == x.dtype, f"antiquant_scale dtype {antiquant_scale.dtype} must equal x's {x.dtype}")
        w = weight.to(x.dtype)
    else:
        _need(a["weight_dtype"] is float4_e2m1fn_x2, "weight_dtype must be torch_npu.float4_e2m1fn_x2")
        # torch_npu 2.13.0 meta: 4-bit weights only as uint8; a transposed view (stride(-2) == 1) is
        # (K/2, N) packed along K, logical N = size(1).
        _need(weight.dtype == torch.uint8, "4-bit weights are carried as uint8")
        _need(weight.stride(-2) == 1 and weight.shape[0] * 2 == k, "this stand-in models the transposed "
              "(K/2, N) view, packed along K")
        _need(antiquant_scale.dtype == torch.uint8, "E8M0 antiquant_scale is carried as uint8 bits")
        _need(group == 32, "native MXFP4 uses group size 32")
        n = weight.shape[1]
        # Decoded here independently of vbhal: OCP MX v1.0 E2M1 values, element 2i in the LOW nibble.
        mags = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
        lut = torch.cat([mags, -mags])
        packed = weight.t().to(torch.int64)  # (N, K/2), packed along K
        w = torch.stack((lut[packed & 0xF], lut[packed >> 4]), dim=-1).flatten(-2).t()  # (K, N)
    _need(1 <= k <= 65535 and 1 <= n <= 65535, "K, N must be in [1, 65535]")
    if group:
        _need(group % 32 == 0 and 32 <= group <= k - 1, f"antiquant_group_size {group} must be a multiple of 32 in [32, K-1]")
        g = -(-k // group)
        _need(tuple(antiquant_scale.shape) == (g, n), f"per-group scale must be (ceil(K/g), N)=({g}, {n}), got "
              f"{tuple(antiquant_scale.shape)}")
        if a["weight_dtype"]:  # E8M0 bits e -> 2^(e - 127) (OCP MX v1.0 section 5.2), decoded here in float64
            scale = torch.pow(2.0, antiquant_scale.to(torch.float64) - 127).repeat_interleave(group, 0)[:k]
        else:
            scale = antiquant_scale.repeat_interleave(group, 0)[:k]
    else:
        _need(tuple(antiquant_scale.shape) in ((n,), (1, n), (1,), (1, 1)), f"per-channel/tensor scale shape "
              f"{tuple(antiquant_scale.shape)} invalid for N={n}")
        scale = antiquant_scale.reshape(-1)[None, :] if antiquant_scale.numel() == n else antiquant_scale.reshape(1, 1)
    off = a["antiquant_offset"]
    if off is not None:
        _need(off.shape == antiquant_scale.shape and off.dtype == antiquant_scale.dtype, "offset must match the scale")
        off = off.repeat_interleave(group, 0)[:k] if group else off.reshape(1, -1)
        w = w + off
    _need(a["quant_scale"] is None and a["quant_offset"] is None, "output quantization not modelled")
    bias = a["bias"]
    if bias is not None:
        want = torch.float32 if x.dtype == torch.bfloat16 else torch.float16
        _need(bias.dtype == want, f"bias must be {want} with {x.dtype} x, got {bias.dtype}")
        _need(bias.is_contiguous() and tuple(bias.shape) in ((n,), (1, n)), "bias must be contiguous (N,)/(1, N)")
    # ANTIQUANT(weight) = (weight + offset) * scale in x's dtype, then x @ W with float32 accumulation.
    wq = (w.to(x.dtype) * scale.to(x.dtype)) if a["weight_dtype"] is None else (w * scale).to(x.dtype)
    y = x.float() @ wq.float()
    if bias is not None:
        y = y + bias.float().reshape(1, n)
    return y.to(x.dtype)


# --------------------------------------------------------------------------------------------------
# the module and torch.npu
# --------------------------------------------------------------------------------------------------


def make_module() -> types.ModuleType:
    """A fresh ``torch_npu`` stand-in module (for ``sys.modules['torch_npu']``)."""
    mod = types.ModuleType("torch_npu")
    mod.__file__ = __file__
    mod.npu_fusion_attention = npu_fusion_attention
    mod.npu_weight_quant_batchmatmul = npu_weight_quant_batchmatmul
    mod.float4_e2m1fn_x2 = float4_e2m1fn_x2
    mod.__version__ = "2.13.0 (vbhal test stand-in)"
    return mod


def make_torch_npu_namespace(device_name: str = "Ascend910B3") -> types.SimpleNamespace:
    """A minimal ``torch.npu`` with one device of the given name."""
    ns = types.SimpleNamespace()
    ns.device_name = device_name
    ns.is_available = lambda: True
    ns.device_count = lambda: 1
    ns.current_device = lambda: 0
    ns.get_device_name = lambda index=0: ns.device_name
    return ns
