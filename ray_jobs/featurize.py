"""Ray entry point of the featurisation job.

Local (starts Ray on this machine's cores):
    python ray_jobs/featurize.py --recipe shards/qm9.yaml
    python ray_jobs/featurize.py moses --out shards/moses --modality 2d job.num_cpus=16
On a cluster (RAY_ADDRESS is set by `ray job submit`, or export it yourself), with an absolute --out:
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python ray_jobs/featurize.py --recipe shards/moses.yaml --out /shared/shards/moses

Same arguments as `flexmol featurize`; the executor is always Ray. The output directory must be on
storage that every node sees (shards are written by the workers, the manifest by the driver).
"""
import sys

from flexmol.cli import main

if __name__ == "__main__":
    sys.exit(main(["featurize", *sys.argv[1:], "job.executor=ray"]))
