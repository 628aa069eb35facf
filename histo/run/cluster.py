"""The Dask engine: a LocalCluster of single-threaded worker processes, bound to localhost and speaking
TLS with credentials made for it, or a client on an existing scheduler (``--scheduler``,
``--scheduler-file``, ``DASK_SCHEDULER_ADDRESS``; TLS credentials from Dask's ``distributed.comm.tls.*``
config).

Every worker, local or remote, is quieted at its start by :class:`QuietWorker` (a Dask worker plugin):
docrep's SyntaxWarnings (squidpy 1.8.2 imports it), squidpy's RuntimeWarnings, spatialdata's INFO lines
and TensorFlow's absl / oneDNN lines at import (printed by its C++ libraries before any setting is read,
so fd 2 is muted while it loads) do not reach the terminal. ``HISTO_VERBOSE=1`` (``histo -v``) leaves them all on.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import warnings
import weakref
from contextlib import contextmanager
from pathlib import Path

import dask
from distributed import Client, LocalCluster
from distributed.diagnostics.plugin import WorkerPlugin
from distributed.security import Security
from distributed.utils import import_term

from histo.errors import HistoError

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


# loggers of other packages whose INFO lines are not histo's (spatialdata's logger also speaks for squidpy)
NOISY_LOGGERS = ("spatialdata._logging", "numba", "h5py", "fsspec")


def verbose() -> bool:
    """True when ``HISTO_VERBOSE`` is set (``histo -v``): other packages' lines are shown."""
    return os.environ.get("HISTO_VERBOSE", "") not in ("", "0")


def quiet_process() -> None:
    """Warning filters and logging levels that keep this process's output to histo's own lines.
    spatialdata sets its logger's level from ``LOGLEVEL`` when it is imported (squidpy imports it)."""
    warnings.filterwarnings("ignore", category=SyntaxWarning, module="docrep")
    # squidpy's z-scores divide by a zero spread for a type whose neighbours never vary (histo.stats.neighbourhood
    # turns those into NaN)
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="squidpy")
    os.environ.setdefault("LOGLEVEL", "WARNING")
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with fd 2 muted: its libraries print absl / oneDNN INFO lines on load whatever
    ``TF_CPP_MIN_LOG_LEVEL`` says. An import error is still raised (and shown) after fd 2 is back."""
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class QuietWorker(WorkerPlugin):
    """Quiets a worker at its start (:func:`quiet_process`, TensorFlow loaded muted), on any cluster. While
    TensorFlow loads (seconds) the worker's other stderr lines are muted too."""

    name = "histo-quiet"

    def setup(self, worker) -> None:
        quiet_process()
        # in the background: the worker starts at once; a task importing TensorFlow waits for this import
        threading.Thread(target=import_tensorflow_quietly, name="histo-quiet-tensorflow", daemon=True).start()


