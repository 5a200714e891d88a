"""The ``lesson-progress`` command: ``serve`` and ``migrate``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from lesson_progress import config as config_module
from lesson_progress import server
from lesson_progress.migrate import MigrationError

log = logging.getLogger("lesson_progress")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lesson-progress",
        description="gRPC service that tracks learners' progress through courses.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gRPC server")
    config_module.add_arguments(serve)
    migrate = commands.add_parser("migrate", help="apply pending database migrations and exit")
    config_module.add_arguments(migrate)
    return parser


async def _serve(config: config_module.Config) -> None:
    running = await server.start(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("shutting down: finishing in-flight calls (grace %.1fs)",
             config.shutdown_grace_seconds)  # fmt: skip
    await running.stop(config.shutdown_grace_seconds)
    log.info("stopped")


async def _migrate(config: config_module.Config) -> None:
    url, embedded_db = server.resolve_database_url(config)
    try:
        applied = await server.run_migrations(url, config)
        print("applied: " + (", ".join(applied) or "nothing pending"))
    finally:
        if embedded_db is not None:
            embedded_db.stop()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lesson-progress`` command."""
    args = _parser().parse_args(argv)
    try:
        config = config_module.load(args, os.environ)
    except config_module.ConfigError as exc:
        print(f"lesson-progress: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "serve":
            asyncio.run(_serve(config))
        else:
            asyncio.run(_migrate(config))
    except MigrationError as exc:
        print(f"lesson-progress: migration refused: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
