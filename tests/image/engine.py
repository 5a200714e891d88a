"""The container engine of the image tier: podman or docker, whichever answers."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

ENGINES = ("podman", "docker")
BUILD_TIMEOUT = 900.0  # seconds
COMMAND_TIMEOUT = 120.0
# The build stage installs from PyPI; podman can hand the host's CA bundle to it.
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


class NoEngine(Exception):
    """Neither podman nor docker answers."""


@dataclass(frozen=True)
class Engine:
    """One container engine's command line."""

    program: str

    @property
    def is_podman(self) -> bool:
        return Path(self.program).name == "podman"

    def run(self, *args: str, timeout: float = COMMAND_TIMEOUT, check: bool = True
            ) -> subprocess.CompletedProcess[str]:  # fmt: skip
        result = subprocess.run(
            [self.program, *args], capture_output=True, text=True, timeout=timeout,
            check=False, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        if check and result.returncode != 0:
            raise AssertionError(
                f"{self.program} {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        return result

    def build(self, context: Path, tag: str) -> None:
        args = ["build", "--pull=never", "--network", "host", "--tag", tag]
        if self.is_podman:
            # Docker format keeps the HEALTHCHECK (OCI images have none).
            args += ["--format", "docker"]
            if HOST_CA_BUNDLE.is_file():
                args += ["--volume", f"{HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro"]
        self.run(*args, str(context), timeout=BUILD_TIMEOUT)

    def health(self, container: str) -> subprocess.CompletedProcess[str]:
        """Runs the image's HEALTHCHECK once, as the engine would."""
        if self.is_podman:
            return self.run("healthcheck", "run", container, check=False)
        test = self.run(
            "inspect", "--format", "{{json .Config.Healthcheck.Test}}", container
        ).stdout
        command = json.loads(test)
        assert command[0] == "CMD", command
        return self.run("exec", container, *command[1:], check=False)


def find_engine() -> Engine:
    """The first of podman and docker whose ``info`` answers."""
    tried = []
    for name in ENGINES:
        program = shutil.which(name)
        if program is None:
            tried.append(f"{name}: not installed")
            continue
        try:
            result = subprocess.run(
                [program, "info"], capture_output=True, text=True, timeout=60, check=False
            )
        except subprocess.TimeoutExpired:
            tried.append(f"{name}: `{name} info` did not answer in 60s")
            continue
        if result.returncode == 0:
            return Engine(program)
        tried.append(f"{name}: `{name} info` failed: {result.stderr.strip()[-300:]}")
    raise NoEngine(
        "the image tier needs a container engine and none answers ("
        + "; ".join(tried)
        + "): install podman or docker, or start its daemon"
    )
