"""Renders a :class:`~.figures.CourseReport` as one self-contained HTML page.

The charts are plotly figures; plotly.js is inlined once in the page, so the file opens
offline with no CDN. Every string that came from the service (course title, lesson ids and
titles) is HTML-escaped before it reaches the page or a chart: plotly.js renders chart text
as a subset of HTML and decodes ``&lt;``, ``&gt;`` and ``&amp;`` back for display (but not
``&quot;``, so chart text leaves quotes alone: without ``<`` no tag can form). The figures
themselves are embedded as JSON in ``<script type="application/json" id="report-data">``.

Importing this module needs the ``report`` extra (plotly).
"""

from __future__ import annotations

import html
import json
import math
from typing import Any

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from lesson_progress.report.figures import SCORE_BUCKETS, CourseReport, LessonFigures

#: Longest lesson label on a chart axis; the full id is in the hover text and the tables.
LABEL_CHARS = 40
_PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}
_COLORS = {"mean": "#9db4d8", "p50": "#3f6fb5", "p90": "#1b3a6b", "funnel": "#2e8b57"}

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0;
       color: #1d2733; background: #f5f7fa; }
main { max-width: 1100px; margin: 0 auto; padding: 24px; }
h1 { margin: 0 0 4px; font-size: 1.6rem; }
h2 { margin: 32px 0 8px; font-size: 1.2rem; }
.meta, .note { color: #5b6776; font-size: 0.9rem; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(150px, 1fr));
         gap: 12px; margin-top: 20px; }
.card { background: #fff; border-radius: 8px; padding: 12px 16px;
        box-shadow: 0 1px 2px rgba(0, 0, 0, .08); }
