"""The machine a run happened on, for the report."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import psutil


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def revision(root: Path) -> str:
    """The commit the service was measured at, and whether service/ or migrations/ had
    uncommitted changes (the working tree is what runs)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
            text=True, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "service", "migrations"], cwd=root,
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{commit} with uncommitted changes in service/ or migrations/" if dirty else commit


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (other work on the shared cores)."""
    return " / ".join(f"{value:.2f}" for value in os.getloadavg())


def describe() -> dict[str, str]:
    """Cores, memory, CPU model, OS and the versions of what runs the load."""
    return {
        "service revision": revision(Path(__file__).resolve().parents[1]),
        "CPU": _cpu_model(),
        "cores": f"{psutil.cpu_count(logical=True)} logical "
        f"({psutil.cpu_count(logical=False) or '?'} physical)",
        "memory": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "OS": platform.platform(),
        "Python": platform.python_version(),
        "grpcio": _version("grpcio"),
        "protobuf": _version("protobuf"),
        "asyncpg": _version("asyncpg"),
    }
