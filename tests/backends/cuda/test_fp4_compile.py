"""Ahead-of-time compiles of the FP4 Triton kernels for GPUs this machine does not have (no GPU needed: Triton
emits PTX and runs its bundled ptxas): sm_80 (A100, and the Ampere cards our users have) and sm_90 (H100), both
formats, with M = 1, which Triton specializes to a constant. Session 7 lost a change to each: the GPU's own E4M3
conversion does not compile below sm_89, and ``M.to(...)`` fails when Triton makes M = 1 a Python int -- neither
shows under the interpreter, which runs neither compiler nor specialization."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed")

try:  # the ahead-of-time compile API (triton >= 3.2)
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as e:  # pragma: no cover - an older or changed triton
    pytest.skip(f"triton {triton.__version__} has no ASTSource/GPUTarget ({e})", allow_module_level=True)

from vbhal.backends.cuda import fp4_kernels as K  # noqa: E402

_LINEAR = {"x_ptr": "*bf16", "codes_ptr": "*i32", "scales_ptr": "*u8", "ts_ptr": "*fp32", "bias_ptr": "*bf16",
           "y_ptr": "*bf16", "ws_ptr": "*fp32", "M": "constexpr", "N": "i32", "K": "i32", "NUM_BLOCKS": "i32",
           "stride_xm": "i32", "stride_cn": "i32", "stride_sn": "i32", "stride_ym": "i32"}


def _compile(fn, signature, constexprs, arch, warps=4):
    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    try:
        return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": 3})
    except FileNotFoundError as e:  # no ptxas in this triton install
        pytest.skip(f"triton cannot compile for CUDA here: {e}")


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("nv", [False, True], ids=["mxfp4", "nvfp4"])
def test_fp4_kernels_compile_ahead_of_time(arch, nv):
    block = 16 if nv else 32
    common = {"IS_NV": nv, "HAS_BIAS": True, "BLOCK": block, "M": 1}
    # the M = 1 GEMV, split and not
    for split in (1, 2):
        c = _compile(K.fp4_gemv_pf_kernel, _LINEAR, {**common, "BLOCK_N": 16, "NBK": 64 if nv else 32,
                                                        "SPLIT_K": split}, arch)
        assert c.asm["ptx"]
    # the packed tensor-core kernels (bf16 packing needs sm_80+), split-K, M = 1 and a real M
    mm = {**_LINEAR, "M_BUCKET": "i32"}
    for kern, bm in ((K.fp4_mm_p_kernel, 16), (K.fp4_mm_pt_kernel, 64)):
        for m in (1, None):
            consts = {**common, "BLOCK_M": bm, "BLOCK_N": 128, "NBK": 4, "GROUP_M": 8, "SPLIT_K": 2, "EVEN_K": True,
                      "PACKED": True}
            sig = dict(mm)
            if m is None:
                consts.pop("M")
                sig["M"] = "i32"
            assert _compile(kern, sig, consts, arch).asm["ptx"]
    deq = {"codes_ptr": "*u8", "scales_ptr": "*u8", "ts_ptr": "*fp32", "out_ptr": "*bf16", "N": "i32", "K": "i32",
           "NUM_BLOCKS": "i32", "stride_cn": "i32", "stride_sn": "i32", "stride_on": "i32"}
    assert _compile(K.fp4_dequantize_kernel, deq, {"IS_NV": nv, "BLOCK": block, "ROWS": 8, "NBK": 16}, arch).asm["ptx"]
    q = {"w_ptr": "*bf16", "codes_ptr": "*u8", "scales_ptr": "*u8", "ts_ptr": "*fp32", "bad_ptr": "*i32", "N": "i32",
         "K": "i32", "NUM_BLOCKS": "i32", "stride_wn": "i32", "stride_cn": "i32", "stride_sn": "i32"}
    assert _compile(K.fp4_quantize_kernel, q, {"IS_NV": nv, "RCEIL": False, "BLOCK": block, "ROWS": 8, "NBK": 16},
                    arch).asm["ptx"]
    if nv:
        amax = {"w_ptr": "*bf16", "out_ptr": "*i32", "numel": "i32"}
        assert _compile(K.fp4_amax_kernel, amax, {"BLOCK": 8192}, arch, warps=8).asm["ptx"]
