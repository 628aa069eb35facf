"""The Dask cluster is authenticated and encrypted (issue 21): the LocalCluster histo starts speaks TLS
with credentials made for it (``Security.temporary()``), so a process without them (another account on a
shared machine) cannot connect to its scheduler, workers or nannies, submit work or send bytes that reach a
deserialiser; an existing TLS scheduler is reached with Dask's own ``distributed.comm.tls.*`` config.

Real LocalClusters and real ``dask scheduler`` / ``dask worker`` processes, real sockets; no mocks."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import dask
import numpy as np
import pytest
from distributed import Client
from distributed.comm import connect as comm_connect
from distributed.comm.addressing import get_address_host_port
from distributed.security import Security
from helpers import histo

from histo.errors import HistoError
from histo.run.cluster import WORKER_ENV, connect, local_cluster

BIN = Path(sys.executable).parent
TLS_ENV = ("CA_FILE", "CLIENT__CERT", "CLIENT__KEY")  # DASK_DISTRIBUTED__COMM__TLS__<name>

# the junk that printed "Unable to allocate 6.09 EiB" from a worker before TLS: a frame count of 2**62
JUNK = (2**62).to_bytes(8, "little") + b"\xff" * 56


def ports(client) -> list[str]:
    """Every address of the cluster behind ``client``: scheduler, workers, nannies."""
    workers = client.scheduler_info()["workers"]
    return [client.scheduler.address, *workers, *(w["nanny"] for w in workers.values())]


def answer(address: str, payload: bytes, context: ssl.SSLContext | None = None) -> bytes | None:
    """What the server at ``address`` sends back to ``payload`` (raw, or over TLS with ``context``) until it
    closes the connection; b"" when a TLS handshake or the client's certificate is refused; None when the
    connection was still open after 10 s."""
    host, port = get_address_host_port(address)
    received = b""
    with socket.create_connection((host, port), timeout=10) as raw:
        try:
            sock = context.wrap_socket(raw) if context else raw  # TLS 1.3: the certificate is checked after this
            sock.sendall(payload)
            while data := sock.recv(4096):
                received += data
        except (ssl.SSLError, ConnectionError):
            return b""
        except TimeoutError:
            return None
    return received


def attacker_security(address: str) -> Security:
    """Credentials of its own that trust the cluster's certificate (read from the port, as anyone can)."""
    own = Security.temporary()
    cluster_cert = ssl.get_server_certificate(get_address_host_port(address), timeout=10)
    return Security(
        require_encryption=True,
        tls_ca_file=cluster_cert + own.tls_ca_file,
        tls_client_cert=own.tls_client_cert,
        tls_client_key=own.tls_client_key,
    )


# ---- the LocalCluster histo starts (conftest's `client`: histo.run.cluster.dask_client, two workers) ------


def test_the_local_cluster_speaks_tls_with_its_own_credentials(client):
    assert all(a.startswith("tls://127.0.0.1:") for a in ports(client))
    assert client.security.require_encryption and client.security.tls_client_cert.startswith("-----BEGIN")
    assert type(client.scheduler_comm.comm).__name__ == "TLS"
    assert set(client.run(lambda dask_worker: dask_worker.security.require_encryption).values()) == {True}


# another account on the machine, as in issue 21: a process of its own that finds the scheduler's port and
# tries Client.run to write a file as histo's user; with Dask's default config, plain TCP, and TLS with a
# certificate of its own that trusts the cluster's (read from the port, as anyone can)
ATTACK = """
import ssl, sys, time
from distributed import Client
from distributed.comm.addressing import get_address_host_port
from distributed.security import Security

address, victim = sys.argv[1:]
own = Security.temporary()
cluster_cert = ssl.get_server_certificate(get_address_host_port(address), timeout=10)
trusting = Security(require_encryption=True, tls_ca_file=cluster_cert + own.tls_ca_file,
                    tls_client_cert=own.tls_client_cert, tls_client_key=own.tls_client_key)
tries = {
    "dask-default": lambda: Client(address, timeout=3),
    "plain-tcp": lambda: Client(address.replace("tls://", "tcp://"), timeout=3),
    "own-certificate": lambda: Client(address, security=trusting, timeout=3),
}
for name, make in tries.items():
    started = time.monotonic()
    try:
        with make() as client:
            client.run(lambda: open(victim, "w").write("ran"))
        print(name, "CONNECTED")
    except Exception as exc:
        print(name, "refused", type(exc).__name__, isinstance(exc, OSError), round(time.monotonic() - started, 1))
"""


