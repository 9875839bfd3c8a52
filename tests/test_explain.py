"""`flexmol explain`: attention capture, the two importance methods, functional groups, the report,
and faithfulness on a task whose label is a substructure (a carboxylic acid), fine-tuned through
`flexmol finetune`'s code path."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, nci_molecules
from flexmol.model import FlexMol
from flexmol.model.network import ModelConfig

sys.path.insert(0, str(REPO / "benchmarks"))
import explain_faithfulness as faith  # noqa: E402

TINY = ModelConfig(dim=32, heads=4, layers=2, decoder_layers=1, mm_layers=1, ffn_mult=2, num_kernels=8, proj_dim=16)
ASPIRIN = "CC(=O)Oc1ccccc1C(=O)O"
HARD_FLOOR = 0.6  # measured: see test_gradient_importance_ranks_the_acid_atoms_first


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    from flexmol.model.export import save_pretrained

    torch.manual_seed(0)
    return save_pretrained(FlexMol(TINY), tmp_path_factory.mktemp("explain") / "export")


@pytest.fixture(scope="module")
def parsed(nci_smi):
    from flexmol.tools.explain import parse

    molecules, rejects = parse([s for s, _ in nci_molecules(nci_smi, 12)])
    assert not rejects and len(molecules) == 12
    return molecules


@pytest.fixture(scope="module")
def faithfulness(nci_smi, tmp_path_factory):
    """The protocol of benchmarks/explain_faithfulness.py at a small size, seed 0: a tiny model
    fully fine-tuned for 8 epochs in batches of 16 on "contains a carboxylic acid" (molecules of the
    first 1,500 lines), explained with 8 integrated-gradients points (not the 32 completeness
    needs: a cheaper test)."""
    work = tmp_path_factory.mktemp("faithfulness")
    result = faith.run_protocol(nci_smi, work, 0, stop=1500, steps=8,
                                train={"epochs": 8, "patience": 8, "batch_size": 16})
    return result, work


def _task_model(work):
    from flexmol.finetune.model import load_task_model

    return load_task_model(work / "finetune" / "runs" / "flexmol" / "seed0" / "model", work / "export")


# --------------------------------------------------------------------------- attention capture

def _batch(parsed, cfg):
    from flexmol.data.collate import collate

    return collate([p.record for p in parsed], cfg.max_spd, cfg.max_path)


def test_capture_attention_leaves_outputs_unchanged_and_rows_sum_to_one(export, parsed):
    from flexmol import load_pretrained
    from flexmol.model.layers import capture_attention

    model = load_pretrained(export)
    batch = _batch(parsed, model.cfg)
    with torch.no_grad():
        plain = model(batch, decode=False)
        with capture_attention(model.encoder_2d, model.encoder_3d) as records:
            captured = model(batch, decode=False)
    for key in ("x_f", "y_f", "h", "pair", "embedding"):
        assert torch.equal(plain[key], captured[key]), key
    # a 2D batch runs the 2D encoder, then the 3D encoder on the generated 3D input
    assert len(records) == 2 * TINY.layers
    mask = batch["mask"]
    for probs in records:
        assert probs.shape == mask.shape + mask.shape[1:]
        assert torch.allclose(probs.sum(-1), torch.ones_like(probs[..., 0]), atol=1e-5)  # padding queries too
        assert float(probs.masked_select(~mask[:, None, :].expand_as(probs)).abs().max()) == 0  # no padding key
    with torch.no_grad():
        model(batch, decode=False)
    assert len(records) == 2 * TINY.layers  # the hooks are gone after the block


def test_captured_probabilities_are_those_the_attention_applies():
    """With one head, the recorded probabilities times V reproduce the attention's output."""
    from flexmol.model.layers import PairTransformer, capture_attention

    torch.manual_seed(0)
    stack = PairTransformer(8, 1, 1).eval()
    layer = stack.layers[0]
    x, pair = torch.randn(2, 5, 8), torch.randn(2, 5, 5, 1)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    with torch.no_grad(), capture_attention(stack) as records:
        stack(x, pair, mask)
        h, _ = layer.attn(layer.ln_attn(x), pair, mask)
        v = layer.attn.qkv(layer.ln_attn(x))[..., 16:]
        assert torch.allclose(layer.attn.out(records[0] @ v), h, atol=1e-5)


