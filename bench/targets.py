"""The targets of shared/design/performance.md, checked against one run's figures.

Every throughput target is a ratio of two figures measured in the same run, on the same
data and at the same concurrency: the machine is shared, so absolute figures drift.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bench.operations import BATCHING_LINGER, FLOOR_OPS, LATENCY_TARGETS_MS, SPECS, Backend, Op
from bench.results import RunResult
from bench.stages import STAGES

MAX_BYTES_PER_ROW = 1024
MIN_INDEX_HIT_RATE = 0.95
MIN_HOT_SHARE = 0.95
MIN_FLOOR_RATIO = 0.85
MAX_FLOOR_CPU_RATIO = 1.2
# "Server memory flat" while streaming: growth between the lowest and highest RSS seen.
MAX_STREAM_RSS_GROWTH = 32 * 2**20


@dataclass(frozen=True)
class Check:
    """One target: the figure, what it must be, and whether it is."""

    name: str
    figure: str
    threshold: str
    met: bool | None
    """None: not measured in this run."""

    @property
    def status(self) -> str:
        """How the report shows it."""
        if self.met is None:
            return "not measured"
        return "met" if self.met else "**not met**"


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _check(name: str, value: float | None, threshold: str, ok: Callable[[float], bool],
           shown: Callable[[float], str]) -> Check:  # fmt: skip
    if value is None:
        return Check(name, "—", threshold, None)
    return Check(name, shown(value), threshold, ok(value))


def _x(value: float) -> str:
    return f"{value:.2f}x"


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _ms(value: float) -> str:
    return f"{value:.1f} ms"


def _below(limit: float) -> Callable[[float], bool]:
    return lambda value: value < limit


def throughput(result: RunResult, op: Op, backend: Backend) -> float | None:
    """Closed-loop throughput of ``op`` on ``backend`` in its unit, if measured."""
    phase = result.phase(op, backend)
    return None if phase is None else phase.throughput(SPECS[op].unit)


def server_cpu_per_call(result: RunResult, op: Op, backend: Backend) -> float | None:
    """Server CPU-seconds per call of ``op`` on ``backend`` (closed loop), if measured."""
    phase = result.phase(op, backend)
    if phase is None or phase.server_cpu is None or phase.ops == 0:
        return None
    return phase.server_cpu / phase.ops


def _floor_checks(result: RunResult) -> list[Check]:
    checks = []
    for op in FLOOR_OPS:
        checks.append(
            _check(f"{op} calls/s ÷ floor (bare grpc.aio server, same concurrency)",
                   _ratio(throughput(result, op, Backend.SERVICE),
                          throughput(result, op, Backend.FLOOR)),
                   f"≥ {MIN_FLOOR_RATIO}", lambda v: v >= MIN_FLOOR_RATIO, _x)
        )  # fmt: skip
        checks.append(
            _check(f"{op} server CPU per call ÷ floor's",
                   _ratio(server_cpu_per_call(result, op, Backend.SERVICE),
                          server_cpu_per_call(result, op, Backend.FLOOR)),
                   f"≤ {MAX_FLOOR_CPU_RATIO}", lambda v: v <= MAX_FLOOR_CPU_RATIO, _x)
        )  # fmt: skip
    return checks


def _batching_checks(result: RunResult) -> list[Check]:
    """The typed client's heartbeat batching against unary RecordTime, same concurrency."""
    unary = result.phase(Op.RECORD_TIME_MANY, Backend.SERVICE)
    batching = result.phase(Op.RECORD_TIME_BATCHING, Backend.SERVICE)
    unary_p99 = None if unary is None else unary.latency_ms(0.99)
    batching_p99 = None if batching is None else batching.latency_ms(0.99)
    bound = None if unary_p99 is None else unary_p99 + BATCHING_LINGER * 1000
    return [
        _check("heartbeats/s through the batching client ÷ unary RecordTime calls/s",
               _ratio(throughput(result, Op.RECORD_TIME_BATCHING, Backend.SERVICE),
                      throughput(result, Op.RECORD_TIME_MANY, Backend.SERVICE)),
               "≥ 10", lambda v: v >= 10, _x),
        _check("batching client p99 ÷ (linger + unary RecordTime p99)",
               _ratio(batching_p99, bound), "≤ 1", lambda v: v <= 1, _x),
    ]  # fmt: skip


