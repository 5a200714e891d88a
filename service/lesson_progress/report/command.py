"""``lesson-progress report COURSE_ID``: writes a course's analytics report as HTML.

This module imports nothing beyond the service's own dependencies, so the command is listed
even without the ``report`` extra; the renderer (plotly) is imported only when it runs, and
its absence is reported with the command that installs it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import grpc

from lesson_progress.report.figures import CourseReport, fetch_report
from lesson_progress_client import ProgressClient, ProgressError, TlsConfig

TOKEN_ENV = "LESSON_PROGRESS_REPORT_TOKEN"
INSTALL_HINT = "pip install 'lesson-progress[report]'"
_PROG = "lesson-progress report"


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Adds the ``report`` subcommand to the CLI's subparsers."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "report",
        help="write a course's analytics report as one self-contained HTML file",
        description="Reads a course's outline and analytics streams from a running server "
        "and writes one HTML file (charts included, opens offline). Needs the 'report' "
        f"extra: {INSTALL_HINT}.",
    )
    parser.add_argument("course_id", metavar="COURSE_ID", help="the course (a UUID)")
    parser.add_argument(
        "--address",
        help="host:port of the server (default: 127.0.0.1 and LESSON_PROGRESS_PORT or 50051)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("report.html"), help="file to write (report.html)"
    )
    parser.add_argument(
        "--min-completions",
        type=int,
        default=0,
        help="completions a lesson needs to be listed as difficult (0: the server's 10)",
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="deadline of each call, in seconds (30)"
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        help=f"file holding the bearer token (or the token in env {TOKEN_ENV})",
    )
    parser.add_argument("--tls-ca", type=Path, help="PEM CA that signs the server's certificate")
    parser.add_argument("--tls-cert", type=Path, help="PEM client certificate for mutual TLS")
    parser.add_argument("--tls-key", type=Path, help="PEM key of the client certificate")
    parser.add_argument("--tls-server-name", help="name to verify the server's certificate against")
    return parser


def run(args: argparse.Namespace) -> int:
    """Runs the command; returns the exit code (0 written, 1 failed, 2 bad usage)."""
    try:
        from lesson_progress.report import render  # the optional extra
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] != "plotly":
            raise
        _fail(f"the report needs the 'report' extra (plotly); install it with: {INSTALL_HINT}")
        return 2
    if args.min_completions < 0 or args.timeout <= 0:
        _fail("--min-completions must be 0 or more and --timeout positive")
        return 2
    if (args.tls_cert is None) != (args.tls_key is None):
        _fail("mutual TLS needs both --tls-cert and --tls-key")
        return 2
    address = args.address or f"127.0.0.1:{os.environ.get('LESSON_PROGRESS_PORT') or 50051}"
    try:
        credentials = _credentials(args)
    except OSError as exc:
        _fail(f"cannot read {exc.filename}: {exc.strerror}")
        return 2
    try:
        report = asyncio.run(_fetch(address, args, credentials))
    except ProgressError as exc:
        _fail(_explain(exc, address, args.course_id))
        return 1
    page = render.render_html(report)
    try:
        args.out.write_text(page, encoding="utf-8")
    except OSError as exc:
        _fail(f"cannot write {args.out}: {exc.strerror}")
        return 1
    print(
        f"wrote {args.out} ({len(page.encode()) / 1e6:.1f} MB): {len(report.lessons)} lessons, "
        f"{report.headline.learners} learners"
    )
    return 0


def _credentials(args: argparse.Namespace) -> dict[str, Any]:
    """The client's token and TLS keyword arguments, read from the files named by flags."""
    token = os.environ.get(TOKEN_ENV) or None
    if args.token_file is not None:
        token = args.token_file.read_text(encoding="utf-8").strip() or None
    tls = None
    if args.tls_ca or args.tls_cert or args.tls_server_name:
        tls = TlsConfig(
            root_certificates=args.tls_ca.read_bytes() if args.tls_ca else None,
            certificate_chain=args.tls_cert.read_bytes() if args.tls_cert else None,
            private_key=args.tls_key.read_bytes() if args.tls_key else None,
            server_name=args.tls_server_name,
        )
    return {"token": token, "tls": tls}


async def _fetch(
    address: str, args: argparse.Namespace, credentials: dict[str, Any]
) -> CourseReport:
    async with ProgressClient(
        address, timeout=args.timeout, stream_timeout=args.timeout, **credentials
    ) as client:
        return await fetch_report(client, args.course_id, min_completions=args.min_completions)


def _explain(error: ProgressError, address: str, course_id: str) -> str:
    """What went wrong, in the terms of the command's arguments."""
    code = error.code
    if code == grpc.StatusCode.NOT_FOUND:
        return f"course {course_id} is not registered on {address} ({error})"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return f"{course_id!r} is not a valid course id ({error})"
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return f"cannot reach the server at {address} ({error})"
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return (
            f"the server at {address} refused the call ({error}); the token needs the "
            "progress:read and analytics:read scopes"
        )
    return f"{address}: {error}"


def _fail(message: str) -> None:
    print(f"{_PROG}: {message}", file=sys.stderr)
