"""What a run measured: one ``PhaseResult`` per phase, and the run as a whole."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from bench.dataset import Dataset
from bench.operations import Backend, Op
from bench.postgres import SizeStats


def percentile(values: list[float], fraction: float) -> float | None:
    """The nearest-rank percentile of ``values`` (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class PhaseResult:
    """One operation on one backend for one window."""

    op: Op
    backend: Backend
    open_loop: bool
    concurrency: int
    duration: float
    ops: int
    rows: int
    errors: int
    first_error: str | None
    latencies: list[float] = field(repr=False)
    server_cpu: float | None
    database_cpu: float | None
    client_cpu: float
    rss_min: int | None
    rss_max: int | None
    updates: int
    hot_updates: int
    target_rate: float | None = None
    dropped: int = 0
    stage: str = ""
    """For open-loop phases: the state of the database they ran in."""
    coordinator_cpu: float | None = None
    """On Citus: the coordinator's part of ``database_cpu``."""

    @property
    def ops_per_second(self) -> float:
        """Completed calls (whole streams) per second."""
        return self.ops / self.duration

    @property
    def rows_per_second(self) -> float:
        """Rows (batch entries, streamed messages) per second."""
        return self.rows / self.duration

    def throughput(self, unit: str) -> float:
        """Per second, in the operation's unit."""
        return self.rows_per_second if unit == "rows" else self.ops_per_second

    def latency_ms(self, fraction: float) -> float | None:
        """A latency percentile in milliseconds."""
        value = percentile(self.latencies, fraction)
        return None if value is None else value * 1000

    def cpu_per_thousand(self, seconds: float | None, unit: str) -> float | None:
        """CPU-seconds per 1,000 operations or rows (``unit``)."""
        count = self.rows if unit == "rows" else self.ops
        if seconds is None or count == 0:
            return None
        return seconds / count * 1000

    @property
    def hot_share(self) -> float | None:
        """Share of lesson_progress updates that were HOT during the phase."""
        return self.hot_updates / self.updates if self.updates else None


@dataclass
class RunResult:
    """Everything a report needs."""

    dataset: Dataset
    seed_seconds: float
    machine: dict[str, str]
    size_after_seed: SizeStats
    engine: str = "postgres"
    """"postgres", or "citus" (a coordinator and its workers)."""
    size_after_run: SizeStats | None = None
    index_hit_rate: float | None = None
    progress_index_hit_rate: float | None = None
    phases: list[PhaseResult] = field(default_factory=list)
    profiles: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def phase(
        self, op: Op, backend: Backend, *, open_loop: bool = False, stage: str = ""
    ) -> PhaseResult | None:
        """The phase of ``op`` on ``backend`` (closed or open loop), if it ran."""
        for phase in self.phases:
            key = (phase.op, phase.backend, phase.open_loop, phase.stage)
            if key == (op, backend, open_loop, stage):
                return phase
        return None
