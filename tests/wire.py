"""Wire compatibility of protos/: `buf breaking` over the history since a recorded baseline.

wire-compat.txt at the repository root names the baseline commit (`since <commit>`) and the
breaking changes accepted as deliberate version steps (`accept <RULE> <file>: <message> |
<why>`, the first part exactly as this check prints it). Every first-parent commit after the
baseline that changed protos/ or buf.yaml is compared with its parent, and uncommitted changes
with HEAD, under buf.yaml's breaking rules. Comparing each step, not just HEAD with the
baseline, also catches a field that one commit adds and a later one removes after callers
may have used it.

`python -m tests.wire [REPO]` exits 1 naming every breaking change that is not accepted.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

FILE = "wire-compat.txt"
# What a module's breaking check reads: its configuration and its protos.
PATHS = ("buf.yaml", "protos")


@dataclass(frozen=True)
class Policy:
    """The parsed wire-compat.txt: the baseline commit and the accepted changes."""

    since: str
    accepted: frozenset[str]


def read_policy(repo: Path) -> Policy:
    since = ""
    accepted: set[str] = set()
    for number, raw in enumerate((repo / FILE).read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word == "since" and rest.strip():
            since = rest.strip()
        elif word == "accept" and " | " in rest and rest.split(" | ", 1)[1].strip():
            accepted.add(rest.split(" | ", 1)[0].strip())
        else:
            raise SystemExit(
                f"error: {FILE}:{number}: expected `since <commit>` or "
                f"`accept <change> | <version step and why>`, got: {line}"
            )
    if not since:
        raise SystemExit(f"error: {FILE} names no baseline (`since <commit>`)")
    return Policy(since, frozenset(accepted))


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
    ).stdout


def export(repo: Path, commit: str, into: Path) -> Path:
    """buf.yaml and protos/ as of ``commit``, written under ``into``."""
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", "--format=tar", commit, "--", *PATHS],
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def breaking(new: Path, old: Path) -> list[str]:
    """Changes of ``new`` that break callers built from ``old``: `RULE file: message`."""
    result = subprocess.run(
        ["buf", "breaking", ".", "--against", str(old.resolve()), "--error-format", "json"],
        cwd=new,
        capture_output=True,
        text=True,
    )
    if result.returncode not in (0, 100):  # 100: breaking changes found
        raise SystemExit(f"error: buf breaking failed in {new}:\n{result.stderr}")
    changes = []
    for line in result.stdout.splitlines():
        if line.strip():
            found = json.loads(line)
            changes.append(f"{found['type']} {found['path']}: {found['message']}")
    return changes


def steps(repo: Path, since: str) -> list[str]:
    """First-parent commits after ``since`` up to HEAD that changed buf.yaml or protos/."""
    try:
        git(repo, "merge-base", "--is-ancestor", since, "HEAD")
    except subprocess.CalledProcessError:
        raise SystemExit(
            f"error: the baseline {since} of {FILE} is not in this clone's history of HEAD "
            "(a shallow clone? `git fetch --unshallow`)"
        ) from None
    out = git(repo, "rev-list", "--first-parent", "--reverse", f"{since}..HEAD", "--", *PATHS)
    return out.split()


def unaccepted(repo: Path) -> list[str]:
    """Every breaking change since the baseline that wire-compat.txt does not accept."""
    policy = read_policy(repo)
    found: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for commit in steps(repo, policy.since):
            old = export(repo, f"{commit}^", Path(tmp, commit, "old"))
            new = export(repo, commit, Path(tmp, commit, "new"))
            found += [f"{commit[:12]}: {c}" for c in breaking(new, old) if c not in policy.accepted]
        if git(repo, "status", "--porcelain", "--", *PATHS).strip():
            head = export(repo, "HEAD", Path(tmp, "HEAD"))
            found += [f"uncommitted: {c}" for c in breaking(repo, head) if c not in policy.accepted]
    return found


def main(argv: list[str]) -> int:
    repo = Path(argv[0] if argv else ".").resolve()
    found = unaccepted(repo)
    for change in found:
        print(change, file=sys.stderr)
    if found:
        print(
            f"error: breaking changes to the API (above). Keep the wire compatible, or make it "
            f"a deliberate version step: add `accept <change> | <why>` lines to {FILE} "
            "(README: Wire compatibility)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