# ------------------------------------------------------------------------------------- methods

def test_attention_importance_is_normalised_over_bonded_pairs(export, parsed):
    from flexmol import load_pretrained
    from flexmol.model.layers import capture_attention
    from flexmol.tools.explain import attention_importance, bonds_of

    model = load_pretrained(export)
    result = attention_importance(model, parsed)
    with torch.no_grad(), capture_attention(model.encoder_2d) as records:
        model(_batch(parsed, model.cfg), decode=False)
    attn = torch.stack(records).mean(0).numpy()
    for b, (p, r) in enumerate(zip(parsed, result)):
        n, pairs = p.mol.GetNumAtoms(), bonds_of(p.mol)
        assert r["atoms"].shape == (n,) and r["bonds"].shape == (p.mol.GetNumBonds(),)
        for values in (r["atoms"], r["bonds"]):
            assert values.min() == pytest.approx(-1) and values.max() == pytest.approx(1)
        # atom weight: the row sum over bonded neighbours only
        i = int(pairs[0, 0])
        neighbours = [a.GetIdx() for a in p.mol.GetAtomWithIdx(i).GetNeighbors()]
        assert r["raw_atoms"][i] == pytest.approx(attn[b, i, neighbours].sum(), rel=1e-5)
        assert r["raw_atoms"][i] < attn[b, i, :n].sum()


def test_gradient_importance_is_normalised(export, parsed):
    from flexmol import load_pretrained
    from flexmol.finetune.model import build_task_model
    from flexmol.tools.explain import gradient_importance

    torch.manual_seed(0)
    task_model = build_task_model(load_pretrained(export), 1, lora=False).eval()
    result, output = gradient_importance(task_model, parsed, steps=4)
    with torch.no_grad():
        assert np.allclose(output, task_model(_batch(parsed, TINY))[:, 0].numpy(), atol=1e-5)
    for p, r in zip(parsed, result):
        assert r["atoms"].shape == (p.mol.GetNumAtoms(),) and r["bonds"].shape == (p.mol.GetNumBonds(),)
        assert np.abs(r["atoms"]).max() == pytest.approx(1) and np.abs(r["bonds"]).max() == pytest.approx(1)
        assert np.allclose(r["atoms"] * np.abs(r["raw_atoms"]).max(), r["raw_atoms"], atol=1e-6)


def test_functional_group_shares_sum_to_at_most_one_and_name_the_acid(nci_smi):
    from flexmol.tools.explain import group_shares, parse

    molecules, _ = parse([ASPIRIN] + [s for s, _ in nci_molecules(nci_smi, 20)])
    rng = np.random.default_rng(0)
    for p in molecules:
        importance = rng.normal(size=p.mol.GetNumAtoms())
        groups = group_shares(p.mol, importance)
        assert sum(g["share"] for g in groups) <= 1 + 1e-9
        atoms = [a for g in groups for a in g["atoms"]]
        assert len(atoms) == len(set(atoms))  # each atom in one group at most
    aspirin = molecules[0]
    importance = np.zeros(aspirin.mol.GetNumAtoms())
    importance[faith.acid_atoms(aspirin.mol)] = 1.0
    top = group_shares(aspirin.mol, importance)[0]
    assert "carboxylic acid" in top["name"] and top["share"] == pytest.approx(1.0)
    assert {"esters", "benzene rings"} <= {g["name"] for g in group_shares(aspirin.mol, importance)}


# ------------------------------------------------------------------------------------ task models

def test_load_task_model_restores_a_lora_task_model(export, parsed, tmp_path):
    from flexmol import load_pretrained
    from flexmol.finetune.model import build_task_model, load_task_model, save_task_model

    torch.manual_seed(0)
    model = build_task_model(load_pretrained(export), 2, lora=True, r=4, alpha=4).eval()
    with torch.no_grad():  # adapters that change the output (peft initialises lora_B to zero)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    batch = _batch(parsed, TINY)
    with torch.no_grad():
        expected = model(batch)
    save_task_model(model, tmp_path / "model", {"targets": ["a", "b"], "task": "classification", "mode": "2d"})
    loaded, meta = load_task_model(tmp_path / "model", export)
    with torch.no_grad():
        assert torch.allclose(loaded(batch), expected, atol=1e-6)
    assert meta["targets"] == ["a", "b"] and not loaded.training


