"""Where featurisation tasks run: Ray (local or a cluster) or in-process."""
from __future__ import annotations

import os
import tempfile
from typing import Any

from flexmol.config import FeaturizerConfig, JobConfig
from flexmol.featurize.task import featurize_shard


class SerialExecutor:
    """Runs each task in the calling process at submit time. For debugging and small inputs: a
    molecule that crashes RDKit takes the whole process with it, and there is no hard time limit."""

    max_in_flight = 1

    def __init__(self) -> None:
        self._done: dict[int, tuple[bool, Any]] = {}
        self._next = 0

    def submit(self, spec, inputs, cfg: FeaturizerConfig, modality: str, out: str, skip: dict) -> int:
        handle, self._next = self._next, self._next + 1
        try:
            self._done[handle] = (True, featurize_shard(spec, inputs, cfg, modality, out, skip, watchdog=False))
        except Exception as exc:  # noqa: BLE001 - reported and retried by the driver
            self._done[handle] = (False, exc)
        return handle

    def wait(self, handles: list) -> list[tuple[Any, bool, Any]]:
        return [(h, *self._done.pop(h)) for h in handles]

    @staticmethod
    def is_worker_death(exc: BaseException) -> bool:
        return False

    def close(self) -> None:
        pass


class RayExecutor:
    """One Ray task per shard, ``num_cpus=1`` each. Ray's own retries are off: a task whose worker
    died is resubmitted by the driver, which first reads which molecule killed it."""

    def __init__(self, job: JobConfig) -> None:
        import ray

        self.ray = ray
        # Ray >= 2.50 writes an auth token to ~/.ray unless told not to; a local job needs none.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            address = os.environ.get("RAY_ADDRESS")
            kwargs: dict[str, Any] = dict(
                include_dashboard=False,
                log_to_driver=True,
                runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}},
            )
            if address:
                kwargs["address"] = address
            else:
                kwargs["num_cpus"] = job.num_cpus
                # Unix socket paths are limited to 107 bytes: keep the session directory short.
                kwargs["_temp_dir"] = os.environ.get("FLEXMOL_RAY_TMPDIR") or os.path.join(tempfile.gettempdir(), "flexmol-ray")
            ray.init(**kwargs)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.max_in_flight = 2 * cpus
        self._task = ray.remote(num_cpus=1, max_retries=0)(featurize_shard)

    def submit(self, spec, inputs, cfg: FeaturizerConfig, modality: str, out: str, skip: dict):
        return self._task.remote(spec, inputs, cfg, modality, out, skip, True)

    def wait(self, handles: list) -> list[tuple[Any, bool, Any]]:
        ready, _ = self.ray.wait(handles, num_returns=1)
        results = []
        for ref in ready:
            try:
                results.append((ref, True, self.ray.get(ref)))
            except self.ray.exceptions.RayTaskError as exc:  # a Python exception inside the task
                results.append((ref, False, exc))
            except self.ray.exceptions.RayError as exc:  # the worker (or its node) died
                results.append((ref, False, exc))
        return results

    def is_worker_death(self, exc: BaseException) -> bool:
        return isinstance(exc, self.ray.exceptions.RayError) and not isinstance(exc, self.ray.exceptions.RayTaskError)

    def close(self) -> None:
        if self._owns_ray:
            self.ray.shutdown()


def make_executor(job: JobConfig):
    return RayExecutor(job) if job.executor == "ray" else SerialExecutor()
