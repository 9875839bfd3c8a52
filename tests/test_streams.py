"""Mixed, deterministic, resumable training streams."""
from collections import Counter
from pathlib import Path

import pytest
import torch

from flexmol import config
from flexmol.data.streams import MixedStream, MixingSchedule, MixPoint, SourceStream, dataset_urls
from flexmol.featurize import run_featurize
from conftest import nci_2d_dataset


@pytest.fixture(scope="module")
def nci_2d(tmp_path_factory, nci_smi):
    return nci_2d_dataset(tmp_path_factory.mktemp("streams"), nci_smi, 400)


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


def resumed(name, urls, state, **kw):
    """A new stream continuing from ``state`` (another stream's ``state_dict()``)."""
    stream = SourceStream(name, urls, **kw)
    stream.load_state_dict(state)
    return stream


@pytest.mark.parametrize("workers,head", [(0, 4), (2, 4), (2, 5), (3, 3), (3, 4), (3, 5)])
def test_a_resumed_stream_continues_the_exact_batch_sequence(nci_2d, workers, head):
    """Whatever ``taken % workers`` is: the new loader starts its round-robin at its worker 0."""
    urls = dataset_urls([str(nci_2d)])
    kw = dict(max_atoms=256, seed=11, shuffle_buffer=64, num_workers=workers)
    straight = batches(SourceStream("single_2d", urls, **kw), 10)
    first = SourceStream("single_2d", urls, **kw)
    got = batches(first, head)
    second = resumed("single_2d", urls, first.state_dict(), **kw)
    got += batches(second, 3)  # and resumed again, at another offset
    got += batches(resumed("single_2d", urls, second.state_dict(), **kw), 10 - head - 3)
    assert len(got) == 10 and all(same(a, b) for a, b in zip(straight, got))
    assert not same(straight[0], straight[1])
    other_seed = batches(SourceStream("single_2d", urls, **{**kw, "seed": 12}), 3)
    assert not all(same(a, b) for a, b in zip(straight, other_seed))


def test_mixed_stream_state_round_trip(nci_2d):
    urls = dataset_urls([str(nci_2d)])
    sched = MixingSchedule([MixPoint(0, {"single_2d": 1.0})], ["single_2d"])
    make = lambda: MixedStream(
        {"single_2d": SourceStream("single_2d", urls, max_atoms=256, seed=3, num_workers=0)}, sched, 3)
    s = make()
    out = [next(s) for _ in range(3)]
    state = s.state_dict()
    assert state["step"] == 3 and state["sources"]["single_2d"]["taken"] == 3
    r = make()
    r.load_state_dict(state)
    step, name, batch = next(r)
    ref = make()
    ref_batches = [next(ref) for _ in range(4)]
    assert step == 3 and name == "single_2d" and same(batch, ref_batches[3][2])
    assert [o[0] for o in out] == [0, 1, 2]


class _Counting:
    """A stand-in source: yields its name, counts what was taken."""

    def __init__(self, name):
        self.name, self.taken = name, 0

    def __next__(self):
        self.taken += 1
        return self.name

    def state_dict(self):
        return {"taken": self.taken}


def test_mixing_schedule_follows_the_optimizer_step_under_gradient_accumulation():
    # paired only through optimizer step 4, single_2d only from step 5
    sched = MixingSchedule([MixPoint(4, {"paired": 1.0}), MixPoint(5, {"single_2d": 1.0})], ["paired", "single_2d"])
    stream = MixedStream({"paired": _Counting("paired"), "single_2d": _Counting("single_2d")}, sched, seed=0,
                         grad_accum=4)
    drawn = [next(stream) for _ in range(32)]
    assert [step for step, _, _ in drawn] == [s for s in range(8) for _ in range(4)]
    assert [name for _, name, _ in drawn] == ["paired"] * 20 + ["single_2d"] * 12
    resumed = MixedStream({"paired": _Counting("paired"), "single_2d": _Counting("single_2d")}, sched, seed=0,
                          step=stream.state_dict()["step"], grad_accum=4)
    assert next(resumed)[:2] == (8, "single_2d")


