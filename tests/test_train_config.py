"""Pre-training configs: every shipped one parses; errors name their key; the LR schedule."""
from pathlib import Path

import pytest

from flexmol.config import ConfigError
from flexmol.train import config as tc
from flexmol.train.schedule import lr_factor

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "pretrain").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_pretrain_config_parses(path):
    cfg = tc.load(path)
    assert cfg.data.paired or cfg.data.single_2d


def test_overrides_and_errors_name_the_key():
    cfg = tc.load(REPO / "configs" / "pretrain" / "stage1.yaml", ["model.size=small", "train.max_steps=7"])
    assert cfg.model.size == "small" and cfg.train.max_steps == 7
    with pytest.raises(ConfigError, match="train.max_step"):
        tc.load(REPO / "configs" / "pretrain" / "stage1.yaml", ["train.max_step=7"])
    with pytest.raises(ConfigError, match="init_from"):
        tc.load(REPO / "configs" / "pretrain" / "stage2.yaml", ["init_from=null"])
    with pytest.raises(ConfigError, match="train.precision"):
        tc.load(REPO / "configs" / "pretrain" / "stage1.yaml", ["train.precision=fp16"])
    ramp = tc.load(REPO / "configs" / "pretrain" / "stage2.yaml")
    assert [dict(p.weights) for p in ramp.data.mix] == [{"paired": 1.0, "single_2d": 0.0}, {"paired": 0.3, "single_2d": 0.7}]
    with pytest.raises(ConfigError, match="data.mix"):
        tc.load(REPO / "configs" / "pretrain" / "stage1.yaml", ["data.mix=[{step: 0, weights: {single_3d: 1.0}}]"])
    with pytest.raises(ConfigError, match="model.size 'huge'"):
        tc.load(REPO / "configs" / "pretrain" / "stage1.yaml", ["model.size=huge"])


def test_lr_warms_up_then_decays_to_the_floor():
    f = [lr_factor(s, warmup=10, total=110, decay="cosine", min_ratio=0.1) for s in range(120)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[110] == pytest.approx(0.1) and f[119] == pytest.approx(0.1)
    assert lr_factor(60, 10, 110, "linear", 0.0) == pytest.approx(0.5)
    assert lr_factor(500, 10, 110, "constant", 0.0) == 1.0


def test_warm_up_is_a_tenth_of_max_steps_unless_set_and_never_longer_than_the_run():
    stage1 = REPO / "configs" / "pretrain" / "stage1.yaml"
    assert tc.load(stage1).train.warmup_steps == 100  # 1000 steps
    assert tc.load(stage1, ["train.max_steps=50"]).train.warmup_steps == 5  # a short try of the shipped stage
    assert tc.load(stage1, ["train.max_steps=50", "train.warmup_steps=50"]).train.warmup_steps == 50
    with pytest.raises(ConfigError, match=r"'train.warmup_steps': 60 is more than train.max_steps \(50\)"):
        tc.load(stage1, ["train.max_steps=50", "train.warmup_steps=60"])
