"""`vbhal train` / `python -m vbhal.train` / `vbhal generate` command lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from vbhal.train.__main__ import build_parser, config_from_args, main
from vbhal.train._errors import ConfigError
from vbhal.train.generate import main as generate_main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MICRO = ["--config", "tiny", "--hidden-size", "32", "--num-layers", "1", "--num-heads", "2", "--seq-length", "32",
         "--batch-size", "4", "--device", "cpu", "--no-progress", "--no-tensorboard", "--log-interval", "1",
         "--warmup-steps", "1", "--val-batches", "2"]


def parse(*argv):
    return config_from_args(build_parser().parse_args(list(argv)))


def test_flags_override_config_file_which_overrides_preset(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("config: small\nlearning-rate: 0.01\nbatch_size: 7\nepochs: 3\nseed: 5\n")
    cfg = parse("--config-file", str(f), "--batch-size", "9")
    assert (cfg.config, cfg.learning_rate, cfg.batch_size, cfg.epochs, cfg.seed) == ("small", 0.01, 9, 3, 5)
    full = cfg.with_preset_defaults()
    assert full.warmup_steps == 100 and full.max_corpus_bytes == 4 * 1024 * 1024   # from the small preset
    # --max-steps on the command line replaces the file's --epochs (alternatives, not a contradiction)
    cfg2 = parse("--config-file", str(f), "--max-steps", "11")
    assert cfg2.max_steps == 11 and cfg2.epochs is None
    j = tmp_path / "run.json"
    j.write_text(json.dumps({"hidden_size": 64, "num_heads": 2}))
    assert parse("--config-file", str(j)).model_config().hidden_size == 64


def test_config_file_unknown_key_and_bad_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("learning_rat: 0.1\n")
    with pytest.raises(ConfigError, match="learning_rat"):
        parse("--config-file", str(f)).with_preset_defaults().check()
    with pytest.raises(ConfigError, match="does not exist"):
        parse("--config-file", str(tmp_path / "none.yaml"))
    g = tmp_path / "list.json"
    g.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="mapping"):
        parse("--config-file", str(g))


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "1", "--max-steps", "3"], "--epochs and --max-steps"),
    (["--data", "/nonexistent/corpus"], "not found"),
    (["--seq-length", "100000", "--max-steps", "1"], "seq_length"),
    (["--num-heads", "3", "--max-steps", "1"], "divisible"),
    (["--batch-size", "0"], "--batch-size must be a positive"),
    (["--fp4-format", "nvfp4", "--max-steps", "1"], "without --use-fp4"),
    (["--resume", "/nonexistent/run", "--max-steps", "1"], "no such file"),
    (["--mode", "memory", "--compile", "--max-steps", "1"], "torch.compile cannot trace"),
    (["--compile-mode", "max-autotune", "--max-steps", "1"], "without --compile"),
])
def test_bad_input_exits_2_with_a_message(tmp_path, corpus_dir, capsys, argv, message):
    base = MICRO + ["--output-dir", str(tmp_path / "out")]
    if "--data" not in argv:
        base += ["--data", corpus_dir]
    assert main(base + argv) == 2
    err = capsys.readouterr().err
    assert "vbhal train: error:" in err and message in err
    assert not list((tmp_path / "out").glob("checkpoints/*.pt"))


def test_out_of_range_preset_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--config", "gigantic"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_train_then_generate(tmp_path, corpus_dir, capsys):
    out = tmp_path / "out"
    assert main(MICRO + ["--data", corpus_dir, "--output-dir", str(out), "--max-steps", "8"]) == 0
    err = capsys.readouterr().err
    assert "model parameters: 23,648 total" in err
    assert generate_main(["--checkpoint", str(out / "best_model.pt"), "--prompt", "the ", "--max-new-tokens", "20",
                          "--temperature", "0", "--device", "cpu"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("the ") and len(first) > 4
    generate_main(["--checkpoint", str(out / "best_model.pt"), "--prompt", "the ", "--max-new-tokens", "20",
                   "--temperature", "0", "--device", "cpu"])
    assert capsys.readouterr().out == first          # greedy is deterministic
    assert generate_main(["--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_no_checkpoints_writes_none(tmp_path, corpus_dir):
    out = tmp_path / "out"
    assert main(MICRO + ["--data", corpus_dir, "--output-dir", str(out), "--max-steps", "3", "--no-checkpoints",
                         "--save-steps", "1"]) == 0
    assert not (out / "checkpoints").exists() and (out / "metrics.jsonl").is_file()


def test_estimate_resources_prints_the_estimate_and_exits(tmp_path, capsys):
    assert main(["--config", "tiny", "--estimate-resources", "--device", "cpu", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "total" in out and "activations" in out
    assert not list(tmp_path.iterdir())


def test_python_dash_m_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "vbhal.train", "--help"], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=REPO), timeout=60)
    assert r.returncode == 0 and "--gradient-accumulation-steps" in r.stdout and "epoch is one pass" in r.stdout


def test_use_fp4_trains_frozen_fp4_weights_and_generate_reloads_them(tmp_path, corpus_dir, capsys):
    out = tmp_path / "out"
    assert main(MICRO + ["--data", corpus_dir, "--output-dir", str(out), "--max-steps", "3", "--use-fp4"]) == 0
    err = capsys.readouterr().err
    assert "after vbhal.optimize" in err and "FP4 weights are frozen" in err
    from vbhal.train import checkpoint as C
    best = C.load_checkpoint(out / "best_model.pt")
    assert best["optimize"]["fp4"] is True
    assert best["model"]["blocks.0.attn.qkv.codes"].dtype == torch.uint8           # FP4 codes, 2 per byte
    assert "blocks.0.attn.qkv.weight" not in best["model"] and "lm_head.weight" in best["model"]
    assert generate_main(["--checkpoint", str(out / "best_model.pt"), "--prompt", "a", "--max-new-tokens", "5",
                          "--temperature", "0", "--device", "cpu"]) == 0


def test_vgpu_auto_applies_the_planners_batch_split(tmp_path, corpus_dir, capsys):
    out = tmp_path / "out"
    assert main(MICRO + ["--data", corpus_dir, "--output-dir", str(out), "--max-steps", "2", "--vgpu-auto"]) == 0
    err = capsys.readouterr().err
    assert "plan:" in err and "global batch 4" in err
