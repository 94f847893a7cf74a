"""Write the attention dispatcher's table from benchmark results measured on the GPU.

Reads one or more ``benchmarks/results/attention-<device>.json`` files (``bench_attention.py``) and
writes ``vbhal/backends/cuda/attention_table.json``: for every (device, dtype, head dim, causal, GQA,
S) and mode (forward, forward+backward), the fastest implementation. An implementation replaces SDPA's
default only when it beats it by more than ``--margin`` (default 3%), so timing noise never makes
the dispatcher slower than ``F.scaled_dot_product_attention``. The dispatcher's own rows
(``vbhal_dispatch``) are measurements of the previous table and are ignored here.

    python benchmarks/make_attention_table.py benchmarks/results/attention-nvidia-h100-80gb-hbm3.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "vbhal" / "backends" / "cuda" / "attention_table.json"
CANDIDATES = ("sdpa_default", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "vbhal")


def make_table(paths, margin: float = 0.03, existing: dict | None = None) -> dict:
    table = existing or {"devices": {}}
    table.setdefault("devices", {})
    for path in paths:
        bench = json.loads(Path(path).read_text())
        meta = bench["meta"]
        groups: dict[tuple, dict] = {}
        for r in bench["rows"]:
            if r["provider"] not in CANDIDATES or "tflops" not in r:
                continue
            key = (r["head_dim"], r["causal"], r.get("gqa", False), r["seq"])
            groups.setdefault(key, {}).setdefault(r["mode"], {})[r["provider"]] = r["tflops"]
        entries = []
        for (hd, causal, gqa, seq), modes in sorted(groups.items()):
            e = {"dtype": meta.get("dtype", "bfloat16"), "head_dim": hd, "causal": causal, "gqa": gqa, "seq": seq}
            for mode, scores in modes.items():
                best = max(scores, key=scores.get)
                default = scores.get("sdpa_default")
                if default is not None and scores[best] < default * (1 + margin):
                    best = "sdpa_default"
                e[mode] = best
                e[f"{mode}_tflops"] = {k: round(v, 1) for k, v in sorted(scores.items())}
            entries.append(e)
        table["devices"][meta["device"]] = {"torch": meta.get("torch"), "triton": meta.get("triton"),
                                            "source": Path(path).name, "margin": margin, "entries": entries}
    return table


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+")
    ap.add_argument("--margin", type=float, default=0.03)
    ap.add_argument("--out", default=str(TABLE))
    args = ap.parse_args(argv)
    out = Path(args.out)
    existing = json.loads(out.read_text()) if out.exists() else None
    table = make_table(args.results, args.margin, existing)
    out.write_text(json.dumps(table, indent=1) + "\n")
    for dev, t in table["devices"].items():
        picks = {}
        for e in t["entries"]:
            for mode in ("fwd", "fwdbwd"):
                if mode in e:
                    picks[e[mode]] = picks.get(e[mode], 0) + 1
        print(f"{dev}: {len(t['entries'])} shapes, picks {picks}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
