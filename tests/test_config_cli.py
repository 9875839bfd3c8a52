"""Configuration errors name their key; the CLI's exit codes and recipes."""
import subprocess
import sys
from pathlib import Path

import pytest

from flexmol import config
from flexmol.config import ConfigError, FeaturizeConfig, FeaturizerConfig

REPO = Path(__file__).resolve().parents[1]


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="featurizer.num_conformer"):
        config.build(FeaturizeConfig, overrides=["featurizer.num_conformer=3"])


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="featurizer.num_conformers"):
        config.build(FeaturizeConfig, {"featurizer": {"num_conformers": "many"}})


def test_values_out_of_range_are_named():
    cfg = config.build(FeaturizeConfig, {"source": "x.smi", "out": "o", "featurizer": {"elements": ["C", "Xx"]}})
    with pytest.raises(ConfigError, match=r"featurizer.elements.*'Xx'"):
        config.validate_featurize(cfg)
    cfg = config.build(FeaturizeConfig, {"source": "x.smi", "out": "o", "modality": "4d"})
    with pytest.raises(ConfigError, match="modality"):
        config.validate_featurize(cfg)


def _another_value(value):
    """A different value of the same type (bool before int: a bool is an int)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "_other"
    if isinstance(value, list):
        return value[:-1]
    raise TypeError(f"no other value for {value!r}: teach this test the new type")


def test_featurizer_hash_changes_with_any_key():
    import dataclasses

    base = FeaturizerConfig()
    assert base.digest() == FeaturizerConfig().digest()
    digests = {base.digest()}
    keys = [f.name for f in dataclasses.fields(FeaturizerConfig)]
    assert len(keys) >= 13
    for key in keys:
        changed = dataclasses.replace(base, **{key: _another_value(getattr(base, key))})
        assert getattr(changed, key) != getattr(base, key)
        assert changed.digest() != base.digest(), f"featurizer.{key} does not change the hash"
        digests.add(changed.digest())
    assert len(digests) == len(keys) + 1  # every key changes it differently


@pytest.mark.parametrize("recipe", sorted((REPO / "shards").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_builds_a_valid_config(recipe):
    cfg = config.build(FeaturizeConfig, recipe)
    config.validate_featurize(cfg)


@pytest.mark.parametrize("preset", sorted((REPO / "configs" / "featurize").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_featurize_preset_composes_with_a_recipe(preset):
    cfg = config.build(FeaturizeConfig, REPO / "shards" / "qm9.yaml", preset)
    config.validate_featurize(cfg)
    assert cfg.source == "qm9"


def test_cli_reports_bad_config_with_exit_2_and_finishes_with_exit_0_despite_rejections(tmp_path):
    src = tmp_path / "in.smi"
    src.write_text("CCO\nnot_a_smiles\n")
    cmd = [sys.executable, "-m", "flexmol.cli", "featurize", str(src), "--out", str(tmp_path / "o"), "--modality", "2d",
           "--executor", "serial"]
    bad = subprocess.run(cmd + ["job.shard_sise=3"], capture_output=True, text=True)
    assert bad.returncode == 2 and "job.shard_sise" in bad.stderr
    ok = subprocess.run(cmd, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "counts: input 2, written 1, rejected 1" in ok.stdout
    missing = subprocess.run(cmd[:4] + ["nope.smi", "--out", str(tmp_path / "p")], capture_output=True, text=True)
    assert missing.returncode == 2 and "neither a file nor a named set" in missing.stderr


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_model_summary_prints_components_and_total(size):
    proc = subprocess.run([sys.executable, "-m", "flexmol.cli", "model", "summary", "--model", size],
                          capture_output=True, text=True, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("total parameters: ")
    total = int(lines[-1].split(": ")[1])
    parts = {l.split()[0]: int(l.split()[1].replace(",", "")) for l in lines[1:-1]}
    assert sum(parts.values()) == total
    assert {"shared_attention", "encoder_2d", "encoder_3d", "decoder_2to3", "decoder_3to2", "fl_2d", "fl_3d",
            "mm_encoder"} <= set(parts)
    if size == "base":
        assert 90e6 < total < 130e6  # the paper reports ~112M


def test_model_summary_rejects_an_unknown_size():
    proc = subprocess.run([sys.executable, "-m", "flexmol.cli", "model", "summary", "--model", "huge"],
                          capture_output=True, text=True, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and "no such preset" in proc.stderr
