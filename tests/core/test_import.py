"""`import vbhal` initialises no device and imports no vendor package (torchao keeps the same test)."""

import subprocess
import sys


def test_import_is_light():
    code = (
        "import sys, vbhal\n"
        "heavy = [m for m in ('triton', 'transformers', 'torch_npu', 'torchao', 'matplotlib') if m in sys.modules]\n"
        "import torch\n"
        "cuda_init = torch.cuda.is_initialized() if hasattr(torch.cuda, 'is_initialized') else False\n"
        "print(heavy, cuda_init, vbhal.__version__, callable(vbhal.optimize))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out.startswith("[] False ") and out.endswith("True"), out


def test_public_api_is_reexported():
    import vbhal

    for name in ("optimize", "enable", "disable", "is_enabled", "get_config", "detect", "stats", "print_stats",
                 "autopatch", "__version__"):
        assert hasattr(vbhal, name), name
    import vbhal.optimize  # noqa: F401  importing the submodule must not shadow the function

    assert callable(vbhal.optimize) and vbhal.optimize.__module__ == "vbhal.optimize"