def evaluate(result: RunResult) -> list[Check]:
    """Every target, in the order of performance.md."""
    service, raw = Backend.SERVICE, Backend.RAW
    record_time = throughput(result, Op.RECORD_TIME, service)
    batch = throughput(result, Op.BATCH_RECORD_TIME, service)
    checks = [
        *_floor_checks(result),
        _check("RecordTime RPC/s ÷ raw asyncpg single-row upsert (same concurrency)",
               _ratio(record_time, throughput(result, Op.RECORD_TIME, raw)), "≥ 0.5",
               lambda v: v >= 0.5, _x),
        _check("BatchRecordTime rows/s ÷ RecordTime RPC/s",
               _ratio(batch, record_time), "≥ 30", lambda v: v >= 30, _x),
        _check("BatchRecordTime rows/s ÷ raw asyncpg unnest upsert rows/s",
               _ratio(batch, throughput(result, Op.BATCH_RECORD_TIME, raw)), "≥ 0.5",
               lambda v: v >= 0.5, _x),
    ]  # fmt: skip
    checks.extend(_batching_checks(result))
    heartbeat = result.phase(Op.RECORD_TIME, service)
    checks.append(
        _check("HOT share of heartbeat updates (RecordTime phase)",
               None if heartbeat is None else heartbeat.hot_share, "≥ 95%",
               lambda v: v >= MIN_HOT_SHARE, _pct)
    )  # fmt: skip
    for stage in STAGES:
        for op, limit in LATENCY_TARGETS_MS.items():
            phase = result.phase(op, service, open_loop=True, stage=stage)
            checks.append(
                _check(f"{op} p99, open loop at half its throughput, {stage}",
                       None if phase is None else phase.latency_ms(0.99), f"< {limit:g} ms",
                       _below(limit), _ms)
            )  # fmt: skip
    checks.append(
        _check("StreamCourseLearners rows/s ÷ raw asyncpg cursor rows/s",
               _ratio(throughput(result, Op.STREAM_COURSE_LEARNERS, service),
                      throughput(result, Op.STREAM_COURSE_LEARNERS, raw)),
               "≥ 0.5", lambda v: v >= 0.5, _x)
    )  # fmt: skip
    stream = result.phase(Op.STREAM_COURSE_LEARNERS, service)
    growth = (
        None
        if stream is None or stream.rss_min is None or stream.rss_max is None
        else float(stream.rss_max - stream.rss_min)
    )
    checks.append(
        _check("Server RSS growth while streaming learners (max - min)", growth,
               f"≤ {MAX_STREAM_RSS_GROWTH // 2**20} MiB (flat)",
               lambda v: v <= MAX_STREAM_RSS_GROWTH, lambda v: f"{v / 2**20:.1f} MiB")
    )  # fmt: skip
    for op in (o for o, spec in SPECS.items() if spec.naive):
        checks.append(
            _check(f"{op} ÷ the seed's naive flow",
                   _ratio(throughput(result, op, service), throughput(result, op, Backend.NAIVE)),
                   "> 1 (faster)", lambda v: v > 1, _x)
        )  # fmt: skip
    sizes = [("after seeding", result.size_after_seed), ("after the run", result.size_after_run)]
    for when, size in sizes:
        checks.append(
            _check(f"Bytes per lesson_progress row incl. indexes, {when}",
                   None if size is None else size.bytes_per_row, "< 1,024",
                   lambda v: v < MAX_BYTES_PER_ROW, lambda v: f"{v:,.0f} B")
        )  # fmt: skip
    checks.append(
        _check("Index hit rate over the run (pg_statio_user_indexes)", result.index_hit_rate,
               "> 95%", lambda v: v > MIN_INDEX_HIT_RATE, _pct)
    )  # fmt: skip
    return checks
