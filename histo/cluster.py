"""The Dask engine: a LocalCluster of single-threaded worker processes, bound to localhost."""

from __future__ import annotations

import os
from contextlib import contextmanager

import dask
from distributed import Client, LocalCluster

# One thread per worker for every numeric library: two processes × one thread beat one × two
# (one worker's single-threaded NMS overlaps the other's network pass; STACK.md).
WORKER_ENV = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TF_NUM_INTRAOP_THREADS": "1",
    "TF_NUM_INTEROP_THREADS": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}


def available_cores() -> int:
    """CPU cores this process may use (affinity-aware)."""
    return len(os.sched_getaffinity(0))


def local_cluster(n_workers: int | None = None) -> LocalCluster:
    """A LocalCluster of ``n_workers`` single-threaded processes (default: one per core); its
    scheduler and HTTP endpoints listen on localhost only, on free ports."""
    environ = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}), **WORKER_ENV}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ, "distributed.worker.profile.enabled": False}):
        return LocalCluster(
            n_workers=n_workers or available_cores(),
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
        )


@contextmanager
def dask_client(scheduler: str | None = None, n_workers: int | None = None):
    """A client on the scheduler at ``scheduler`` (host:port), else on a new LocalCluster that is
    shut down on exit."""
    if scheduler:
        with Client(scheduler) as client:
            yield client
        return
    cluster = local_cluster(n_workers)
    try:
        with Client(cluster) as client:
            yield client
    finally:
        try:
            cluster.close(timeout=60)
        except TimeoutError:  # a worker slow to exit under load is killed all the same
            pass
