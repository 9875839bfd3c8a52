"""The 2D pair inputs (shortest-path distances, path bonds), stored or computed while batching, and
the batches the loader workers send, with the record labels asked for."""
import re

import numpy as np
import pytest
import torch
from rdkit import Chem

from conftest import nci_molecules
from flexmol.chem.features import graph_features
from flexmol.chem.featurizer import Featurizer, RawInput
from flexmol.chem.pairs import FAR, STORED_MAX_ATOMS, batch_distances, path_bonds, stored_tables, table_problem
from flexmol.config import FeaturizerConfig
from flexmol.data import schema
from flexmol.data.collate import collate, move

# Rings fused and bridged, a cage, a macrocycle, a salt and a mixture (disconnected graphs),
# single atoms, and a molecule of two atoms without a bond.
SPECIAL = ["c1ccc2ccccc2c1", "C1CC2CCC1C2", "C1C2CC3CC1CC(C2)C3", "C12C3C4C1C5C2C3C45", "C1" + "C" * 28 + "C1",
           "CC(=O)[O-].[Na+]", "c1ccccc1.OCC.[Cl-]", "C", "[Na+]", "[He].[He]"]


def record(mol, stored=True):
    feat, bonds, bond_feat = graph_features(mol)
    rec = {"modality": "2d", "z": feat[:, 0].copy(), "atom_feat": feat, "bond_index": bonds, "bond_feat": bond_feat,
           "id": Chem.MolToSmiles(mol)}
    if stored:
        rec.update(stored_tables(Chem.GetDistanceMatrix(mol), bonds))
    return rec


def reference(rec, max_spd, max_path):
    """One molecule by hand: a breadth-first search from every atom; the path bond into j is the
    bond from its lowest-numbered neighbour one step closer to i."""
    n = len(rec["z"])
    neighbours = {a: [] for a in range(n)}
    for e, (u, v) in enumerate(rec["bond_index"].tolist()):
        neighbours[u].append((v, e))
        neighbours[v].append((u, e))
    spd = np.full((n, n), max_spd + 1)
    paths = np.full((n, n, max_path), -1)
    for i in range(n):
        dist, queue = {i: 0}, [i]
        for a in queue:
            for c, _ in neighbours[a]:
                if c not in dist:
                    dist[c] = dist[a] + 1
                    queue.append(c)
        for j, d in dist.items():
            if d > max_spd:
                continue
            spd[i, j], cur = d, j
            for t in range(min(d, max_path)):
                k, e = min((k, e) for k, e in neighbours[cur] if dist.get(k) == dist[cur] - 1)
                paths[i, j, t], cur = e, k
    return spd, paths


def assert_matches_reference(records, batch, max_spd, max_path):
    offset = 0
    for b, rec in enumerate(records):
        n, e = len(rec["z"]), len(rec["bond_index"])
        spd, paths = reference(rec, max_spd, max_path)
        assert np.array_equal(batch["spd"][b, :n, :n].numpy(), spd), rec["id"]
        got = batch["path_edges"][b, :n, :n].numpy()
        assert np.array_equal(np.where(got >= 0, got - offset, -1), paths), rec["id"]
        assert np.array_equal(batch["edge_feat"][offset:offset + e].numpy(), rec["bond_feat"])
        offset += e


@pytest.fixture(scope="module")
def molecules(nci_smi):
    return [m for _, m in nci_molecules(nci_smi, 60)] + [Chem.MolFromSmiles(s) for s in SPECIAL]


@pytest.mark.parametrize("max_spd,max_path", [(8, 5), (3, 2), (20, 7), (1, 1)])
def test_pair_inputs_stored_or_computed_are_the_shortest_paths_a_search_by_hand_finds(molecules, max_spd, max_path):
    stored = [record(m) for m in molecules]
    computed = [record(m, stored=False) for m in molecules]
    for records in (stored, computed, stored[::2] + computed[1::2]):
        for start in range(0, len(records), 16):  # batches mixing sizes, as the loader makes them
            chunk = records[start:start + 16]
            assert_matches_reference(chunk, collate(chunk, max_spd, max_path), max_spd, max_path)


