"""DATABASE_URL with sslmode=verify-full, against a PostgreSQL of this module reached over
TLS with a certificate of a test CA (tests/certs.py).

The embedded PostgreSQL is built without SSL, so the TLS side is tests/tls_proxy.py in
front of it: the client's handshake, certificate check and encrypted session are real.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from tests import certs
from tests.faults.cluster import Cluster
from tests.support import clean_env, free_port
from tests.test_operations import SERVING, START_TIMEOUT, Serve
from tests.tls_proxy import tls_front


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> certs.Pki:
    return certs.make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_cluster(pki: certs.Pki) -> Iterator[int]:
    """The port of a PostgreSQL over TLS; its certificate names 127.0.0.1 and localhost."""
    cluster = Cluster(free_port())
    try:
        cluster.start()
        port = free_port()
        with tls_front(cluster.port, pki.server.cert, pki.server.key, port):
            yield port
    finally:
        cluster.destroy()


def verify_full(port: int, ca: Path | str, host: str = "localhost") -> str:
    return f"postgresql://postgres@{host}:{port}/postgres?sslmode=verify-full&sslrootcert={ca}"


def lesson_progress(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lesson_progress", *args], env=clean_env(**env), cwd=cwd,
        capture_output=True, text=True, timeout=START_TIMEOUT, check=False,
    )  # fmt: skip


async def test_verify_full_with_the_ca_file_migrates_and_serves(
    tmp_path: Path, tls_cluster: int, pki: certs.Pki
) -> None:
    url = verify_full(tls_cluster, pki.ca.cert)
    migrated = lesson_progress(tmp_path, "migrate", DATABASE_URL=url)
    assert migrated.returncode == 0, migrated.stderr
    assert migrated.stdout.startswith("applied: ")
    connection = await asyncpg.connect(url)
    try:
        encrypted = await connection.fetchval(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        )
    finally:
        await connection.close()
    assert encrypted is False  # behind the front: the client's side is the TLS one
    with Serve(tmp_path, url, metrics=False) as served:
        await served.wait_health(SERVING)


def test_verify_full_refuses_a_server_the_ca_did_not_sign(tmp_path: Path, tls_cluster: int) -> None:
    foreign = certs.make_ca(tmp_path, "foreign")
    refused = lesson_progress(
        tmp_path, "migrate", DATABASE_URL=verify_full(tls_cluster, foreign.cert)
    )
    assert refused.returncode == 1
    assert "certificate verify failed" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_verify_full_without_a_readable_ca_is_a_configuration_error(
    tmp_path: Path, tls_cluster: int
) -> None:
    missing = lesson_progress(
        tmp_path, "migrate", DATABASE_URL=verify_full(tls_cluster, tmp_path / "absent.crt")
    )
    assert missing.returncode == 2
    assert f"sslrootcert {tmp_path / 'absent.crt'} is not a readable file" in missing.stderr
    assert "Traceback" not in missing.stderr

    # No sslrootcert, and a home without ~/.postgresql/root.crt (a container's user).
    url = f"postgresql://postgres@localhost:{tls_cluster}/postgres?sslmode=verify-full"
    unnamed = lesson_progress(tmp_path, "migrate", DATABASE_URL=url, HOME=str(tmp_path))
    assert unnamed.returncode == 2
    assert "add sslrootcert=/path/to/ca.crt to the URL" in unnamed.stderr
    assert "Traceback" not in unnamed.stderr
