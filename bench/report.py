"""The report: markdown tables for the terminal and a section of BENCHMARKS.md per size.

BENCHMARKS.md holds one section per data size, between ``<!-- bench rows=N -->`` and
``<!-- /bench rows=N -->``; a new run replaces the section of its size and keeps the
others, and everything outside the markers (notes written by hand) is left as it is.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

from bench import targets
from bench.operations import FLOOR_OPS, LATENCY_TARGETS_MS, SPECS, Backend, Op
from bench.results import PhaseResult, RunResult
from bench.run import ORDER, backends_of
from bench.settings import Settings
from bench.stages import STAGES

HEADER = """# Benchmarks

Written by the benchmark harness (`./dev bench`, see [bench/README.md](bench/README.md)):
one section per data size, the newest run of each size. Every throughput figure is compared
with a baseline measured in the same run on the same data and at the same concurrency,
because the two cores are shared by the load generators, the server, PostgreSQL and
whatever else runs on the machine: read the ratios, not the absolute numbers.

"""
_SECTION = re.compile(
    r"<!-- bench rows=(\d+)( engine=citus|) -->\n.*?<!-- /bench rows=\1\2 -->\n", re.S
)


def _num(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def _ms(phase: PhaseResult | None, fraction: float) -> str:
    value = None if phase is None else phase.latency_ms(fraction)
    return "—" if value is None else f"{value:.1f}"


def _cpu(phase: PhaseResult | None, seconds: float | None) -> str:
    value = None if phase is None else phase.cpu_per_thousand(seconds, SPECS[phase.op].unit)
    return "—" if value is None else f"{value:.3f}"


def throughput_table(result: RunResult) -> str:
    """Closed loop: every operation on the service and its baselines."""
    lines = [
        "| operation | unit | service /s | p50 ms | p99 ms | server CPU-s /1k | "
        "PostgreSQL CPU-s /1k | raw asyncpg /s | ÷ raw | naive flow /s | ÷ naive | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for op in ORDER:
        spec = SPECS[op]
        service = result.phase(op, Backend.SERVICE)
        raw = result.phase(op, Backend.RAW)
        naive = result.phase(op, Backend.NAIVE)
        s, r, n = (None if p is None else p.throughput(spec.unit) for p in (service, raw, naive))
        errors = sum(p.errors for p in (service, raw, naive) if p is not None)
        lines.append(
            f"| {op} | {spec.unit} | {_num(s)} | {_ms(service, 0.5)} | {_ms(service, 0.99)} | "
            f"{_cpu(service, None if service is None else service.server_cpu)} | "
            f"{_cpu(service, None if service is None else service.database_cpu)} | "
            f"{_num(r)} | {_ratio(s, r)} | "
            f"{_num(n) if spec.naive else 'n/a'} | {_ratio(s, n) if spec.naive else 'n/a'} | "
            f"{errors} |"
        )
    return "\n".join(lines) + "\n"


def floor_table(result: RunResult) -> str:
    """The service beside the floor server: throughput and server CPU per call."""
    lines = [
        "| operation | service /s | floor /s | ÷ floor | service CPU-ms /call | "
        "floor CPU-ms /call | CPU ÷ floor |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for op in FLOOR_OPS:
        s, f = (targets.throughput(result, op, b) for b in (Backend.SERVICE, Backend.FLOOR))
        sc, fc = (
            targets.server_cpu_per_call(result, op, b) for b in (Backend.SERVICE, Backend.FLOOR)
        )
        lines.append(
            f"| {op} | {_num(s)} | {_num(f)} | {_ratio(s, f)} | "
            f"{_num(None if sc is None else 1000 * sc, 3)} | "
            f"{_num(None if fc is None else 1000 * fc, 3)} | {_ratio(sc, fc)} |"
        )
    return "\n".join(lines) + "\n"


def baseline_table(result: RunResult) -> str:
    """Latency and CPU of the baselines, for reading the ratios."""
    lines = [
        "| operation | backend | /s | p50 ms | p99 ms | PostgreSQL CPU-s /1k | "
        "load-generator CPU-s /1k | HOT share |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for op in ORDER:
        for backend in backends_of(op):
            phase = result.phase(op, backend)
            if phase is None:
                continue
            hot = phase.hot_share
            lines.append(
                f"| {op} | {backend} | {_num(phase.throughput(SPECS[op].unit))} | "
                f"{_ms(phase, 0.5)} | {_ms(phase, 0.99)} | {_cpu(phase, phase.database_cpu)} | "
                f"{_cpu(phase, phase.client_cpu)} | "
                f"{'—' if hot is None else f'{100 * hot:.1f}% of {phase.updates:,}'} |"
            )
    return "\n".join(lines) + "\n"


def latency_table(result: RunResult) -> str:
    """Open loop: the latency targets at half the closed-loop throughput."""
    lines = [
        "| operation | server | database | arrivals /s | completed /s | p50 ms | p99 ms | "
        "p99.9 ms | target p99 |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for stage in STAGES:
        for op, limit in LATENCY_TARGETS_MS.items():
            for backend in (Backend.SERVICE, Backend.FLOOR):
                phase = result.phase(op, backend, open_loop=True, stage=stage)
                if phase is None:
                    continue
                target = f"< {limit:g} ms" if backend is Backend.SERVICE else "—"
                lines.append(
                    f"| {op} | {backend} | {stage} | {_num(phase.target_rate)} | "
                    f"{_num(phase.ops_per_second)} | {_ms(phase, 0.5)} | {_ms(phase, 0.99)} | "
                    f"{_ms(phase, 0.999)} | {target} |"
                )
    return "\n".join(lines) + "\n"


def coordinator_table(result: RunResult) -> str:
    """On Citus: the database CPU per 1,000 operations, split between coordinator and
    workers (server processes told apart by the node each belongs to)."""
    lines = [
        "| operation | backend | all nodes CPU-s /1k | coordinator | workers | coordinator share |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for op in ORDER:
        for backend in (Backend.SERVICE, Backend.RAW):
            phase = result.phase(op, backend)
            if phase is None or phase.database_cpu is None or phase.coordinator_cpu is None:
                continue
            workers = phase.database_cpu - phase.coordinator_cpu
            share = (
                "—"
                if phase.database_cpu <= 0
                else f"{100 * phase.coordinator_cpu / phase.database_cpu:.0f}%"
            )
            lines.append(
                f"| {op} | {backend} | {_cpu(phase, phase.database_cpu)} | "
                f"{_cpu(phase, phase.coordinator_cpu)} | {_cpu(phase, workers)} | {share} |"
            )
    return "\n".join(lines) + "\n"


def targets_table(result: RunResult) -> str:
    """Each target of performance.md, met or not."""
    lines = ["| target | figure | required | status |", "|---|---:|---:|---|"]
    for check in targets.evaluate(result):
        lines.append(f"| {check.name} | {check.figure} | {check.threshold} | {check.status} |")
    return "\n".join(lines) + "\n"


def _database(result: RunResult) -> str:
    seed, end = result.size_after_seed, result.size_after_run
    lines = [
        f"- `lesson_progress` after seeding: {seed.rows:,} rows, "
        f"{seed.total_bytes / 2**20:,.0f} MiB in all (heap {seed.heap_bytes / 2**20:,.0f} MiB, "
        f"indexes {seed.index_bytes / 2**20:,.0f} MiB): {seed.bytes_per_row:,.0f} bytes per row.",
    ]
    if end is not None:
        lines.append(
            f"- after the run: {end.rows:,} rows, {end.total_bytes / 2**20:,.0f} MiB: "
            f"{end.bytes_per_row:,.0f} bytes per row."
        )
    if result.index_hit_rate is not None:
        lp = result.progress_index_hit_rate
        lines.append(
            f"- index hit rate over the run: {100 * result.index_hit_rate:.2f}% for all "
            f"indexes, {'—' if lp is None else f'{100 * lp:.2f}%'} for lesson_progress's "
            "(blocks found in shared_buffers; a block read from the OS page cache counts "
            "as a miss)."
        )
    stream = result.phase(Op.STREAM_COURSE_LEARNERS, Backend.SERVICE)
    if stream is not None and stream.rss_min is not None and stream.rss_max is not None:
        lines.append(
            f"- server RSS while streaming the largest course: {stream.rss_min / 2**20:.0f} to "
            f"{stream.rss_max / 2**20:.0f} MiB ({stream.rows:,} learner rows streamed in "
            f"{stream.duration:g} s)."
        )
    return "\n".join(lines) + "\n"


def _dataset(result: RunResult, settings: Settings) -> str:
    data = result.dataset
    largest = data.course_rows[data.largest_course]
    return (
        f"Data: {data.rows:,} `lesson_progress` rows of {data.learners:,} learners in "
        f"{data.enrollments:,} enrollments over {len(data.course_ids):,} courses of 20 lessons "
        f"(largest course {largest:,} rows, median course {data.median_course_rows:,}); "
        f"seeded with COPY in {result.seed_seconds:.1f} s.\n\n"
        f"Load: {settings.concurrency} concurrent clients ({settings.batch_concurrency} for "
        f"BatchRecordTime, {settings.batch_size} heartbeats each; {settings.many_concurrency} "
        f"for the batching client and its unary counterpart; 1 for the largest-course "
        f"streams) over {settings.clients} load-generator processes; {settings.duration:g} s "
        f"measured after {settings.warmup:g} s of warm-up per phase."
        + (
            f" The service ran with `--workers {settings.workers}` (each client on a "
            "connection of its own; server CPU is the supervisor's and the workers')."
            if settings.workers > 1
            else ""
        )
        + "\n"
    )


def section(result: RunResult, settings: Settings) -> str:
    """The report of one run, as markdown."""
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    quick = (
        " (--quick: proves the harness runs; the figures mean nothing)" if settings.quick else ""
    )
    citus = result.engine == "citus"
    parts = [
        f"## {'Citus, ' if citus else ''}{result.dataset.rows:,} rows — {when}{quick}\n",
        *(
            [
                "On a Citus coordinator (the machine section says which cluster). When it and "
                "its workers share the machine's cores with the service and the load "
                "generators, these figures show Citus's overhead per call, not scale-out.\n"
            ]
            if citus
            else []
        ),
        _dataset(result, settings),
        "### Targets\n",
        targets_table(result),
        "### Throughput (closed loop)\n",
        "`÷ raw`: the service's throughput over raw asyncpg running the service's own SQL "
        "(one connection per client, no gRPC); `÷ naive`: over the seed note's "
        "SELECT-then-write flow. CPU columns: CPU-seconds per 1,000 operations (calls, whole "
        "streams) or rows (the unit column) of the server process and of all PostgreSQL "
        "processes.\n",
        throughput_table(result),
        "### The service beside the floor\n",
        "The floor is a bare grpc.aio server (bench/floor.py) with the service's protos, SQL "
        "and pool, and no validation, auth, metrics, logs or request merging, in its own "
        "process, driven by the same clients at the same concurrency right after the "
        "service. Server CPU is that process's user + system time per call.\n",
        floor_table(result),
        "### Latency under load (open loop)\n",
        "Poisson arrivals at half the closed-loop throughput of the same run; latency from "
        "the scheduled start (no coordinated omission). StreamLessonStats: time to the last "
        "message, for a course drawn uniformly (a typical course). Measured on the database "
        "as seeded (before any write phase) and again after the write phases. Operations the "
        "floor serves run on it too, at the same arrivals: the tail of a bare grpc.aio "
        "server on this machine.\n",
        latency_table(result),
        "### Database\n",
        _database(result),
        *(
            [
                "### Coordinator and workers\n",
                "PostgreSQL CPU of the closed-loop phases per 1,000 operations or rows, "
                "split by node: each server process counts for the node whose postmaster "
                "it descends from.\n",
                coordinator_table(result),
            ]
            if citus and any(p.coordinator_cpu is not None for p in result.phases)
            else []
        ),
        "### Every phase\n",
        baseline_table(result),
    ]
    if result.profiles:
        parts += ["### Where the server's CPU goes (py-spy)\n", *result.profiles.values()]
    notes = result.notes + [
        f"{phase.op} on {phase.backend}{' (open loop)' if phase.open_loop else ''}: "
        f"{phase.errors} errors, the first: `{' '.join(phase.first_error.split())}`"
        for phase in result.phases
        if phase.errors and phase.first_error
    ]
    if notes:
        parts += ["### Notes\n", "\n".join(f"- {note}" for note in notes) + "\n"]
    parts += [
        "### Machine\n",
        "\n".join(f"- {name}: {value}" for name, value in result.machine.items()) + "\n",
    ]
    return "\n".join(parts)


def write(path: Path, rows: int, text: str, engine: str = "postgres") -> None:
    """Puts ``text`` into ``path`` as the section for ``rows`` on ``engine``, keeping
    everything else. A Citus section follows the PostgreSQL section of the same size."""
    tag = f"rows={rows}" + (" engine=citus" if engine == "citus" else "")
    block = f"<!-- bench {tag} -->\n{text.rstrip()}\n<!-- /bench {tag} -->\n"
    current = path.read_text() if path.exists() else HEADER
    sections = {(int(m.group(1)), bool(m.group(2))): m for m in _SECTION.finditer(current)}
    key = (rows, engine == "citus")
    if key in sections:
        match = sections[key]
        updated = current[: match.start()] + block + current[match.end() :]
    else:
        later = [m for size, m in sorted(sections.items()) if size > key]
        at = later[0].start() if later else len(current)
        prefix = current[:at]
        if prefix and not prefix.endswith("\n\n"):
            prefix = prefix.rstrip("\n") + "\n\n"
        updated = prefix + block + ("\n" if later else "") + current[at:]
    path.write_text(updated)