def test_stored_tables_are_the_tables_the_batched_search_computes(molecules):
    for mol in molecules:
        rec = record(mol)
        n = len(rec["z"])
        dist = batch_distances([rec["bond_index"]], n, FAR - 1)[0]
        assert np.array_equal(rec["dist"], dist)
        assert np.array_equal(rec["path_bond"], path_bonds(dist[None], [rec["bond_index"]])[0])
        assert table_problem(rec) is None
        schema.validate({**rec, "v": 1, "index": 0, "smiles": rec["id"], "inchikey": "K"})


def test_distances_between_fragments_are_far_and_long_chains_are_counted_exactly():
    salt = record(Chem.MolFromSmiles("CC(=O)[O-].[Na+]"))
    assert (salt["dist"][:4, 4] == FAR).all() and (salt["path_bond"][:4, 4] == len(salt["bond_index"])).all()
    chain = record(Chem.MolFromSmiles("C" * STORED_MAX_ATOMS))
    assert chain["dist"][0, -1] == STORED_MAX_ATOMS - 1 and table_problem(chain) is None
    longer = record(Chem.MolFromSmiles("C" * 256), stored=False)  # ends 255 bonds apart
    batch = [longer, chain, salt]
    for max_spd, max_path in ((8, 5), (200, 3)):
        assert_matches_reference(batch, collate(batch, max_spd, max_path), max_spd, max_path)


def test_molecules_above_the_stored_size_get_their_tables_while_batching():
    big = Chem.AddHs(Chem.MolFromSmiles("C" * 90))  # 272 atoms with hydrogens
    assert big.GetNumAtoms() > STORED_MAX_ATOMS
    assert stored_tables(Chem.GetDistanceMatrix(big), graph_features(big)[1]) is None
    rec = record(big, stored=False)
    assert_matches_reference([rec], collate([rec], 8, 5), 8, 5)


def test_the_featuriser_stores_pair_tables_in_graph_records_only():
    raw = RawInput(0, "aspirin", "smiles", "CC(=O)Oc1ccccc1C(=O)O")
    for modality in ("2d", "paired"):
        rec = Featurizer(FeaturizerConfig(num_conformers=1), modality)(raw)
        schema.validate(rec)
        assert rec["dist"].shape == (13, 13) and rec["dist"].max() == 6 and table_problem(rec) is None
    assert "dist" not in Featurizer(FeaturizerConfig(num_conformers=1), "3d")(raw)


def _valid(mol_smiles="c1ccccc1CCO"):
    rec = record(Chem.MolFromSmiles(mol_smiles))
    return {**rec, "v": 1, "index": 0, "smiles": mol_smiles, "inchikey": "K"}


@pytest.mark.parametrize("change,why", [
    (lambda r: r.pop("path_bond"), "come together"),
    (lambda r: r.update(dist=r["dist"].astype(np.uint16)), "dist is uint16"),
    (lambda r: r.update(dist=r["dist"][:-1]), r"dist is uint8 \(8, 9\)"),
    (lambda r: r.update(path_bond=r["path_bond"].astype(np.int32)), "path_bond is int32"),
    (lambda r: r.update(path_bond=r["path_bond"].ravel()), "path_bond is not a 2-d array"),
    (lambda r: r.update(path_bond=r["path_bond"] + 20), "refers to a bond that does not exist"),
    (lambda r: r.update(modality="3d", pos=np.zeros((1, 9, 3), np.float32)), "come together"),
])
def test_validate_refuses_pair_tables_of_the_wrong_type_shape_or_range(change, why):
    rec = _valid()
    schema.validate(rec)
    change(rec)
    if rec["modality"] == "3d":
        for k in ("atom_feat", "bond_index", "bond_feat"):
            rec.pop(k)
    with pytest.raises(schema.SchemaError, match=why):
        schema.validate(rec)


