"""The command line as a careless or hostile user meets it: every mistake is one line on stderr
naming the flag or file, exit 2; nothing is written for a refused command; every argument is
described with its default in --help."""
import argparse
import gzip
from pathlib import Path

import pytest
from rdkit import Chem

from flexmol import save_pretrained
from flexmol.cli import build_parser, main as cli
from flexmol.model import FlexMol
from flexmol.model.summary import model_config


def _one_line_error(capsys, *needles, progress=""):
    err = "\n".join(line for line in capsys.readouterr().err.strip().splitlines()
                    if not (progress and line.startswith(progress)))
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def test_confgen_refuses_a_binary_input_in_one_line_naming_it(tmp_path, capsys):
    binary = tmp_path / "garbage.smi"  # gzip data under a text name
    binary.write_bytes(gzip.compress(b"CCO\nc1ccccc1\n" * 50) + b"\nCCO ethanol\n")
    out = tmp_path / "c.sdf"
    rc = cli(["confgen", "--input", str(binary), "--out", str(out)])
    err = _one_line_error(capsys, str(binary), "binary data, not a text file")
    assert rc == 2 and "rejected" not in err
    assert not out.exists()


def test_confgen_reads_a_csv_and_names_rejects_by_their_id(tmp_path, capsys):
    csv = tmp_path / "m.csv"
    csv.write_text("name,smiles\naspirin,CC(=O)Oc1ccccc1C(=O)O\nbroken,C1CC(\n")
    out = tmp_path / "c.sdf"
    assert cli(["confgen", "--input", str(csv), "--out", str(out), "--num-confs", "1"]) == 0
    captured = capsys.readouterr()
    assert [m.GetNumHeavyAtoms() for m in Chem.SDMolSupplier(str(out))] == [13]
    assert "C1CC(" in captured.err and "1 rejected" in captured.out


