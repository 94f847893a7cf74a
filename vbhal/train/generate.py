"""``vbhal generate``: sample text from a model trained by ``vbhal train``.

    vbhal generate --checkpoint output/best_model.pt --prompt "def main(" --max-new-tokens 200

Accepts best_model.pt or any checkpoints/step_*.pt; loads with ``weights_only=True`` after checking the
file against its sidecar hash. Tokens are bytes (see vbhal.train.data); generation stops at the
end-of-document token.

In Python::

    import torch
    from vbhal.train.generate import load_model
    from vbhal.train.data import encode, decode
    model = load_model("output/best_model.pt")             # GPT in eval mode, on CPU
    ids = torch.tensor([encode("import ")])
    print(decode(model.generate(ids, 100, temperature=0.8, top_k=40)[0].tolist()))
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from vbhal.train._errors import VbhalError

__all__ = ["load_model", "main"]


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """The GPT stored in a best_model.pt / step_*.pt file, in eval mode on `device`."""
    from vbhal.train.checkpoint import load_checkpoint, verify_checkpoint
    from vbhal.train.model import GPT, GPTConfig
    from vbhal.train._errors import CheckpointError

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; train first (vbhal train ...) or pass the "
                              f"path of best_model.pt in the run's --output-dir.")
    reason = verify_checkpoint(path)
    if reason is not None and "sidecar" not in reason:
        raise CheckpointError(f"checkpoint {path} is not usable: {reason}.")
    state = load_checkpoint(path, map_location="cpu", verify=False)
    if "model" not in state or "model_config" not in state:
        raise CheckpointError(f"{path} has no model weights (an FSDP training checkpoint keeps them in its "
                              f".dcp folder); use best_model.pt of that run.")
    model = GPT(GPTConfig(**state["model_config"]))
    applied = state.get("optimize")
    if applied and (applied.get("fp4") or applied.get("attention")):
        # The weights were saved from an optimized model (FP4 codes and scales instead of nn.Linear
        # weights): rebuild the same structure, then load.
        import vbhal
        overrides = {k: v for k, v in applied.items() if k != "mode"}
        model = vbhal.optimize(model, applied["mode"], device=str(device), **overrides)
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vbhal generate", description="Sample text from a vbhal train model.")
    p.add_argument("--checkpoint", default="output/best_model.pt")
    p.add_argument("--prompt", default="", help="text to continue (default: empty)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from vbhal.train.data import EOS_ID, decode, encode

    try:
        if args.max_new_tokens <= 0 or args.num_samples <= 0:
            from vbhal.train._errors import ConfigError
            raise ConfigError("--max-new-tokens and --num-samples must be positive.")
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                              else ("cpu" if args.device == "auto" else args.device))
        model = load_model(args.checkpoint, device)
        gen = torch.Generator(device=device).manual_seed(args.seed)
        ids = encode(args.prompt) or [EOS_ID]   # an empty prompt starts a new document
        x = torch.tensor([ids] * args.num_samples, device=device)
        out = model.generate(x, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
                             generator=gen, stop_token=EOS_ID)
        for i in range(args.num_samples):
            new = out[i, len(ids):].tolist()
            if args.num_samples > 1:
                print(f"--- sample {i + 1} ---")
            print(args.prompt + decode(new, stop_at_eos=True))
        return 0
    except VbhalError as exc:
        print(f"vbhal generate: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
