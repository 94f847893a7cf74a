"""Helpers for the FP4 format tests: devices, torchao (the pinned reference), float64 spec references."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

#: The torchao version the bit-exactness tests were written against (pyproject's test extra pins it).
TORCHAO_VERSION = "0.18.0"

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def torchao_mx():
    """torchao.prototype.mx_formats pieces, or skip (with the reason) if torchao is absent/unusable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao
            from torchao.prototype.mx_formats import kernels, mx_tensor, nvfp4_tensor
    except Exception as e:  # noqa: BLE001 - any import failure means "no reference here"
        pytest.skip(f"torchao=={TORCHAO_VERSION} (the bit-exactness reference) is not importable: {e}")
    if torchao.__version__.split("+")[0] != TORCHAO_VERSION:
        pytest.skip(f"bit-exactness tests are pinned to torchao=={TORCHAO_VERSION}, found {torchao.__version__}")
    return kernels, mx_tensor, nvfp4_tensor


# ---- independent spec references in float64 (no torch rounding tricks) ---------------------------
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def e2m1_ref_code(v: float) -> int:
    """Nearest E2M1 code to v (float64), ties to the even code (mantissa bit 0), saturating to 6."""
    m = abs(v)
    best = min(range(8), key=lambda i: (abs(m - E2M1[i]), i & 1))
    return best | (8 if math.copysign(1.0, v) < 0 else 0)


def mx_floor_ref_scale_code(amax: float) -> int:
    """OCP MX v1.0 section 6.3: X = 2^(floor(log2 amax) - 2), clamped to the E8M0 range."""
    if amax == 0.0:
        return 0
    _, e = math.frexp(amax)  # amax = m * 2^e, m in [0.5, 1): floor(log2 amax) = e - 1
    return max(0, min(254, (e - 1) - 2 + 127))


def mx_rceil_ref_scale_code(d: float) -> int:
    """Smallest power of two >= d (d = float32(amax / 6)), as an E8M0 code."""
    if d == 0.0:
        return 0
    m, e = math.frexp(d)
    p = e - 1 if m == 0.5 else e  # ceil(log2 d)
    return max(0, min(254, p + 127))


def random_weight(n: int, k: int, dtype=torch.float32, device="cpu", seed=0, spread=True) -> torch.Tensor:
    """Fresh random weights: normal values with per-row magnitudes spread over a few decades."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g, dtype=torch.float64)
    if spread:
        w = w * torch.exp2(torch.randint(-6, 7, (n, 1), generator=g)).to(torch.float64)
    return w.to(dtype).to(device)


def torch_bf16_to_fp4x2():
    """torch's own bf16 -> ``float4_e2m1fn_x2`` helper from its test utilities (the layout torch defines).

    ``torch.testing._internal.common_quantized`` imports five platform flags from ``common_utils``, which
    needs the optional ``expecttest`` package; when that import fails we load the file under a private
    name with those flags stubbed (sys.modules restored afterwards). Skips if torch has no such helper.
    """
    import importlib.util
    import sys
    import types

    try:
        from torch.testing._internal.common_quantized import _bfloat16_to_float4_e2m1fn_x2

        return _bfloat16_to_float4_e2m1fn_x2
    except ImportError:
        pass
    spec = importlib.util.find_spec("torch.testing._internal.common_quantized")
    if spec is None or spec.origin is None:
        pytest.skip("this torch has no torch.testing._internal.common_quantized")
    key = "torch.testing._internal.common_utils"
    saved = sys.modules.get(key)
    stub = types.ModuleType(key)
    for flag in ("TEST_WITH_TSAN", "IS_PPC", "IS_MACOS", "IS_WINDOWS", "IS_ARM64"):
        setattr(stub, flag, False)
    sys.modules[key] = stub
    try:
        private = importlib.util.spec_from_file_location("_vbhal_torch_common_quantized", spec.origin)
        mod = importlib.util.module_from_spec(private)
        private.loader.exec_module(mod)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"cannot load torch's common_quantized helpers: {e}")
    finally:
        if saved is None:
            sys.modules.pop(key, None)
        else:
            sys.modules[key] = saved
    fn = getattr(mod, "_bfloat16_to_float4_e2m1fn_x2", None)
    if fn is None:
        pytest.skip("this torch's common_quantized has no _bfloat16_to_float4_e2m1fn_x2")
    return fn
