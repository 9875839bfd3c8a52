"""The main job (``flexmol demo``) on a very small subset of its default data."""
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_builds_and_checks_both_default_datasets(tmp_path, qm9_rows):
    proc = subprocess.run([sys.executable, "-m", "flexmol.cli", "demo", "--out", str(tmp_path), "--qm9-limit", "60",
                           "--moses-limit", "300"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "modality paired" in proc.stdout and "modality 2d" in proc.stdout
    assert "counts: input 60," in proc.stdout and "counts: input 300," in proc.stdout
    assert proc.stdout.count("  OK") == 2
