"""`vbhal train`: the training launcher (reference GPT, byte-level data, loop, checkpoints, DDP/FSDP2).

Entry points: ``vbhal train ARGS`` / ``python -m vbhal.train ARGS`` (`vbhal.train.__main__.main`) and
``vbhal generate ARGS`` (`vbhal.train.generate.main`). The model lives in `vbhal.train.model`.
"""

from vbhal.train.model import GPT, PRESETS, GPTConfig

__all__ = ["GPT", "GPTConfig", "PRESETS"]