def test_micro_batches_of_one_step_draw_their_sources_independently():
    sched = MixingSchedule([MixPoint(0, {"paired": 0.5, "single_2d": 0.5})], ["paired", "single_2d"])
    stream = MixedStream({"paired": _Counting("paired"), "single_2d": _Counting("single_2d")}, sched, seed=5,
                         grad_accum=8)
    per_step = [{next(stream)[1] for _ in range(8)} for _ in range(20)]
    assert sum(len(s) == 2 for s in per_step) > 10  # most steps mix both sources


@pytest.fixture(scope="module")
def nci_multi_conformer(tmp_path_factory, nci_smi):
    out = tmp_path_factory.mktemp("streams") / "nci_paired_k3"
    cfg = config.build(config.FeaturizeConfig, {"source": str(nci_smi), "out": str(out), "modality": "paired",
                                                "limit": 40, "featurizer": {"num_conformers": 3},
                                                "job": {"executor": "serial", "shard_size": 20, "progress": False}})
    run_featurize(cfg, log=lambda m: None)
    return out


def _conformer_index(batch, i, records):
    """Which of the record's conformers batch row ``i`` holds."""
    n = int(batch["num_atoms"][i])
    z = batch["z"][i, :n].numpy()
    pos = batch["pos"][i, :n].numpy()
    for rec in records:
        if len(rec["z"]) == n and (rec["z"] == z).all():
            for k, conf in enumerate(rec["pos"]):
                if (conf == pos).all():
                    return rec["index"], k
    raise AssertionError("batch row matches no conformer of any record")


def test_training_samples_one_conformer_per_molecule_per_draw_and_resumes_exactly(nci_multi_conformer):
    from flexmol.data.shards import read_shard, shard_paths
    from flexmol.data.streams import fixed_batches

    records = [r for p in shard_paths(nci_multi_conformer) for r in read_shard(p)]
    assert all(len(r["pos"]) == 3 for r in records)
    urls = dataset_urls([str(nci_multi_conformer)])
    kw = dict(max_atoms=128, seed=4, shuffle_buffer=16, num_workers=0)
    straight = batches(SourceStream("paired", urls, **kw), 12)
    picks = [_conformer_index(b, i, records) for b in straight for i in range(len(b["num_atoms"]))]
    assert {k for _, k in picks} == {0, 1, 2}
    by_molecule = {}
    for index, k in picks:
        by_molecule.setdefault(index, set()).add(k)
    assert any(len(ks) > 1 for ks in by_molecule.values())  # a molecule seen twice gets another conformer
    first = SourceStream("paired", urls, **kw)
    batches(first, 5)
    tail = batches(resumed("paired", urls, first.state_dict(), **kw), 7)
    assert all(torch.equal(a["pos"], b["pos"]) for a, b in zip(straight[5:], tail))
    # evaluation always uses the first conformer
    fixed = fixed_batches(urls, max_atoms=128, max_molecules=40)
    assert {k for b in fixed for _, k in (_conformer_index(b, i, records) for i in range(len(b["num_atoms"])))} == {0}


def _rows(batch):
    n = batch["num_atoms"]
    return {(tuple(batch["z"][i, :n[i]].tolist()), tuple(map(tuple, batch["atom_feat"][i, :n[i]].tolist())))
            for i in range(len(n))}


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_reading_a_source_with_too_few_shards_get_disjoint_molecules(nci_2d, monkeypatch, workers):
    urls = dataset_urls([str(nci_2d)])[:1]  # one shard of 50 molecules for 2 ranks
    seen = {}
    for rank in (0, 1):
        with monkeypatch.context() as m:
            m.setenv("RANK", str(rank))
            m.setenv("WORLD_SIZE", "2")
            stream = SourceStream("single_2d", urls, max_atoms=512, seed=0, shuffle_buffer=20, num_workers=workers)
            seen[rank] = set().union(*(_rows(next(stream)) for _ in range(6)))
    assert seen[0] and seen[1]
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) <= 50


