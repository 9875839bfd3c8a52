"""M2UMol: the network, the objective's losses (NT-Xent per modality over the molecules that have it,
the modality classifier), its export, fine-tuning from it, a CSV embedding as a modality, and one
pre-training run through the launcher, resumed."""
import copy
import csv
import json
import math
import os
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from rdkit import Chem
from rdkit.Chem import Crippen, Descriptors

from conftest import nci_2d_dataset, nci_molecules
from flexmol import config, load_pretrained, save_pretrained
from flexmol.chem import Featurizer, Rejected
from flexmol.config import ConfigError, FeaturizerConfig
from flexmol.data.collate import collate
from flexmol.model import FlexMol, ModelConfig
from flexmol.model.export import ExportError
from flexmol.model.m2umol import M2UMol
from flexmol.objectives.m2umol import M2UMolConfig, M2UMolObjective, ModalityConfig, validate_config

os.environ.setdefault("DS_ACCELERATOR", "cpu")

QM9_KEYS = ["mu", "alpha", "homo", "lumo", "gap", "r2", "zpve", "u0", "u298", "h298", "g298", "cv"]
SIZES = ModelConfig(dim=32, heads=4, layers=2, num_kernels=16)


def objective(**m2umol):
    modalities = m2umol.pop("modalities", {"3d": ModalityConfig(kind="conformer"),
                                           "qm9": ModalityConfig(labels=["mu", "alpha", "homo", "lumo", "gap", "r2",
                                                                         "zpve", "u*", "h298", "g298", "cv"])})
    return M2UMolObjective(SimpleNamespace(m2umol=M2UMolConfig(modalities=modalities, **m2umol)))


@pytest.fixture(scope="module")
def qm9_records(qm9_rows):
    """48 QM9 molecules with their DFT geometry and their 12 properties as record labels."""
    feat, out = Featurizer(FeaturizerConfig(), "paired"), []
    for raw in qm9_rows[:60]:
        try:
            out.append(feat(raw))
        except Rejected:
            continue
    return out[:48]


@pytest.fixture(scope="module")
def prepared(qm9_records):
    torch.manual_seed(0)
    obj = objective()
    obj.prepare({"paired": qm9_records})
    return obj, obj.build_model(SIZES).eval()


def _with_labels(records, change):
    """Copies of ``records`` whose labels ``change(i, labels)`` edits in place."""
    out = []
    for i, r in enumerate(records):
        labels = dict(r["labels"])
        change(i, labels)
        out.append({**r, "labels": labels})
    return out


# ----------------------------------------------------------------------------------- data side

def test_prepare_resolves_label_patterns_and_standardises_with_the_sampled_statistics(prepared, qm9_records):
    obj, model = prepared
    assert obj.label_keys() == QM9_KEYS  # u* gives u0, u298 (natural order), in the pattern's place
    values = np.array([[r["labels"][k] for k in obj.label_keys()] for r in qm9_records])
    enc = model.encoders["qm9"]
    assert np.allclose(enc.mean.numpy(), values.mean(0), rtol=1e-5)
    assert np.allclose(enc.std.numpy(), values.std(0), rtol=1e-4)
    assert model.cfg.modalities["qm9"].dim == 12 and model.cfg.modalities["qm9"].labels == obj.label_keys()


@pytest.mark.parametrize("labels,change,why", [
    (["mu", "polarity*"], None, r"'m2umol.modalities.qm9.labels': 'polarity\*' matches no label key"),
    (["mu"], lambda i, lab: lab.update(mu="high") if i == 5 else None, r"label 'mu' of molecule '.*' \(paired\) is "
                                                                       r"'high', not a finite number"),
    (["mu"], lambda i, lab: lab.update(mu=None), r"label 'mu' holds no number"),
])
def test_prepare_refuses_labels_it_cannot_use_naming_the_key(qm9_records, labels, change, why):
    obj = objective(modalities={"qm9": ModalityConfig(labels=labels)})
    records = _with_labels(qm9_records, change) if change else qm9_records
    with pytest.raises(ConfigError, match=why):
        obj.prepare({"paired": records})


