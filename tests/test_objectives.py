"""Pre-training objectives: whole-atom masking, contrastive negatives gathered across data-parallel
ranks, and frozen feature learners in stage 2; real molecules, the default tiny model, CPU."""
import os
import socket
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from flexmol.chem import Featurizer, RawInput
from flexmol.chem.vocab import ATOM_FEATURE_SIZES
from flexmol.config import FeaturizerConfig, build
from flexmol.data.collate import collate
from flexmol.model import FlexMol, ModelConfig
from flexmol.model.inputs import MASK_Z, AtomEmbedding2D
from flexmol.objectives import ObjectiveConfig, mask_atoms, pretraining_losses, validate_objective
from flexmol.objectives.losses import ContrastiveLoss, gather_enabled, gather_mode

SMILES = {
    "caffeine": "CN1C=NC2=C1C(=O)N(C(=O)N2C)C",
    "aspirin": "CC(=O)Oc1ccccc1C(=O)O",
    "ibuprofen": "CC(C)Cc1ccc(cc1)[C@@H](C)C(=O)O",
    "paracetamol": "CC(=O)Nc1ccc(O)cc1",
    "nicotine": "CN1CCC[C@H]1c1cccnc1",
}


@pytest.fixture(scope="module")
def records():
    feat = Featurizer(FeaturizerConfig(seed=3), "paired")
    return [feat(RawInput(i, name, "smiles", s)) for i, (name, s) in enumerate(SMILES.items())]


def tiny(seed=0):
    torch.manual_seed(seed)
    return FlexMol(ModelConfig())


# -- whole-atom masking ------------------------------------------------------------------------

def other_values(batch, atoms):
    """``batch`` with every categorical feature and the element of ``atoms`` [B, N] changed to
    another valid value (and ``z`` kept equal to the new atomic number)."""
    feat = batch["atom_feat"].clone()
    for k, size in enumerate(ATOM_FEATURE_SIZES):
        col = feat[..., k]
        # atomic numbers 1..118 stay elements; other columns cycle through their classes
        new = col % (size - 1) + 1 if k == 0 else (col + 1) % size
        feat[..., k] = torch.where(atoms, new, col)
    assert ((feat != batch["atom_feat"]).all(-1) == atoms).all()
    return dict(batch, atom_feat=feat, z=torch.where(atoms, feat[..., 0], batch["z"]))


@pytest.mark.parametrize("modality", ["paired", "2d"])
def test_a_masked_atom_is_masked_whole_so_its_features_cannot_leak(records, modality):
    m = tiny().eval()
    batch = collate([dict(r, modality=modality) for r in records])
    masked, picked = mask_atoms(batch, 0.15, torch.Generator().manual_seed(1))
    assert picked.sum() >= 3 and (masked["z"][picked] == MASK_Z).all()
    altered = other_values(batch, picked)
    masked_alt, picked_alt = mask_atoms(altered, 0.15, torch.Generator().manual_seed(1))
    assert torch.equal(picked, picked_alt)
    with torch.no_grad():
        a, b = m(masked), m(masked_alt)
        for key in ("x", "h", "embedding") + (("y",) if modality == "paired" else ()):
            assert torch.equal(a[key], b[key]), key
        assert torch.equal(m.atom_head(a["h"])[picked], m.atom_head(b["h"])[picked])
        # every loss but the masked-atom one (whose targets changed) is bit-identical; the
        # generator's first draw picks the atoms, so the same seed masks the same ones
        cfg = ObjectiveConfig()
        la = pretraining_losses(m, batch, cfg, torch.Generator().manual_seed(1))
        lb = pretraining_losses(m, altered, cfg, torch.Generator().manual_seed(1))
    for key in la.keys() - {"atom", "total"}:
        assert torch.equal(la[key], lb[key]), key
    # the same change on atoms that are not masked does reach the model
    unmasked = batch["mask"] & ~picked
    with torch.no_grad():
        c = m(mask_atoms(other_values(batch, unmasked), 0.15, torch.Generator().manual_seed(1))[0])
    assert not torch.allclose(a["embedding"], c["embedding"])


