"""The body of one featurisation task: a slice of the input -> one shard and its summary.

Runs the same in a Ray worker and in-process. Per-molecule failures become rejections; what
cannot be caught in Python (a segfault in RDKit, a hang in C++) kills the worker, and the
progress file written here tells the driver which molecule was being processed at the time.
"""
from __future__ import annotations

import faulthandler
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from flexmol import faults
from flexmol.chem import Featurizer, RawInput, Rejected
from flexmol.config import FeaturizerConfig
from flexmol.data import schema
from flexmol.data.shards import atomic_write_text, shard_name, write_encoded_shard


@dataclass
class ShardSpec:
    shard_id: int
    first_index: int
    num_inputs: int

    @property
    def name(self) -> str:
        return shard_name(self.shard_id)


def parts_dir(out: Path) -> Path:
    return Path(out) / "parts"


def part_path(out: Path, shard_id: int) -> Path:
    return parts_dir(out) / f"shard-{shard_id:06d}.json"


def progress_path(out: Path, shard_id: int) -> Path:
    return parts_dir(out) / f"shard-{shard_id:06d}.progress"


def featurize_shard(
    spec: ShardSpec,
    inputs: list[RawInput],
    cfg: FeaturizerConfig,
    modality: str,
    out: str,
    skip: dict[int, str] | None = None,
    watchdog: bool = True,
) -> dict:
    """Featurise ``inputs`` into ``<out>/shard-NNNNNN.tar``; return (and store) the shard summary.

    ``skip`` maps input indices to a rejection reason decided by the driver (molecules that killed
    their worker before). With ``watchdog``, a molecule still running after
    ``cfg.hard_timeout_s`` makes the process exit (the only way out of a hung C++ call).
    """
    out_dir = Path(out)
    skip = skip or {}
    featurize = Featurizer(cfg, modality)
    started = time.perf_counter()
    encoded: list[tuple[int, bytes]] = []  # (input index, record bytes), what the shard holds
    keys: list[list] = []  # [InChIKey, input index, id] of each record, for the cross-shard duplicate pass
    rejects: list[dict] = []
    seen: dict[str, tuple[int, str]] = {}
    atoms = conformers = stripped = 0
    fd = os.open(progress_path(out_dir, spec.shard_id), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    # Where the watchdog writes the stack of a molecule that overran its time, before it exits.
    watchdog_log = open(parts_dir(out_dir) / f"shard-{spec.shard_id:06d}.watchdog.log", "a") if watchdog else None
    dog = _Watchdog(cfg.hard_timeout_s, watchdog_log) if watchdog else None
    try:
        for raw in inputs:
            if raw.index in skip:
                rejects.append(_reject(raw, "worker_died", skip[raw.index], raw.text))
                continue
            # Unbuffered: this line survives the process dying in the very next call.
            os.write(fd, f"{raw.index}\n".encode())
            if dog is not None:
                dog.tick()
            try:
                faults.maybe_inject(raw.id)
                rec = featurize(raw)
            except Rejected as exc:
                rejects.append(_reject(raw, exc.code, exc.reason, exc.smiles or _input_smiles(raw)))
                continue
            except Exception as exc:  # a featuriser bug must not lose the other molecules
                rejects.append(_reject(raw, "error", f"{type(exc).__name__}: {str(exc).strip()[:200]}", _input_smiles(raw)))
                continue
            try:
                # Every record is checked against the schema before it is written, so a featuriser
                # bug costs its molecule (rejected with the reason), never a dataset that fails its
                # check or a training run. Measured on 1000 NCI molecules: validate takes ~8 us
                # per record, 1.3% of 2D featurisation (~0.63 ms per molecule), 0.02% of paired
                # (~20 ms). Encoding moved here from the shard writer: done once, costs nothing more.
                schema.validate(rec)
                if rec["index"] != raw.index:
                    raise schema.SchemaError(f"index {rec['index']} for input {raw.index}")
                data = schema.encode(rec)
            except Exception as exc:  # SchemaError, or a value msgpack cannot encode (TypeError)
                why = str(exc).strip()[:200]
                if not isinstance(exc, schema.SchemaError):
                    why = f"{type(exc).__name__}: {why}"
                rejects.append(_reject(raw, "schema", f"the featurised record breaks the sample schema: {why}",
                                       _input_smiles(raw)))
                continue
            key = rec["inchikey"]
            if key in seen:
                first_index, first_id = seen[key]
                rejects.append(_reject(raw, "duplicate", f"duplicate of input {first_index} ({first_id}) by InChIKey {key}", rec["smiles"]))
                continue
            seen[key] = (raw.index, raw.id)
            encoded.append((raw.index, data))
            keys.append([key, rec["index"], rec["id"]])
            atoms += len(rec["z"])
            conformers += len(rec["pos"]) if "pos" in rec else 0
            stripped += bool(rec.get("fragments_stripped"))
    finally:
        os.close(fd)
        if dog is not None:
            faulthandler.cancel_dump_traceback_later()
            watchdog_log.close()

    samples, size, digest = write_encoded_shard(out_dir / spec.name, encoded)
    summary = {
        "shard": spec.name,
        "shard_id": spec.shard_id,
        "first_index": spec.first_index,
        "num_inputs": spec.num_inputs,
        "samples": samples,
        "bytes": size,
        "sha256": digest,
        "atoms": atoms,
        "conformers": conformers,
        "fragments_stripped": stripped,
        "keys": keys,
        "rejects": rejects,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if samples + len(rejects) != spec.num_inputs or len(inputs) != spec.num_inputs:
        raise RuntimeError(f"{spec.name}: {samples} written + {len(rejects)} rejected != {spec.num_inputs} inputs")
    # The summary is written last: its presence is what marks the shard as finished.
    atomic_write_text(part_path(out_dir, spec.shard_id), json.dumps(summary))
    progress_path(out_dir, spec.shard_id).unlink(missing_ok=True)
    log_path = parts_dir(out_dir) / f"shard-{spec.shard_id:06d}.watchdog.log"
    if log_path.exists() and log_path.stat().st_size == 0:
        log_path.unlink()
    return summary


class _Watchdog:
    """Ends the process when one molecule runs for too long, from a C thread that needs no GIL
    (RDKit can hang inside C++, where no Python-level timeout reaches).

    Re-arming faulthandler's timer costs ~0.1 ms (it restarts a thread): done per molecule it
    would add 10% to 2D featurisation. So the timer runs for 2 x ``limit`` and is re-armed only
    when it was armed more than ``limit`` ago: every molecule gets at least ``limit`` seconds and
    at most 2 x ``limit`` before its worker is killed.
    """

    def __init__(self, limit: float, log):
        self.limit, self.log, self.armed_at = limit, log, -float("inf")

    def tick(self) -> None:
        now = time.monotonic()
        if now - self.armed_at > self.limit:
            faulthandler.dump_traceback_later(2 * self.limit, exit=True, file=self.log)
            self.armed_at = now


def _input_smiles(raw: RawInput) -> str | None:
    return raw.text if raw.kind in ("smiles", "smiles+geometry") else None


def _reject(raw: RawInput, code: str, reason: str, smiles: str | None) -> dict:
    return {"index": raw.index, "id": raw.id, "smiles": smiles or None, "code": code, "reason": reason}


def last_started(out: Path, shard_id: int) -> int | None:
    """Index of the molecule a dead worker was featurising (the last one it announced)."""
    path = progress_path(out, shard_id)
    try:
        lines = path.read_text().split()
        return int(lines[-1]) if lines else None
    except (OSError, ValueError):  # gone, or its last line cut short by the death it records
        return None
