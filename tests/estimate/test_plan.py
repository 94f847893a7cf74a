"""The planner: largest batch that fits, the ladder of optimizations, what to do when nothing fits."""

from __future__ import annotations

import json
import sys

import pytest

import vbhal.estimate  # noqa: F401
from vbhal.config import OptimizeConfig
from vbhal.errors import EstimateError

E = sys.modules["vbhal.estimate"]
MB = 10**6


def _fits(model, seq, b, p, cap):
    """The estimator's verdict for batch b under the cap (the allocator model's replay on CUDA)."""
    est = E.estimate(model, batch_size=b, seq_length=seq, gradient_checkpointing=p.gradient_checkpointing,
                     fp4=p.fp4_format if p.fp4 else None, offload=p.offload, gpu_mem=cap)
    return est.tier("device").fits


def test_plan_picks_the_largest_batch_that_fits():
    p = E.plan("small", gpu_mem=600 * MB, cpu_mem="8GB", disk="10GB", seq_length=256, max_batch_size=256)
    assert p.fits and p.mode == "speed" and not p.gradient_checkpointing
    assert 1 < p.batch_size < 256
    assert _fits("small", 256, p.batch_size, p, 600 * MB) and not _fits("small", 256, p.batch_size + 1, p, 600 * MB)
    assert p.estimate.peak_allocated <= 600 * MB and p.estimate.tier("device").fits
    dev = p.tiers[0]
    assert (dev.name, dev.level, dev.capacity) == ("device", 0, 600 * MB) and dev.used <= dev.capacity


def _long_context():
    # activations dominate at long context: checkpointing is what makes it fit
    from vbhal.train.model import GPTConfig

    return GPTConfig(hidden_size=128, num_layers=4, num_heads=4, seq_length=2048)


def test_plan_turns_on_checkpointing_when_speed_mode_cannot_fit():
    cfg = _long_context()
    speed_b1 = E.estimate(cfg, batch_size=1, seq_length=2048).peak_allocated
    p = E.plan(cfg, gpu_mem=int(speed_b1 * 0.99), cpu_mem="8GB", disk="10GB", seq_length=2048, max_batch_size=32)
    assert p.fits and p.mode == "balanced" and p.gradient_checkpointing and p.batch_size >= 1
    saved = {o.name: o for o in p.optimizations}
    assert saved["gradient checkpointing"].enabled and saved["gradient checkpointing"].saves > 0
    assert saved["flash attention"].saves > 0


def test_plan_offloads_when_model_states_do_not_fit_and_fp4_only_when_allowed():
    # at batch 1 the model states of "medium" dominate: checkpointing cannot help, offload can
    ck = E.estimate("medium", batch_size=1, seq_length=256, gradient_checkpointing=True).peak_allocated
    p = E.plan("medium", gpu_mem=int(ck * 0.9), cpu_mem="8GB", disk="10GB", seq_length=256, max_batch_size=4)
    assert p.fits and p.offload and p.mode == "memory" and not p.fp4
    assert p.tiers[1].used > 0  # model states in the host tier
    q = E.plan("medium", gpu_mem=int(ck * 0.9), cpu_mem="8GB", disk="10GB", seq_length=256, max_batch_size=4,
               allow_fp4=True)
    assert q.fits and q.fp4 and q.mode == "full"


def test_gradient_accumulation_reaches_the_global_batch():
    p = E.plan("small", gpu_mem=600 * MB, cpu_mem="8GB", disk="10GB", seq_length=256, global_batch=100)
    assert p.fits
    assert p.batch_size * p.grad_accum >= 100
    assert p.batch_size * (p.grad_accum - 1) < 100
    assert p.global_batch == p.batch_size * p.grad_accum


def test_nothing_fits_says_what_is_missing_and_what_would_fit():
    p = E.plan("small", gpu_mem="5MB", cpu_mem="10MB", disk="10MB", seq_length=256)
    assert not p.fits and p.batch_size == 0
    assert "nothing fits" in p.missing and "more than" in p.missing
    assert any("a device with at least" in s for s in p.suggestions)
    text = E.format_plan(p)
    assert "DOES NOT FIT" in text and "would fit" in text


def test_overrides_build_an_optimize_config():
    p = E.plan("small", gpu_mem="1GB", cpu_mem="8GB", disk="10GB", seq_length=256, global_batch=64)
    ov = p.to_optimize_overrides()
    assert set(ov) == {"mode", "fp4", "fp4_format", "attention", "mixed_precision", "gradient_checkpointing",
                       "offload", "batch_size", "grad_accum"}
    batch, accum = ov.pop("batch_size"), ov.pop("grad_accum")
    cfg = OptimizeConfig.for_mode(ov.pop("mode"), **ov)
    assert cfg.gradient_checkpointing == p.gradient_checkpointing and cfg.mixed_precision == "bf16"
    assert (batch, accum) == (p.batch_size, p.grad_accum)
    json.dumps(p.to_dict(), default=str)


def test_plan_on_cpu_uses_the_host_budget():
    p = E.plan("tiny", device="cpu", cpu_mem="200MB", disk="1GB", seq_length=128, max_batch_size=64)
    assert p.fits and p.batch_size >= 1
    assert p.estimate.tiers[0].name == "host"


def test_plan_rejects_bad_budgets():
    with pytest.raises(EstimateError, match="gpu_mem"):
        E.plan("tiny", gpu_mem="eight", cpu_mem="1GB", disk="1GB")
    with pytest.raises(EstimateError, match="global_batch"):
        E.plan("tiny", gpu_mem="1GB", cpu_mem="1GB", disk="1GB", global_batch=0)
