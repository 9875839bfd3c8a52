"""Ray entry point of a scaling sweep: the same code as `flexmol scaling run`.

Local (starts Ray on this machine, run.parallel runs at once):
    python ray_jobs/scaling.py configs/scaling/ladder.yaml --out outputs/scaling/ladder
On a cluster (RAY_ADDRESS is set by `ray job submit`, or export it yourself), with an absolute --out
on storage every node sees; each run is one Ray task asking for run.cpus_per_run CPUs and
run.gpus_per_run GPUs, so Ray places them:
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python ray_jobs/scaling.py configs/scaling/ladder.yaml --out /shared/scaling/ladder

A killed job resumes with the same command: finished runs are not repeated, unfinished ones resume
from their checkpoints.
"""
import sys

from flexmol.cli import main

if __name__ == "__main__":
    sys.exit(main(["scaling", "run", *sys.argv[1:]]))