def _swap_path_bond(rec):
    """Point the path bond of one pair at another bond of the molecule: in range, but wrong."""
    pb = rec["path_bond"].copy()
    i, j = np.argwhere(rec["dist"] == 3)[0]
    pb[i, j] = (int(pb[i, j]) + 1) % len(rec["bond_index"])
    return {**rec, "path_bond": pb}


def _stretch_dist(rec):
    dist = rec["dist"].copy()
    dist[0, -1] = dist[-1, 0] = dist[0, -1] + 1
    return {**rec, "dist": dist}


@pytest.mark.parametrize("damage", [_swap_path_bond, _stretch_dist])
def test_a_record_whose_tables_do_not_follow_its_bonds_is_refused_naming_it(damage):
    good = [record(Chem.MolFromSmiles(s)) for s in ("c1ccccc1CCO", "CCN(CC)CC", "OC1CCCCC1")]
    bad = damage(good[2])
    assert table_problem(bad)
    schema.validate({**bad, "v": 1, "index": 0, "smiles": "x", "inchikey": "K"})  # well-formed: types, shapes, ranges
    with pytest.raises(ValueError, match="record m000000042 of shard-000003.tar: its path_bond table does not follow"):
        collate(good[:2] + [{**bad, "__key__": "m000000042", "__url__": "/data/set/shard-000003.tar"}])
    with pytest.raises(ValueError, match="molecule 'OC1CCCCC1': its path_bond table"):
        collate([bad])
    collate(good)


def _set(field, at, value):
    def damage(rec):
        table = rec[field].copy()
        table[at] = value
        return {**rec, field: table}
    return damage


@pytest.mark.parametrize("damage,why", [
    (_set("dist", (0, 1), 0), "zero exactly on its diagonal"),
    (_set("dist", (0, 5), 4), "not symmetric"),
    (_stretch_dist, "a bond spans more than one step"),
    (_swap_path_bond, "not a bond one step closer"),
    (_set("path_bond", (3, 3), 0), "where dist has no path"),
])
def test_table_problem_says_how_stored_tables_disagree_with_the_bonds(damage, why):
    rec = record(Chem.MolFromSmiles("OC1CCCCC1"))
    assert table_problem(rec) is None
    assert why in table_problem(damage(rec))


def test_compact_batches_hold_the_same_values_and_move_restores_int64(molecules):
    records = [record(m) for m in molecules[:20]]
    wide, compact = collate(records), collate(records, compact=True)
    assert compact["spd"].dtype == torch.uint8 and compact["path_edges"].dtype == torch.int32
    assert compact["z"].dtype == compact["atom_feat"].dtype == compact["edge_feat"].dtype == torch.uint8
    moved = move(compact, "cpu")
    for k, v in wide.items():
        if isinstance(v, torch.Tensor):
            assert v.dtype == moved[k].dtype and torch.equal(v, moved[k]), k
    assert all(v.dtype == torch.int64 for k, v in wide.items() if k not in ("mask", "modality", "pos"))


def test_a_batch_is_one_buffer_so_it_crosses_to_the_training_process_as_one_segment(molecules):
    batch = collate([record(m) for m in molecules[:20]])
    storages = {v.untyped_storage().data_ptr() for v in batch.values() if isinstance(v, torch.Tensor)}
    assert len(storages) == 1


class _Records(torch.utils.data.IterableDataset):
    def __init__(self, records):
        self.records = records

    def __iter__(self):
        for start in range(0, len(self.records), 10):
            yield collate(self.records[start:start + 10])


def test_batches_made_in_loader_workers_are_compact_and_widen_to_the_same_batch(molecules):
    records = [record(m) for m in molecules[:40]]
    loader = torch.utils.data.DataLoader(_Records(records), batch_size=None, num_workers=1)
    for got, start in zip(loader, range(0, 40, 10)):
        assert got["path_edges"].dtype == torch.int32 and got["spd"].dtype == torch.uint8
        want = collate(records[start:start + 10])
        got = move(got, "cpu")
        assert all(torch.equal(want[k], got[k]) for k in want if k != "modality")