def test_another_process_without_the_credentials_cannot_connect(client, tmp_path):
    """The issue's attack, from another process: no connection, nothing run, refused within seconds."""
    victim = tmp_path / "victim"
    done = subprocess.run(
        [sys.executable, "-c", ATTACK, client.scheduler.address, str(victim)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line.split() for line in done.stdout.splitlines()]
    assert [line[:2] for line in lines] == [
        [name, "refused"] for name in ("dask-default", "plain-tcp", "own-certificate")
    ], done.stdout + done.stderr
    assert lines[0][2] == "TypeError"  # Dask's client: "TLS expects a `ssl_context`" (no credentials)
    assert all(line[3] == "True" for line in lines[1:]), lines  # OSError: reset, handshake refused, timed out
    assert all(float(line[4]) < 20 for line in lines), lines
    assert not victim.exists()
    assert client.submit(sum, [1, 2], pure=False).result(timeout=60) == 3  # the cluster is unharmed


def test_no_port_of_the_cluster_takes_a_connection_without_its_certificate(client):
    """Scheduler, workers and nannies: Dask's own connect with another certificate fails; raw junk bytes
    and TLS without a client certificate are dropped before any Dask message is read."""
    unverified = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    unverified.check_hostname, unverified.verify_mode = False, ssl.CERT_NONE
    addresses = ports(client)
    assert len(addresses) == 5
    for address in addresses:
        args = attacker_security(address).get_connection_args("client")
        with pytest.raises(OSError):
            asyncio.run(comm_connect(address, timeout=3, **args))
        junk = answer(address, JUNK)
        assert junk == b"" or junk.startswith(b"\x15"), (address, junk)  # nothing, or a TLS alert record, then closed
        assert answer(address, JUNK, unverified) == b"", address
    assert client.submit(sum, [3, 4], pure=False).result(timeout=60) == 7


def test_tasks_and_their_data_move_between_workers_over_tls(client):
    a, b = sorted(client.scheduler_info()["workers"])
    x = client.submit(np.arange, 3_000_000, workers=[a], pure=False)  # 24 MB from worker a to worker b
    total = client.submit(np.sum, x, workers=[b], pure=False)
    assert total.result(timeout=120) == 3_000_000 * 2_999_999 // 2
    assert client.who_has(x)[x.key] and np.array_equal(x.result(timeout=120)[-3:], [2_999_997, 2_999_998, 2_999_999])


def test_clients_of_local_cluster_in_this_process():
    """``histo.run.cluster.local_cluster`` as the napari Analyze widget uses it: ``Client(cluster)`` and
    ``Client(cluster.scheduler_address)`` get the cluster's credentials (the latter through
    ``own_security``, Dask's security loader); an address this process did not start gets none."""
    cluster = local_cluster(1)
    try:
        assert cluster.scheduler_address.startswith("tls://127.0.0.1:")
        assert dask.config.get("distributed.client.security-loader") == "histo.run.cluster.own_security"
        with Client(cluster) as c:
            assert c.submit(sum, [5, 6], pure=False).result(timeout=60) == 11
        with Client(cluster.scheduler_address) as c:
            assert c.security is cluster.security
            assert c.submit(sum, [1, 1], pure=False).result(timeout=60) == 2
        with pytest.raises(TypeError, match="TLS expects a `ssl_context`"):
            Client("tls://127.0.0.1:9", timeout=1)
    finally:
        cluster.close(timeout=60)


# ---- an existing TLS cluster: dask scheduler / dask worker --tls-*, histo with Dask's config ------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """One certificate and key for every role (as Security.temporary() makes them), in files only we read."""
    folder = tmp_path_factory.mktemp("tls")
    made = Security.temporary()
    files = {"ca": made.tls_ca_file, "cert": made.tls_scheduler_cert, "key": made.tls_scheduler_key}
    for name, text in files.items():
        (folder / f"{name}.pem").write_text(text)
        (folder / f"{name}.pem").chmod(0o600)
    return {name: folder / f"{name}.pem" for name in files}


@pytest.fixture(scope="module")
def tls_scheduler(tls_files, tmp_path_factory):
    """``dask scheduler`` and one ``dask worker``, both TLS with ``tls_files``; yields the scheduler file."""
    file = tmp_path_factory.mktemp("scheduler") / "scheduler.json"
    tls = ["--tls-ca-file", tls_files["ca"], "--tls-cert", tls_files["cert"], "--tls-key", tls_files["key"]]
    env = {**os.environ, **WORKER_ENV}
    scheduler = [BIN / "dask", "scheduler", "--protocol", "tls", "--host", "127.0.0.1", "--port", "0"]
    scheduler += ["--dashboard-address", "127.0.0.1:0", "--scheduler-file", file, *tls]
    procs = [subprocess.Popen(scheduler, env=env, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.monotonic() + 120
        while not file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        worker = [BIN / "dask", "worker", "--scheduler-file", file, "--host", "127.0.0.1", "--nthreads", "1"]
        procs.append(subprocess.Popen([*worker, "--no-dashboard", *tls], env=env, stderr=subprocess.DEVNULL))
        security = Security(
            tls_ca_file=str(tls_files["ca"]),
            tls_client_cert=str(tls_files["cert"]),
            tls_client_key=str(tls_files["key"]),
        )
        with Client(json.loads(file.read_text())["address"], security=security, timeout=60) as c:
            c.wait_for_workers(1, timeout=120)
        yield file
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in reversed(procs):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def tls_env(tls_files) -> dict[str, str]:
    """The environment of a histo run on ``tls_scheduler``: Dask's config through its environment variables."""
    paths = (tls_files["ca"], tls_files["cert"], tls_files["key"])
    return {**os.environ, **{f"DASK_DISTRIBUTED__COMM__TLS__{k}": str(p) for k, p in zip(TLS_ENV, paths)}}


def test_a_tls_scheduler_without_credentials_is_one_line(tls_scheduler, generated, tmp_path):
    address = json.loads(tls_scheduler.read_text())["address"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_DISTRIBUTED__COMM__TLS")}
    slide = generated("lymph-node", 512, 1)
    result = histo("run", slide, "--out", tmp_path, "--scheduler", address, "--quiet", env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"histo: error: {address}: a TLS scheduler: give histo the cluster's CA certificate and a client "
        "certificate and key in Dask's config (distributed.comm.tls.ca-file, distributed.comm.tls.client.cert, "
        "distributed.comm.tls.client.key; or DASK_DISTRIBUTED__COMM__TLS__CA_FILE, "
        "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT, DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY)"
    ]
    assert not list(tmp_path.iterdir())


def test_a_tls_scheduler_refuses_other_credentials_in_one_line(tls_scheduler):
    address = json.loads(tls_scheduler.read_text())["address"]
    other = Security.temporary()
    config = {
        "distributed.comm.tls.ca-file": other.tls_ca_file,
        "distributed.comm.tls.client.cert": other.tls_client_cert,
        "distributed.comm.tls.client.key": other.tls_client_key,
        "distributed.comm.timeouts.connect": "5s",
    }
    with dask.config.set(config), pytest.raises(HistoError, match="cannot connect to the Dask scheduler") as err:
        connect(address)
    assert err.value.path == address and "\n" not in str(err.value)


def test_histo_reaches_a_tls_scheduler_with_dask_config_from_the_environment(tls_scheduler, tls_files):
    """``DASK_DISTRIBUTED__COMM__TLS__CA_FILE`` / ``__CLIENT__CERT`` / ``__CLIENT__KEY``, as README says."""
    code = (
        "import sys\nfrom histo.run.cluster import dask_client, scheduler_address\n"
        "with dask_client(scheduler_address(None, sys.argv[1])) as c:\n"
        "    print(c.scheduler.address, c.submit(sum, [20, 22], pure=False).result(timeout=120))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tls_scheduler)], env=tls_env(tls_files), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    address = json.loads(tls_scheduler.read_text())["address"]
    assert address.startswith("tls://127.0.0.1:") and done.stdout.split() == [address, "42"]


@pytest.mark.slow
def test_histo_run_on_a_tls_scheduler_file(tls_scheduler, tls_files, generated, tmp_path):
    """``histo run --scheduler-file`` end to end on the TLS cluster: the bundle completes."""
    slide = generated("lymph-node", 1024, 2)
    result = histo(
        "run", slide, "--out", tmp_path, "--scheduler-file", tls_scheduler, "--quiet", env=tls_env(tls_files)
    )
    assert result.returncode == 0, result.stderr
    (bundle,) = (p for p in tmp_path.iterdir() if p.is_dir())
    run = json.loads((bundle / "run.json").read_text())
    assert run["status"] == "complete" and run["n_cells"] > 100