def _break(shard, index, how):
    """Damage record ``index`` of ``shard`` in place (same size): ``structure``, it no longer
    decodes; ``vocabulary``, it decodes with the chirality of its first atom out of its vocabulary.
    Returns the record's key."""
    import tarfile

    from flexmol.data import schema

    with tarfile.open(shard) as tar:
        member = [m for m in tar.getmembers() if m.isfile()][index]
        raw = tar.extractfile(member).read()
    if how == "structure":
        at, data = member.offset_data, b"\xc1"
    else:
        at, data = member.offset_data + raw.index(schema.decode(raw)["atom_feat"].tobytes()) + 2, bytes([250])
    with open(shard, "r+b") as f:
        f.seek(at)
        f.write(data)
    return member.name.partition(".")[0]


class _Hung(Exception):
    """Raised by the alarm (not a TimeoutError: that is an OSError, which shard reading handles)."""


def _with_timeout(seconds, call):
    """``call()``, or :class:`_Hung` after ``seconds`` (a stream that reads forever fails the test)."""
    import signal

    def hung(signum, frame):
        raise _Hung(f"no answer in {seconds} s: the stream reads on without end")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        return call()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_shard_cut_short_by_a_damaged_tar_header_stops_the_stream_naming_it(nci_2d, tmp_path):
    """A tar header that fails its checksum ends a tar stream without an error: the records after
    it would vanish unless the count is checked against the manifest."""
    import shutil
    import tarfile

    from flexmol.data.integrity import DataError

    data = Path(shutil.copytree(nci_2d, tmp_path / "nci2d"))
    shard = data / "shard-000003.tar"
    with tarfile.open(shard) as tar:
        member = tar.getmembers()[10]
    with open(shard, "r+b") as f:
        f.seek(member.offset + 108)  # the uid field of the header
        f.write(b"7777777")
    urls = dataset_urls([str(data)])
    stream = SourceStream("single_2d", urls, max_atoms=256, seed=0, num_workers=0)
    with pytest.raises(DataError, match=r"data\.single_2d: .*shard shard-000003\.tar: 10 records read, "
                                        r"manifest\.json says 50"):
        batches(stream, 60)  # a pass over the 8 shards
    skipping = SourceStream("single_2d", urls, max_atoms=256, seed=0, num_workers=0, on_bad_record="skip")
    batches(skipping, 60)
    assert skipping.skipped >= 40 and skipping.skipped % 40 == 0  # 40 records lost per read of the shard


def test_a_record_with_values_out_of_its_vocabulary_stops_the_stream_naming_it_or_is_skipped(nci_2d, tmp_path):
    import shutil
    import tarfile

    from flexmol.data import schema
    from flexmol.data.integrity import DataError

    data = Path(shutil.copytree(nci_2d, tmp_path / "nci2d"))
    shard = data / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        member = [m for m in tar.getmembers() if m.isfile()][7]
        raw = tar.extractfile(member).read()
    feat = schema.decode(raw)["atom_feat"]
    at = member.offset_data + raw.index(feat.tobytes()) + 2  # the chirality of the first atom
    with open(shard, "r+b") as f:  # same size: only a checksum tells
        f.seek(at)
        f.write(bytes([250]))
    key = member.name.partition(".")[0]
    urls = dataset_urls([str(data)])
    with pytest.raises(DataError, match=rf"shard-000000\.tar: record {key}: atom feature out of its vocabulary"):
        batches(SourceStream("single_2d", urls, max_atoms=256, seed=0, num_workers=0), 60)  # a pass over the 8 shards
    skipping = SourceStream("single_2d", urls, max_atoms=256, seed=0, num_workers=0, on_bad_record="skip")
    got = batches(skipping, 60)
    assert skipping.skipped >= 1 and all(int(b["atom_feat"].max()) < 119 for b in got)
    # the shard alone, in order, up to before its end: the record is met once and counted once
    once = SourceStream("single_2d", [str(shard)], max_atoms=256, seed=0, shuffle_buffer=0, num_workers=0,
                        on_bad_record="skip")
    got = batches(once, 3)
    assert sum(int(b["mask"].shape[0]) for b in got) + 1 < 40 and once.skipped == 1


