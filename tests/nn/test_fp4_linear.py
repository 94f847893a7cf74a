"""FP4Linear (drop-in nn.Linear with an FP4 weight) and swap_linears."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vbhal._report import OptimizeReport
from vbhal.errors import KernelError, QuantizationError
from vbhal.formats import quantize
from vbhal.hookspecs import Kernel
from vbhal.nn import FP4Linear, swap_linears

FMTS = ["mxfp4", "nvfp4"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _linear(k=96, n=40, bias=True, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias).to(dtype)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("device", DEVICES)
def test_forward_is_linear_with_the_dequantized_weight(fmt, device):
    lin = _linear().to(device)
    q = FP4Linear.from_linear(lin, fmt, name="blk.up")
    x = torch.randn(3, 5, 96, device=device)
    y = q(x)
    ref = F.linear(x.double(), q.dequantized_weight().double(), lin.bias.double())
    assert y.shape == (3, 5, 40) and y.dtype == torch.float32
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-5)
    # and near the original layer: FP4 error, not garbage
    rel = ((y - lin(x)).norm() / lin(x).norm()).item()
    assert rel < 0.2


@pytest.mark.parametrize("fmt", FMTS)
def test_quant_error_and_repr(fmt):
    lin = _linear()
    q = FP4Linear.from_linear(lin, fmt, name="blk.up")
    w = lin.weight.detach()
    expect = ((w - q.dequantized_weight()).norm() / w.norm()).item()
    assert q.quant_error == pytest.approx(expect, rel=1e-5) and 0 < q.quant_error < 0.2
    r = repr(q)
    assert f"fmt={fmt}" in r and "in_features=96" in r and "out_features=40" in r and "quant_error=" in r


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("device", DEVICES)
def test_backward_gives_input_and_bias_gradients_weight_frozen(fmt, device):
    lin = _linear().to(device)
    q = FP4Linear.from_linear(lin, fmt)
    assert [n for n, p in q.named_parameters()] == ["bias"]
    x = torch.randn(4, 96, device=device, requires_grad=True)
    y = q(x)
    go = torch.randn_like(y)
    y.backward(go)
    w64 = q.dequantized_weight().double()
    assert torch.allclose(x.grad.double(), go.double() @ w64, rtol=1e-5, atol=1e-5)
    assert torch.allclose(q.bias.grad.double(), go.double().sum(0), rtol=1e-5, atol=1e-5)
    assert q.codes.grad is None


def test_lora_adapter_trains_on_an_fp4_base():
    """Adapters before and beside the frozen FP4 layer: gradients must flow through its input."""
    torch.manual_seed(1)
    base = FP4Linear.from_linear(_linear(bias=False), "nvfp4")
    a_in, b_in = nn.Parameter(torch.randn(4, 96) * 0.1), nn.Parameter(torch.randn(96, 4) * 0.1)
    a, b = nn.Parameter(torch.randn(4, 96) * 0.1), nn.Parameter(torch.zeros(40, 4))
    opt = torch.optim.Adam([a_in, b_in, a, b], lr=3e-2)
    x, target = torch.randn(32, 96), torch.randn(32, 40)
    losses = []
    for _ in range(30):
        h = x + x @ a_in.t() @ b_in.t()
        loss = F.mse_loss(base(h) + x @ a.t() @ b.t(), target)
        opt.zero_grad()
        loss.backward()
        assert a_in.grad.abs().sum() > 0  # reached through FP4Linear's input gradient
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.7


def test_no_bias():
    q = FP4Linear.from_linear(_linear(bias=False), "mxfp4")
    assert q.bias is None
    x = torch.randn(2, 96, requires_grad=True)
    q(x).sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("fmt", FMTS)
def test_custom_op_passes_opcheck(fmt):
    q = FP4Linear.from_linear(_linear(), fmt)
    x = torch.randn(3, 96, requires_grad=True)
    args = (x, q.codes, q.scales, q.tensor_scale, q.bias, q.fmt, q.in_features, q.kernel_key)
    # opcheck's test_schema multiplies every tensor input, which torch cannot do for float8 scales on
    # CPU ("mul_cpu_reduced_float" not implemented): run the fake-tensor, autograd and AOT checks.
    utils = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.vbhal.fp4_linear.default, args, test_utils=utils)
    g = torch.randn(3, 40)
    gargs = (g, q.codes, q.scales, q.tensor_scale, q.fmt, q.in_features, q.kernel_key)
    torch.library.opcheck(torch.ops.vbhal.fp4_linear_grad_input.default, gargs, test_utils=utils)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_traces_forward_and_backward(fmt, device):
    q = FP4Linear.from_linear(_linear(), fmt).to(device)
    x = torch.randn(2, 7, 96, device=device, requires_grad=True)
    y = q(x)
    y.sum().backward()
    gx, gb = x.grad.clone(), q.bias.grad.clone()
    x.grad, q.bias.grad = None, None
    torch._dynamo.reset()
    cq = torch.compile(q, backend="aot_eager", fullgraph=True)
    yc = cq(x)
    yc.sum().backward()
    assert torch.equal(yc, y) and torch.equal(x.grad, gx) and torch.equal(q.bias.grad, gb)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_gives_bf16_like_nn_linear(device):
    lin = _linear().to(device)
    q = FP4Linear.from_linear(lin, "mxfp4")
    x = torch.randn(4, 96, device=device, requires_grad=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = q(x)
        y_ref = lin(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    expect = F.linear(x.detach().to(torch.bfloat16).float(), q.dequantized_weight(), q.bias).to(torch.bfloat16)
    assert torch.equal(y, expect)
    y.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32


def test_bf16_activations_and_module_to_dtype_keeps_the_format():
    q = FP4Linear.from_linear(_linear(), "nvfp4")
    codes, scales, ts = q.codes.clone(), q.scales.clone(), q.tensor_scale.clone()
    q.to(torch.bfloat16)
    assert q.codes.dtype == torch.uint8 and q.scales.dtype == torch.float8_e4m3fn
    assert q.tensor_scale.dtype == torch.float32 and q.bias.dtype == torch.bfloat16
    assert torch.equal(q.codes, codes) and torch.equal(q.scales.float(), scales.float()) and torch.equal(q.tensor_scale, ts)
    y = q(torch.randn(2, 96, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    q.half()
    assert q.scales.dtype == torch.float8_e4m3fn and q.bias.dtype == torch.float16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to move the module to")
def test_to_cuda_moves_buffers_and_matches_cpu():
    q = FP4Linear.from_linear(_linear(), "mxfp4")
    x = torch.randn(3, 96)
    y = q(x)
    qc = q.to("cuda")
    assert qc.codes.is_cuda and qc.scales.is_cuda
    assert torch.allclose(qc(x.cuda()).cpu(), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.zeros(2, 96, dtype=torch.int32), "float32/bfloat16/float16"),
        (torch.zeros(2, 96, device="meta"), "input is on meta"),
        (torch.zeros(2, 95), r"\(\.\.\., 96\)"),
    ],
)
def test_bad_activations_get_clear_errors(x, match):
    q = FP4Linear.from_linear(_linear(), "mxfp4", name="blk.up")
    with pytest.raises(KernelError, match=match):
        q(x)


# ---- kernels ---------------------------------------------------------------------------------------
def test_bound_kernels_are_the_ones_called():
    calls = {"lin": 0, "deq": 0, "q": 0}

    def my_linear(x, qw, bias):
        calls["lin"] += 1
        return F.linear(x, qw.dequantize(x.dtype), bias)

    def my_deq(qw, dtype=torch.float32):
        calls["deq"] += 1
        return qw.dequantize(dtype)

    def my_quant(w, fmt, *, scale_rule="floor"):
        calls["q"] += 1
        return quantize(w, fmt, scale_rule=scale_rule)

    kernels = {"fp4_linear": Kernel("fp4_linear", my_linear, "test"), "dequantize_fp4": my_deq,
               "quantize_fp4": my_quant}
    q = FP4Linear.from_linear(_linear(), "mxfp4", kernels=kernels)
    x = torch.randn(2, 96, requires_grad=True)
    q(x).sum().backward()
    assert calls == {"lin": 1, "deq": 1, "q": 1}
    assert "my_linear" in q.kernel_key and "my_linear" in repr(q)


def test_a_quantize_kernel_must_return_a_quantized_weight():
    with pytest.raises(KernelError, match="QuantizedWeight"):
        FP4Linear.from_linear(_linear(), "mxfp4", kernels={"quantize_fp4": lambda w, fmt, scale_rule: w})


def test_nan_weight_is_refused_with_the_layer_name():
    lin = _linear()
    with torch.no_grad():
        lin.weight[3, 4] = float("nan")
    with pytest.raises(QuantizationError, match="'blocks.0.attn.q'"):
        FP4Linear.from_linear(lin, "mxfp4", name="blocks.0.attn.q")


# ---- state dict ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FMTS)
def test_state_dict_round_trip_strict(fmt):
    q = FP4Linear.from_linear(_linear(k=100), fmt, scale_rule="floor")
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert set(sd) == {"codes", "scales", "bias", "_extra_state"} | ({"tensor_scale"} if fmt == "nvfp4" else set())
    fresh = FP4Linear(100, 40, fmt=fmt)
    fresh.load_state_dict(sd)  # strict
    x = torch.randn(3, 100)
    assert torch.equal(fresh(x), q(x))
    assert torch.equal(fresh.codes, q.codes) and fresh.orig_dtype == q.orig_dtype


def test_loading_into_a_mismatched_module_is_an_error():
    sd = FP4Linear.from_linear(_linear(k=100), "mxfp4").state_dict()
    # same buffer sizes (K=96 and K=100 both pad to 128) but another logical shape: header says no
    with pytest.raises(QuantizationError, match=r"\(40, 96\).*\(40, 100\)"):
        FP4Linear(96, 40, fmt="mxfp4").load_state_dict(sd)
    with pytest.raises((QuantizationError, RuntimeError)):
        FP4Linear(100, 40, fmt="nvfp4").load_state_dict(sd)
    bad = dict(sd)
    bad["scales"] = sd["scales"].view(torch.uint8)
    with pytest.raises(QuantizationError, match="torch.uint8.*float8_e8m0fnu"):
        FP4Linear(100, 40, fmt="mxfp4").load_state_dict(bad)
    missing = {k: v for k, v in sd.items() if k != "codes"}
    with pytest.raises(RuntimeError, match="codes"):
        FP4Linear(100, 40, fmt="mxfp4").load_state_dict(missing)
    wrong = dict(sd)
    wrong["codes"] = sd["codes"][:, :-1]
    with pytest.raises(RuntimeError, match="size mismatch"):
        FP4Linear(100, 40, fmt="mxfp4").load_state_dict(wrong)


# ---- swap_linears ----------------------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.router = nn.Linear(d, 8)
        self.gate = nn.Linear(d, 8, bias=False)

    def forward(self, x):
        h = self.o(self.q(x) + self.k(x) + self.v(x))
        return x + h + self.down(F.gelu(self.up(x))) + 0 * self.router(x).sum(-1, keepdim=True)


class _Model(nn.Module):
    def __init__(self, d=64, vocab=50):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.embed_proj = nn.Linear(d, d)
        self.blocks = nn.ModuleList(_Block(d) for _ in range(2))
        self.tiny = nn.Linear(8, d)
        self.classifier = nn.Linear(d, 3)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.embed_tokens.weight  # tied
        self.proj_out = nn.Linear(d, d)
        self.proj_out.weight = self.blocks[0].o.weight  # tied under an innocent name
        self.output = nn.Linear(d, vocab)  # Meta-LLaMA-style head name
        self.ffn = nn.ModuleDict({"output": nn.ModuleDict({"dense": nn.Linear(d, d)})})  # BERT-style: quantized
        self.mha = nn.MultiheadAttention(d, 4)  # out_proj is a Linear subclass: left alone
        self.shared_expert_gate = nn.Linear(d, 1)

    def forward(self, idx):
        x = self.embed_proj(self.embed_tokens(idx))
        for b in self.blocks:
            x = b(x)
        return self.lm_head(x)


def test_swap_linears_keeps_sensitive_modules_and_reports():
    torch.manual_seed(2)
    m = _Model()
    rep = OptimizeReport()
    swapped = swap_linears(m, fmt="mxfp4", report=rep)
    expect = {f"blocks.{i}.{n}" for i in range(2) for n in ("q", "k", "v", "up", "down")} | {"blocks.1.o",
                                                                                          "ffn.output.dense"}
    assert set(swapped) == expect
    for name in expect:
        assert isinstance(m.get_submodule(name), FP4Linear)
    kept = {c.name: c.detail for c in rep.changes if c.kind == "skip"}
    assert "lm_head" in kept and "classifier" in kept and "embed_proj" in kept
    assert "blocks.0.router" in kept and "blocks.0.gate" in kept and "MoE router" in kept["blocks.0.router"]
    assert "tiny" in kept and "too small" in kept["tiny"]
    assert "blocks.0.o" in kept and "proj_out" in kept and "tied" in kept["proj_out"]
    assert "output" in kept and "shared_expert_gate" in kept
    assert "mha.out_proj" in kept and "subclass" in kept["mha.out_proj"]
    assert rep.count("fp4") == len(expect)
    assert all("rel_err=" in c.detail for c in rep.changes if c.kind == "fp4")
    assert m(torch.randint(0, 50, (2, 5))).shape == (2, 5, 50)


def test_swap_linears_include_exclude():
    m = _Model()
    swapped = swap_linears(m, fmt="nvfp4", include=("blocks.*.up", "blocks.*.down", "classifier"),
                           exclude=("blocks.1.*",))
    # classifier is named exactly in include: quantized although it is an output head
    assert set(swapped) == {"blocks.0.up", "blocks.0.down", "classifier"}
    assert isinstance(m.classifier, FP4Linear) and isinstance(m.blocks[1].up, nn.Linear)


@pytest.mark.parametrize("fmt", FMTS)
def test_model_linear_bytes_drop_below_0_29_of_bf16(fmt):
    torch.manual_seed(3)
    m = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256), nn.Linear(256, 1024)).to(torch.bfloat16)
    bf16_bytes = sum(l.weight.numel() * 2 for l in m if isinstance(l, nn.Linear))
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    y0 = m(x)
    swap_linears(m, fmt=fmt)
    fp4 = [l for l in m if isinstance(l, FP4Linear)]
    assert len(fp4) == 3
    fp4_bytes = sum(l.codes.nbytes + l.scales.nbytes + (0 if l.tensor_scale is None else l.tensor_scale.nbytes)
                    for l in fp4)
    ratio = fp4_bytes / bf16_bytes
    assert ratio <= 0.29, ratio
    assert sum(l.qweight.nbytes for l in fp4) == fp4_bytes
    y = m(x)
    assert y.dtype == torch.bfloat16 and ((y.float() - y0.float()).norm() / y0.float().norm()) < 0.3


def test_swap_linears_uses_the_given_kernels():
    seen = []

    def lin(x, qw, bias):
        seen.append(qw.shape)
        return F.linear(x, qw.dequantize(x.dtype), bias)

    m = nn.Sequential(nn.Linear(64, 64))
    swap_linears(m, fmt="mxfp4", kernel_linear=Kernel("fp4_linear", lin, "t"), include=("0",))
    m(torch.randn(2, 64))
    assert seen == [(64, 64)]


def test_swap_linears_on_a_bare_linear_reports_instead_of_breaking():
    rep = OptimizeReport()
    lin = nn.Linear(64, 64)
    assert swap_linears(lin, fmt="mxfp4", report=rep) == []
    assert rep.changes[0].name == "<model>" and "from_linear" in rep.changes[0].detail
    with pytest.raises(QuantizationError, match="unknown FP4 format"):
        swap_linears(lin, fmt="int4")


def _module_level_linear(x, qw, bias):
    return F.linear(x, qw.dequantize(x.dtype), bias)


def test_deepcopy_and_pickle_keep_the_module_working():
    import copy

    q = FP4Linear.from_linear(_linear(), "nvfp4", kernels={"fp4_linear": _module_level_linear})
    x = torch.randn(2, 96)
    y = q(x)
    assert torch.equal(copy.deepcopy(q)(x), y)
    # torch.save of the whole module (plain pickle.dumps of a float8 tensor fails in torch 2.13 itself)
    buf = io.BytesIO()
    torch.save(q, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    from vbhal.nn import fp4_linear as mod

    mod._REGISTRY.pop(back.kernel_key)  # as in a fresh process: the module re-registers its kernels
    assert torch.equal(back(x), y)


def test_a_quantize_kernel_without_name_still_names_the_layer_on_nan():
    lin = _linear()
    with torch.no_grad():
        lin.weight[0, 0] = float("inf")
    with pytest.raises(QuantizationError, match="'x.y'"):
        FP4Linear.from_linear(lin, "mxfp4", name="x.y",
                              kernels={"quantize_fp4": lambda w, fmt, *, scale_rule: quantize(w, fmt)})


def test_swap_handles_transformers_conv1d_exactly():
    """GPT-2's Conv1D stores W as (in, out): the swap quantizes W^T and computes the same function."""
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    from vbhal.formats import quantize
    from vbhal.nn.fp4_linear import swap_linears

    torch.manual_seed(3)
    model = torch.nn.Sequential(Conv1D(96, 64))  # nf=96 outputs, nx=64 inputs
    x = torch.randn(5, 64)
    w_t = model[0].weight.detach().t().contiguous()
    names = swap_linears(model, fmt="mxfp4")
    assert names == ["0"]
    want = torch.nn.functional.linear(x, quantize(w_t, "mxfp4").dequantize(), model[0].bias)
    torch.testing.assert_close(model(x), want, rtol=0, atol=1e-5)
    assert transformers is not None


