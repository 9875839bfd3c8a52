"""Mixed, deterministic, resumable training streams."""
from collections import Counter

import pytest
import torch

from flexmol import config
from flexmol.data.streams import MixedStream, MixingSchedule, MixPoint, SourceStream, dataset_urls
from flexmol.featurize import run_featurize


@pytest.fixture(scope="module")
def nci_2d(tmp_path_factory, nci_smi):
    out = tmp_path_factory.mktemp("streams") / "nci2d"
    cfg = config.build(config.FeaturizeConfig, {"source": str(nci_smi), "out": str(out), "modality": "2d", "limit": 400,
                                                "job": {"executor": "serial", "shard_size": 50, "progress": False}})
    run_featurize(cfg, log=lambda m: None)
    return out


def test_mixing_follows_a_ramp_schedule_over_many_steps():
    sched = MixingSchedule([MixPoint(0, {"paired": 1.0}), MixPoint(1000, {"paired": 1.0}),
                            MixPoint(3000, {"paired": 0.2, "single_2d": 0.8})], ["paired", "single_2d"])
    assert sched.weights(500) == {"paired": 1.0, "single_2d": 0.0}
    assert sched.weights(2000)["single_2d"] == pytest.approx(0.4 / 1.0)
    early = Counter(sched.choose(s, seed=7) for s in range(0, 1000))
    assert early == {"paired": 1000}
    late = Counter(sched.choose(s, seed=7) for s in range(3000, 13000))
    assert late["single_2d"] / 10000 == pytest.approx(0.8, abs=0.015)
    ramp = Counter(sched.choose(s, seed=7) for s in range(1900, 2100))
    assert 0.3 < ramp["single_2d"] / 200 < 0.5


def test_every_rank_draws_the_same_source_per_step_and_seeds_differ():
    sched = MixingSchedule([MixPoint(0, {"paired": 0.5, "single_2d": 0.5})], ["paired", "single_2d"])
    a = [sched.choose(s, seed=1) for s in range(200)]
    assert a == [sched.choose(s, seed=1) for s in range(200)]
    assert a != [sched.choose(s, seed=2) for s in range(200)]


def test_schedule_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown source"):
        MixingSchedule([MixPoint(0, {"single_4d": 1.0})], ["paired"])
    with pytest.raises(ValueError, match="no weight"):
        MixingSchedule([MixPoint(0, {"single_3d": 1.0})], ["paired"])


def batches(stream, n):
    return [next(stream) for _ in range(n)]


def same(a, b):
    return a["z"].shape == b["z"].shape and torch.equal(a["z"], b["z"]) and torch.equal(a["atom_feat"], b["atom_feat"])


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_stream_continues_the_exact_batch_sequence(nci_2d, workers):
    urls = dataset_urls([str(nci_2d)])
    kw = dict(max_atoms=256, seed=11, shuffle_buffer=64, num_workers=workers)
    straight = batches(SourceStream("single_2d", urls, **kw), 10)
    first = SourceStream("single_2d", urls, **kw)
    head = batches(first, 4)
    resumed = SourceStream("single_2d", urls, taken=first.taken, **kw)
    tail = batches(resumed, 6)
    assert all(same(a, b) for a, b in zip(straight, head + tail))
    assert not same(straight[0], straight[1])
    other_seed = batches(SourceStream("single_2d", urls, **{**kw, "seed": 12}), 3)
    assert not all(same(a, b) for a, b in zip(straight, other_seed))


def test_mixed_stream_state_round_trip(nci_2d):
    urls = dataset_urls([str(nci_2d)])
    sched = MixingSchedule([MixPoint(0, {"single_2d": 1.0})], ["single_2d"])
    make = lambda taken=0, step=0: MixedStream(
        {"single_2d": SourceStream("single_2d", urls, max_atoms=256, seed=3, num_workers=0, taken=taken)}, sched, 3, step)
    s = make()
    out = [next(s) for _ in range(3)]
    state = s.state_dict()
    assert state == {"step": 3, "taken": {"single_2d": 3}}
    r = make(state["taken"]["single_2d"], state["step"])
    step, name, batch = next(r)
    ref = make()
    ref_batches = [next(ref) for _ in range(4)]
    assert step == 3 and name == "single_2d" and same(batch, ref_batches[3][2])
    assert [o[0] for o in out] == [0, 1, 2]
