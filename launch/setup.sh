#!/usr/bin/env bash
# Creates .venv/ at the repository root and installs FlexMol with its pinned stack.
# Idempotent: a second run with unchanged pyproject.toml / constraints returns in a second.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3

[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.flexmol-install
want="$(cat pyproject.toml configs/constraints.txt | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing into .venv/ (first run: about 2 minutes)"
  pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
  # torch first, pinned: anything that asks for torch later finds it satisfied.
  "${pip[@]}" "$(grep -E '^torch==' configs/constraints.txt)"
  "${pip[@]}" -c configs/constraints.txt -e ".[test]"
  echo "$want" > "$stamp"
fi
