"""The wire-compatibility check (tests/wire.py) on a scratch git repository, and on this one."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests import wire

ROOT = Path(__file__).resolve().parent.parent
PROTO = "protos/demo/v1/demo.proto"
MESSAGE = """syntax = "proto3";

package demo.v1;

// A demo message.
message Demo {{
{fields}}}
"""
# What a rename of field 1 from `name` to `title` breaks: its JSON name and its name.
RENAMED = [
    f'FIELD_SAME_JSON_NAME {PROTO}: Field "1" with name "title" on message "Demo" changed option '
    '"json_name" from "name" to "title".',
    f'FIELD_SAME_NAME {PROTO}: Field "1" on message "Demo" changed name from "name" to "title".',
]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def write(repo: Path, fields: str) -> None:
    (repo / PROTO).write_text(MESSAGE.format(fields=fields))


def commit(repo: Path, what: str) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", what)
    return git(repo, "rev-parse", "HEAD")


def policy(repo: Path, since: str, *accepted: str) -> None:
    lines = [f"since {since}", *(f"accept {change} | v2 step: renamed" for change in accepted)]
    (repo / wire.FILE).write_text("\n".join(lines) + "\n")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git repository with this project's buf.yaml and a one-field message: the baseline."""
    git(tmp_path, "init", "-q")
    git(tmp_path, "config", "user.email", "dev@example.com")
    git(tmp_path, "config", "user.name", "dev")
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    (tmp_path / PROTO).parent.mkdir(parents=True)
    write(tmp_path, "  // The name.\n  string name = 1;\n")
    baseline = commit(tmp_path, "baseline")
    policy(tmp_path, baseline)
    commit(tmp_path, "policy")
    return tmp_path


def test_additions_pass(repo: Path) -> None:
    write(repo, "  // The name.\n  string name = 1;\n  // The size.\n  int32 size = 2;\n")
    commit(repo, "add a field")
    assert wire.unaccepted(repo) == []


def test_a_committed_rename_fails_until_accepted(repo: Path) -> None:
    write(repo, "  // The title.\n  string title = 1;\n")
    renamed = commit(repo, "rename")
    (repo / "README").write_text("later\n")
    commit(repo, "an unrelated later commit")
    assert wire.unaccepted(repo) == [f"{renamed[:12]}: {change}" for change in RENAMED]
    assert wire.main([str(repo)]) == 1

    baseline = git(repo, "rev-list", "--max-parents=0", "HEAD")
    policy(repo, baseline, RENAMED[0])
    assert wire.unaccepted(repo) == [f"{renamed[:12]}: {RENAMED[1]}"]
    policy(repo, baseline, *RENAMED)
    assert wire.unaccepted(repo) == []


def test_a_field_added_then_removed_in_later_commits_fails(repo: Path) -> None:
    write(repo, "  // The name.\n  string name = 1;\n  // The size.\n  int32 size = 2;\n")
    commit(repo, "add a field")
    write(repo, "  // The name.\n  string name = 1;\n")
    removed = commit(repo, "remove it again")
    found = wire.unaccepted(repo)
    assert found, "removing a field that an earlier commit published must fail"
    assert all(change.startswith(f"{removed[:12]}: ") for change in found)
    assert any("FIELD_NO_DELETE" in change for change in found)


def test_an_uncommitted_rename_fails(repo: Path) -> None:
    write(repo, "  // The title.\n  string title = 1;\n")
    assert wire.unaccepted(repo) == [f"uncommitted: {change}" for change in RENAMED]


def test_an_acceptance_needs_a_reason(repo: Path) -> None:
    (repo / wire.FILE).write_text(f"since HEAD\naccept {RENAMED[1]}\n")
    with pytest.raises(SystemExit, match="version step and why"):
        wire.read_policy(repo)


def test_this_repository_is_wire_compatible_with_its_baseline() -> None:
    assert wire.unaccepted(ROOT) == []
