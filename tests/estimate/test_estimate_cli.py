"""`vbhal estimate` on the command line."""

from __future__ import annotations

import json

import pytest

from vbhal._estimate_cli import main


def test_table_by_default(capsys):
    assert main(["--config", "tiny", "--batch-size", "2", "--seq-length", "64"]) == 0
    out = capsys.readouterr().out
    assert "optimizer state" in out and "peak allocated" in out and "batch 2 x seq 64" in out


def test_budgets_add_the_plan(capsys):
    assert main(["--config", "small", "--batch-size", "4", "--seq-length", "128", "--gpu-mem", "1GB",
                 "--cpu-mem", "8 GiB", "--disk", "100GB", "--global-batch", "32"]) == 0
    out = capsys.readouterr().out
    assert "plan: mode" in out and "grad accumulation" in out and "overrides:" in out


def test_json_output(capsys):
    assert main(["--config", "tiny", "--batch-size", "2", "--seq-length", "32", "--json", "--checkpointing",
                 "--fp4", "nvfp4"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["estimate"]["setup"]["fp4"] == "nvfp4" and data["plan"] is None
    assert data["estimate"]["peak_allocated"] > data["estimate"]["parameters"]


def test_hf_config_file(tmp_path, capsys):
    pytest.importorskip("transformers")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                               "vocab_size": 256, "max_position_embeddings": 128}))
    assert main(["--hf", str(cfg), "--batch-size", "2", "--seq-length", "64"]) == 0
    assert "hf:llama" in capsys.readouterr().out


@pytest.mark.parametrize("argv,msg", [
    (["--config", "huge"], "unknown model preset"),
    (["--config", "tiny", "--gpu-mem", "eight"], "cannot parse 'eight'"),
    (["--config", "tiny", "--batch-size", "0"], "batch_size"),
])
def test_errors_exit_2_with_a_message(argv, msg, capsys):
    assert main(argv) == 2
    assert msg in capsys.readouterr().err