@pytest.mark.parametrize("change,key", [
    (dict(temperature=0.0), "m2umol.temperature"),
    (dict(temperature=float("nan")), "m2umol.temperature"),
    (dict(classifier_weight=-1.0), "m2umol.classifier_weight"),
    (dict(encoder="gin"), "m2umol.encoder"),
    (dict(gather_negatives="maybe"), "m2umol.gather_negatives"),
    (dict(walk_length=0), "m2umol.walk_length"),
    (dict(modalities={}), "m2umol.modalities"),
    (dict(modalities={"text": ModalityConfig(kind="words", labels=["x"])}), "m2umol.modalities.text.kind"),
    (dict(modalities={"text": ModalityConfig()}), "m2umol.modalities.text.labels"),
    (dict(modalities={"a": ModalityConfig(kind="conformer"), "b": ModalityConfig(kind="conformer")}),
     "m2umol.modalities"),
    (dict(modalities={"fused": ModalityConfig(labels=["x"])}), "m2umol.modalities.fused"),
    (dict(modalities={"3d": ModalityConfig(labels=["x"])}), "m2umol.modalities.3d"),
    (dict(modalities={"a.b": ModalityConfig(labels=["x"])}), "m2umol.modalities.a.b"),
    (dict(modalities={"a": ModalityConfig(labels=["x"]), "b": ModalityConfig(labels=["x"])}),
     "m2umol.modalities.b.labels"),
    (dict(modalities={"c": ModalityConfig(kind="conformer", labels=["x"])}), "m2umol.modalities.c.labels"),
])
def test_validate_config_refuses_bad_values_naming_the_key(change, key):
    cfg = M2UMolConfig(modalities={"3d": ModalityConfig(kind="conformer")})
    for k, v in change.items():
        setattr(cfg, k, v)
    with pytest.raises(ConfigError, match=rf"^config key '{re.escape(key)}': "):
        validate_config(cfg)


# ------------------------------------------------------------------------------------- losses

def test_nt_xent_of_two_matched_pairs_is_the_closed_form_value():
    obj = objective(temperature=0.5)
    a, t = torch.eye(2), torch.eye(2)
    want = math.log(1 + math.exp(-2.0))  # each row: -log(e^2 / (e^2 + e^0)); symmetric, the same
    assert obj._nt_xent(a, t, None).item() == pytest.approx(want, rel=1e-6)
    assert obj._nt_xent(3 * a, 0.5 * t, None).item() == pytest.approx(want, rel=1e-6)  # L2-normalised


def _by_hand(a, t, temperature):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    logits = a @ t.T / temperature
    rows = np.mean([np.log(np.exp(logits[i]).sum()) - logits[i, i] for i in range(len(a))])
    cols = np.mean([np.log(np.exp(logits[:, i]).sum()) - logits[i, i] for i in range(len(a))])
    return 0.5 * (rows + cols)


def test_each_term_is_the_nt_xent_of_the_adapter_against_the_modality_encoder_computed_by_hand(prepared,
                                                                                               qm9_records):
    obj, model = prepared
    batch = collate(qm9_records[:5], labels=obj.label_keys())
    with torch.no_grad():
        losses = obj.losses(model, batch)
        out = model(batch)
        target = model.encode_vector("qm9", batch["labels"])
        logits = model.classify(out["adapted"]).double().numpy()  # [B, M, M]: molecule, adapter, class
    t = obj.cfg.temperature
    assert losses["nt_xent/qm9"].item() == pytest.approx(
        _by_hand(out["adapted"]["qm9"].double().numpy(), target.double().numpy(), t), rel=1e-5)
    assert losses["nt_xent/3d"].item() == pytest.approx(
        _by_hand(out["adapted"]["3d"].double().numpy(), out["h_3d"].double().numpy(), t), rel=1e-5)
    ce = np.mean([np.log(np.exp(logits[b, m]).sum()) - logits[b, m, m] for b in range(5) for m in range(2)])
    assert losses["classifier"].item() == pytest.approx(ce, rel=1e-5)
    assert losses["total"].item() == pytest.approx(
        losses["nt_xent/qm9"].item() + losses["nt_xent/3d"].item() + 0.5 * ce, rel=1e-5)


