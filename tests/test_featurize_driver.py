"""The featurisation job's driver at scale: the source read once, duplicates across shards found by
tasks that each read a share of the keys, nothing held per molecule in the driver, and a dataset
identical, byte for byte, to what a plain sequential build writes: straight, with many duplicate
search tasks, after a task retried half-way, and resumed after a kill in any phase."""
import hashlib
import io
import json
import random
import re
import tarfile
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from rdkit import Chem

from flexmol import config
from flexmol.chem import Featurizer, Rejected
from flexmol.data import schema
from flexmol.data.sources import open_source
from flexmol.featurize import job, run_featurize, task

SHARD_SIZE = 37


@pytest.fixture(scope="module")
def source(nci_smi, tmp_path_factory) -> Path:
    """727 NCI inputs: 600 lines as they come (ten rejected for their elements), then 120 of them
    again and 7 spellings of ethanol, benzene and acetic acid, shuffled into the middle and the end:
    duplicates within shards and across them."""
    lines = [line for line in nci_smi.read_text().splitlines() if line.strip()][:600]
    rnd = random.Random(0)
    extra = [lines[i] for i in rnd.sample(range(600), 120)]
    extra += ["OCC ethanol-1", "CCO ethanol-2", "C(C)O ethanol-3", "c1ccccc1 benzene", "C1=CC=CC=C1 kekule-benzene",
              "CC(=O)[O-].[Na+] acetate-salt", "CC(=O)O acetic-acid"]
    rnd.shuffle(extra)
    path = tmp_path_factory.mktemp("src") / "dups.smi"
    path.write_text("\n".join(lines[:300] + extra[:60] + lines[300:] + extra[60:]) + "\n")
    return path


def cfg_for(src, out, **job_keys):
    return config.build(config.FeaturizeConfig, {
        "source": str(src), "out": str(out), "modality": "2d",
        "job": {"executor": "serial", "progress": False, "shard_size": SHARD_SIZE, **job_keys}})