def test_load_task_model_refuses_what_is_not_a_task_model(export, tmp_path):
    from flexmol.config import ConfigError
    from flexmol.finetune.model import load_task_model

    with pytest.raises(ConfigError, match="not a saved task model"):
        load_task_model(export, export)
    (tmp_path / "task.json").write_text(json.dumps({"targets": ["y"], "task": "classification"}))
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match="model.safetensors: not a readable safetensors file"):
        load_task_model(tmp_path, export)
    (tmp_path / "task.json").write_text("[]")
    with pytest.raises(ConfigError, match="task.json: not a readable task description"):
        load_task_model(tmp_path, export)
    from flexmol import load_pretrained
    from flexmol.finetune.model import build_task_model, save_task_model

    lora = tmp_path / "lora"
    save_task_model(build_task_model(load_pretrained(export), 1, lora=True, r=2, alpha=2), lora,
                    {"targets": ["y"], "task": "classification", "mode": "2d"})
    (lora / "adapter" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match="adapter: the adapters do not load"):
        load_task_model(lora, export)


# ---------------------------------------------------------------------------------- faithfulness

def test_gradient_importance_ranks_the_acid_atoms_first(faithfulness):
    """What is asserted, on the held-out acids of seed 0 (lines 0-1,500): the model learnt the task
    (classification ROC-AUC >= 0.9); integrated gradients rank the acid's atoms first (atom-level
    ROC-AUC >= 0.9) with the sign of the prediction. A model-free rule (oxygens among an atom and
    its neighbours) also ranks them high (0.96 here), so a figure it cannot reach is asserted too:
    against look-alike atoms only (oxygens outside the acid, atoms bonded to an oxygen) the trained
    model's AUC is at least HARD_FLOOR and above the rule's.

    Measured at these settings on other molecules (lines 1,500-3,000), seeds 0, 1, 2:
    classification 0.96, 0.98, 0.94; atom AUC 0.97, 0.95, 0.78; look-alike AUC 0.83, 0.83, 0.64
    (rule 0.63, 0.63, 0.62). So the >= 0.9 atom AUC is this seed's figure, not every seed's (one
    seed in three fell to 0.78 with the task learnt), and the margin over the rule is narrow on
    some seeds (0.70 against 0.62 here). The same attribution on the untrained model (the
    fine-tuning's starting point) is printed, not asserted on: its figures follow the random
    head's sign (atom AUC 0.42, 0.77, 0.19 on those seeds; look-alike AUC 0.64 here, against 0.70)."""
    result, _ = faithfulness
    print(f"\nfaithfulness (seed 0, {result['held_out_acids']} held-out acids): held-out ROC-AUC "
          f"{result['held_out_roc_auc']:.3f}; atom-level ROC-AUC integrated gradients "
          f"{result['gradient_atom_auc']:.3f} (look-alikes {result['gradient_hard_auc']:.3f}), untrained "
          f"{result['control_atom_auc']:.3f} ({result['control_hard_auc']:.3f}), rule {result['rule_atom_auc']:.3f} "
          f"({result['rule_hard_auc']:.3f}), attention {result['attention_atom_auc']:.3f}")
    assert result["held_out_roc_auc"] >= 0.9  # the model learnt the task
    assert result["gradient_atom_auc"] >= 0.9
    assert result["acid_raises"] >= 0.9  # positive importance: raises the prediction
    assert result["gradient_hard_auc"] >= HARD_FLOOR
    assert result["gradient_hard_auc"] > result["rule_hard_auc"]


def test_gradient_attributions_add_up_to_the_change_from_the_masked_molecule(faithfulness, export, parsed):
    """Completeness at the default number of points: every atom's and pair's attribution sums to
    the output minus the output of the masked molecule (every atom the mask token), within 5%, for
    the fine-tuned model and for an untrained one."""
    from flexmol import load_pretrained
    from flexmol.finetune.model import build_task_model
    from flexmol.tools.explain import STEPS, gradient_importance, parse

    _, work = faithfulness
    trained, _ = _task_model(work)
    torch.manual_seed(0)
    untrained = build_task_model(load_pretrained(export), 1, lora=False).eval()
    with torch.no_grad():  # a head whose output varies enough to test
        for p in untrained.head.parameters():
            p.normal_(0, 0.5)
    molecules = parse([ASPIRIN, "OC(=O)CCCN", "c1ccccc1N"])[0] + list(parsed[:5])
    for model in (trained, untrained):
        result, output = gradient_importance(model, molecules, steps=STEPS)
        for r, y in zip(result, output):
            c = r["completeness"]
            change = c["output"] - c["baseline_output"]
            assert c["output"] == pytest.approx(float(y))
            assert abs(change) > 0.05  # the masked molecule is not the molecule
            assert c["attribution_sum"] == pytest.approx(change, rel=0.05)