def test_without_masked_atoms_the_2d_token_is_the_sum_of_the_feature_embeddings(records):
    emb = tiny().atom_2d
    feat = collate(records)["atom_feat"]
    expected = sum(t(feat[..., k]) for k, t in enumerate(emb.tables))
    assert torch.equal(emb(feat), expected)
    assert torch.equal(emb(feat, torch.zeros(feat.shape[:2], dtype=torch.bool)), expected)
    some = torch.zeros(feat.shape[:2], dtype=torch.bool)
    some[0, 2] = some[3, 0] = True
    got = emb(feat, some)
    assert torch.equal(got[some], emb.mask_token.expand(2, -1))
    assert torch.equal(got[~some], expected[~some])


def test_an_export_from_before_the_mask_token_still_loads_strictly():
    state = {k: v for k, v in tiny(1).state_dict().items() if k != "atom_2d.mask_token"}
    m = tiny(2)
    token = m.atom_2d.mask_token.detach().clone()
    m.load_state_dict(state, strict=True)
    assert torch.equal(m.atom_2d.mask_token, token)
    assert torch.equal(m.atom_2d.tables[0].weight, state["atom_2d.tables.0.weight"])
    with pytest.raises(RuntimeError, match="Missing key"):  # a missing table still fails
        m.load_state_dict({k: v for k, v in state.items() if k != "atom_2d.tables.0.weight"}, strict=True)


# -- stage 2: frozen feature learners -----------------------------------------------------------

def fl_params(m):
    return list(m.fl_2d.parameters()) + list(m.fl_3d.parameters())


@pytest.mark.parametrize("modality", ["paired", "2d", "3d"])
def test_stage_two_gives_the_feature_learners_no_gradient_on_any_batch(records, modality):
    m = tiny().train()
    batch = collate([dict(r, modality=modality) for r in records])
    losses = pretraining_losses(m, batch, ObjectiveConfig(), torch.Generator().manual_seed(0),
                                train_feature_learners=False)
    losses["total"].backward()
    assert all(p.grad is None for p in fl_params(m))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.mm_encoder.parameters())
    if modality == "paired":  # still logged, without gradient
        assert torch.isfinite(losses["alignment"]) and not losses["alignment"].requires_grad


