"""Configuration: mode presets and the order of sources; bad values name their source."""

import json

import pytest

from vbhal.config import MODE_PRESETS, OptimizeConfig, resolve_config
from vbhal.errors import ConfigError


@pytest.fixture
def where(tmp_path):
    home, cwd = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    cwd.mkdir()
    return home, cwd


def test_each_mode_is_its_preset(where):
    home, cwd = where
    for mode, preset in MODE_PRESETS.items():
        cfg = resolve_config(mode, env={}, cwd=cwd, home=home)
        assert cfg.mode == mode
        for key, value in preset.items():
            assert getattr(cfg, key) == value, (mode, key)


def test_sources_override_in_order(where):
    home, cwd = where
    (home / ".vbrc").write_text(json.dumps({"mode": "speed", "fp4_format": "nvfp4", "offload": True}))
    (cwd / ".vbrc").write_text(json.dumps({"offload": False, "fp4": True}))
    (cwd / "pyproject.toml").write_text('[tool.vbhal]\nfp4-format = "mxfp4"\nmixed_precision = "fp16"\n')
    env = {"VBHAL_MIXED_PRECISION": "none"}
    cfg = resolve_config(env=env, cwd=cwd, home=home)
    assert cfg.mode == "speed"  # home .vbrc
    assert cfg.offload is False  # cwd .vbrc beats home .vbrc
    assert cfg.fp4 is True
    assert cfg.fp4_format == "mxfp4"  # pyproject beats .vbrc
    assert cfg.mixed_precision == "none"  # environment beats files
    cfg = resolve_config(env=env, cwd=cwd, home=home, overrides={"mixed_precision": "bf16"})
    assert cfg.mixed_precision == "bf16"  # explicit arguments win


def test_legacy_variables_are_accepted(where):
    home, cwd = where
    cfg = resolve_config(env={"VB_MODE": "memory", "VB_AUTO_PATCH": "0"}, cwd=cwd, home=home)
    assert cfg.mode == "memory" and cfg.offload is True and cfg.autopatch_hf is False
    cfg = resolve_config(env={"VB_MODE": "memory", "VBHAL_MODE": "full"}, cwd=cwd, home=home)
    assert cfg.mode == "full"  # the vbhal name beats the legacy alias


@pytest.mark.parametrize(
    "env, fragment",
    [
        ({"VBHAL_MODE": "fastest"}, "environment variable VBHAL_MODE"),
        ({"VB_MODE": "turbo"}, "environment variable VB_MODE"),
        ({"VBHAL_FP4": "maybe"}, "environment variable VBHAL_FP4"),
        ({"VBHAL_FP4_FORMAT": "int4"}, "environment variable VBHAL_FP4_FORMAT"),
    ],
)
def test_bad_environment_value_names_the_variable(where, env, fragment):
    home, cwd = where
    with pytest.raises(ConfigError, match=fragment):
        resolve_config(env=env, cwd=cwd, home=home)


def test_bad_file_value_names_file_and_key(where):
    home, cwd = where
    (cwd / ".vbrc").write_text(json.dumps({"mixed_precision": "fp8"}))
    with pytest.raises(ConfigError, match=r"\.vbrc: key 'mixed_precision'"):
        resolve_config(env={}, cwd=cwd, home=home)
    (cwd / ".vbrc").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        resolve_config(env={}, cwd=cwd, home=home)
    (cwd / ".vbrc").write_text(json.dumps({"turbo": True}))
    with pytest.raises(ConfigError, match="unknown setting 'turbo'"):
        resolve_config(env={}, cwd=cwd, home=home)
    (cwd / ".vbrc").unlink()
    (cwd / "pyproject.toml").write_text("[tool.vbhal]\nfp4 = 3\n")
    with pytest.raises(ConfigError, match=r"pyproject.toml: \[tool.vbhal\] key 'fp4'"):
        resolve_config(env={}, cwd=cwd, home=home)


def test_unknown_mode_argument():
    with pytest.raises(ConfigError, match="mode='turbo' is not one of"):
        OptimizeConfig.for_mode("turbo")
    with pytest.raises(ConfigError, match="contradicts"):
        resolve_config("speed", OptimizeConfig.for_mode("memory"), env={})


def test_config_is_frozen():
    cfg = OptimizeConfig()
    with pytest.raises(Exception):
        cfg.fp4 = True  # type: ignore[misc]
    assert cfg.replace(fp4=True).fp4 is True and cfg.fp4 is False