def test_a_molecule_missing_a_modality_leaves_that_term_alone_and_trains_the_others(prepared, qm9_records):
    obj, model = prepared
    keys = obj.label_keys()
    missing = {2, 5, 9}  # one property each lacks: the vector modality is missing for them

    def lacking(i, labels):
        if i in missing:
            labels["gap"] = None

    def lacking_and_changed(i, labels):
        lacking(i, labels)
        if i in missing:
            labels.update({k: v * 10 + 5 for k, v in labels.items() if v is not None})

    records = qm9_records[:12]
    with torch.no_grad():
        base = obj.losses(model, collate(_with_labels(records, lacking), labels=keys))
        changed = obj.losses(model, collate(_with_labels(records, lacking_and_changed), labels=keys))
        present = obj.losses(model, collate([r for i, r in enumerate(records) if i not in missing], labels=keys))
        moved = obj.losses(model, collate(_with_labels(records, lambda i, lab: lab.update(mu=lab["mu"] + 3)
                                                       if i == 0 else lacking(i, lab)), labels=keys))
    assert {k: v.item() for k, v in changed.items()} == {k: v.item() for k, v in base.items()}
    assert base["nt_xent/qm9"].item() == pytest.approx(present["nt_xent/qm9"].item(), rel=1e-5)
    assert base["nt_xent/3d"].item() != pytest.approx(present["nt_xent/3d"].item(), rel=1e-3)  # all 12 molecules
    assert moved["nt_xent/qm9"].item() != pytest.approx(base["nt_xent/qm9"].item(), rel=1e-4)


def test_a_term_with_fewer_than_two_molecules_is_absent_not_nan(prepared, qm9_records):
    obj, model = prepared
    one = _with_labels(qm9_records[:6], lambda i, lab: lab.update(mu=None) if i else None)
    losses = obj.losses(model, collate(one, labels=obj.label_keys()))
    assert "nt_xent/qm9" not in losses and "nt_xent/3d" in losses and torch.isfinite(losses["total"])
    losses["total"].backward()
    assert all(p.grad is not None for p in model.encoders["qm9"].parameters())  # every step the same parameters
    model.zero_grad()
    flat = collate([{**r, "modality": "2d"} for r in qm9_records[:6]], labels=obj.label_keys())
    assert set(obj.losses(model, flat)) == {"nt_xent/qm9", "classifier", "total"}  # no conformer in a 2D batch
    with pytest.raises(ValueError, match="not 3d"):
        obj.losses(model, collate([{**r, "modality": "3d"} for r in qm9_records[:6]]))


def test_the_fusion_is_frozen_in_pre_training_and_the_embedding_starts_as_the_2d_encoders(prepared, qm9_records):
    obj, model = prepared
    assert set(obj.frozen(model)) == {f"fusion.{k}" for k, _ in model.fusion.named_parameters()}
    batch = collate([{**r, "modality": "2d"} for r in qm9_records[:8]])
    spaces = model.spaces(batch)
    assert set(spaces) == {"2d", "fused", "adapter_3d", "adapter_qm9"}
    assert torch.equal(spaces["fused"], spaces["2d"])  # the untrained attention adds nothing
    atoms = model.spaces(collate(qm9_records[:8]), atoms=True)
    assert set(atoms) == {"2d", "3d"} and atoms["2d"].shape == (8, batch["mask"].shape[1], 32)
    assert set(model.spaces(collate([{**r, "modality": "3d"} for r in qm9_records[:8]]))) == {"3d"}


def _ranked_records(rows):
    """12 QM9 molecules for two ranks of 6: on rank 0 only the first has every QM9 property."""
    feat, records = Featurizer(FeaturizerConfig(), "paired"), []
    for raw in rows:
        try:
            records.append(feat(raw))
        except Rejected:
            continue
    records = records[:12]
    return records, _with_labels(records, lambda i, lab: lab.update(gap=None) if 0 < i < 6 else None)