def test_stage_one_trains_the_feature_learners_and_stage_two_leaves_alignment_out_of_the_total(records):
    batch = collate(records)
    cfg = ObjectiveConfig(alignment=0.7)
    m = tiny().train()
    stage1 = pretraining_losses(m, batch, cfg, torch.Generator().manual_seed(0))
    stage1["total"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fl_params(m) if p.dim() > 1)
    with torch.no_grad():
        stage2 = pretraining_losses(m, batch, cfg, torch.Generator().manual_seed(0), train_feature_learners=False)
    assert torch.allclose(stage2["alignment"], stage1["alignment"], rtol=0, atol=1e-6)
    assert torch.allclose(stage2["total"], stage1["total"] - 0.7 * stage1["alignment"], rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("modality", ["paired", "2d", "3d"])
def test_the_losses_draw_on_the_batch_device_with_its_generator(records, modality):
    m = tiny().cuda().train()
    batch = {k: (v.cuda() if isinstance(v, torch.Tensor) else v)
             for k, v in collate([dict(r, modality=modality) for r in records]).items()}
    run = [pretraining_losses(m, batch, ObjectiveConfig(), torch.Generator("cuda").manual_seed(3))
           for _ in range(2)]
    for k in run[0]:  # the generator drives every draw
        assert torch.allclose(run[0][k], run[1][k], rtol=1e-5, atol=1e-6), k
    run[0]["total"].backward()


# -- contrastive negatives across ranks ---------------------------------------------------------

SIZES = (3, 5)  # ranks' batches differ: they are filled up to an atom budget
IN, OUT = 12, 8


def contrastive_problem():
    """The whole batch's encoder outputs and the two projections, identical in every process."""
    g = torch.Generator().manual_seed(7)
    n = sum(SIZES)
    h2d, h3d = torch.randn(n, IN, generator=g), torch.randn(n, IN, generator=g)
    h3d = h3d + 2 * h2d  # matched pairs are closer, as after some training
    torch.manual_seed(11)
    return h2d, h3d, nn.Linear(IN, OUT), nn.Linear(IN, OUT)


def _contrastive_rank(rank, world, port, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        h2d, h3d, p2, p3 = contrastive_problem()
        lo = sum(SIZES[:rank])
        rows = slice(lo, lo + SIZES[rank])
        result = {"auto": gather_enabled("auto"), "off_enabled": gather_enabled("off")}
        loss = ContrastiveLoss(0.1, gather=result["auto"])(p2(h2d[rows]), p3(h3d[rows]))
        loss.backward()
        result["loss"] = loss.detach()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        result["mean_loss"] = mean_loss / world
        grads = {}
        for name, p in [*(("p2." + k, v) for k, v in p2.named_parameters()),
                        *(("p3." + k, v) for k, v in p3.named_parameters())]:
            g = p.grad.clone()
            dist.all_reduce(g)  # what data-parallel gradient averaging does
            grads[name] = g / world
        result["grads"] = grads
        with torch.no_grad():
            local = ContrastiveLoss(0.1, gather=gather_enabled("off"))(p2(h2d[rows]), p3(h3d[rows]))
        dist.all_reduce(local)
        result["mean_local_loss"] = local / world
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gathered_negatives_at_world_size_two_match_one_process_holding_the_whole_batch():
    world = len(SIZES)
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out_dir:
        port = free_port()
        procs = [ctx.Process(target=_contrastive_rank, args=(r, world, port, out_dir)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=180)
        for p in procs:
            if p.is_alive():
                p.terminate()
        assert [p.exitcode for p in procs] == [0] * world
        results = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(world)]

    h2d, h3d, p2, p3 = contrastive_problem()
    reference = ContrastiveLoss(0.1)(p2(h2d), p3(h3d))
    reference.backward()
    ref_grads = {**{"p2." + k: v.grad for k, v in p2.named_parameters()},
                 **{"p3." + k: v.grad for k, v in p3.named_parameters()}}
    # the single-process loss, written out: symmetric InfoNCE over all 8 molecules
    a, b = nn.functional.normalize(p2(h2d), dim=-1), nn.functional.normalize(p3(h3d), dim=-1)
    logits, target = a @ b.T / 0.1, torch.arange(len(a))
    assert torch.allclose(reference, 0.5 * (nn.functional.cross_entropy(logits, target)
                                            + nn.functional.cross_entropy(logits.T, target)), atol=1e-6)

    for r in results:
        assert r["auto"] and not r["off_enabled"]
        assert torch.allclose(r["mean_loss"], reference.detach(), rtol=1e-6, atol=1e-6)
        for name, g in r["grads"].items():
            assert torch.allclose(g, ref_grads[name], rtol=1e-5, atol=1e-7), name
        # without gathering each rank sees only its own molecules as negatives: another loss
        assert not torch.allclose(r["mean_local_loss"], reference.detach(), rtol=1e-3, atol=1e-3)
    # and each rank's own loss is not the whole batch's loss (the mean over ranks is)
    assert not torch.allclose(results[0]["loss"], reference.detach(), rtol=1e-3, atol=1e-3)


def test_gather_negatives_is_validated_naming_its_key(monkeypatch):
    assert build(ObjectiveConfig).gather_negatives == "auto"
    for mode in ("auto", "on", "off", "true", "false"):  # YAML reads on / off as booleans
        cfg = build(ObjectiveConfig, overrides=[f"gather_negatives={mode}"])
        validate_objective(cfg)
        assert gather_mode(cfg.gather_negatives) == {"true": "on", "false": "off"}.get(mode, mode)
    with pytest.raises(ValueError, match="objective.gather_negatives"):
        validate_objective(build(ObjectiveConfig, overrides=["gather_negatives=always"]))
    with pytest.raises(ValueError, match="objective.gather_negatives"):
        gather_enabled("sometimes")
    # one process, no process group (in-process runs of other tests may have made one: set it aside)
    import flexmol.objectives.losses as losses

    monkeypatch.setattr(losses.dist, "is_initialized", lambda: False)
    # auto and off keep the local batch, on cannot gather
    assert not gather_enabled("auto") and not gather_enabled("off")
    with pytest.raises(RuntimeError, match="gather_negatives=on"):
        gather_enabled("on")
