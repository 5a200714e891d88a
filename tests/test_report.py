"""``lesson-progress report``: the HTML report's figures against the model and the streams.

A course is seeded through the API with random progress (the model of test_analytics keeps
what was sent); the command runs as a child process against the test server, and the
figures it embeds in ``<script type="application/json" id="report-data">`` are compared
with the figures computed from the model and with what the three streams return.
"""

from __future__ import annotations

import asyncio
import html
import json
import random
import socket
import sys
import uuid
from dataclasses import dataclass
from fractions import Fraction
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from lesson_progress import server
from lesson_progress.auth import hash_token
from lessonprogress.v1 import catalog_service_pb2 as cs
from lessonprogress.v1 import resources_pb2
from tests import certs
from tests.conftest import new_id
from tests.test_analytics import (
    Analytics,
    Catalog,
    LessonSpec,
    Model,
    Progress,
    analytics,  # noqa: F401 - the AnalyticsService stub fixture
    course_learners,
    difficult_lessons,
    lesson_stats,
    percent,
    plan_learner,
    run_plans,
    stats_as_dict,
)
from tests.test_cli import clean_env
from tests.test_security import serving

COMMAND_TIMEOUT = 120.0  # seconds; only a guard against a hung command
MIN_COMPLETIONS = 3

# User-controlled strings that would run as script if the page did not escape them.
EVIL_TITLE = '</script><script>alert("course")</script> & <b>friends</b>'
EVIL_LESSON = '<script>alert("lesson")</script>'
EVIL_LESSON_TITLE = "<img src=x onerror=alert(1)>"

LESSONS = [
    LessonSpec("welcome", "plain"),
    LessonSpec("quiz-1", "graded", 60),
    LessonSpec(EVIL_LESSON, "plain"),
    LessonSpec("essay", "assessed"),
    LessonSpec("final-exam", "graded", 70),
    LessonSpec("bonus", "idle"),
]
TITLES = {
    "welcome": "Welcome",
    "quiz-1": "First quiz",
    EVIL_LESSON: EVIL_LESSON_TITLE,
    "essay": "Essay",
    "final-exam": "Final exam",
    "bonus": "",
}


@dataclass
class Report:
    """One run of the command: its page, the page's data block, and the model behind it."""

    model: Model
    page: str
    data: dict[str, Any]
    stdout: str


async def run_report(
    *args: str, cwd: Path, python_prelude: str = "", env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """Runs ``lesson-progress report *args`` as a child process; (exit code, stdout, stderr).

    The child runs without blocking the event loop, which also serves the test server.
    ``python_prelude`` is run in the child before the command's main function.
    """
    code = f"{python_prelude}\nimport sys\nfrom lesson_progress.cli import main\n"
    code += "sys.exit(main(sys.argv[1:]))"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        "report",
        *args,
        env=clean_env(**(env or {})),
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), COMMAND_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


