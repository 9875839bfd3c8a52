"""The FlexMol network and its objectives, on real molecules with the tiny model (CPU)."""
import numpy as np
import pytest
import torch

from flexmol.chem import Featurizer, RawInput
from flexmol.config import FeaturizerConfig
from flexmol.data.collate import atom_budget_batches, collate
from flexmol.model import FlexMol, ModelConfig
from flexmol.objectives import ObjectiveConfig, pretraining_losses
from flexmol.objectives.losses import ContrastiveLoss, pooled

DRUGS = ["CC(=O)Oc1ccccc1C(=O)O", "CN1C=NC2=C1C(=O)N(C(=O)N2C)C", "CC(C)Cc1ccc(cc1)[C@@H](C)C(=O)O",
         "C[C@@H](C(=O)O)N", "c1ccc2c(c1)cccn2", "OCC(O)CO", "CCN(CC)C(=O)c1ccccc1", "N#Cc1ccc(O)cc1"]
TINY = ModelConfig(dim=32, heads=4, layers=2, decoder_layers=1, mm_layers=1, num_kernels=16, proj_dim=16)


@pytest.fixture(scope="module")
def records():
    feat = Featurizer(FeaturizerConfig(seed=3), "paired")
    return [feat(RawInput(i, str(i), "smiles", s)) for i, s in enumerate(DRUGS)]


def model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return FlexMol(TINY).to(dtype).eval()


def as_dtype(batch, dtype):
    return {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in batch.items()}


