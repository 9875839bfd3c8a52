"""Where the featurisation job's tasks run: Ray (local or a cluster) or in-process.

Both take a task by name (a function of :mod:`flexmol.featurize.task`) and its arguments (large
ones stored once with ``put``), and report each task's result or exception; retrying is the
driver's decision, because a task whose worker died may have to skip the molecule that killed it.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Callable

from flexmol.config import JobConfig
from flexmol.featurize.task import featurize_shard, find_duplicates, remove_duplicates


def task_function(name: str) -> Callable:
    # Looked up at each call, so that what runs is what this module's names hold now.
    return {"featurize_shard": featurize_shard, "find_duplicates": find_duplicates,
            "remove_duplicates": remove_duplicates}[name]


class SerialExecutor:
    """Runs each task in the calling process at submit time. For debugging and small inputs: a
    molecule that crashes RDKit takes the whole process with it, and there is no hard time limit
    (``isolated`` is False: the watchdog would end the job, not a worker)."""

    max_in_flight = 1
    cpus = 1
    isolated = False

    def __init__(self) -> None:
        self._done: dict[int, tuple[bool, Any]] = {}
        self._next = 0

    @staticmethod
    def put(value: Any) -> Any:
        return value

    def submit(self, task: str, *args) -> int:
        handle, self._next = self._next, self._next + 1
        try:
            self._done[handle] = (True, task_function(task)(*args))
        except Exception as exc:  # noqa: BLE001 - reported and retried by the driver
            self._done[handle] = (False, exc)
        return handle

    def wait(self, handles: list) -> list[tuple[Any, bool, Any]]:
        return [(h, *self._done.pop(h)) for h in handles]

    @staticmethod
    def is_worker_death(exc: BaseException) -> bool:
        return False

    @staticmethod
    def is_node_loss(exc: BaseException) -> bool:
        return False

    def close(self) -> None:
        pass


def init_ray(num_cpus: int | None, env_vars: dict[str, str]) -> bool:
    """Connect to Ray unless this process already has: the cluster ``RAY_ADDRESS`` names, or a local
    Ray with ``num_cpus`` (None: every core); ``env_vars`` are set in every worker. True when this
    call started the connection (the caller shuts it down)."""
    import ray

    # Ray >= 2.50 writes an auth token to ~/.ray unless told not to; a local job needs none.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=True,
                                  runtime_env={"env_vars": {**env_vars, "RAY_AUTH_MODE": "disabled"}})
    if address:
        kwargs["address"] = address
    else:
        kwargs["num_cpus"] = num_cpus
        # Unix socket paths are limited to 107 bytes: keep the session directory short.
        kwargs["_temp_dir"] = os.environ.get("FLEXMOL_RAY_TMPDIR") or os.path.join(tempfile.gettempdir(), "flexmol-ray")
    ray.init(**kwargs)
    return True


class RayExecutor:
    """One Ray task per call, ``num_cpus=1`` each. Ray's own retries are off: a task whose worker
    died is resubmitted by the driver, which first reads which molecule killed it."""

    isolated = True

    def __init__(self, job: JobConfig) -> None:
        import ray

        self.ray = ray
        self._owns_ray = init_ray(job.num_cpus, {"OMP_NUM_THREADS": "1"})
        self.cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.max_in_flight = 2 * self.cpus
        self._remote: dict[str, Any] = {}

    def put(self, value: Any):
        """``value`` stored in Ray's object store (which spills to disk), passed to tasks by reference:
        the driver keeps no slice of the input it has handed out, however many are in flight."""
        return self.ray.put(value)

    def submit(self, task: str, *args):
        if task not in self._remote:
            self._remote[task] = self.ray.remote(num_cpus=1, max_retries=0)(task_function(task))
        return self._remote[task].remote(*args)

    def wait(self, handles: list) -> list[tuple[Any, bool, Any]]:
        ready, _ = self.ray.wait(handles, num_returns=1)
        results = []
        for ref in ready:
            try:
                results.append((ref, True, self.ray.get(ref)))
            except self.ray.exceptions.RayError as exc:  # an exception inside the task, or its worker (or node) died
                results.append((ref, False, exc))
        return results

    def is_worker_death(self, exc: BaseException) -> bool:
        return isinstance(exc, self.ray.exceptions.RayError) and not isinstance(exc, self.ray.exceptions.RayTaskError)

    def is_node_loss(self, exc: BaseException) -> bool:
        """The task's node died (a machine lost or stopped): retried without blaming a molecule."""
        return isinstance(exc, self.ray.exceptions.NodeDiedError)

    def close(self) -> None:
        if self._owns_ray:
            self.ray.shutdown()


def make_executor(job: JobConfig):
    return RayExecutor(job) if job.executor == "ray" else SerialExecutor()