def test_from_linear_on_an_accelerator_binds_the_hal_kernels(monkeypatch):
    """kernels=None on a non-CPU weight asks the HAL for that device's kernels (the CPU reference would run
    there otherwise: right but ~30x slower); on CPU the reference stays."""
    import vbhal.nn.fp4_linear as F4
    from vbhal import hal

    asked = []

    def fake_get_kernel(name, device=None):
        asked.append((name, device))
        return F4.fp4_linear_reference if name == "fp4_linear" else None

    monkeypatch.setattr(hal, "get_kernel", fake_get_kernel)
    assert F4._device_kernels(torch.device("cpu")) is None and asked == []
    got = F4._device_kernels(torch.device("cuda", 1))
    assert [n for n, _ in asked] == list(F4._KERNEL_NAMES) and all(d == "cuda:1" for _, d in asked)
    assert got["fp4_linear"] is F4.fp4_linear_reference

    def broken(name, device=None):
        raise RuntimeError("no such device")

    monkeypatch.setattr(hal, "get_kernel", broken)
    with pytest.warns(UserWarning, match="CPU reference"):
        assert F4._device_kernels(torch.device("cuda", 0)) is None


def test_auto_bound_kernels_follow_the_weight_to_another_device(monkeypatch):
    """kernels=None: bind_kernels asks for the weight's device and binds again when .to() moves the weight;
    explicitly bound kernels stay where they are."""
    import vbhal.nn.fp4_linear as F4

    asked = []

    def fake_device_kernels(device):
        asked.append(device.type)
        return {"fp4_linear": F4.fp4_linear_reference} if device.type == "meta" else None

    monkeypatch.setattr(F4, "_device_kernels", fake_device_kernels)
    q = FP4Linear.from_linear(torch.nn.Linear(64, 32), "mxfp4")
    assert asked == ["cpu", "cpu"] and q.kernel_key == F4.REFERENCE_KEY   # quantize choice, then the binding
    q.to(torch.float64)                                                    # same device: nothing rebound
    assert asked == ["cpu", "cpu"]
    q.to("meta")
    assert asked[-1] == "meta" and q.kernel_key != F4.REFERENCE_KEY
    fixed = FP4Linear.from_linear(torch.nn.Linear(64, 32), "mxfp4", kernels={})
    n = len(asked)
    fixed.to("meta")
    assert len(asked) == n and fixed.kernel_key == F4.REFERENCE_KEY