def data_block(page: str) -> dict[str, Any]:
    """The JSON of the page's ``report-data`` script element."""

    class Finder(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.inside = False
            self.found: list[str] = []

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            self.inside = tag == "script" and ("id", "report-data") in attrs

        def handle_endtag(self, tag: str) -> None:
            self.inside = False

        def handle_data(self, data: str) -> None:
            if self.inside:
                self.found.append(data)

    finder = Finder()
    finder.feed(page)
    assert len(finder.found) == 1, "one report-data block"
    loaded: dict[str, Any] = json.loads(finder.found[0])
    return loaded


def external_references(page: str) -> list[str]:
    """Every ``src``/``href`` of the page's elements that points off the file."""

    class Finder(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.found: list[str] = []

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            for name, value in attrs:
                if name in ("src", "href") and value and not value.startswith("#"):
                    self.found.append(f"{tag} {name}={value}")

    finder = Finder()
    finder.feed(page)
    return finder.found


@pytest.fixture(scope="module")
async def seeded(progress: Progress, catalog: Catalog) -> Model:
    """30 random learners plus three who finish the course; one lesson nobody opens."""
    course_id = new_id()
    await catalog.UpsertCourse(
        cs.UpsertCourseRequest(
            course_id=course_id,
            title=EVIL_TITLE,
            lessons=[
                resources_pb2.Lesson(
                    lesson_id=spec.lesson_id,
                    title=TITLES[spec.lesson_id],
                    assessed=spec.kind in ("graded", "assessed"),
                    passing_score=spec.passing_score,
                )
                for spec in LESSONS
            ],
        )
    )
    model = Model(course_id, LESSONS)
    rng = random.Random(4242)
    active = [spec for spec in LESSONS if spec.kind != "idle"]
    plans = {new_id(): plan_learner(rng, active, 5) for _ in range(30)}
    finish = [
        ("complete", "welcome", None),
        ("attempt", "quiz-1", 75),
        ("complete", EVIL_LESSON, None),
        ("complete", "essay", 88),
        ("attempt", "final-exam", 95),
        ("complete", "bonus", None),
    ]
    plans.update({new_id(): [("time", "welcome", 40 + i), *finish] for i in range(3)})
    await run_plans(progress, model, plans)
    assert len(model.course_completed) >= 3
    return model


@pytest.fixture(scope="module")
async def report(
    seeded: Model, running_server: server.RunningServer, tmp_path_factory: pytest.TempPathFactory
) -> Report:
    """The command's output for the seeded course."""
    directory = tmp_path_factory.mktemp("report")
    code, stdout, stderr = await run_report(
        seeded.course_id,
        "--address",
        f"127.0.0.1:{running_server.port}",
        "--out",
        "course.html",
        "--min-completions",
        str(MIN_COMPLETIONS),
        cwd=directory,
    )
    assert code == 0, stderr
    page = (directory / "course.html").read_text(encoding="utf-8")
    return Report(seeded, page, data_block(page), stdout)


# --- the figures -----------------------------------------------------------------------------


def expected_lessons(model: Model) -> list[dict[str, Any]]:
    """The report's per-lesson rows, from the model and the outline that was registered."""
    rows = []
    for stats in model.expected_stats():
        spec = model.spec(stats["lesson_id"])
        rows.append(
            {
                **stats,
                "title": TITLES[spec.lesson_id],
                "assessed": spec.kind in ("graded", "assessed"),
                "passing_score": spec.passing_score,
            }
        )
    return rows


def expected_headline(model: Model) -> dict[str, Any]:
    users = model.users()
    outline = set(model.outline)
    progress = [
        percent(len(model.completions.get(user, set()) & outline), len(outline)) for user in users
    ]
    seconds = sum(row.time for row in model.rows.values())
    return {
        "learners": len(users),
        "course_completions": len(model.course_completed),
        "average_progress_percentage": Fraction(sum(progress), len(users)),
        "total_time_spent_seconds": seconds,
        "average_time_spent_seconds": Fraction(seconds, len(users)),
        "lessons": len(LESSONS),
        "assessed_lessons": sum(spec.kind in ("graded", "assessed") for spec in LESSONS),
    }


async def test_report_lessons_equal_the_model(report: Report):
    got = report.data["lessons"]
    want = expected_lessons(report.model)
    assert [row["lesson_id"] for row in got] == [spec.lesson_id for spec in LESSONS]
    for row, expected in zip(got, want, strict=True):
        row, expected = dict(row), dict(expected)
        for exact in ("lesson_id", "title", "assessed", "passing_score", "score_histogram"):
            assert row.pop(exact) == expected.pop(exact), (exact, row)
        assert row == pytest.approx(expected, rel=1e-9, abs=1e-9)
    # The seeded data exercises every section: scores, completions, an idle lesson.
    assert sum(sum(row["score_histogram"]) for row in got) > 10
    assert got[-1]["started_count"] == 3


async def test_report_difficult_lessons_equal_the_model(report: Report):
    got = report.data["difficult_lessons"]
    want = report.model.expected_difficult(MIN_COMPLETIONS)
    assert len(want) >= 3
    assert [(row["lesson_id"], row["completion_count"]) for row in got] == [
        (lesson_id, count) for lesson_id, _, _, count in want
    ]
    for row, (lesson_id, attempts, seconds, _) in zip(got, want, strict=True):
        assert row["title"] == TITLES[lesson_id]
        assert row["avg_attempts"] == pytest.approx(float(attempts), rel=1e-9)
        assert row["avg_time_spent_seconds"] == pytest.approx(float(seconds), rel=1e-9)
    assert report.data["min_completions"] == MIN_COMPLETIONS


async def test_report_headline_equals_the_model(report: Report):
    got = report.data["headline"]
    want = expected_headline(report.model)
    assert set(got) == set(want)
    for name, value in want.items():
        assert got[name] == pytest.approx(float(value), rel=1e-12), name
    assert (report.data["course_id"], report.data["title"]) == (report.model.course_id, EVIL_TITLE)
    assert f"{want['learners']} learners" in report.stdout


async def test_report_figures_equal_the_streams(report: Report, analytics: Analytics):  # noqa: F811
    course_id = report.model.course_id
    stats = await lesson_stats(analytics, course_id)
    for row, streamed in zip(report.data["lessons"], stats, strict=True):
        assert {key: row[key] for key in stats_as_dict(streamed)} == stats_as_dict(streamed)
    difficult = await difficult_lessons(analytics, course_id, MIN_COMPLETIONS)
    assert [
        (r["lesson_id"], r["avg_attempts"], r["avg_time_spent_seconds"], r["completion_count"])
        for r in report.data["difficult_lessons"]
    ] == [
        (d.lesson_id, d.avg_attempts, d.avg_time_spent_seconds, d.completion_count)
        for d in difficult
    ]
    learners = await course_learners(analytics, course_id)
    headline = report.data["headline"]
    assert headline["learners"] == len(learners)
    assert headline["course_completions"] == sum(x.HasField("completed_at") for x in learners)
    assert headline["total_time_spent_seconds"] == sum(x.total_time_spent_seconds for x in learners)


# --- the page --------------------------------------------------------------------------------


async def test_user_strings_are_escaped(report: Report):
    page = report.page
    for raw in (EVIL_TITLE, EVIL_LESSON, EVIL_LESSON_TITLE, "<b>friends</b>", "<img src=x"):
        assert raw not in page, raw
    # Shown as text: the page title, the lesson tables, the chart labels.
    assert f"<h1>{html.escape(EVIL_TITLE)}</h1>" in page
    assert f"<td>{html.escape(EVIL_LESSON)}</td>" in page
    assert f"<td>{html.escape(EVIL_LESSON_TITLE)}</td>" in page
    # In the charts' JSON (where plotly also writes "/" as "\u002f"), escaped for plotly's
    # HTML subset, which shows "&lt;" as "<".
    chart_label = html.escape(f"3. {EVIL_LESSON}", quote=False)
    assert json.dumps(chart_label)[1:-1].replace("/", "\\u002f") in page
    # And read back intact from the data block.
    assert report.data["lessons"][2]["lesson_id"] == EVIL_LESSON
    assert report.data["lessons"][2]["title"] == EVIL_LESSON_TITLE


async def test_report_is_self_contained(report: Report):
    page = report.page
    assert external_references(page) == []
    # plotly.js is inlined once, and every chart is drawn by it.
    assert page.count("<script") - page.count('type="application/json"') >= 4
    assert page.count("Plotly.newPlot(") == 3
    assert len(page) > 1_000_000, "the charting library is in the file"


async def test_report_over_mutual_tls_with_a_token(
    report: Report, database_url: str, tmp_path: Path
):
    # The same course through a server that wants a client certificate and a bearer token.
    pki = certs.make_pki(tmp_path / "pki")
    reader, writer = f"reader-{uuid.uuid4().hex}", f"writer-{uuid.uuid4().hex}"
    tokens = tmp_path / "tokens"
    tokens.write_text(
        f"reader {hash_token(reader)} progress:read,analytics:read\n"
        f"writer {hash_token(writer)} progress:write\n"
    )
    (tmp_path / "reader.token").write_text(reader + "\n")
    tls = ["--tls-ca", str(pki.ca.cert), "--tls-cert", str(pki.client.cert)]
    tls += ["--tls-key", str(pki.client.key)]
    async with serving(
        database_url,
        tls_cert_file=pki.server.cert,
        tls_key_file=pki.server.key,
        tls_client_ca_file=pki.ca.cert,
        auth_tokens_file=tokens,
    ) as address:
        course = [report.model.course_id, "--address", address]
        course += ["--min-completions", str(MIN_COMPLETIONS), *tls]
        code, _, stderr = await run_report(
            *course, "--token-file", "reader.token", "--out", "tls.html", cwd=tmp_path
        )
        assert code == 0, stderr
        got = data_block((tmp_path / "tls.html").read_text(encoding="utf-8"))
        got.pop("generated_at")
        assert got == {k: v for k, v in report.data.items() if k != "generated_at"}

        code, _, stderr = await run_report(
            *course, cwd=tmp_path, env={"LESSON_PROGRESS_REPORT_TOKEN": writer}
        )
        assert code == 1
        assert f"the server at {address} refused the call" in stderr
        assert "PERMISSION_DENIED" in stderr
        assert "Traceback" not in stderr


# --- failures --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_unknown_course_is_a_clear_error(
    running_server: server.RunningServer, tmp_path: Path
):
    course_id = new_id()
    address = f"127.0.0.1:{running_server.port}"
    code, _, stderr = await run_report(course_id, "--address", address, cwd=tmp_path)
    assert code == 1
    assert f"course {course_id} is not registered on {address}" in stderr
    assert "COURSE_NOT_FOUND" in stderr or "NOT_FOUND" in stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "report.html").exists()


async def test_malformed_course_id_is_a_clear_error(
    running_server: server.RunningServer, tmp_path: Path
):
    address = f"127.0.0.1:{running_server.port}"
    code, _, stderr = await run_report("not-a-uuid", "--address", address, cwd=tmp_path)
    assert code == 1
    assert "'not-a-uuid' is not a valid course id" in stderr
    assert "Traceback" not in stderr


async def test_unreachable_address_is_a_clear_error(tmp_path: Path):
    address = f"127.0.0.1:{free_port()}"
    code, _, stderr = await run_report(
        new_id(), "--address", address, "--timeout", "3", cwd=tmp_path
    )
    assert code == 1
    assert f"cannot reach the server at {address}" in stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "report.html").exists()


async def test_missing_extra_says_how_to_install_it(tmp_path: Path):
    # plotly made unimportable, as in an installation without the extra.
    code, _, stderr = await run_report(
        new_id(),
        "--address",
        f"127.0.0.1:{free_port()}",
        cwd=tmp_path,
        python_prelude="import sys; sys.modules['plotly'] = None",
    )
    assert code == 2
    assert "pip install 'lesson-progress[report]'" in stderr
    assert "Traceback" not in stderr