def test_skipping_bad_records_of_a_source_without_a_good_one_stops_rather_than_reading_forever(nci_2d, tmp_path):
    import shutil
    import tarfile

    from flexmol.data.integrity import DataError

    data = Path(shutil.copytree(nci_2d, tmp_path / "nci2d"))
    for shard in sorted(data.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            offsets = [m.offset_data for m in tar.getmembers() if m.isfile()]
        with open(shard, "r+b") as f:
            for at in offsets:
                f.seek(at)
                f.write(b"\xc1")  # no record decodes
    stream = SourceStream("single_2d", dataset_urls([str(data)]), max_atoms=256, seed=0, num_workers=0,
                          on_bad_record="skip")

    with pytest.raises(DataError, match=r"data\.single_2d: no good record in the last \d+ records read"):
        _with_timeout(60, lambda: next(stream))


@pytest.mark.parametrize("workers", [0, 2])
def test_skipping_a_source_whose_records_all_decode_but_none_has_good_values_stops_with_one_line(
        nci_2d, tmp_path, workers):
    import shutil
    import tarfile

    from flexmol.data.integrity import DataError

    data = Path(shutil.copytree(nci_2d, tmp_path / "nci2d"))
    shard = data / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        count = sum(m.isfile() for m in tar.getmembers())
    for i in range(count):
        _break(shard, i, "vocabulary")
    notes = []
    stream = SourceStream("single_2d", [str(shard)], max_atoms=256, seed=0, shuffle_buffer=0, num_workers=workers,
                          on_bad_record="skip", log=notes.append)
    with pytest.raises(DataError) as err:
        _with_timeout(30, lambda: next(stream))
    line = str(err.value)
    assert len(line.splitlines()) == 1
    assert line.startswith("data.single_2d: no good record in the last ")
    assert "atom feature out of its vocabulary" in line
    assert notes and all("shard-000000.tar: record " in n and "atom feature out of its vocabulary" in n for n in notes)


PLANTED = {3: "structure", 7: "vocabulary", 12: "structure", 20: "vocabulary"}


@pytest.mark.parametrize("workers", [0, 2])
def test_skipped_records_are_counted_once_each_straight_and_across_a_resume(nci_2d, tmp_path, workers):
    """Records dropped at decoding and at the batch's value check, each counted once: the count
    of the batches taken is the number of bad records planted in the part of the shard they read
    (its first 40 records or fewer of 49, in order), and a stream resumed after any of the first 5
    batches counts the same."""
    import shutil

    data = Path(shutil.copytree(nci_2d, tmp_path / "nci2d"))
    shard = data / "shard-000000.tar"
    keys = {_break(shard, i, how) for i, how in PLANTED.items()}
    kw = dict(max_atoms=128, seed=0, shuffle_buffer=0, num_workers=workers, on_bad_record="skip")
    straight = SourceStream("single_2d", [str(shard)], **kw)
    taken = batches(straight, 6)
    assert sum(int(b["mask"].shape[0]) for b in taken) + len(PLANTED) < 40  # all in the shard's first read
    assert straight.skipped == len(PLANTED) == len(keys)
    for head in range(1, 6):
        first = SourceStream("single_2d", [str(shard)], **kw)
        batches(first, head)
        second = resumed("single_2d", [str(shard)], first.state_dict(), **kw)
        batches(second, 6 - head)
        assert first.skipped + second.skipped == len(PLANTED), head


@pytest.mark.parametrize("buffer", [0, 1])
def test_a_shuffle_buffer_of_0_or_1_reads_the_records_in_order(nci_2d, buffer):
    from flexmol.data.shards import read_shard

    urls = dataset_urls([str(nci_2d)])[:1]
    got = batches(SourceStream("single_2d", urls, max_atoms=256, seed=0, shuffle_buffer=buffer, num_workers=0), 2)
    records = list(read_shard(Path(urls[0])))
    n = int(got[0]["num_atoms"][0])
    assert got[0]["z"][0, :n].tolist() == records[0]["z"].tolist()


# -- resuming in constant time -----------------------------------------------------------------

class _Work:
    """Counts, in this process, the records decoded and the tar headers read."""

    def __init__(self, monkeypatch):
        import tarfile

        from flexmol.data import schema

        self.decoded = self.headers = 0
        decode, step = schema.decode, tarfile.TarFile.next

        def counting_decode(data):
            self.decoded += 1
            return decode(data)

        def counting_next(tar):
            self.headers += 1
            return step(tar)

        from flexmol.data import integrity

        plain = integrity._plain_member

        def counting_plain(header):  # the reader's own parse of the plain ustar headers shards have
            self.headers += 1
            return plain(header)

        monkeypatch.setattr(schema, "decode", counting_decode)
        monkeypatch.setattr(tarfile.TarFile, "next", counting_next)
        monkeypatch.setattr(integrity, "_plain_member", counting_plain)


def test_resuming_reads_no_more_at_a_late_step_than_at_an_early_one(nci_2d, monkeypatch):
    """Positions after 4 and after 200 batches (four passes over the 400 molecules): the resumed
    stream's first batch costs one shard's headers and its own records at either."""
    urls = dataset_urls([str(nci_2d)])  # 8 shards of 50
    kw = dict(max_atoms=256, seed=5, shuffle_buffer=16, num_workers=0)
    stream, states = SourceStream("single_2d", urls, **kw), {}
    for n in range(1, 201):
        next(stream)
        if n in (4, 200):
            states[n] = stream.state_dict()
    straight = batches(SourceStream("single_2d", urls, **kw), 201)
    for n, state in states.items():
        with monkeypatch.context() as m:
            work = _Work(m)
            first = next(resumed("single_2d", urls, state, **kw))
        rows = int(first["mask"].shape[0])
        # the batch's records, the record that ends it, and the headers of at most two shards (it may
        # span two visits); a replay from the start would read ~1,600 headers at n = 200
        assert work.decoded <= rows + 1, (n, work.decoded, rows)
        assert 0 < work.headers <= 2 * (50 + 1), (n, work.headers)
        assert same(first, straight[n]), n


# -- nested subsets and unique molecules ---------------------------------------------------------

def _source_records(urls):
    """Every record of the source, in the stream's numbering (shard order, then position)."""
    from flexmol.data.shards import read_shard

    return [r for u in urls for r in read_shard(Path(u))]


def _seen(stream, n, records=None):
    """The record numbers of ``n`` batches; with ``records``, each row checked against its record."""
    out = []
    for _ in range(n):
        b = next(stream)
        numbers = b["records"].tolist()
        assert len(numbers) == b["mask"].shape[0]
        if records is not None:
            for i, k in enumerate(numbers):
                assert b["z"][i, :int(b["num_atoms"][i])].tolist() == records[k]["z"].tolist()
        out += numbers
    return out


@pytest.mark.parametrize("size", [1, 2, 3, 5, 64, 1000, 4097])
def test_the_subset_permutation_is_a_bijection_of_the_record_numbers(size):
    import numpy as np

    from flexmol.data.streams import permutation_rank

    ranks = permutation_rank(np.arange(size), size, seed=7)
    assert sorted(ranks.tolist()) == list(range(size))
    if size >= 64:
        assert (ranks != np.arange(size)).mean() > 0.9
        assert not np.array_equal(ranks, permutation_rank(np.arange(size), size, seed=8))


def test_a_subset_streams_exactly_its_d_molecules(nci_2d):
    import numpy as np

    from flexmol.data.streams import permutation_rank

    urls = dataset_urls([str(nci_2d)])
    records = _source_records(urls)
    stream = SourceStream("single_2d", urls, max_atoms=256, seed=0, shuffle_buffer=16, num_workers=0, subset=37,
                          subset_seed=3)
    seen = _seen(stream, 40, records)  # some 8 passes over the subset
    expected = set(np.flatnonzero(permutation_rank(np.arange(len(records)), len(records), 3) < 37).tolist())
    assert len(expected) == 37 and set(seen) == expected
    assert len({records[k]["inchikey"] for k in seen}) == 37


def test_subsets_are_nested_and_the_same_whatever_the_training_seed(nci_2d):
    urls = dataset_urls([str(nci_2d)])
    kw = dict(max_atoms=256, shuffle_buffer=16, num_workers=0, subset_seed=3)
    small = {seed: set(_seen(SourceStream("single_2d", urls, seed=seed, subset=20, **kw), 30)) for seed in (1, 2)}
    large = set(_seen(SourceStream("single_2d", urls, seed=1, subset=60, **kw), 60))
    assert small[1] == small[2] and len(small[1]) == 20
    assert len(large) == 60 and small[1] < large
    other = set(_seen(SourceStream("single_2d", urls, seed=1, subset=20, **{**kw, "subset_seed": 4}), 30))
    assert len(other) == 20 and other != small[1]


@pytest.mark.parametrize("workers", [0, 2])
def test_unique_molecules_seen_are_counted_exactly_straight_and_across_a_resume(nci_2d, workers):
    urls = dataset_urls([str(nci_2d)])
    records = _source_records(urls)
    kw = dict(max_atoms=256, seed=2, shuffle_buffer=16, num_workers=workers)
    straight = SourceStream("single_2d", urls, **kw)
    numbers = _seen(straight, 70, records)  # more than a pass: molecules repeat
    assert straight.coverage.merge() == len(set(numbers)) < len(numbers)
    first = SourceStream("single_2d", urls, **kw)
    _seen(first, 25)
    first.coverage.merge()
    second = resumed("single_2d", urls, first.state_dict(), **kw)
    second.coverage.load_state_dict(first.coverage.state_dict())
    _seen(second, 45)
    assert second.coverage.merge() == straight.coverage.unique
    assert torch.equal(second.coverage.state_dict(), straight.coverage.state_dict())


def test_the_records_seen_by_two_ranks_merge_into_their_union(nci_2d, monkeypatch):
    from flexmol.data.streams import Coverage

    urls = dataset_urls([str(nci_2d)])
    parts = []
    for rank in (0, 1):
        with monkeypatch.context() as m:
            m.setenv("RANK", str(rank))
            m.setenv("WORLD_SIZE", "2")
            parts.append(_seen(SourceStream("single_2d", urls, max_atoms=256, seed=0, num_workers=0), 20))
    coverage = Coverage(400)
    assert coverage.merge(parts) == len(set(parts[0]) | set(parts[1]))
    assert set(parts[0]) != set(parts[1])


@pytest.mark.parametrize("max_atoms,n,head", [(96, 8, 1), (96, 8, 2), (96, 8, 3), (96, 8, 4), (1, 25, 10),
                                             (1, 25, 13), (1, 25, 20)])
def test_a_shard_cut_short_is_counted_once_per_read_straight_and_across_a_resume(nci_2d, tmp_path, max_atoms, n,
                                                                                 head):
    """A shard whose tar ends after 10 of its 50 records (a damaged header), read in blocks of 16:
    each read of it costs 40 records, counted once wherever the stream was resumed: mid-read, or
    (one molecule a batch) right after a read's last record, before the next read counts its loss."""
    import shutil
    import tarfile

    data = Path(shutil.copytree(nci_2d, tmp_path / "nci2d"))
    shard = data / "shard-000003.tar"
    with tarfile.open(shard) as tar:
        member = tar.getmembers()[10]
    with open(shard, "r+b") as f:
        f.seek(member.offset + 108)  # the uid field of the header: its checksum fails
        f.write(b"7777777")
    kw = dict(max_atoms=max_atoms, seed=1, shuffle_buffer=16, num_workers=0, on_bad_record="skip")
    straight = SourceStream("single_2d", [str(shard)], **kw)
    expected = batches(straight, n)
    assert straight.skipped >= 80 and straight.skipped % 40 == 0  # two reads of the shard or more
    first = SourceStream("single_2d", [str(shard)], **kw)
    got = batches(first, head)
    second = resumed("single_2d", [str(shard)], first.state_dict(), **kw)
    got += batches(second, n - head)
    assert all(same(a, b) for a, b in zip(expected, got))
    assert first.skipped + second.skipped == straight.skipped


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_subset_stream_continues_the_exact_batch_sequence(nci_2d, workers):
    urls = dataset_urls([str(nci_2d)])
    kw = dict(max_atoms=256, seed=4, shuffle_buffer=16, num_workers=workers, subset=60, subset_seed=1)
    straight = batches(SourceStream("single_2d", urls, **kw), 12)
    first = SourceStream("single_2d", urls, **kw)
    got = batches(first, 5)
    got += batches(resumed("single_2d", urls, first.state_dict(), **kw), 7)
    assert all(same(a, b) and torch.equal(a["records"], b["records"]) for a, b in zip(straight, got))


# -- reading shards by position ------------------------------------------------------------------

def _webdataset_samples(path):
    import webdataset as wds

    return [(s["__key__"], s.get("msgpack")) for s in wds.tarfile_to_samples()([{"url": str(path)}])]


def _tar_of(path, form, members):
    """A tar in ``form`` (tarfile's PAX, GNU or USTAR format) of (name, bytes or None for a
    directory) members."""
    import io
    import tarfile

    with tarfile.open(path, "w", format=form) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
            else:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)