def _gathering_rank(rank, world, port, rows, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        sample, records = _ranked_records(rows)
        result = {}
        for mode in ("on", "off"):
            torch.manual_seed(0)
            obj = objective(gather_negatives=mode)
            obj.prepare({"paired": sample})
            model = obj.build_model(SIZES)
            losses = obj.losses(model, collate(records[6 * rank:6 * rank + 6], labels=obj.label_keys()))
            losses["total"].backward()
            grads = torch.cat([p.grad.reshape(-1) for k, p in model.named_parameters() if p.grad is not None])
            dist.all_reduce(grads)
            result[mode] = {"losses": {k: v.detach() for k, v in losses.items()}, "grads": grads / world}
        with torch.no_grad():  # held-out scoring: each rank's batch alone, whatever the other ranks hold
            held = obj.heldout().losses(model, collate(records[6 * rank:6 * rank + 6], labels=obj.label_keys()))
        result["heldout"] = {"losses": {k: v.detach() for k, v in held.items()}}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_negatives_gathered_over_two_ranks_give_the_loss_of_one_process_holding_both_batches(qm9_rows, tmp_path):
    """Rank 0 holds one molecule with the QM9 properties: alone it makes no term, but with the
    other rank's five it does, and the mean over the ranks is the loss (and gradient) of one
    process holding all twelve molecules; without gathering, neither rank has the term."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rows = qm9_rows[:20]
    procs = [mp.get_context("spawn").Process(target=_gathering_rank, args=(r, 2, port, rows, str(tmp_path)))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        if p.is_alive():
            p.terminate()
    assert [p.exitcode for p in procs] == [0, 0]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    sample, records = _ranked_records(rows)
    torch.manual_seed(0)
    obj = objective(gather_negatives="off")
    obj.prepare({"paired": sample})
    model = obj.build_model(SIZES)
    reference = obj.losses(model, collate(records, labels=obj.label_keys()))
    reference["total"].backward()
    grads = torch.cat([p.grad.reshape(-1) for k, p in model.named_parameters() if p.grad is not None])
    for name in ("nt_xent/qm9", "nt_xent/3d", "classifier", "total"):
        mean = sum(r["on"]["losses"][name] for r in ranks) / 2
        assert mean.item() == pytest.approx(reference[name].item(), rel=1e-5), name
    assert torch.allclose(ranks[0]["on"]["grads"], grads, rtol=1e-4, atol=1e-6)
    assert all("nt_xent/qm9" not in r["off"]["losses"] and "nt_xent/3d" in r["off"]["losses"] for r in ranks)
    alone = obj.heldout().losses(model, collate(records[6:], labels=obj.label_keys()))
    assert "nt_xent/qm9" not in ranks[0]["heldout"]["losses"]  # one molecule with the properties
    assert ranks[1]["heldout"]["losses"]["nt_xent/qm9"].item() == pytest.approx(alone["nt_xent/qm9"].item(), rel=1e-5)


# ------------------------------------------------------------------------------------- export

def test_export_round_trip_gives_the_same_embedding_and_says_the_recipe(prepared, qm9_records, tmp_path):
    obj, model = prepared[0], copy.deepcopy(prepared[1])
    with torch.no_grad():  # a fusion that is not the identity, as after fine-tuning
        model.fusion.attention.out_proj.weight.normal_()
    save_pretrained(model, tmp_path / "export")
    shape = config.read_yaml(tmp_path / "export" / "model.yaml")
    assert shape.recipe == "m2umol" and shape.encoder == "flexmol"
    assert {m: (s.kind, s.dim) for m, s in shape.modalities.items()} == {"3d": ("conformer", 0), "qm9": ("vector", 12)}
    assert list(shape.modalities.qm9.labels) == obj.label_keys()
    loaded = load_pretrained(tmp_path / "export")
    assert isinstance(loaded, M2UMol) and not loaded.training
    batch = collate([{**r, "modality": "2d"} for r in qm9_records[:10]])
    with torch.no_grad():
        assert torch.equal(loaded(batch)["embedding"], model(batch)["embedding"])
        assert not torch.equal(model(batch)["embedding"], model(batch)["h_2d"])
    assert torch.equal(loaded.encoders["qm9"].std, model.encoders["qm9"].std)


def _damage_weights(export):
    data = bytearray((export / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (export / "model.safetensors").write_bytes(bytes(data))


def _edit_yaml(old, new):
    def damage(export):
        path = export / "model.yaml"
        path.write_text(path.read_text().replace(old, new, 1))
    return damage


@pytest.mark.parametrize("damage,why", [
    (_damage_weights, "checksum mismatch"),
    (_edit_yaml("recipe: m2umol", "recipe: unimol"), r"recipe 'unimol' is not one of flexmol, m2umol"),
    (_edit_yaml("    dim: 12\n", "    dim: 11\n"), r"config key 'modalities.qm9.dim': 11 for 12 label"),
    (_edit_yaml("kind: vector", "kind: text"), r"modalities.qm9.kind"),
    (_edit_yaml("recipe: m2umol\n", ""), r"Key 'encoder' not in 'ModelConfig'"),  # read as FlexMol: refused
])
def test_a_damaged_or_foreign_m2umol_export_is_refused_naming_the_file(prepared, tmp_path, damage, why):
    export = save_pretrained(prepared[1], tmp_path / "export")
    damage(export)
    with pytest.raises(ExportError, match=why) as info:
        load_pretrained(export)
    assert str(export) in str(info.value) and "\n" not in str(info.value)


def test_a_flexmol_export_loads_as_before_and_its_encoders_fit_m2umol_by_name(prepared, qm9_records, tmp_path):
    _, model = prepared
    torch.manual_seed(1)
    flexmol = FlexMol(SIZES).eval()
    export = save_pretrained(flexmol, tmp_path / "flexmol")
    assert "recipe" not in (export / "model.yaml").read_text()
    assert type(load_pretrained(export)) is FlexMol
    mine = {k: v for k, v in model.state_dict().items()
            if k.startswith(("atom_2d.", "pair_2d.", "shared_attention.", "encoder_2d.", "input_3d.", "encoder_3d."))}
    theirs = flexmol.state_dict()
    assert all(theirs[k].shape == v.shape for k, v in mine.items())
    fresh = M2UMol(model.cfg).eval()
    fresh.load_state_dict({k: theirs[k] for k in mine}, strict=False)
    batch = collate(qm9_records[:6])
    with torch.no_grad():
        got, want = fresh(batch), flexmol(batch, decode=False)
    assert torch.allclose(got["x_f"], want["x_f"]) and torch.allclose(got["y_f"], want["y_f"])


def test_graphgps_encoder_reads_the_padded_batch_with_pyg_random_walk_encodings_trains_and_exports(qm9_records,
                                                                                                    tmp_path):
    from torch_geometric.data import Data
    from torch_geometric.transforms import AddRandomWalkPE

    obj = objective(encoder="graphgps", walk_length=6, pe_dim=4)
    obj.prepare({"paired": qm9_records})
    torch.manual_seed(0)
    model = obj.build_model(SIZES)
    assert not hasattr(model, "encoder_2d") and model.gps.walk_length == 6
    records = qm9_records[10:18]
    batch = collate(records, labels=obj.label_keys())
    mask = batch["mask"]
    bonded = ((batch["spd"] == 1) & mask.unsqueeze(-1) & mask.unsqueeze(-2)).float()
    mine = model.gps.random_walk_encoding(bonded)
    for k, r in enumerate(records):  # the same as torch-geometric's transform on each molecule's bond graph
        bonds = torch.from_numpy(r["bond_index"].astype(np.int64)).T
        data = AddRandomWalkPE(walk_length=6, attr_name="pe")(Data(edge_index=torch.cat([bonds, bonds.flip(0)], 1),
                                                                   num_nodes=len(r["z"])))
        assert torch.allclose(mine[k, :len(r["z"])], data.pe, atol=1e-6), r["smiles"]
    losses = obj.losses(model, batch)
    losses["total"].backward()
    assert {"nt_xent/3d", "nt_xent/qm9", "classifier"} < set(losses) and torch.isfinite(losses["total"])
    assert all(p.grad is not None for k, p in model.gps.named_parameters() if k != "atom.mask_token")
    model.eval()
    export = save_pretrained(model, tmp_path / "gps")
    loaded = load_pretrained(export)
    flat = collate([{**r, "modality": "2d"} for r in records])
    with torch.no_grad():
        assert loaded.cfg.encoder == "graphgps" and torch.equal(loaded(flat)["embedding"], model(flat)["embedding"])
    from flexmol.finetune.model import build_task_model

    lora = {k for k, p in build_task_model(loaded.train(), 1, lora=True, r=2).named_parameters() if p.requires_grad}
    assert any(".gps.layers.1.conv.nn.2.lora_A" in k for k in lora) and any(".gps.layers.0.mlp.3.lora_B" in k
                                                                          for k in lora)
    with pytest.raises(ConfigError, match=r"config key 'm2umol.pe_dim': 32 must be below the model's dim 32"):
        objective(encoder="graphgps", pe_dim=32).build_model(SIZES)


# ------------------------------------------------------------------------------------ finetune

@pytest.fixture(scope="module")
def logp_csv(nci_smi, tmp_path_factory):
    path = tmp_path_factory.mktemp("m2u_ft") / "logp.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["smiles", "logp"])
        for smi, mol in nci_molecules(nci_smi, 30):
            w.writerow([smi, f"{Crippen.MolLogP(mol):.3f}"])
    return path


def test_flexmol_finetune_trains_lora_and_the_fusion_on_an_m2umol_export_and_probes_it(prepared, logp_csv, tmp_path,
                                                                                       capsys):
    from flexmol.finetune.cli import main as finetune_main
    from flexmol.finetune.model import load_task_model

    export = save_pretrained(prepared[1], tmp_path / "export")
    common = ["--checkpoint", str(export), "--data", str(logp_csv), "--target", "logp", "--task", "regression",
              "--seeds", "1", "--out", str(tmp_path / "ft"), "train.epochs=1", "lora.r=4", "data.num_workers=1"]
    assert finetune_main(common + ["--mode", "both", "--baselines", "none"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"flexmol finetune: config key 'mode': 'both': the checkpoint {export} (an M2UMol export) "
                   "serves 2d, 3d only")
    assert finetune_main(common + ["--baselines", "probe_flexmol"]) == 0
    res = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert set(res["models"]) == {"flexmol", "probe_flexmol"}
    assert all(np.isfinite(m["per_seed"]).all() for m in res["models"].values())
    run = tmp_path / "ft" / "runs" / "flexmol" / "seed0" / "model"
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter["modules_to_save"] == ["fusion"]
    assert set(adapter["target_modules"]) == {"qkv", "out", "ffn.0", "ffn.3"}
    from safetensors import safe_open

    with safe_open(str(run / "adapter" / "adapter_model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert any("shared_attention.0.qkv.lora_A" in n for n in names)
    assert any("encoder_2d.layers.1.ffn.3.lora_B" in n for n in names)
    assert any("fusion" in n and "in_proj_weight" in n for n in names)
    task, meta = load_task_model(run, export)
    assert meta["targets"] == ["logp"]
    batch = collate([Featurizer(FeaturizerConfig(), "2d")(_raw("CCO"))])
    with torch.no_grad():
        assert torch.isfinite(task(batch)).all()


def _raw(smiles):
    from flexmol.chem.featurizer import RawInput

    return RawInput(0, smiles, "smiles", smiles)


# --------------------------------------------------------------------- a CSV column set as a modality

def test_numeric_csv_columns_selected_by_a_glob_train_as_a_vector_modality(nci_smi, tmp_path):
    """A 'text embedding computed elsewhere': 8 numeric columns of a user's CSV, empty for a few
    molecules, featurised with ``--label-column 'emb_*'`` and learnt as the modality ``text``."""
    from flexmol.cli import main as flexmol_main
    from flexmol.data.shards import read_shard, shard_paths

    mols = nci_molecules(nci_smi, 24)
    rng = np.random.default_rng(0)
    projection = rng.normal(size=(6, 8))
    with open(tmp_path / "emb.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["smiles", "name"] + [f"emb_{i}" for i in range(8)] + ["note"])
        for i, (smi, mol) in enumerate(mols):
            desc = np.array([Descriptors.MolWt(mol) / 100, Crippen.MolLogP(mol), Descriptors.TPSA(mol) / 20,
                             mol.GetNumHeavyAtoms() / 5, Descriptors.NumHDonors(mol), Descriptors.NumHAcceptors(mol)])
            emb = np.tanh(desc @ projection)
            w.writerow([smi, f"m{i}"] + (["" for _ in emb] if i % 10 == 3 else [f"{x:.5f}" for x in emb]) + ["x"])
    out = tmp_path / "ds"
    assert flexmol_main(["featurize", str(tmp_path / "emb.csv"), "--out", str(out), "--modality", "2d",
                         "--label-column", "emb_*", "--executor", "serial", "--no-progress"]) == 0
    records = [r for p in shard_paths(out) for r in read_shard(p)]
    assert len(records) == 24 and sorted(records[0]["labels"], key=lambda k: int(k[4:])) == [f"emb_{i}" for i in range(8)]
    obj = objective(modalities={"text": ModalityConfig(labels=["emb_*"])}, temperature=0.2)
    obj.prepare({"single_2d": records})
    assert obj.label_keys() == [f"emb_{i}" for i in range(8)]
    torch.manual_seed(0)
    model = obj.build_model(SIZES)
    batch = collate(records, labels=obj.label_keys())
    assert int(torch.isnan(batch["labels"]).any(1).sum()) == 3
    optimizer = torch.optim.Adam([p for k, p in model.named_parameters() if k not in obj.frozen(model)], lr=1e-2)
    history = []
    for _ in range(16):
        losses = obj.losses(model, batch)
        optimizer.zero_grad()
        losses["total"].backward()
        optimizer.step()
        history.append(losses["nt_xent/text"].item())
    assert history[-1] < 0.6 * history[0]  # the 2D encoder learns to predict its molecules' embedding space


# ------------------------------------------------------------------ the launcher, straight and resumed

@pytest.fixture(scope="module")
def mix(tmp_path_factory, nci_smi):
    from flexmol.featurize import run_featurize

    base = tmp_path_factory.mktemp("m2u_run")
    run_featurize(config.build(config.FeaturizeConfig, {
        "source": "qm9", "out": str(base / "qm9"), "modality": "paired", "limit": 100,
        "job": {"executor": "serial", "shard_size": 50, "progress": False}}), log=lambda m: None)
    return base / "qm9", nci_2d_dataset(base, nci_smi, 100)


def test_the_m2umol_config_runs_through_the_launcher_and_resumes_exactly(qm9_rows, mix, tmp_path, capsys):
    from flexmol.train.cli import main

    qm9, nci = mix
    common = ["--config", "m2umol", f"data.paired=[{qm9}]", f"data.single_2d=[{nci}]", "data.num_workers=0",
              "data.max_atoms=256", "train.max_steps=4", "train.warmup_steps=2", "train.log_every=1",
              "train.save_every=100", "validation.every=0", "validation.max_molecules=40", "wandb.mode=disabled"]
    assert main(common + [f"output_dir={tmp_path / 'a'}"]) == 0
    progress = capsys.readouterr().err
    assert "m2umol: " in progress and "stage" not in progress  # the recipe has no stages
    assert main(common + [f"output_dir={tmp_path / 'b'}", "train.stop_after=2"]) == 0
    assert not (tmp_path / "b" / "export").exists()
    assert main(common + [f"output_dir={tmp_path / 'b'}", "resume=auto"]) == 0

    def records(d, split):
        return [json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()
                if json.loads(line)["split"] == split]

    straight, resumed = records("a", "train"), records("b", "train")
    assert [r["step"] for r in resumed] == list(range(1, 5))
    assert [{k: v for k, v in r.items() if k.startswith("loss/")} for r in resumed] == \
        [{k: v for k, v in r.items() if k.startswith("loss/")} for r in straight]
    names = set().union(*(r for r in straight))
    assert {"loss/nt_xent/3d", "loss/nt_xent/qm9", "loss/classifier", "loss/total"} <= names
    assert any("loss/nt_xent/qm9" not in r for r in straight)  # a 2D-only MOSES-like batch: the classifier only
    valid = records("a", "valid")[-1]
    assert {"valid/paired/nt_xent/qm9", "valid/single_2d/classifier"} <= set(valid)
    model = load_pretrained(tmp_path / "b" / "export")
    assert isinstance(model, M2UMol) and model.modalities == ["3d", "qm9"]
    a, b = (load_pretrained(tmp_path / d / "export").state_dict() for d in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
