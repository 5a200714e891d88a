"""Where the server's CPU goes: py-spy samples of the server process, summarized.

Samples are taken only while a thread holds the GIL (``--gil``): Python-level CPU work,
without the time spent waiting in epoll or in C code that released the GIL. py-spy
samples Python frames only: time spent inside a C or Cython extension (grpc's
Cython core, asyncpg's protocol, protobuf's upb) is charged to the Python frame that
called into it, so ``_run (asyncio/events.py)`` as a leaf is callback work done in
extension code (grpc's completion queue, asyncpg's data_received).
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

TOP = 12
AREAS = (
    ("lesson_progress/", "service code (lesson_progress)"),
    ("lessonprogress/", "generated stubs"),
    ("grpc/", "grpc"),
    ("asyncpg/", "asyncpg"),
    ("google/protobuf/", "protobuf"),
    ("google/rpc/", "protobuf"),
    ("asyncio/", "asyncio event loop"),
    ("logging/", "logging"),
    ("json/", "json"),
    ("prometheus_client/", "metrics (prometheus_client)"),
)
# A callback frame as the leaf: the callback itself is extension code (grpc's Cython
# completion-queue callbacks, asyncpg's protocol), invisible to py-spy.
_EXTENSION_CALLBACK = "Handle._run (asyncio/events.py)"


# Frames every sample passes through: the process's entry point.
_ENTRY_POINTS = ("(lesson_progress/__main__.py)", "(lesson_progress/cli.py)")


def py_spy() -> str | None:
    """The py-spy executable (next to this Python, or on PATH), if installed."""
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists():
        return str(beside)
    return shutil.which("py-spy")


async def record(
    pid: int, seconds: float, output: Path, *, subprocesses: bool = False
) -> Path | None:
    """Samples ``pid`` (and its children, with ``subprocesses``) for ``seconds`` into a raw
    (collapsed stacks) file; None if it fails."""
    executable = py_spy()
    if executable is None:
        return None
    process = await asyncio.create_subprocess_exec(
        executable, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
        "--format", "raw", "--nolineno", "--gil", "--output", str(output),
        *(["--subprocesses"] if subprocesses else []),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await process.communicate()
    if process.returncode != 0 or not await asyncio.to_thread(output.exists):
        print(f"py-spy failed: {stderr.decode(errors='replace')[-500:]}", file=sys.stderr)
        return None
    return output


@dataclass(frozen=True)
class Profile:
    """Sample counts of one recording."""

    samples: int
    leaf: Counter[str]
    inclusive: Counter[str]
    areas: Counter[str]


def _short(frame: str) -> str:
    """``name (path/to/module.py)`` with the path cut to its package part."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", "python3.11/", "service/"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{name} ({where})"


def _area(frame: str) -> str:
    if frame == _EXTENSION_CALLBACK:
        return "extension code in event-loop callbacks (grpc Cython core, asyncpg protocol)"
    for marker, area in AREAS:
        if marker in frame:
            return area
    return "other"


def parse(text: str) -> Profile:
    """Reads py-spy's raw output: ``frame;frame;...;leaf count`` per line."""
    leaf: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    samples = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";") if " (" in f]
        if not frames:
            continue
        samples += count
        leaf[frames[-1]] += count
        areas[_area(frames[-1])] += count
        for frame in set(frames):
            if "lesson_progress/" in frame and not frame.endswith(_ENTRY_POINTS):
                inclusive[frame] += count
    return Profile(samples, leaf, inclusive, areas)


def summarize(title: str, profile: Profile) -> str:
    """A markdown summary: self time by area, top leaf frames, top service frames."""
    if profile.samples == 0:
        return f"#### {title}\n\nNo busy samples were recorded.\n"

    def share(count: int) -> str:
        return f"{100 * count / profile.samples:.1f}%"

    lines = [f"#### {title}", "", f"{profile.samples} busy samples.", ""]
    lines += ["| self time in | share |", "|---|---:|"]
    lines += [f"| {area} | {share(count)} |" for area, count in profile.areas.most_common()]
    lines += ["", "| top frames by self time | share |", "|---|---:|"]
    lines += [f"| `{frame}` | {share(count)} |" for frame, count in profile.leaf.most_common(TOP)]
    if profile.inclusive:
        lines += ["", "| service functions, inclusive time | share |", "|---|---:|"]
        lines += [
            f"| `{frame}` | {share(count)} |" for frame, count in profile.inclusive.most_common(TOP)
        ]
    return "\n".join(lines) + "\n"
