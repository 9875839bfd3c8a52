"""Fault injection for testing how jobs survive dying and hanging workers.

``FLEXMOL_FAULTS`` holds comma-separated ``ACTION:MOLECULE_ID`` items, read in the worker just
before it featurises that molecule:

- ``crash:ID``: the worker process kills itself with SIGSEGV, as a crashing RDKit call would;
- ``crash-once:ID``: the same, the first time only (a marker file in ``FLEXMOL_FAULTS_DIR``
  remembers it), so the retry succeeds;
- ``hang:ID``: the worker sleeps forever, as a hung embedding would; the hard time limit ends it.

Unset (the normal case), this costs one dictionary lookup per molecule.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

_PLAN: dict[str, str] | None = None


def _plan() -> dict[str, str]:
    global _PLAN
    if _PLAN is None:
        _PLAN = {}
        for item in filter(None, (os.environ.get("FLEXMOL_FAULTS") or "").split(",")):
            action, _, ident = item.partition(":")
            _PLAN[ident.strip()] = action.strip()
    return _PLAN


def maybe_inject(molecule_id: str) -> None:
    action = _plan().get(molecule_id)
    if action is None:
        return
    if action == "crash-once":
        marker = Path(os.environ.get("FLEXMOL_FAULTS_DIR", ".")) / f"crashed-{molecule_id}"
        if marker.exists():
            return
        marker.touch()
        action = "crash"
    if action == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif action == "hang":
        while True:
            time.sleep(3600)