# ------------------------------------------------------------------------------------------- CLI

def test_explain_cli_writes_an_offline_report_pictures_and_numbers(faithfulness, tmp_path, capsys):
    from flexmol.cli import main

    _, work = faithfulness
    out, numbers = tmp_path / "report.html", tmp_path / "numbers.json"
    code = main(["explain", ASPIRIN, "C1CC", "c1ccccc1N", "--checkpoint", str(work / "export"),
                 "--task-model", str(work / "finetune" / "runs" / "flexmol" / "seed0" / "model"),
                 "--out", str(out), "--json", str(numbers)])
    err = capsys.readouterr().err
    assert code == 0  # one input rejected, the others explained
    assert "'C1CC'" in err and "does not parse" in err
    page = out.read_text()
    assert "http://" not in page and "https://" not in page
    assert page.count("<svg") >= 4 and "carboxylic acid" in page and "does not parse" in page
    assert page.count("masked molecule") >= 3  # the method's text and each molecule's completeness line
    files = out.with_name("report_files")
    for index in (0, 2):
        for method in ("attention", "gradient"):
            assert (files / f"mol{index}_{method}.svg").read_text().lstrip().startswith("<?xml")
            assert (files / f"mol{index}_{method}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    payload = json.loads(numbers.read_text())
    assert [m["input"] for m in payload["molecules"]] == [ASPIRIN, "c1ccccc1N"]
    assert payload["rejects"][0]["input"] == "C1CC"
    aspirin = payload["molecules"][0]
    assert aspirin["prediction"]["task"] == "acid" and aspirin["prediction"]["value"] > 0.5
    for method in ("attention", "gradient"):
        values = aspirin["methods"][method]["atom_importance"]
        assert len(values) == len(aspirin["atoms"]) and max(abs(v) for v in values) == pytest.approx(1)
    c = aspirin["methods"]["gradient"]["completeness"]
    assert c["attribution_sum"] == pytest.approx(c["output"] - c["baseline_output"], rel=0.05)


def test_explain_cli_refuses_gradient_without_a_task_model(export, tmp_path, capsys):
    from flexmol.cli import main

    code = main(["explain", ASPIRIN, "--checkpoint", str(export), "--method", "gradient",
                 "--out", str(tmp_path / "r.html")])
    assert code == 2
    assert "give --task-model" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


def test_explain_cli_attention_only_with_a_checkpoint(export, tmp_path, capsys):
    from flexmol.cli import main

    code = main(["explain", ASPIRIN, "--checkpoint", str(export), "--out", str(tmp_path / "r.html")])
    assert code == 0
    assert "attention:" in capsys.readouterr().out
    assert (tmp_path / "r_files" / "mol0_attention.png").is_file()
    assert not (tmp_path / "r_files" / "mol0_gradient.png").exists()


def test_explain_cli_reads_an_m2umol_checkpoint(tmp_path, capsys):
    from flexmol.cli import main
    from flexmol.model.export import save_pretrained
    from flexmol.model.m2umol import M2UMol, M2UMolModelConfig, ModalitySpec

    torch.manual_seed(0)
    cfg = M2UMolModelConfig(dim=32, heads=4, layers=2, num_kernels=8,
                            modalities={"qm9": ModalitySpec(kind="vector", dim=2, labels=["gap", "mu"])})
    export = save_pretrained(M2UMol(cfg), tmp_path / "m2umol")
    code = main(["explain", ASPIRIN, "--checkpoint", str(export), "--out", str(tmp_path / "r.html"),
                 "--json", str(tmp_path / "r.json")])
    assert code == 0, capsys.readouterr().err
    values = json.loads((tmp_path / "r.json").read_text())["molecules"][0]["methods"]["attention"]["atom_importance"]
    assert min(values) == pytest.approx(-1) and max(values) == pytest.approx(1)
