"""The package is self-contained: a wheel installed anywhere finds the configs it ships."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# What the wheel is built from; copied so that the build leaves nothing in the checkout and no
# stale build/ directory can slip files into the wheel.
BUILD_INPUTS = ("pyproject.toml", "README.md", "setup.py", "setup.cfg", "MANIFEST.in", "LICENSE", "flexmol")

CHECKS = """
import json, sys
from pathlib import Path

import flexmol

target, elsewhere = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
assert Path(flexmol.__file__).resolve().is_relative_to(target), flexmol.__file__

from flexmol.finetune.cli import DEFAULT_CONFIG
from flexmol.finetune.config import load as load_finetune

assert DEFAULT_CONFIG.is_file() and DEFAULT_CONFIG.resolve().is_relative_to(target), DEFAULT_CONFIG
ft = load_finetune(DEFAULT_CONFIG, {"data": {"source": "x.csv", "targets": ["y"]}})
import yaml
shipped = yaml.safe_load(DEFAULT_CONFIG.read_text())
assert ft.lora.r == shipped["lora"]["r"] and ft.split.kind == shipped["split"]["kind"] and ft.seeds == shipped["seeds"]

from flexmol.train.config import load as load_pretrain

def zero_stage(cfg):
    path = Path(cfg.deepspeed)
    assert path.is_absolute() and path.is_file(), cfg.deepspeed
    return json.loads(path.read_text())["zero_optimization"]["stage"]

default = load_pretrain(None, ["data.paired=[shards/qm9]"])
assert Path(default.deepspeed).resolve().is_relative_to(target) and zero_stage(default) == 2
assert zero_stage(load_pretrain(None, ["data.paired=[shards/qm9]", "deepspeed=zero3", "model.size=small"])) == 3