@pytest.mark.parametrize("form", ["shard", "pax", "gnu", "ustar"])
def test_the_shard_reader_reads_by_position_what_webdataset_reads(nci_2d, tmp_path, form):
    """Shards as written here (plain ustar headers, parsed by the reader itself) and tars of other
    formats, with long and non-ASCII names, other members of a sample and directories (left to
    tarfile): the same samples, keys and records, read whole or by position."""
    import tarfile

    from flexmol.data.integrity import ShardReader

    if form == "shard":
        path = nci_2d / "shard-000001.tar"
    else:
        long = "d" * 60 + "/" + "e" * 70  # a ustar prefix, a pax record or a GNU long name
        members = [(f"{i:06d}.msgpack", bytes([i]) * (100 + 300 * i)) for i in range(6)]
        members[2:2] = [("000001.json", b"{}")]  # a second member of sample 000001
        members += [(f"{long}/000007.msgpack", b"long"), ("a-directory", None), ("caf\u00e9/000008.msgpack", b"accent"),
                    ("000009.txt", b"no record"), ("000010.msgpack", b"plain again")]
        path = tmp_path / f"{form}.tar"
        _tar_of(path, {"pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT, "ustar": tarfile.USTAR_FORMAT}[form],
                members if form != "ustar" else [m for m in members if not m[0].startswith("caf")])
    expected = _webdataset_samples(path)
    n = len(expected)
    reader = ShardReader(str(path), n)
    got = reader.take(range(n))
    assert reader.finish() is None and [got[p] for p in range(n)] == expected
    some = [1, 3, n - 1]
    reader = ShardReader(str(path), n)
    assert reader.take(some) == {p: expected[p] for p in some} and reader.finish() is None
    why = ShardReader(str(path), n + 1).finish()
    assert why.endswith(f"{n} records read, manifest.json says {n + 1} (damaged tar)")