.card .value { font-size: 1.5rem; font-weight: 600; }
.card .label { color: #5b6776; font-size: 0.85rem; }
section { background: #fff; border-radius: 8px; padding: 8px 16px 16px; margin-top: 16px;
          box-shadow: 0 1px 2px rgba(0, 0, 0, .08); }
table { border-collapse: collapse; width: 100%; font-size: 0.9rem; }
th, td { text-align: left; padding: 6px 8px; border-bottom: 1px solid #e3e7ed; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
"""


def render_html(report: CourseReport) -> str:
    """The whole page: headline figures, charts, tables and the JSON data block."""
    title = html.escape(report.title or "Untitled course")
    body = "\n".join(
        [
            f"<h1>{title}</h1>",
            f'<div class="meta">Course {html.escape(report.course_id)} · generated '
            f"{html.escape(report.generated_at)} from the AnalyticsService streams</div>",
            _headline_cards(report),
            _section(
                "Completion by lesson",
                "Learners who completed each lesson, in outline order; the text gives the "
                "lesson's completion rate (completed ÷ started).",
                _div(_funnel(report.lessons)),
            ),
            _section(
                "Time spent per lesson",
                "Mean over learners who started the lesson; median and 90th percentile over "
                "learners who completed it.",
                _div(_time_chart(report.lessons)),
            ),
            _section(
                "Score distribution",
                "Learners per best-score bucket, for each assessed lesson.",
                _scores(report.lessons),
            ),
            _section(
                "Difficult lessons",
                "Lessons with at least "
                + (f"{report.min_completions}" if report.min_completions else "10 (default)")
                + " completions, most attempts first (figures over the learners who "
                "completed them).",
                _difficult_table(report),
            ),
            _section("Every lesson", "", _lessons_table(report.lessons)),
        ]
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{title} · lesson progress report</title>\n"
        f"<style>{_STYLE}</style>\n"
        f'<script type="text/javascript">{get_plotlyjs()}</script>\n'
        f'<script type="application/json" id="report-data">{data_block(report)}</script>\n'
        f"</head>\n<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n"
    )


def data_block(report: CourseReport) -> str:
    """The report's figures as JSON that cannot end its ``<script>`` element early."""
    text = json.dumps(report.as_json(), ensure_ascii=True, sort_keys=True)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


# --- page parts ------------------------------------------------------------------------------


def _headline_cards(report: CourseReport) -> str:
    h = report.headline
    cards = [
        (f"{h.learners:,}", "learners"),
        (f"{h.course_completions:,}", "completed the course"),
        (f"{h.average_progress_percentage:.1f}%", "average progress"),
        (duration(h.total_time_spent_seconds), "total time spent"),
        (duration(h.average_time_spent_seconds), "average time per learner"),
        (f"{h.lessons:,} ({h.assessed_lessons:,} assessed)", "lessons"),
    ]
    return (
        '<div class="cards">'
        + "".join(
            f'<div class="card"><div class="value">{html.escape(value)}</div>'
            f'<div class="label">{html.escape(label)}</div></div>'
            for value, label in cards
        )
        + "</div>"
    )


def _section(heading: str, note: str, content: str) -> str:
    note_html = f'<p class="note">{html.escape(note)}</p>' if note else ""
    return f"<section><h2>{html.escape(heading)}</h2>{note_html}{content}</section>"


def _div(figure: Any) -> str:
    """A figure as a ``<div>`` and its script; plotly.js itself is in the page's head."""
    return str(figure.to_html(full_html=False, include_plotlyjs=False, config=_PLOTLY_CONFIG))


def _table(headers: list[tuple[str, bool]], rows: list[list[str]]) -> str:
    """A table of already escaped cells; ``headers`` are (label, numeric) pairs."""
    head = "".join(
        f'<th class="num">{label}</th>' if numeric else f"<th>{label}</th>"
        for label, numeric in headers
    )
    lines = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{cell}</td>' if numeric else f"<td>{cell}</td>"
            for cell, (_, numeric) in zip(row, headers, strict=True)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{lines}</tbody></table>"


def _difficult_table(report: CourseReport) -> str:
    if not report.difficult_lessons:
        return '<p class="note">No lesson has enough completions yet.</p>'
    rows = [
        [
            html.escape(row.lesson_id),
            html.escape(row.title),
            f"{row.avg_attempts:.2f}",
            duration(row.avg_time_spent_seconds),
            f"{row.completion_count:,}",
        ]
        for row in report.difficult_lessons
    ]
    headers = [
        ("lesson", False),
        ("title", False),
        ("mean attempts", True),
        ("mean time", True),
        ("completions", True),
    ]
    return _table(headers, rows)


def _lessons_table(lessons: list[LessonFigures]) -> str:
    rows = [
        [
            str(position),
            html.escape(lesson.lesson_id),
            html.escape(lesson.title),
            f"{lesson.started_count:,}",
            f"{lesson.completed_count:,}",
            f"{lesson.completion_rate:.1%}",
            f"{lesson.avg_attempts:.2f}",
            duration(lesson.avg_time_spent_seconds),
            duration(lesson.p50_time_spent_seconds),
            duration(lesson.p90_time_spent_seconds),
            f"{lesson.avg_score:.1f} ({lesson.scored_count:,})" if lesson.scored_count else "",
        ]
        for position, lesson in enumerate(lessons, start=1)
    ]
    headers = [
        ("#", True),
        ("lesson", False),
        ("title", False),
        ("started", True),
        ("completed", True),
        ("completion", True),
        ("attempts", True),
        ("mean time", True),
        ("median", True),
        ("p90", True),
        ("mean score (scored)", True),
    ]
    return _table(headers, rows)


# --- charts ----------------------------------------------------------------------------------


def label(position: int, lesson_id: str) -> str:
    """A lesson's axis label: its position (which keeps labels unique) and its escaped id."""
    text = lesson_id if len(lesson_id) <= LABEL_CHARS else lesson_id[: LABEL_CHARS - 1] + "…"
    return chart_text(f"{position}. {text}")


def chart_text(text: str) -> str:
    """``text`` escaped for plotly's HTML subset, which shows it as it was."""
    return html.escape(text, quote=False)


def _hover_name(lesson: LessonFigures) -> str:
    name = lesson.lesson_id + (f" · {lesson.title}" if lesson.title else "")
    return chart_text(name)


def _chart_height(rows: int) -> int:
    return 120 + 30 * max(rows, 3)


def _funnel(lessons: list[LessonFigures]) -> Any:
    labels = [label(i, lesson.lesson_id) for i, lesson in enumerate(lessons, start=1)]
    figure = go.Figure(
        go.Funnel(
            y=labels,
            x=[lesson.completed_count for lesson in lessons],
            text=[
                f"{lesson.completion_rate:.0%} of {lesson.started_count:,} started"
                for lesson in lessons
            ],
            textinfo="value+text",
            textposition="inside",
            customdata=[_hover_name(lesson) for lesson in lessons],
            hovertemplate="%{customdata}<br>completed: %{x}<br>%{text}<extra></extra>",
            marker={"color": _COLORS["funnel"]},
            connector={"fillcolor": "#cfe8da"},
        )
    )
    figure.update_layout(
        height=_chart_height(len(lessons)), margin={"l": 10, "r": 10, "t": 10, "b": 10}
    )
    return figure


def _time_chart(lessons: list[LessonFigures]) -> Any:
    labels = [label(i, lesson.lesson_id) for i, lesson in enumerate(lessons, start=1)]
    names = [_hover_name(lesson) for lesson in lessons]
    figure = go.Figure()
    for key, name, attribute in (
        ("mean", "mean (started)", "avg_time_spent_seconds"),
        ("p50", "median (completed)", "p50_time_spent_seconds"),
        ("p90", "p90 (completed)", "p90_time_spent_seconds"),
    ):
        seconds = [float(getattr(lesson, attribute)) for lesson in lessons]
        figure.add_trace(
            go.Bar(
                name=name,
                x=labels,
                y=[s / 60 for s in seconds],
                customdata=[[n, duration(s)] for n, s in zip(names, seconds, strict=True)],
                hovertemplate="%{customdata[0]}<br>" + name + ": %{customdata[1]}<extra></extra>",
                marker={"color": _COLORS[key]},
            )
        )
    figure.update_layout(
        barmode="group",
        height=420,
        yaxis_title="minutes",
        yaxis_rangemode="tozero",
        legend={"orientation": "h", "y": 1.08},
        margin={"l": 10, "r": 10, "t": 30, "b": 10},
    )
    return figure


def _scores(lessons: list[LessonFigures]) -> str:
    scored = [
        (position, lesson) for position, lesson in enumerate(lessons, start=1) if lesson.has_scores
    ]
    if not scored:
        return '<p class="note">No assessed lesson in this course.</p>'
    cols = min(3, len(scored))
    rows = math.ceil(len(scored) / cols)
    figure = make_subplots(
        rows=rows,
        cols=cols,
        subplot_titles=[
            f"{label(position, lesson.lesson_id)} ({lesson.scored_count:,} scored)"
            for position, lesson in scored
        ],
        vertical_spacing=min(0.12, 0.6 / rows),
        horizontal_spacing=0.06,
    )
    for index, (_, lesson) in enumerate(scored):
        figure.add_trace(
            go.Bar(
                x=list(SCORE_BUCKETS),
                y=lesson.score_histogram,
                customdata=[_hover_name(lesson)] * len(SCORE_BUCKETS),
                hovertemplate="%{customdata}<br>score %{x}: %{y} learners<extra></extra>",
                marker={"color": _COLORS["p50"]},
                showlegend=False,
            ),
            row=index // cols + 1,
            col=index % cols + 1,
        )
    figure.update_xaxes(tickangle=-45, tickfont={"size": 9})
    figure.update_layout(height=60 + 260 * rows, margin={"l": 10, "r": 10, "t": 40, "b": 10})
    return _div(figure)


def duration(seconds: float) -> str:
    """Seconds as a short human duration: ``45 s``, ``12 min 5 s``, ``3 h 20 min``."""
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours:,} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"
