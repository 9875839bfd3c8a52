"""Measured training compute (flexmol.scaling.flops): FLOPs of a training step fitted as a function
of the batch's shape, per model size, stage and modality, on real NCI molecules featurised as
paired records (each serves 2D and 3D batches too); a micro model so that a measurement takes
seconds."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from flexmol.chem import Featurizer, RawInput
from flexmol.config import FeaturizerConfig
from flexmol.data.collate import atom_budget_batches, collate
from flexmol.model import FlexMol, ModelConfig
from flexmol.objectives import ObjectiveConfig, pretraining_losses
from flexmol.scaling import ScalingError
from flexmol.scaling.flops import (MODALITIES, FlopModel, batch_work, cache_key, count_flops, flop_model, measure,
                                   planned_work, prepare, sample_records, step_flops)
from tests.conftest import nci_2d_dataset, nci_molecules

MICRO = ModelConfig(dim=16, heads=2, layers=1, num_kernels=8, proj_dim=8)
MAX_ATOMS = 96
SOURCE = {"paired": "paired", "2d": "single_2d", "3d": "single_3d"}


@pytest.fixture(scope="module")
def records(nci_smi):
    """24 real molecules of 5-30 heavy atoms, featurised as paired records (RDKit conformers)."""
    feat = Featurizer(FeaturizerConfig(seed=0), "paired")
    return [feat(RawInput(i, f"nci{i}", "smiles", smi)) for i, (smi, _) in enumerate(nci_molecules(nci_smi, 24))]


@pytest.fixture(scope="module")
def measured(records):
    return measure(MICRO, {m: records for m in MODALITIES}, max_atoms=MAX_ATOMS)


def as_modality(records, modality):
    return [dict(r, modality=modality) for r in records]


def counted(cfg, batch, stage=1):
    torch.manual_seed(1)
    return step_flops(prepare(FlexMol(cfg), stage), batch, ObjectiveConfig(), stage)


# -- counting ----------------------------------------------------------------------------------

def test_the_cpu_attention_kernel_is_counted_as_attention():
    """FlopCounterMode alone counts nothing for the CPU flash-attention kernel; count_flops counts
    torch's own attention formulas: 4*B*H*N^2*d_h forward, twice that (plus the scores recomputed)
    backward."""
    b, h, n, d = 2, 3, 7, 8
    q = torch.randn(b, h, n, d, requires_grad=True)
    bias = torch.randn(b, h, n, n)

    def attend():
        F.scaled_dot_product_attention(q, q.detach(), q.detach(), attn_mask=bias).sum().backward()

    with FlopCounterMode(display=False) as plain:
        attend()
    assert plain.get_total_flops() == 0
    assert count_flops(attend) == 4 * b * h * n * n * d + 10 * b * h * n * n * d


def test_a_step_counts_the_backward_pass_too(records):
    """A training step is its forward and its backward (about twice the forward: the gradients of
    the inputs and of the weights of each product)."""
    batch = collate(as_modality(records[:4], "paired"))
    model = prepare(FlexMol(MICRO), 1)
    forward = count_flops(lambda: pretraining_losses(model, batch, ObjectiveConfig()))
    assert 2.5 * forward < step_flops(model, batch, ObjectiveConfig(), 1) < 3.5 * forward


def test_bf16_autocast_changes_no_count(records):
    """The trainer's train.precision=bf16 runs the same products on the same shapes."""
    batch = collate(as_modality(records[:4], "3d"))
    model = prepare(FlexMol(MICRO), 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = step_flops(model, batch, ObjectiveConfig(), 1)
    assert bf16 == step_flops(model, batch, ObjectiveConfig(), 1)


def test_the_count_of_a_step_depends_on_the_batch_shape_alone(records):
    """Every module runs on the padded tensors: two batches of different molecules padded to the
    same shape cost the same, which is what lets the fit use (B, N_pad) alone."""
    big = max(len(r["z"]) for r in records)
    largest = [r for r in records if len(r["z"]) == big][:1]
    others = [r for r in records if len(r["z"]) < big]
    a = collate(as_modality(largest + others[:3], "paired"))
    b = collate(as_modality(largest + others[-3:], "paired"))
    assert a["mask"].shape == b["mask"].shape and not torch.equal(a["mask"], b["mask"])
    assert counted(MICRO, a) == counted(MICRO, b)


# -- the fit -----------------------------------------------------------------------------------

def test_the_fit_predicts_unseen_real_batches_within_one_percent(measured, records):
    for modality in MODALITIES:
        fit = measured.fits[modality]
        assert fit["held_out"] and fit["held_out_max_relative_error"] < 0.01
        assert fit["max_relative_error"] < 0.01
    # batches neither fitted nor held out: another order, another atom budget, counted afresh
    shuffled = [records[i] for i in np.random.default_rng(7).permutation(len(records))]
    fitted = {(b, n) for f in measured.fits.values() for b, n, _ in f["points"]}
    checked = 0
    for modality in MODALITIES:
        for batch in list(atom_budget_batches(as_modality(shuffled, modality), 70))[:2]:
            batch = collate(batch)
            b, n = batch["mask"].shape
            checked += (b, n) not in fitted
            assert measured.batch_flops(modality, b, n) == pytest.approx(counted(MICRO, batch), rel=0.01)
    assert checked >= 3


def test_the_pair_term_makes_the_cost_per_molecule_grow_faster_than_its_atoms(measured):
    for modality in MODALITIES:
        assert measured.coefficients[modality]["atom_pairs"] > 0
        for n in (5, 10, 20):
            assert measured.per_molecule(2 * n, modality) > 2 * measured.per_molecule(n, modality)
        # straight from the counts: one molecule of the most atoms against one of the fewest
        single = sorted((n, f) for b, n, f in measured.fits[modality]["points"] if b == 1)
        (n1, f1), (n2, f2) = single[0], single[-1]
        assert f2 / f1 > n2 / n1


def test_the_contrastive_loss_alone_grows_with_the_batch_squared(measured):
    assert measured.coefficients["paired"]["batch_pairs"] > 0
    assert measured.coefficients["2d"]["batch_pairs"] == measured.coefficients["3d"]["batch_pairs"] == 0


def test_a_wider_model_costs_more_per_molecule(measured, records):
    wide = measure(ModelConfig(dim=32, heads=2, layers=1, num_kernels=8, proj_dim=8), {"2d": records},
                   max_atoms=MAX_ATOMS)
    assert wide.parameters > measured.parameters
    for n in range(5, 31):
        assert wide.per_molecule(n, "2d") > 1.5 * measured.per_molecule(n, "2d")


def test_a_cost_term_outside_the_form_is_refused(records, monkeypatch):
    """A triangle update (B*N^3) added to every pair stack: over 5-30 atoms a quadratic mimics it
    to within a percent, but not exactly, and the counts are exact."""
    from flexmol.model.layers import PairTransformer

    plain = PairTransformer.finish

    def with_triangle(self, x, pair):
        return plain(self, x, pair + torch.einsum("bikh,bkjh->bijh", pair, pair) / pair.shape[1])

    monkeypatch.setattr(PairTransformer, "finish", with_triangle)
    with pytest.raises(ScalingError, match=r"2d batches: the counts are not c_molecule\*B \+ c_atom\*B\*N \+ "
                                           r"c_pair\*B\*N\^2 \+ c_batch\*B\^2 \(residual [-+]0\.\d+% on .*B\*N\^3"):
        measure(MICRO, {"2d": records}, max_atoms=MAX_ATOMS)


def test_stage_2_skips_the_feature_learners_backward_on_paired_batches_only(measured, records):
    stage2 = measure(MICRO, {"paired": records, "2d": records}, stage=2, max_atoms=MAX_ATOMS)
    one, two = measured.coefficients, stage2.coefficients
    assert two["2d"] == pytest.approx(one["2d"], rel=1e-9)
    # the feature learners (per-atom MLPs d -> 2d -> d) run without gradient: per atom, each saves
    # its backward, the input and weight gradients of its two products, 2 * 2 * (2 * d * 2d)
    assert one["paired"]["atoms"] - two["paired"]["atoms"] == 2 * 16 * MICRO.dim ** 2
    for term in ("molecules", "atom_pairs", "batch_pairs"):
        assert two["paired"][term] == pytest.approx(one["paired"][term], rel=1e-9)
    assert stage2.key != measured.key


# -- a run's total -----------------------------------------------------------------------------

def hand_model():
    return FlopModel(key="k", model={}, stage=1, objective={}, parameters=1, fits={}, seconds=0.0, torch="x",
                     coefficients={"paired": {"molecules": 5.0, "atoms": 7.0, "atom_pairs": 11.0, "batch_pairs": 13.0},
                                   "2d": {"molecules": 1.0, "atoms": 2.0, "atom_pairs": 3.0, "batch_pairs": 0.0}})


def test_total_of_a_work_dict_is_the_hand_computation():
    work = {"paired": {"molecules": 10, "atoms": 200, "atom_pairs": 4500, "padded_atoms": 250,
                       "padded_pairs": 6300, "batch_pairs": 60},
            "single_2d": {"molecules": 4, "atoms": 30, "atom_pairs": 250, "padded_atoms": 40,
                          "padded_pairs": 400, "batch_pairs": 16},
            "single_3d": {"molecules": 0, "atoms": 0, "atom_pairs": 0, "padded_atoms": 0, "padded_pairs": 0,
                          "batch_pairs": 0}}  # no 3D fit, and no 3D molecule: nothing to cost
    got = hand_model().total(work)
    assert got["flops"] == 5 * 10 + 7 * 200 + 11 * 4500 + 13 * 60 + 1 * 4 + 2 * 30 + 3 * 250
    assert got["flops_padded"] == 5 * 10 + 7 * 250 + 11 * 6300 + 13 * 60 + 1 * 4 + 2 * 40 + 3 * 400


@pytest.mark.parametrize("work, error", [
    ({"single_4d": {}}, r"work: unknown source 'single_4d'"),
    ({"paired": {"molecules": 1, "atoms": 3}}, r"work\['paired'\]\['atom_pairs'\]: must be a non-negative number"),
    ({"paired": {"molecules": 1, "atoms": -3, "atom_pairs": 9, "padded_atoms": 3, "padded_pairs": 9,
                 "batch_pairs": 1}}, r"work\['paired'\]\['atoms'\]"),
    ({"single_3d": {"molecules": 1, "atoms": 3, "atom_pairs": 9, "padded_atoms": 3, "padded_pairs": 9,
                    "batch_pairs": 1}}, r"work\['single_3d'\]: .* not '3d'; measure it with 3d records"),
])
def test_total_refuses_work_it_cannot_cost(work, error):
    with pytest.raises(ScalingError, match=error):
        hand_model().total(work)


def test_the_counters_of_a_run_give_the_flops_its_steps_ran(measured, records):
    """A run in miniature: training-like batches of two sources, their counters summed as the
    trainer sums them (batch_work); the padded total is the sum of the steps' counts, the useful
    total (each molecule at its own size) below it."""
    work, ran = {}, 0
    for source, modality in (("paired", "paired"), ("single_2d", "2d")):
        counters = dict.fromkeys(batch_work(np.ones((1, 1), dtype=bool)), 0)
        for batch in atom_budget_batches(as_modality(records[:12], modality), MAX_ATOMS):
            batch = collate(batch)
            for k, v in batch_work(batch["mask"]).items():
                counters[k] += v
            ran += counted(MICRO, batch)
        work[source] = counters
    assert work["paired"]["molecules"] == work["single_2d"]["molecules"] == 12
    got = measured.total(work)
    assert got["flops_padded"] == pytest.approx(ran, rel=1e-9)
    assert got["flops"] < got["flops_padded"]


def test_batch_work_counts_molecules_atoms_and_pairs():
    mask = np.zeros((3, 5), dtype=bool)
    for i, n in enumerate((5, 2, 3)):
        mask[i, :n] = True
    assert batch_work(torch.from_numpy(mask)) == {"molecules": 3, "atoms": 10, "atom_pairs": 25 + 4 + 9,
                                                  "padded_atoms": 15, "padded_pairs": 75, "batch_pairs": 9}


def test_planned_work_batches_a_sample_as_training_does():
    # one size: batches of exactly max_atoms // n molecules, no padding
    even = planned_work({"single_2d": 1000}, {"single_2d": [10] * 50}, max_atoms=100)["single_2d"]
    assert even == {"molecules": 1000, "atoms": 10_000, "atom_pairs": 100_000, "padded_atoms": 10_000,
                    "padded_pairs": 100_000, "batch_pairs": 10_000}
    sizes = np.random.default_rng(0).integers(5, 30, size=400)
    mixed = planned_work({"paired": 2000}, {"paired": sizes}, max_atoms=256)["paired"]
    assert mixed["atoms"] == pytest.approx(2000 * sizes.mean())
    assert mixed["atom_pairs"] == pytest.approx(2000 * np.mean(sizes ** 2))
    assert mixed["padded_atoms"] > mixed["atoms"] and mixed["padded_pairs"] > mixed["atom_pairs"]
    assert mixed["padded_atoms"] <= 2000 / len(sizes) * 256 * len(list(atom_budget_batches(
        ({"modality": "paired", "z": range(n)} for n in sizes), 256)))
    with pytest.raises(ScalingError, match=r"sizes\['paired'\]: atom counts must be within 1..max_atoms"):
        planned_work({"paired": 10}, {"paired": [5, 300]}, max_atoms=256)
    with pytest.raises(ScalingError, match=r"sizes\['single_3d'\]: no atom counts"):
        planned_work({"single_3d": 10}, {}, max_atoms=256)


def test_sample_records_reads_the_first_records_of_a_dataset(tmp_path, nci_smi):
    directory = nci_2d_dataset(tmp_path, nci_smi, limit=60)
    modality, recs = sample_records(directory, limit=20, key="data.single_2d")
    assert modality == "2d" and len(recs) == 20 and all("atom_feat" in r for r in recs)
    with pytest.raises(ScalingError, match=r"config key 'data.single_2d': .*nothing does not exist"):
        sample_records(tmp_path / "nothing", key="data.single_2d")


# -- JSON and the cache ------------------------------------------------------------------------

def test_a_flop_model_survives_json(measured, tmp_path):
    again = FlopModel.from_dict(json.loads(json.dumps(measured.to_dict())))
    assert again == measured
    assert FlopModel.load(measured.save(tmp_path / "m.json")) == measured


def test_a_measured_model_is_read_from_the_cache_not_measured_again(measured, records, tmp_path, monkeypatch):
    key = cache_key(MICRO, 1, ObjectiveConfig(), MODALITIES)
    assert key == measured.key
    measured.save(tmp_path / f"flops-{key}.json")
    import flexmol.scaling.flops as flops

    def fail(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(flops, "measure", fail)
    assert flop_model(MICRO, {m: records for m in MODALITIES}, stage=1, cache_dir=tmp_path) == measured
    with pytest.raises(AssertionError, match="measured again"):  # another stage: another model
        flop_model(MICRO, {m: records for m in MODALITIES}, stage=2, cache_dir=tmp_path)


@pytest.mark.parametrize("change, error", [
    (lambda d: d.pop("coefficients"), r"key 'coefficients': missing"),
    (lambda d: d.update(format="other"), r"key 'format': not a flexmol-flops version 1 file"),
    (lambda d: d["coefficients"]["2d"].update(atoms=float("nan")), r"key 'coefficients.2d.atoms'"),
    (lambda d: d["coefficients"].update({"4d": {}}), r"key 'coefficients': unknown modality '4d'"),
    (lambda d: d.update(stage=3), r"key 'stage': must be 1 or 2"),
    (lambda d: d.update(parameters="many"), r"key 'parameters': expected int, got 'many'"),
])
def test_a_damaged_flop_model_file_is_refused_naming_the_file_and_key(measured, tmp_path, change, error):
    d = json.loads(json.dumps(measured.to_dict()))
    change(d)
    path = tmp_path / "m.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ScalingError, match=rf"{path}: {error}"):
        FlopModel.load(path)
    path.write_text("{not json")
    with pytest.raises(ScalingError, match=rf"{path}: not a readable FLOP model"):
        FlopModel.load(path)


# -- what measure refuses ----------------------------------------------------------------------

def test_measure_refuses_records_it_cannot_fit_or_batch(records, nci_smi):
    one_size = [r for r in records if len(r["z"]) == len(records[0]["z"])]
    with pytest.raises(ScalingError, match=r"records\['2d'\]: molecules of 1 atom count\(s\) .* at least 3"):
        measure(MICRO, {"2d": one_size}, max_atoms=MAX_ATOMS)
    graphs = [Featurizer(FeaturizerConfig(), "2d")(RawInput(0, "ethanol", "smiles", "CCO"))]
    with pytest.raises(ScalingError, match=r"records\['3d'\]\[0\] \(molecule 'ethanol'\): cannot make a 3d batch"):
        measure(MICRO, {"3d": graphs})
    with pytest.raises(ScalingError, match=r"records: unknown modality \['4d'\]"):
        measure(MICRO, {"4d": records})
    with pytest.raises(ScalingError, match=r"stage: must be 1 or 2"):
        measure(MICRO, {"2d": records}, stage=3)