def _chain_row(rec):
    """Benzene's row 0 rewritten as if the ring were open between atoms 5 and 0 (distances 0..5),
    each path bond consistent with that row: the walk checks pass, the distances are wrong."""
    bonds = [tuple(sorted(map(int, b))) for b in rec["bond_index"]]
    dist, pb = rec["dist"].copy(), rec["path_bond"].copy()
    for j in range(1, 6):
        dist[0, j] = j
        pb[0, j] = bonds.index((j - 1, j))
    return {**rec, "dist": dist, "path_bond": pb}


@pytest.mark.parametrize("damage", [_chain_row, _set("dist", (0, 1), 0), _set("dist", (0, 5), 4), _stretch_dist,
                                    _swap_path_bond], ids=["open-ring-row", "zero", "asymmetric", "stretched", "swapped"])
def test_collate_refuses_every_table_that_is_not_its_bonds_tables(damage):
    # (a path bond where dist has no path is never followed: harmless, and table_problem reports it)
    rec = record(Chem.MolFromSmiles("c1ccccc1" if damage is _chain_row else "OC1CCCCC1"))
    bad = damage(rec)
    assert table_problem(bad)
    with pytest.raises(ValueError, match=r"molecule '.*': its (dist|path_bond) table"):
        collate([record(Chem.MolFromSmiles("CCO")), bad])


def _described(mol, i):
    """A record whose labels are RDKit descriptors of its molecule, some of them missing: every
    third lacks ``logp``, every fourth holds None for ``tpsa``."""
    from rdkit.Chem import Descriptors

    labels = {"mw": Descriptors.MolWt(mol), "tpsa": None if i % 4 == 0 else Descriptors.TPSA(mol)}
    if i % 3:
        labels["logp"] = Descriptors.MolLogP(mol)
    return {**record(mol), "labels": labels}


def test_labels_come_as_a_float_matrix_in_the_order_asked_with_nan_where_a_molecule_lacks_one(molecules):
    records = [_described(m, i) for i, m in enumerate(molecules[:20])]
    keys = ["logp", "mw", "tpsa", "absent"]
    for compact in (False, True):
        batch = collate(records, labels=keys, compact=compact)
        got = batch["labels"].numpy()
        assert batch["labels"].dtype == torch.float32 and got.shape == (20, 4)
        for i, r in enumerate(records):
            want = [r["labels"].get(k) for k in keys]
            want = np.array([np.nan if v is None else v for v in want], dtype=np.float32)
            assert np.array_equal(got[i], want, equal_nan=True), r["id"]
        assert np.isnan(got[::3, 0]).all() and not np.isnan(got[1::3, 0]).any()
        assert np.isnan(got[:, 3]).all()
        assert np.isfinite(got[:, 1]).all()
    assert "labels" not in collate(records)  # asked for, not carried by default
    storages = {v.untyped_storage().data_ptr() for v in batch.values() if isinstance(v, torch.Tensor)}
    assert len(storages) == 1


@pytest.mark.parametrize("value", ["high", float("inf"), True])
def test_a_label_that_is_not_a_finite_number_is_refused_naming_the_molecule_and_the_key(molecules, value):
    records = [_described(m, i) for i, m in enumerate(molecules[:3])]
    records[1]["labels"]["mw"] = value
    with pytest.raises(ValueError, match=rf"molecule '{re.escape(records[1]['id'])}': label 'mw' is .*, not a finite number"):
        collate(records, labels=["mw"])
    collate(records, labels=["tpsa"])  # a key not asked for is not read


