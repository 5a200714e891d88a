"""Listen addresses and the health probe's target: IPv6, wildcards, the TLS server name.

The machine's IPv6 loopback (::1) is used; without one these tests fail rather than skip.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from lesson_progress.addresses import dial_host, host_port
from tests import certs
from tests.support import clean_env
from tests.test_operations import SERVING, START_TIMEOUT, Serve


def health(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``lesson-progress health *args`` with the given LESSON_PROGRESS_* settings."""
    return subprocess.run(
        [sys.executable, "-m", "lesson_progress", "health", "--timeout", "5", *args],
        env=clean_env(**env), cwd=cwd, capture_output=True, text=True,
        timeout=START_TIMEOUT, check=False,
    )  # fmt: skip


async def health_until(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Runs the probe until it exits 0 (the server may still be starting)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_TIMEOUT
    while True:
        result = await asyncio.to_thread(health, cwd, *args, **env)
        if result.returncode == 0 or loop.time() > deadline:
            return result
        await asyncio.sleep(0.5)


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        return bytes(response.read())


def test_addresses() -> None:
    assert host_port("::", 1) == "[::]:1"
    assert host_port("[::]", 1) == "[::]:1"
    assert host_port("::1", 50051) == "[::1]:50051"
    assert host_port("10.0.0.7", 2) == "10.0.0.7:2"
    assert host_port("progress.internal", 3) == "progress.internal:3"
    assert dial_host("0.0.0.0") == dial_host("::") == dial_host("[::]") == "127.0.0.1"
    assert dial_host("[::1]") == "::1"
    assert dial_host("10.0.0.7") == "10.0.0.7"


@pytest.mark.parametrize("host", ["::", "[::]"])
async def test_ipv6_wildcard_serves_grpc_and_metrics_on_both_families(
    tmp_path: Path, database_url: str, host: str
) -> None:
    with Serve(tmp_path, database_url, "--insecure", host=host) as served:
        await served.wait_health(SERVING)  # over IPv4: 127.0.0.1
        for address in (f"127.0.0.1:{served.port}", f"[::1]:{served.port}"):
            probe = await asyncio.to_thread(health, tmp_path, "--address", address)
            assert probe.returncode == 0, probe.stderr
            assert probe.stdout.strip() == f"{address} (overall): SERVING"
        # The metrics listener follows the listen address (IPv6 wildcard: both families).
        for base in (
            f"http://[::1]:{served.metrics_port}",
            f"http://127.0.0.1:{served.metrics_port}",
        ):
            assert b"lesson_progress_rpc_requests" in await asyncio.to_thread(
                fetch, f"{base}/metrics"
            )


async def test_health_dials_the_configured_host_and_port(tmp_path: Path, database_url: str) -> None:
    with Serve(tmp_path, database_url, host="::1", metrics=False) as served:
        # Only on ::1: the old probe (always 127.0.0.1) could not reach it.
        probe = await health_until(
            tmp_path, LESSON_PROGRESS_HOST="::1", LESSON_PROGRESS_PORT=str(served.port)
        )
        assert probe.returncode == 0, probe.stderr + served.log_tail()
        assert probe.stdout.strip() == f"[::1]:{served.port} (overall): SERVING"
        ipv4 = await asyncio.to_thread(health, tmp_path, LESSON_PROGRESS_PORT=str(served.port))
        assert ipv4.returncode == 1


async def test_health_tls_server_name(tmp_path: Path, database_url: str) -> None:
    # The certificate names 127.0.0.1 and localhost, not ::1: dialled at [::1], the probe
    # verifies it only against the name given with --tls-server-name.
    pki = certs.make_pki(tmp_path)
    tls = ["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key)]
    with Serve(tmp_path, database_url, *tls, host="::1", metrics=False) as served:
        address = ["--address", f"[::1]:{served.port}", "--tls-ca", str(pki.ca.cert)]
        named = await health_until(tmp_path, *address, "--tls-server-name", "localhost")
        assert named.returncode == 0, named.stderr + served.log_tail()
        assert "SERVING" in named.stdout
        unnamed = await asyncio.to_thread(health, tmp_path, *address)
        assert unnamed.returncode == 1
        assert "Traceback" not in unnamed.stderr
        wrong = await asyncio.to_thread(
            health, tmp_path, *address, LESSON_PROGRESS_HEALTH_TLS_SERVER_NAME="other.example"
        )
        assert wrong.returncode == 1
        from_env = await asyncio.to_thread(
            health, tmp_path, *address, LESSON_PROGRESS_HEALTH_TLS_SERVER_NAME="localhost"
        )
        assert from_env.returncode == 0, from_env.stderr