def _tar(members: list[tuple[int, bytes]]) -> bytes:
    """A shard as tarfile writes it: WebDataset's layout, ustar headers, mode 0444, mtime 0."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for index, data in members:
            info = tarfile.TarInfo(f"m{index:09d}.{schema.SAMPLE_EXTENSION}")
            info.size, info.mode, info.mtime = len(data), 0o444, 0
            info.uname = info.gname = "flexmol"
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def reference_build(src: Path, shard_size: int) -> dict:
    """What the job must write, computed the plain way, in one process and in input order, with
    :mod:`tarfile` writing the shards (none of the job's code but the featuriser).

    A record whose InChIKey an earlier record of its own shard holds is a duplicate of that one;
    otherwise, one whose InChIKey an earlier shard holds is a duplicate of the first record with it.
    """
    inputs = list(open_source(str(src)))
    featurize = Featurizer(config.FeaturizerConfig(), "2d")
    first: dict[str, tuple[int, str]] = {}
    shards, rejects = {}, []
    totals = Counter()
    for start in range(0, len(inputs), shard_size):
        chunk, members, in_shard = inputs[start:start + shard_size], [], {}
        for raw in chunk:
            try:
                rec = featurize(raw)
            except Rejected as exc:
                rejects.append({"index": raw.index, "id": raw.id, "smiles": exc.smiles or raw.text or None,
                                "code": exc.code, "reason": exc.reason})
                continue
            key = rec["inchikey"]
            earlier = in_shard.get(key) or first.get(key)
            in_shard.setdefault(key, (raw.index, raw.id))
            if earlier:
                rejects.append({"index": raw.index, "id": raw.id, "smiles": rec["smiles"], "code": "duplicate",
                                "reason": f"duplicate of input {earlier[0]} ({earlier[1]}) by InChIKey {key}"})
                continue
            first[key] = (raw.index, raw.id)
            members.append((raw.index, schema.encode(rec)))
            totals.update(atoms=len(rec["z"]), fragments_stripped=bool(rec.get("fragments_stripped")))
        shards[f"shard-{start // shard_size:06d}.tar"] = (_tar(members), len(members), chunk[0].index, len(chunk))
    written = sum(n for _, n, _, _ in shards.values())
    return {
        "shards": shards,
        "rejects": "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in rejects),
        "counts": {"input": len(inputs), "written": written, "rejected": len(rejects)},
        "rejects_by_reason": list(Counter(r["code"] for r in rejects).most_common()),
        "totals": {"molecules": written, "by_modality": {"2d": written}, "atoms": totals["atoms"], "conformers": 0,
                   "fragments_stripped": totals["fragments_stripped"]},
    }


@pytest.fixture(scope="module")
def reference(source):
    return reference_build(source, SHARD_SIZE)


def assert_same_dataset(out: Path, ref: dict) -> None:
    m = json.loads((out / "manifest.json").read_text())
    assert sorted(p.name for p in out.glob("shard-*.tar")) == sorted(ref["shards"])
    for name, (data, *_) in ref["shards"].items():
        assert (out / name).read_bytes() == data, f"{name} differs"
    assert m["shards"] == [{"name": name, "samples": n, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                            "first_index": fi, "num_inputs": ni} for name, (data, n, fi, ni) in ref["shards"].items()]
    assert (out / "rejects.jsonl").read_text() == ref["rejects"]
    assert m["counts"] == ref["counts"]
    assert list(m["rejects_by_reason"].items()) == [tuple(kv) for kv in ref["rejects_by_reason"]]
    assert m["totals"] == ref["totals"]


@pytest.mark.parametrize("keys_per_task", [10 ** 9, 7], ids=["one-search-task", "many-search-tasks"])
def test_the_dataset_is_byte_for_byte_the_sequential_reference(source, reference, tmp_path, monkeypatch, keys_per_task):
    logs = []
    run_featurize(cfg_for(source, tmp_path / "out", dedup_keys_per_task=keys_per_task), log=logs.append)
    assert reference["counts"]["input"] == 727 and dict(reference["rejects_by_reason"])["duplicate"] > 100
    assert_same_dataset(tmp_path / "out", reference)
    line = next(line for line in logs if "searched for duplicates" in line)
    records, tasks = map(int, re.search(r"(\d+) records of 20 shards searched for duplicates in (\d+) task", line).groups())
    assert tasks == (1 if keys_per_task > records else -(-records // keys_per_task)) and records > 700


def test_the_source_is_read_once(source, tmp_path, monkeypatch):
    reads = []

    def counting(*args, **kwargs):
        src = open_source(*args, **kwargs)
        iterate = src._iterate
        src._iterate = lambda: (reads.append(1), iterate())[1]
        return src

    monkeypatch.setattr(job, "open_source", counting)
    run_featurize(cfg_for(source, tmp_path / "out"), log=lambda s: None)
    assert len(reads) == 1


class Killed(BaseException):
    """The process dies here (not an Exception: nothing in the job catches it)."""


@pytest.mark.parametrize("phase, nth", [
    ("featurize_shard", 3),  # two shards finished
    ("find_duplicates", 2),  # one bucket range searched
    ("remove_duplicates", 2),  # one shard rewritten
    ("finish", 12),  # rejects.jsonl written for 11 shards of 20
])
def test_a_job_killed_in_any_phase_resumes_to_the_same_dataset(source, reference, tmp_path, monkeypatch, phase, nth):
    from flexmol.featurize import executors

    calls = Counter()

    def dies(real):
        def wrapped(*args, **kwargs):
            calls[phase] += 1
            if calls[phase] == nth:
                raise Killed(phase)
            return real(*args, **kwargs)
        return wrapped

    if phase == "finish":
        monkeypatch.setattr(job, "encode_rejects", dies(job.encode_rejects))
    else:
        real = executors.task_function
        monkeypatch.setattr(executors, "task_function", lambda t: dies(real(t)) if t == phase else real(t))
    out = tmp_path / "out"
    with pytest.raises(Killed):
        run_featurize(cfg_for(source, out, dedup_keys_per_task=100), log=lambda s: None)
    assert not (out / "manifest.json").exists()
    monkeypatch.undo()
    logs = []
    run_featurize(cfg_for(source, out, dedup_keys_per_task=100), log=logs.append)
    assert_same_dataset(out, reference)
    assert any("finished shard(s) found and kept" in line for line in logs), logs


def test_a_duplicate_removal_retried_after_it_rewrote_the_shard_ends_the_same(source, reference, tmp_path, monkeypatch):
    # A worker (or node) that dies right after replacing the shard: the driver runs the task again
    # on the rewritten shard, which must end as if it had run once.
    real, failed = task.filter_shard, []

    def dies_after_rewriting(*args):
        result = real(*args)
        if not failed:
            failed.append(args[0])
            raise RuntimeError("worker lost after the rename")
        return result

    monkeypatch.setattr(task, "filter_shard", dies_after_rewriting)
    logs = []
    run_featurize(cfg_for(source, tmp_path / "out"), log=logs.append)
    assert failed and any("failed (RuntimeError: worker lost after the rename); retry 1/2" in line for line in logs)
    assert_same_dataset(tmp_path / "out", reference)


def _run_task(name: str, args: tuple):
    from flexmol.featurize import executors

    return executors.task_function(name)(*args)


class ProcessExecutor:
    """The job's tasks in a child process, as Ray runs them, so that this process is the driver alone."""

    max_in_flight, cpus, isolated = 2, 1, False

    def __init__(self, pool):
        self.pool = pool

    @staticmethod
    def put(value):
        return value

    def submit(self, name: str, *args):
        return self.pool.apply_async(_run_task, (name, args))

    def wait(self, handles):
        handle = handles[0]
        handle.wait()
        try:
            return [(handle, True, handle.get())]
        except Exception as exc:  # noqa: BLE001
            return [(handle, False, exc)]

    def is_worker_death(self, exc):
        return False

    def is_node_loss(self, exc):
        return False

    def close(self):
        pass


def test_the_driver_holds_nothing_per_molecule(nci_smi, tmp_path, monkeypatch):
    # 2, then 10 shards of 250 NCI inputs: each molecule twice (duplicates across shards). The
    # driver holds the slice it is cutting (it grows with the shard size, not the dataset) and
    # ~12 kB per shard (49 bytes per input at this shard size, measured); a dict entry per InChIKey
    # or a list entry per reject cost an earlier driver ~420 bytes per input, a set of the unique
    # keys alone would add ~55.
    import multiprocessing

    lines = [line for line in nci_smi.read_text().splitlines() if line.strip()]
    peaks = []
    with multiprocessing.get_context("fork").Pool(1) as pool:  # forked before tracing starts
        monkeypatch.setattr(job, "make_executor", lambda cfg: ProcessExecutor(pool))
        for n in (500, 500, 2500):  # the first one warms up (imports, caches)  # the first one warms up (imports, caches)
            src = tmp_path / f"nci{len(peaks)}.smi"
            src.write_text("\n".join(lines[:n // 2] * 2) + "\n")
            tracemalloc.start(1)
            try:
                m = run_featurize(cfg_for(src, tmp_path / f"out{len(peaks)}", shard_size=250), log=lambda s: None)
                peaks.append(tracemalloc.get_traced_memory()[1])
            finally:
                tracemalloc.stop()
            assert m["counts"]["input"] == n and m["rejects_by_reason"]["duplicate"] >= n // 2 - 10
            assert len(m["shards"]) == n // 250
    per_input = (peaks[2] - peaks[1]) / 2000
    assert per_input < 75, f"the driver's memory grows by {per_input:.0f} bytes per input ({peaks[1:]})"


def test_key_files_split_into_disjoint_bucket_ranges(tmp_path):
    keys = [Chem.MolToInchiKey(Chem.MolFromSmiles("C" * n)) for n in range(1, 41)]
    entries = [[k, i, f"id{i}", "C", 1, 0, False] for i, k in enumerate(keys)]
    path = tmp_path / "k.keys"
    size = task.write_keys(path, entries)
    assert size == path.stat().st_size
    bounds = [0, 1, 17, 128, 255, task.KEY_BUCKETS]
    ranges = [task.read_keys(path, lo, hi) for lo, hi in zip(bounds, bounds[1:])]
    assert sorted(e[1] for r in ranges for e in r) == list(range(40))  # each entry in exactly one range
    for (lo, hi), r in zip(zip(bounds, bounds[1:]), ranges):
        assert all(lo <= task.key_bucket(e[0]) < hi for e in r)
    assert task.read_keys(path, 0, task.KEY_BUCKETS) == sorted(entries, key=lambda e: (task.key_bucket(e[0]), e[1]))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated key file"):
        task.read_keys(path, 0, task.KEY_BUCKETS)


def plain_graph_features(mol):
    """The 2D features as :mod:`flexmol.chem.vocab` defines them, atom by atom and bond by bond."""
    atoms = [[a.GetAtomicNum(), int(a.GetChiralTag()), min(a.GetTotalDegree(), 10),
              min(max(a.GetFormalCharge(), -5), 6) + 5, min(a.GetTotalNumHs(includeNeighbors=True), 8),
              min(a.GetNumRadicalElectrons(), 4), int(a.GetHybridization()), int(a.GetIsAromatic()), int(a.IsInRing())]
             for a in mol.GetAtoms()]
    bonds = [sorted((b.GetBeginAtomIdx(), b.GetEndAtomIdx())) for b in mol.GetBonds()]
    feats = [[int(b.GetBondType()), int(b.GetStereo()), int(b.GetIsConjugated())] for b in mol.GetBonds()]
    return (np.array(atoms, np.uint8).reshape(-1, 9), np.array(bonds, np.uint16).reshape(-1, 2),
            np.array(feats, np.uint8).reshape(-1, 3))


def test_graph_features_are_the_plain_atom_by_atom_definition(nci_smi):
    from flexmol.chem.features import graph_features

    mols = [m for m in (Chem.MolFromSmiles(line.split()[0]) for line in nci_smi.read_text().splitlines()[:1500]) if m]
    mols += [Chem.AddHs(m) for m in mols[:150]]  # hydrogen atoms as nodes: counted as neighbours
    odd = ["[H][H]", "[2H]C([2H])[2H]", "[CH2]C", "[Fe+6]", "[O-2]", "F[P-](F)(F)(F)(F)F", "C[C@H](F)Cl", "F/C=C/F",
           "[Na+].[Cl-]", "C1=CC=CC=C1", "[N+8]", "[C-9]", "C[Si](C)(C)(C)(C)(C)(C)(C)(C)(C)(C)C"]
    for smiles in odd:
        mol = Chem.MolFromSmiles(smiles, sanitize=False)
        mol.UpdatePropertyCache(strict=False)
        mols.append(mol)
    for mol in mols:
        for got, want in zip(graph_features(mol), plain_graph_features(mol)):
            assert got.dtype == want.dtype and got.shape == want.shape and (got == want).all(), Chem.MolToSmiles(mol)


def test_shards_are_byte_for_byte_what_tarfile_writes(tmp_path):
    from flexmol.data.shards import filter_shard, write_encoded_shard

    rng = np.random.default_rng(0)
    sizes = [0, 1, 511, 512, 513, 1024, 10239, 10240, 20000] + rng.integers(1, 3000, 200).tolist()
    members = [(i * 7919 + (10 ** 10 if i == 5 else 0), rng.bytes(s)) for i, s in enumerate(sizes)]
    path = tmp_path / "s.tar"
    samples, size, digest = write_encoded_shard(path, members)
    assert path.read_bytes() == _tar(members)
    assert (samples, size, digest) == (len(members), path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
    drop = {members[0][0], members[5][0], members[100][0]}
    kept = [m for m in members if m[0] not in drop]
    assert filter_shard(path, drop)[0] == len(kept) and path.read_bytes() == _tar(kept)
    assert filter_shard(path, drop)[0] == len(kept) and path.read_bytes() == _tar(kept)  # idempotent


class NodeLost(RuntimeError):
    """What a task returns when its machine goes away (Ray's NodeDiedError)."""


def test_a_lost_node_is_retried_without_blaming_a_molecule(source, reference, tmp_path, monkeypatch):
    # every shard task's first two tries end with the node lost, after the task reported a molecule
    # started: with crash_retries_per_molecule=0 a worker death would reject that molecule
    from flexmol.featurize import executors

    class LosesNodes(executors.SerialExecutor):
        lost = Counter()

        def submit(self, name, *args):
            if name == "featurize_shard" and self.lost[args[0].shard_id] < 2:
                self.lost[args[0].shard_id] += 1
                handle, self._next = self._next, self._next + 1
                self._done[handle] = (False, NodeLost("node died"))
                return handle
            return super().submit(name, *args)

        @staticmethod
        def is_worker_death(exc):
            return isinstance(exc, NodeLost)

        @staticmethod
        def is_node_loss(exc):
            return isinstance(exc, NodeLost)

    monkeypatch.setattr(job, "make_executor", lambda cfg: LosesNodes())
    monkeypatch.setattr(job, "last_started", lambda out, shard_id: 0)
    with pytest.raises(job.FeaturizeError, match=r"lost its node 2 time\(s\) \(job.node_loss_retries=1\)"):
        run_featurize(cfg_for(source, tmp_path / "capped", node_loss_retries=1), log=lambda s: None)
    LosesNodes.lost.clear()
    logs = []
    run_featurize(cfg_for(source, tmp_path / "out", crash_retries_per_molecule=0, task_retries=0), log=logs.append)
    assert_same_dataset(tmp_path / "out", reference)
    assert sum("node was lost" in line for line in logs) == 2 * len(LosesNodes.lost) > 0


def test_a_relative_out_on_a_ray_cluster_is_refused(source, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    monkeypatch.chdir(tmp_path)
    cfg = config.build(config.FeaturizeConfig, {"source": str(source), "out": "relative/out", "modality": "2d",
                                                "job": {"executor": "ray", "progress": False}})
    with pytest.raises(job.FeaturizeError, match="absolute path on storage every node sees"):
        run_featurize(cfg, log=lambda s: None)
    assert not (tmp_path / "relative").exists()
