"""Settings of one run, from the command line."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

DEFAULT_OUTPUT = Path("BENCHMARKS.md")
ENGINES = ("postgres", "citus")


@dataclass(frozen=True)
class Settings:
    """How big, how long and how hard a run is."""

    rows: int = 1_000_000
    """lesson_progress rows seeded."""
    duration: float = 10.0
    """Measured seconds per phase (one operation on one backend)."""
    warmup: float = 1.0
    """Unmeasured seconds of load before each phase's window."""
    concurrency: int = 16
    """Concurrent clients for unary operations (all backends alike)."""
    many_concurrency: int = 256
    """Concurrent heartbeat callers for the batching client and the unary RecordTime it
    is compared with (an application server relaying many learners)."""
    batch_concurrency: int = 4
    """Concurrent clients for BatchRecordTime (the reference figure's 4)."""
    batch_size: int = 500
    """Heartbeats per BatchRecordTime call."""
    clients: int = 2
    """Load generator processes the clients are spread over."""
    output: Path | None = DEFAULT_OUTPUT
    """Where the report goes (None: printed only)."""
    quick: bool = False
    """Small data, short phases: proves the harness works, measures nothing."""
    profile: bool = False
    """Profile the server with py-spy in extra phases after the measured ones."""
    profile_seconds: float = 10.0
    """Seconds of each profiling phase."""
    seed: int = 1
    """Seed of the data generator and of the key choices."""
    workers: int = 1
    """The service's ``--workers`` (server processes on one port)."""
    engine: str | None = None
    """"postgres" or "citus"; None: whatever BENCH_DATABASE_URL names, else postgres."""


def parse(argv: list[str] | None = None) -> Settings:
    """Settings from command-line arguments; ``--quick`` changes the defaults it covers."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmarks the lesson progress service against raw asyncpg and the "
        "seed's naive data flow on a seeded PostgreSQL; writes BENCHMARKS.md.",
    )
    parser.add_argument("--rows", type=int, help="lesson_progress rows to seed (default 1M)")
    parser.add_argument("--duration", type=float, help="measured seconds per phase (10)")
    parser.add_argument("--warmup", type=float, help="warm-up seconds per phase (1)")
    parser.add_argument("--concurrency", type=int, help="concurrent clients (16)")
    parser.add_argument(
        "--many-concurrency",
        type=int,
        help="heartbeat callers of the batching-client phase and its unary counterpart (256)",
    )
    parser.add_argument("--batch-concurrency", type=int, help="BatchRecordTime clients (4)")
    parser.add_argument("--batch-size", type=int, help="heartbeats per batch (500)")
    parser.add_argument("--clients", type=int, help="load generator processes (2)")
    parser.add_argument(
        "--output", type=Path, help="report file (default BENCHMARKS.md; --quick: none)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="20k rows, sub-second phases: checks the harness"
    )
    parser.add_argument(
        "--profile", action="store_true", help="profile the server with py-spy afterwards"
    )
    parser.add_argument("--seed", type=int, help="random seed (1)")
    parser.add_argument(
        "--workers", type=int,
        help="the service's --workers (1); above 1 each client has a connection of its own",
    )  # fmt: skip
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        help="postgres: the embedded PostgreSQL; citus: a local 1-coordinator + 2-worker "
        "Citus cluster from the installed binaries (default: what BENCH_DATABASE_URL names, "
        "else postgres)",
    )
    args = parser.parse_args(argv)

    base = (
        Settings(rows=20_000, duration=0.4, warmup=0.1, output=None, quick=True,
                 profile_seconds=2.0)
        if args.quick
        else Settings()
    )  # fmt: skip
    chosen = {
        name: value
        for name, value in vars(args).items()
        if value is not None and name not in ("quick", "profile")
    }
    settings = Settings(**{**base.__dict__, **chosen, "profile": args.profile or base.profile})
    problems = [
        f"--{name.replace('_', '-')} must be positive"
        for name in ("rows", "duration", "concurrency", "many_concurrency",
                     "batch_concurrency", "batch_size", "clients", "workers")
        if getattr(settings, name) <= 0
    ]  # fmt: skip
    if settings.batch_size > 1000:
        problems.append("--batch-size must be at most 1000 (the service's limit)")
    if problems:
        parser.error("; ".join(problems))
    return settings