@pytest.fixture(scope="module")
def labelled_dataset(tmp_path_factory, nci_smi):
    """60 NCI molecules from a CSV whose descriptor columns are labels (some cells empty), and a
    column ``note`` of numbers but one word (molecule 7's), featurised as 2D in shards of 20."""
    import csv

    from conftest import nci_molecules
    from flexmol import config
    from flexmol.featurize import run_featurize

    d = tmp_path_factory.mktemp("labelled")
    rows = [(smi, _described(mol, i)["labels"]) for i, (smi, mol) in enumerate(nci_molecules(nci_smi, 60))]
    with open(d / "mols.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["smiles", "mw", "logp", "tpsa", "note"])
        for i, (smi, lab) in enumerate(rows):
            w.writerow([smi] + ["" if lab.get(k) is None else repr(lab[k]) for k in ("mw", "logp", "tpsa")]
                       + ["n/a" if i == 7 else str(i)])
    run_featurize(config.build(config.FeaturizeConfig, {
        "source": str(d / "mols.csv"), "out": str(d / "ds"), "modality": "2d",
        "source_options": {"label_columns": ["mw", "logp", "tpsa", "note"]},
        "job": {"executor": "serial", "shard_size": 20, "progress": False}}), log=lambda m: None)
    return d / "ds"


def test_training_streams_and_heldout_batches_carry_the_labels_asked_for(labelled_dataset):
    from flexmol.data.shards import read_shard, shard_paths
    from flexmol.data.streams import SourceStream, fixed_batches

    records = [r for p in shard_paths(labelled_dataset) for r in read_shard(p)]
    urls = [str(p) for p in shard_paths(labelled_dataset)]
    keys = ["tpsa", "logp"]

    def want(index):
        return np.array([np.nan if records[index]["labels"].get(k) is None else records[index]["labels"][k]
                         for k in keys], dtype=np.float32)

    for workers in (0, 1):
        stream = SourceStream("single_2d", urls, max_atoms=256, seed=0, num_workers=workers, labels=keys)
        for _ in range(4):
            batch = next(stream)
            assert batch["labels"].shape == (len(batch["num_atoms"]), 2)
            for row, index in zip(batch["labels"].numpy(), batch["records"].tolist()):
                assert np.array_equal(row, want(index), equal_nan=True)
    fixed = fixed_batches(urls, max_atoms=256, max_molecules=30, labels=keys)
    got = np.concatenate([b["labels"].numpy() for b in fixed])
    heldout = [i for p in range(3) for i in range(p * 20, p * 20 + 10)]  # an equal share from each shard
    assert np.array_equal(got, np.stack([want(i) for i in heldout]), equal_nan=True)
    assert np.isnan(got).any() and not np.isnan(got).all()
    assert "labels" not in next(SourceStream("single_2d", urls, max_atoms=256, seed=0, num_workers=0))


def test_a_label_that_is_not_a_number_stops_or_is_skipped_in_training_and_held_out_batches(labelled_dataset):
    from flexmol.data.integrity import DataError
    from flexmol.data.shards import shard_paths
    from flexmol.data.streams import SourceStream, fixed_batches

    urls = [str(p) for p in shard_paths(labelled_dataset)]
    with pytest.raises(DataError, match=r"held-out data: molecule '.*' \(record 7\): label 'note' is 'n/a'"):
        fixed_batches(urls, max_atoms=256, max_molecules=30, labels=["note"])
    notes = []
    fixed = fixed_batches(urls, max_atoms=256, max_molecules=30, labels=["note"], on_bad_record="skip", notes=notes)
    assert len(notes) == 1 and sum(len(b["num_atoms"]) for b in fixed) == 29
    with pytest.raises(DataError, match=r"data.single_2d: .* shard shard-000000.tar: record m000000007: label 'note' is "
                                        r"'n/a', not a finite number"):
        stopping = SourceStream("single_2d", urls, max_atoms=256, seed=0, num_workers=0, labels=["note"])
        for _ in range(12):
            next(stopping)
    logged = []
    stream = SourceStream("single_2d", urls, max_atoms=256, seed=0, num_workers=0, labels=["note"],
                          on_bad_record="skip", log=logged.append)
    for _ in range(12):
        batch = next(stream)
        if stream.skipped:
            break
    assert stream.skipped == 1 and len(logged) == 1 and "label 'note'" in logged[0]
    assert not torch.isnan(batch["labels"]).any()