# Relative paths in a config file name files beside it; the same paths on the command line are
# relative to the working directory.
run = load_pretrain(elsewhere / "exp" / "run.yaml", ["data.paired=[shards/qm9]"])
assert Path(run.deepspeed) == elsewhere / "exp" / "ds.json" and zero_stage(run) == 1
assert run.model.size == str(elsewhere / "exp" / "net.yaml")
assert run.data.single_2d == [str(elsewhere / "exp" / "moses")]
assert run.data.paired == ["shards/qm9"] and run.output_dir == "out"
cli = load_pretrain(None, ["data.paired=[shards/qm9]", "deepspeed=exp/ds.json"])
assert Path(cli.deepspeed) == elsewhere / "exp" / "ds.json"
stage2 = load_pretrain("stage2", [])  # a packaged stage config by name
assert stage2.stage == 2 and stage2.init_from == "outputs/stage1" and zero_stage(stage2) == 2
print("checks passed")
"""


@pytest.mark.slow
def test_a_wheel_installed_elsewhere_runs_outside_the_repository(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif path.is_file():
            shutil.copy2(path, src / name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")  # offline: nothing may be fetched
    pip = [sys.executable, "-m", "pip"]
    wheels = tmp_path / "wheels"
    build = subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(wheels),
                                  str(src)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (wheel,) = wheels.glob("flexmol-*.whl")
    target = tmp_path / "site"
    install = subprocess.run(pip + ["install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
                             capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]

    elsewhere = tmp_path / "elsewhere"  # a working directory outside the repository
    (elsewhere / "exp" / "moses").mkdir(parents=True)
    (elsewhere / "exp" / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    (elsewhere / "exp" / "net.yaml").write_text("dim: 32\nheads: 2\nlayers: 1\ndecoder_layers: 1\nmm_layers: 1\n")
    (elsewhere / "exp" / "run.yaml").write_text(textwrap.dedent("""\
        deepspeed: ds.json
        model: {size: net.yaml}
        data: {single_2d: [moses]}
        output_dir: out
        """))
    assert not elsewhere.resolve().is_relative_to(REPO)
    env["PYTHONPATH"] = str(target)

    checks = subprocess.run([sys.executable, "-c", CHECKS, str(target), str(elsewhere)], capture_output=True,
                            text=True, env=env, cwd=elsewhere, timeout=600)
    assert checks.returncode == 0 and "checks passed" in checks.stdout, checks.stdout[-3000:] + checks.stderr[-3000:]

    summary = subprocess.run([sys.executable, "-m", "flexmol.cli", "model", "summary", "--model", "tiny"],
                             capture_output=True, text=True, env=env, cwd=elsewhere, timeout=600)
    assert summary.returncode == 0, summary.stderr[-3000:]
    assert summary.stdout.startswith("FlexMol tiny: d=64,")
    assert summary.stdout.strip().splitlines()[-1].startswith("total parameters: ")

    # the pre-training command runs from the package: its stage config and ZeRO config are found,
    # and a missing dataset is one line naming the key, exit 2
    missing = elsewhere / "no_such_dataset"
    pretrain = subprocess.run([sys.executable, "-m", "flexmol.cli", "pretrain", "--config", "stage1",
                               f"data.paired=[{missing}]", "wandb.mode=disabled"],
                              capture_output=True, text=True, env={**env, "DS_ACCELERATOR": "cpu"}, cwd=elsewhere,
                              timeout=600)
    assert pretrain.returncode == 2, pretrain.stdout[-2000:] + pretrain.stderr[-2000:]
    assert f"'data.paired': {missing} " in pretrain.stderr  # the key and the directory, whatever the wording
    assert "Traceback" not in pretrain.stderr and len(pretrain.stderr.strip().splitlines()) == 1


def test_names_resolve_in_the_package_and_config_paths_beside_their_file(tmp_path, monkeypatch):
    import argparse

    from flexmol import config
    from flexmol.config import ConfigError
    from flexmol.finetune.cli import add_arguments, config_from
    from flexmol.train.config import load

    assert config.resolve_resource("model", "tiny") == config.PACKAGE_CONFIGS / "model" / "tiny.yaml"
    assert config.resource_names("deepspeed") == ["zero1", "zero2", "zero3"]
    with pytest.raises(ConfigError, match=r"deepspeed 'zero4': no such preset \(known: zero1, zero2, zero3"):
        config.resolve_resource("deepspeed", "zero4")
    with pytest.raises(ConfigError, match="deepspeed 'zero2.json': no such file"):
        config.resolve_resource("deepspeed", "zero2.json")  # a path means a file, here in the working directory

    exp, cwd = tmp_path / "exp", tmp_path / "cwd"
    for d in (exp / "qm9", exp / "tiny", cwd / "exp"):
        d.mkdir(parents=True)
    (exp / "ds.json").write_text('{"zero_optimization": {"stage": 3}}')
    (exp / "data.csv").write_text("smiles,y\nCCO,1\n")
    (cwd / "exp" / "ds.json").write_text('{"zero_optimization": {"stage": 1}}')
    (exp / "run.yaml").write_text("deepspeed: ds.json\nmodel: {size: tiny}\ndata: {paired: [qm9, shards/x]}\n"
                                  "init_from: qm9\nstage: 2\n")
    monkeypatch.chdir(cwd)
    cfg = load(exp / "run.yaml")
    assert cfg.deepspeed == str(exp / "ds.json")  # beside the file, although exp/ds.json exists in the cwd too
    assert cfg.model.size == "tiny"  # a name stays a name, though exp/tiny exists
    assert cfg.data.paired == [str(exp / "qm9"), "shards/x"] and cfg.init_from == str(exp / "qm9")
    cfg = load(exp / "run.yaml", ["deepspeed=exp/ds.json", "data.paired=[qm9]"])  # command line: the cwd
    assert cfg.deepspeed == str(cwd / "exp" / "ds.json") and cfg.data.paired == ["qm9"]
    assert load(None, ["data.paired=[x]"]).deepspeed == str(config.PACKAGE_CONFIGS / "deepspeed" / "zero2.json")

    (exp / "ft.yaml").write_text("data: {source: data.csv, targets: [y]}\nscratch_model: tiny\nbaselines: [scratch]\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    ft = config_from(parser.parse_args(["--config", str(exp / "ft.yaml")]), [])
    assert ft.data.source == str(exp / "data.csv") and ft.scratch_model == "tiny" and ft.lora.r == 64
