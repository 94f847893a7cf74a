"""`vbhal bench NAME [ARGS]`: run benchmarks/bench_NAME.py from a source checkout.

The benchmarks time vbhal against its peers (cuBLAS, SDPA, torch int4, bitsandbytes, DeepSpeed...) on one
device in one run, print a table and write JSON under benchmarks/results/. They live in the repository, not
in the wheel: this command finds them next to the package of a source or editable install.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def benchmarks_dir() -> Path | None:
    import vbhal

    candidate = Path(vbhal.__file__).resolve().parents[1] / "benchmarks"
    return candidate if candidate.is_dir() else None


def main(argv: list[str]) -> int:
    where = benchmarks_dir()
    if where is None:
        print("vbhal bench: the benchmarks ship with the source repository, not the wheel; clone it and run "
              "`pip install -e .` there", file=sys.stderr)
        return 2
    names = sorted(p.stem[len("bench_"):] for p in where.glob("bench_*.py"))
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: vbhal bench NAME [ARGS...]\navailable: " + ", ".join(names))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in names:
        print(f"vbhal bench: no benchmark {name!r}; available: {', '.join(names)}", file=sys.stderr)
        return 2
    script = where / f"bench_{name}.py"
    old = sys.argv
    sys.argv = [str(script), *rest]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    return 0