@pytest.mark.parametrize("argv, needle", [
    (["confgen", "--input", "{tmp}/missing.smi", "--out", "{tmp}/o.sdf"], "--input"),
    (["confgen", "--input", "{tmp}", "--out", "{tmp}/o.sdf"], "is a directory"),
    (["confgen", "--smiles", "CCO", "--out", "{tmp}"], "--out"),
    (["confgen", "--smiles", "CCO", "--out", "{tmp}/file.txt/o.sdf"], "not a directory"),
    (["confgen", "--smiles", "CCO", "--num-confs", "0", "--out", "{tmp}/o.sdf"], "--num-confs"),
    (["confgen", "--smiles", "CCO", "--refine-steps", "-1", "--out", "{tmp}/o.sdf"], "--refine-steps"),
    (["confgen", "--smiles", "CCO", "--checkpoint", "{tmp}", "--out", "{tmp}/o.sdf"], "--checkpoint"),
    (["confgen", "--out", "{tmp}/o.sdf"], "no molecules"),
    (["evaluate", "confgen", "--count", "0", "--out", "{tmp}/ev"], "--count"),
    (["evaluate", "confgen", "--stride", "0", "--out", "{tmp}/ev"], "--stride"),
    (["evaluate", "confgen", "--start", "-3", "--out", "{tmp}/ev"], "--start"),
    (["evaluate", "confgen", "--exclude-shards", "{tmp}/nowhere", "--out", "{tmp}/ev"], "--exclude-shards"),
    (["evaluate", "confgen", "--out", "{tmp}/file.txt"], "not a directory"),
    (["evaluate", "confgen", "--checkpoint", "{tmp}/garbage", "--out", "{tmp}/ev"], "--checkpoint"),
    (["shards", "inspect", "{tmp}/nowhere"], "no such directory"),
    (["shards", "inspect", "{tmp}/file.txt"], "not a directory"),
    (["shards", "inspect", "{tmp}"], "manifest.json"),
    (["demo", "--seeds", "0", "--out", "{tmp}/demo"], "--seeds"),
    (["demo", "--out", "{tmp}/file.txt"], "--out"),
])
def test_a_users_mistake_is_one_line_naming_the_flag_with_exit_2(tmp_path, capsys, argv, needle):
    (tmp_path / "file.txt").write_text("not a directory\n")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "model.safetensors").write_bytes(b"\x00" * 64)
    (garbage / "model.yaml").write_text("width: 64\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli(argv) == 2
    _one_line_error(capsys, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written for a refused command


def test_a_refused_evaluation_beyond_the_data_writes_no_table_of_nan(qm9_rows, tmp_path, capsys):
    assert cli(["evaluate", "confgen", "--count", "2", "--start", "10000000", "--out", str(tmp_path / "ev")]) == 2
    _one_line_error(capsys, "no held-out molecule", progress="[confgen]")
    assert not (tmp_path / "ev" / "confgen.json").exists()


def test_an_unwritable_output_is_one_line_not_a_traceback(tmp_path, capsys):
    # /proc refuses new files even to root, so this holds whoever runs the tests
    assert cli(["confgen", "--smiles", "CCO", "--out", "/proc/flexmol-test.sdf"]) == 2
    _one_line_error(capsys, "/proc/flexmol-test.sdf")


def test_a_checkpoint_with_altered_weights_is_refused_in_one_line(tmp_path, capsys):
    export = save_pretrained(FlexMol(model_config("tiny")), tmp_path / "export")
    weights = export / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    assert cli(["confgen", "--smiles", "CCO", "--checkpoint", str(export), "--out", str(tmp_path / "o.sdf")]) == 2
    _one_line_error(capsys, "--checkpoint")
    assert not (tmp_path / "o.sdf").exists()


def _subparsers(parser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name), sub
                yield from _subparsers(sub, (*prefix, name))


def test_every_argument_of_every_command_is_described_with_its_default():
    commands = dict(_subparsers(build_parser()))
    assert {("confgen",), ("evaluate", "confgen"), ("demo",), ("pretrain",), ("finetune",), ("featurize",)} \
        <= set(commands)
    for path, sub in commands.items():
        assert sub.description, f"flexmol {' '.join(path)} has no description"
        text = sub.format_help()
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            name = action.option_strings[-1] if action.option_strings else action.dest
            assert action.help, f"flexmol {' '.join(path)} {name} has no help"
            if action.option_strings and not any(action.default is v for v in (None, False, argparse.SUPPRESS)) \
                    and action.default != []:
                flat = " ".join(text.split())
                assert f"(default: {action.default})" in flat or "default:" in action.help, (path, name)


def test_pretrain_help_shows_key_value_overrides():
    help_text = dict(_subparsers(build_parser()))[("pretrain",)].format_help()
    assert "key=value" in help_text.splitlines()[0] and "train.max_steps=100" in help_text


def test_a_text_file_that_is_not_a_config_is_named_not_printed(tmp_path, capsys):
    notes = tmp_path / "accounts.txt"  # colon-separated lines: YAML reads the whole file as one key
    notes.write_text("".join(f"user{i}:x:{i}:{i}:/home/user{i}:/bin/sh\n" for i in range(40)))
    assert cli(["model", "summary", "--model", str(notes)]) == 2
    err = _one_line_error(capsys, str(notes), "not a config file")
    assert len(err) < 300 and "user39" not in err


@pytest.fixture(scope="module")
def small_paired(tmp_path_factory, nci_smi):
    """12 NCI molecules featurised as paired data, in 3 shards."""
    from flexmol import config
    from flexmol.featurize import run_featurize

    root = tmp_path_factory.mktemp("cli_errors")
    smi = root / "twelve.smi"
    smi.write_text("".join(nci_smi.read_text().splitlines(keepends=True)[:12]))
    out = root / "paired"
    run_featurize(config.build(config.FeaturizeConfig, {
        "source": str(smi), "out": str(out), "modality": "paired",
        "job": {"executor": "serial", "shard_size": 4, "progress": False}}), log=lambda m: None)
    return out


def test_a_damaged_dataset_to_exclude_is_refused_before_any_work(small_paired, tmp_path, capsys):
    import shutil

    damaged = Path(shutil.copytree(small_paired, tmp_path / "damaged"))
    shard = sorted(damaged.glob("*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[:700])  # cut inside the first record
    assert cli(["evaluate", "confgen", "--exclude-shards", str(damaged), "--out", str(tmp_path / "ev")]) == 2
    _one_line_error(capsys, "--exclude-shards", "damaged dataset", shard.name)
    assert not (tmp_path / "ev").exists()


def test_alignment_refuses_an_unusable_out_before_evaluating(small_paired, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    export = save_pretrained(FlexMol(model_config("tiny")), tmp_path / "export")
    rc = cli(["evaluate", "alignment", "--checkpoint", str(export), "--data", str(small_paired), "--count", "4",
              "--device", "cpu", "--out", str(tmp_path / "file.txt" / "report.json")])
    assert rc == 2
    err = _one_line_error(capsys, "--out", "file.txt")
    assert err.startswith("flexmol evaluate alignment: ")
    assert "2D -> 3D" not in capsys.readouterr().out  # refused before the evaluation ran


def test_an_environment_refusal_names_the_whole_command(tmp_path, capsys, monkeypatch):
    import flexmol.data.shards as shards

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied", str(tmp_path / "manifest.json"))

    (tmp_path / "manifest.json").write_text("{}")
    monkeypatch.setattr(shards, "inspect", refuse)
    assert cli(["shards", "inspect", str(tmp_path)]) == 2
    err = _one_line_error(capsys, "Permission denied", "manifest.json")
    assert err.startswith("flexmol shards inspect: ")


def test_a_finetune_refused_for_its_data_leaves_no_output_folder(tmp_path, capsys):
    binary = tmp_path / "mols.smi"
    binary.write_bytes(gzip.compress(b"CCO 1\n" * 100))  # gzip bytes under a .smi name
    out = tmp_path / "run"
    assert cli(["finetune", "--data", str(binary), "--target", "y", "--baselines", "ecfp_rf", "--out", str(out)]) == 2
    _one_line_error(capsys, str(binary))
    assert not out.exists()