def random_rotation(seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    return torch.tensor(q * np.sign(np.linalg.det(q)), dtype=torch.float64)


def test_rotation_and_translation_leave_invariants_unchanged_and_rotate_coordinates(records):
    m = model(dtype=torch.float64)
    batch = as_dtype(collate(records[:4]), torch.float64)
    rot, shift = random_rotation(1), torch.tensor([3.0, -1.0, 7.5], dtype=torch.float64)
    moved = dict(batch, pos=(batch["pos"] @ rot.T + shift) * batch["mask"].unsqueeze(-1))
    with torch.no_grad():
        a, b = m(batch), m(moved)
        for key in ("y", "Q", "y_f", "h", "embedding"):
            assert torch.allclose(a[key], b[key], atol=1e-9), key
        ca = m.coord_head(a["pair"], batch["pos"], batch["mask"])
        cb = m.coord_head(b["pair"], moved["pos"], batch["mask"])
        real = batch["mask"]
        assert torch.allclose((ca @ rot.T + shift)[real], cb[real], atol=1e-9)
        cfg = ObjectiveConfig(noise_std=0.0)
        la = pretraining_losses(m, batch, cfg, torch.Generator().manual_seed(5))
        lb = pretraining_losses(m, moved, cfg, torch.Generator().manual_seed(5))
    for k in la:
        assert torch.allclose(la[k], lb[k], atol=1e-9), k


def permute_record(rec, perm):
    inv = np.argsort(perm)
    out = dict(rec)
    out["z"] = rec["z"][perm]
    out["atom_feat"] = rec["atom_feat"][perm]
    out["pos"] = rec["pos"][:, perm]
    out["bond_index"] = np.sort(inv[rec["bond_index"].astype(int)], axis=1).astype(np.uint16)
    for table in ("dist", "path_bond"):  # stored pair tables are indexed by atom on both axes
        if table in rec:
            out[table] = rec[table][perm][:, perm]
    return out


def test_permuting_atoms_permutes_atom_outputs_and_keeps_the_embedding(records):
    m = model(dtype=torch.float64)
    rec = records[2]
    perm = np.random.default_rng(0).permutation(len(rec["z"]))
    a = m(as_dtype(collate([rec]), torch.float64))
    b = m(as_dtype(collate([permute_record(rec, perm)]), torch.float64))
    assert torch.allclose(a["h"][0, perm], b["h"][0], atol=1e-9)
    assert torch.allclose(a["pair"][0][perm][:, perm], b["pair"][0], atol=1e-9)
    assert torch.allclose(a["embedding"], b["embedding"], atol=1e-9)


@pytest.mark.parametrize("modality", ["paired", "2d", "3d"])
def test_padding_and_batch_mates_do_not_change_a_molecule(records, modality):
    m = model(dtype=torch.float64)
    small = dict(records[3], modality=modality)
    mates = [dict(r, modality=modality) for r in records[:3]]  # larger molecules: forces padding
    alone = m(as_dtype(collate([small]), torch.float64))
    together = m(as_dtype(collate(mates + [small]), torch.float64))
    n = len(small["z"])
    assert torch.allclose(alone["h"][0, :n], together["h"][3, :n], atol=1e-9)
    assert torch.allclose(alone["embedding"][0], together["embedding"][3], atol=1e-9)


def test_the_two_encoders_share_exactly_the_attention_parameters():
    m = FlexMol(TINY)
    enc2, enc3 = m.encoder_2d, m.encoder_3d
    for l2, l3 in zip(enc2.layers, enc3.layers):
        assert l2.attn is l3.attn
        assert l2.ln_attn is not l3.ln_attn and l2.ffn is not l3.ffn
    shared = {id(p) for p in m.shared_attention.parameters()}
    attn_2d = {id(p) for layer in enc2.layers for p in layer.attn.parameters()}
    attn_3d = {id(p) for layer in enc3.layers for p in layer.attn.parameters()}
    assert attn_2d == attn_3d == shared
    own_2d = {id(p) for p in enc2.parameters()}
    own_3d = {id(p) for p in enc3.parameters()}
    assert own_2d.isdisjoint(own_3d) and own_2d.isdisjoint(shared) and own_3d.isdisjoint(shared)
    # each parameter is counted once by the model (ZeRO partitions what parameters() yields)
    assert len(list(m.parameters())) == len({id(p) for p in m.parameters()})



@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_model_summary_counts_on_the_meta_device_what_a_real_build_holds(size, monkeypatch):
    import flexmol.model.summary as summary

    cfg = summary.model_config(size)
    real = FlexMol(cfg)
    built = []
    make = summary.FlexMol
    monkeypatch.setattr(summary, "FlexMol", lambda c: built.append(torch.empty(0).device.type) or make(c))
    text = summary.summary_text(size)
    assert built == ["meta"]  # nothing allocated
    assert text.splitlines()[-1] == f"total parameters: {summary.count(real)}"
    assert [(n, c) for n, c in summary.parameter_table(real)] == [
        (line.split()[0], int(line.split()[1].replace(",", ""))) for line in text.splitlines()[1:-1]]

def grads(m):
    return {name: (p.grad is not None and p.grad.abs().sum().item() > 0) for name, p in m.named_parameters()}


def by_module(flags):
    out = {}
    for name, has in flags.items():
        top = name.split(".")[0]
        out.setdefault(top, []).append(has)
    return {k: (all(v), any(v)) for k, v in out.items()}


@pytest.mark.parametrize("modality,frozen,learning", [
    ("2d", "fl_3d", ["atom_2d", "pair_2d", "shared_attention", "encoder_2d", "encoder_3d", "decoder_2to3",
                     "mm_encoder", "atom_head", "spd_head"]),
    ("3d", "fl_2d", ["input_3d", "shared_attention", "encoder_3d", "encoder_2d", "decoder_3to2", "mm_encoder",
                     "coord_head", "dist_head"]),
])
def test_stage_two_gives_the_frozen_feature_learner_no_gradient(records, modality, frozen, learning):
    m = model().train()
    batch = collate([dict(r, modality=modality) for r in records[:4]])
    pretraining_losses(m, batch, ObjectiveConfig(), torch.Generator().manual_seed(0))["total"].backward()
    flags = by_module(grads(m))
    assert all(p.grad is None for p in getattr(m, frozen).parameters())
    for part in learning:
        assert flags[part][1], f"{part} gets no gradient"


def test_stage_one_trains_every_part(records):
    m = model().train()
    pretraining_losses(m, collate(records[:4]), ObjectiveConfig(), torch.Generator().manual_seed(0))["total"].backward()
    missing = [k for k, (_, some) in by_module(grads(m)).items() if not some]
    assert not missing


@pytest.fixture(scope="module")
def overfit(records):
    m = model().train()
    batch = collate(records)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    cfg = ObjectiveConfig()
    history = []
    for step in range(80):
        losses = pretraining_losses(m, batch, cfg, torch.Generator().manual_seed(step))
        opt.zero_grad()
        losses["total"].backward()
        opt.step()
        history.append({k: v.item() for k, v in losses.items()})
    return m.eval(), batch, history


def test_every_loss_is_finite_and_falls_when_overfitting_a_small_real_batch(overfit):
    _, _, history = overfit
    for key in history[0]:
        first = np.mean([h[key] for h in history[:5]])
        last = np.mean([h[key] for h in history[-5:]])
        assert all(np.isfinite(h[key]) for h in history), key
        assert last < first, f"{key}: {first:.3f} -> {last:.3f}"


def test_infonce_is_lower_on_matched_pairs_than_on_shuffled_pairs(overfit):
    m, batch, _ = overfit
    with torch.no_grad():
        out = m(batch)
        z2 = m.proj_2d(pooled(out["x_f"], batch["mask"]))
        z3 = m.proj_3d(pooled(out["y_f"], batch["mask"]))
        loss = ContrastiveLoss(0.1)
        matched = loss(z2, z3)
        # every cyclic shift pairs each 2D embedding with another molecule's 3D embedding
        shuffled = [loss(z2, z3.roll(k, dims=0)) for k in range(1, len(z3))]
    assert matched < min(shuffled)


def test_bf16_autocast_forward_and_losses_are_finite(records):
    m = model().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = pretraining_losses(m, collate(records[:4]), ObjectiveConfig(), torch.Generator().manual_seed(0))
    assert all(torch.isfinite(v) for v in losses.values())
    losses["total"].backward()


def test_collate_shortest_paths_and_budget(records):
    from rdkit import Chem

    batch = collate(records, max_spd=6, max_path=3)
    for i, rec in enumerate(records):
        n = len(rec["z"])
        # records keep the input SMILES' atom order, so RDKit's distance matrix of it is the reference
        ref = Chem.GetDistanceMatrix(Chem.MolFromSmiles(DRUGS[i])).astype(int)
        spd = batch["spd"][i, :n, :n].numpy()
        assert (spd == np.minimum(ref, 7)).all()
        paths = batch["path_edges"][i, :n, :n].numpy()
        # a pair at distance k <= 6 lists min(k, 3) bonds; a chain of bonds ending at j
        assert ((paths >= 0).sum(-1) == np.where(ref <= 6, np.minimum(ref, 3), 0)).all()
        edges = batch["edge_feat"]
        assert (paths < len(edges)).all()
    with pytest.raises(ValueError, match="one modality"):
        collate([records[0], dict(records[1], modality="2d")])
    batches = list(atom_budget_batches(records, max_atoms=64))
    assert sum(len(b) for b in batches) == len(records)
    assert all(len(b) * max(len(r["z"]) for r in b) <= 64 or len(b) == 1 for b in batches)


def test_path_edges_walk_from_j_towards_i():
    from rdkit import Chem

    from flexmol.chem.features import graph_features

    mol = Chem.MolFromSmiles("CCCCC")  # a chain: atom k bonded to k+1
    af, bi, bf = graph_features(mol)
    rec = {"modality": "2d", "z": af[:, 0], "atom_feat": af, "bond_index": bi, "bond_feat": bf}
    batch = collate([rec], max_spd=8, max_path=5)
    bonds = [tuple(b) for b in bi.tolist()]
    path = batch["path_edges"][0, 0, 4].tolist()  # from atom 0 to atom 4: bonds 3-4, 2-3, 1-2, 0-1
    assert [bonds[e] for e in path[:4]] == [(3, 4), (2, 3), (1, 2), (0, 1)] and path[4] == -1


def test_a_max_spd_the_stored_distance_tables_cannot_hold_is_refused_at_build_time():
    from flexmol.config import ConfigError
    from flexmol.model.network import ModelConfig, validate_model

    validate_model(ModelConfig(dim=8, heads=2, layers=1, max_spd=254))
    with pytest.raises(ConfigError, match="'max_spd': must be at most 254"):
        validate_model(ModelConfig(dim=8, heads=2, layers=1, max_spd=255))