def scheduler_address(scheduler: str | None = None, scheduler_file: str | None = None) -> str | None:
    """The scheduler to connect to: ``scheduler``, else the ``address`` in a Dask scheduler file (written by
    ``dask scheduler --scheduler-file``, dask-mpi, dask-jobqueue), else ``DASK_SCHEDULER_ADDRESS`` (Dask's
    ``scheduler-address`` setting); None: start a LocalCluster."""
    if scheduler:
        return scheduler
    if scheduler_file:
        try:
            return json.loads(Path(scheduler_file).read_text(encoding="utf-8"))["address"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise HistoError(scheduler_file, f"not a Dask scheduler file ({exc.__class__.__name__}: {exc})") from None
    return dask.config.get("scheduler-address", None)


def available_cores() -> int:
    """CPU cores this process may use (affinity-aware)."""
    return len(os.sched_getaffinity(0))


# LocalClusters started in this process, by scheduler address: their credentials never leave it
_own_clusters: weakref.WeakValueDictionary[str, LocalCluster] = weakref.WeakValueDictionary()
SECURITY_LOADER = "distributed.client.security-loader"
OWN_SECURITY = f"{__name__}.own_security"
_user_loader: str | None = None  # the security loader configured before histo's own


def user_loader() -> str | None:
    """The ``distributed.client.security-loader`` the user configured, if any (not histo's own)."""
    configured = dask.config.get(SECURITY_LOADER, None)
    return _user_loader if configured == OWN_SECURITY else configured


def own_security(info: dict) -> Security | None:
    """Dask's ``distributed.client.security-loader`` (installed by :func:`local_cluster`), called for a
    ``Client(address)`` made without ``security``: the credentials of this process's own LocalCluster at that
    address; for any other address the loader configured before, else None (Dask's
    ``distributed.comm.tls.*`` config)."""
    cluster = _own_clusters.get(info.get("address"))
    if cluster is not None:
        return cluster.security
    loader = user_loader()
    return import_term(loader)(info) if loader else None


def local_cluster(n_workers: int | None = None) -> LocalCluster:
    """A LocalCluster of ``n_workers`` single-threaded processes (default: one per core); its
    scheduler, worker and HTTP endpoints listen on localhost only, on free ports.

    Its scheduler, workers and nannies speak TLS (``tls://``) with credentials made for this cluster
    (``Security.temporary()``: a self-signed certificate and key held in memory, passed to the worker
    processes through the nanny's pipe), and each end of every connection must show that certificate:
    a process without it (another account on a shared machine) cannot connect, submit work or send
    bytes that reach a deserialiser. In this process a client gets them from the cluster
    (``Client(cluster)``) or, from its address alone (``Client(cluster.scheduler_address)``, as the napari
    widget makes it), through :func:`own_security`. The dashboard stays plain HTTP on 127.0.0.1."""
    global _user_loader
    environ = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}), **WORKER_ENV}
    if not verbose():  # before the plugin's filter: warnings at the worker's own imports
        environ["PYTHONWARNINGS"] = "ignore::SyntaxWarning:docrep.decorators"
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ, "distributed.worker.profile.enabled": False}):
        cluster = LocalCluster(
            n_workers=n_workers or available_cores(),
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            protocol="tls://",
            security=Security.temporary(),
            dashboard_address="127.0.0.1:0",
        )
    _own_clusters[cluster.scheduler_address] = cluster
    if dask.config.get(SECURITY_LOADER, None) != OWN_SECURITY:
        _user_loader = dask.config.get(SECURITY_LOADER, None)
        dask.config.set({SECURITY_LOADER: OWN_SECURITY})  # for the rest of this process
    return cluster


# what a client of a TLS scheduler needs from Dask's config (distributed.comm.tls.*)
TLS_CONFIG = (
    "give histo the cluster's CA certificate and a client certificate and key in Dask's config "
    "(distributed.comm.tls.ca-file, distributed.comm.tls.client.cert, distributed.comm.tls.client.key; "
    "or DASK_DISTRIBUTED__COMM__TLS__CA_FILE, DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT, "
    "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY)"
)


def connect(address: str) -> Client:
    """A client on the existing scheduler at ``address``, with the TLS credentials of Dask's config
    (``distributed.comm.tls.*``; used for ``tls://`` addresses). A ``tls://`` address without them, or a
    scheduler that cannot be reached or refuses the credentials, is histo's one-line error."""
    if address.startswith("tls://") and address not in _own_clusters and not user_loader():
        security = Security()
        if not (security.tls_ca_file and security.tls_client_cert):
            raise HistoError(address, f"a TLS scheduler: {TLS_CONFIG}")
    try:
        return Client(address)
    except OSError as exc:  # timed out, refused, TLS handshake failed (CommClosedError is an OSError)
        raise HistoError(address, f"cannot connect to the Dask scheduler ({exc})") from None


@contextmanager
def dask_client(scheduler: str | None = None, n_workers: int | None = None):
    """A client on the scheduler at ``scheduler`` (host:port; else ``DASK_SCHEDULER_ADDRESS``; see
    :func:`connect`), else on a new TLS LocalCluster (:func:`local_cluster`) that is shut down on exit; its
    workers quieted (:class:`QuietWorker`) unless :func:`verbose`."""
    scheduler = scheduler_address(scheduler)
    if scheduler:
        with connect(scheduler) as client:
            if not verbose():
                client.register_plugin(QuietWorker())
            yield client
        return
    cluster = local_cluster(n_workers)
    try:
        with Client(cluster) as client:
            if not verbose():
                client.register_plugin(QuietWorker())
            yield client
    finally:
        # a worker slow to exit under load is killed all the same: not worth a warning and a traceback
        names = () if verbose() else ("distributed.nanny", "tornado.application")
        quiet = {name: logging.getLogger(name) for name in names}
        levels = {name: log.level for name, log in quiet.items()}
        for log in quiet.values():
            log.setLevel(logging.CRITICAL)
        try:
            cluster.close(timeout=60)
        except TimeoutError:
            pass
        finally:
            for name, log in quiet.items():
                log.setLevel(levels[name])
