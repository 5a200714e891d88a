"""Lesson notes: CreateNote, UpdateNote, DeleteNote, ListNotes, their request ids, erasure,
and that a note's body never reaches the logs."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from lesson_progress_client import ProgressClient
from lessonprogress.v1 import catalog_service_pb2 as cs
from lessonprogress.v1 import catalog_service_pb2_grpc, progress_service_pb2_grpc, resources_pb2
from lessonprogress.v1 import progress_service_pb2 as ps
from tests.conftest import new_id
from tests.errors import bad_fields, error_info
from tests.support import ServerProcess, clean_env, free_port, key

Catalog = catalog_service_pb2_grpc.CatalogServiceStub
Progress = progress_service_pb2_grpc.ProgressServiceStub
MakeCourse = Callable[..., Awaitable[Any]]
Note = resources_pb2.Note


async def create(
    progress: Progress,
    user: str,
    course: str,
    lesson: str,
    body: str,
    anchor: str = "",
    request_id: str = "",
) -> Note:
    response = await progress.CreateNote(
        ps.CreateNoteRequest(
            **key(user, course, lesson), body=body, anchor=anchor, request_id=request_id
        )
    )
    return response.note


async def list_all(
    progress: Progress, user: str, course: str, lesson: str = "", page_size: int = 0
) -> list[Note]:
    notes: list[Note] = []
    token = ""
    while True:
        page = await progress.ListNotes(
            ps.ListNotesRequest(
                user_id=user,
                course_id=course,
                lesson_id=lesson,
                page_size=page_size,
                page_token=token,
            )
        )
        notes.extend(page.notes)
        token = page.next_page_token
        if not token:
            return notes


async def failure(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value


async def test_create_update_delete_round_trip(progress: Progress, make_course: MakeCourse):
    course = await make_course(2)
    user = new_id()
    note = await create(progress, user, course.course_id, "l2", "Ohm: V = I·R\n\ttab", "t=93s")
    assert uuid.UUID(note.note_id).version == 4
    assert (note.user_id, note.course_id, note.lesson_id) == (user, course.course_id, "l2")
    assert (note.anchor, note.body) == ("t=93s", "Ohm: V = I·R\n\ttab")
    assert note.created_at == note.updated_at

    updated = await progress.UpdateNote(
        ps.UpdateNoteRequest(
            user_id=user, course_id=course.course_id, note_id=note.note_id, body="better"
        )
    )
    assert (updated.note.anchor, updated.note.body) == ("t=93s", "better")
    assert updated.note.created_at == note.created_at
    assert updated.note.updated_at.ToMicroseconds() > note.updated_at.ToMicroseconds()
    cleared = await progress.UpdateNote(
        ps.UpdateNoteRequest(
            user_id=user, course_id=course.course_id, note_id=note.note_id, anchor=""
        )
    )
    assert (cleared.note.anchor, cleared.note.body) == ("", "better")
    assert await list_all(progress, user, course.course_id) == [cleared.note]

    await progress.DeleteNote(
        ps.DeleteNoteRequest(user_id=user, course_id=course.course_id, note_id=note.note_id)
    )
    assert await list_all(progress, user, course.course_id) == []
    again = await failure(
        progress.DeleteNote(
            ps.DeleteNoteRequest(user_id=user, course_id=course.course_id, note_id=note.note_id)
        )
    )
    assert again.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(again).reason == "NOTE_NOT_FOUND"


async def test_listing_is_newest_first_paged_and_filtered(
    progress: Progress, make_course: MakeCourse
):
    course = await make_course(3)
    user = new_id()
    made = [
        await create(progress, user, course.course_id, f"l{1 + i % 3}", f"note {i}")
        for i in range(11)
    ]
    newest_first = sorted(
        made, key=lambda n: (n.created_at.ToMicroseconds(), n.note_id), reverse=True
    )
    assert [n.body for n in newest_first] == [f"note {i}" for i in reversed(range(11))]
    for page_size in (0, 1, 4, 11, 600):
        assert await list_all(progress, user, course.course_id, page_size=page_size) == (
            newest_first
        )
    assert await list_all(progress, user, course.course_id, "l2", page_size=2) == [
        n for n in newest_first if n.lesson_id == "l2"
    ]
    # Another learner's notes are theirs alone.
    assert await list_all(progress, new_id(), course.course_id) == []
    # A token is bound to its query.
    first = await progress.ListNotes(
        ps.ListNotesRequest(user_id=user, course_id=course.course_id, page_size=2)
    )
    other = await failure(
        progress.ListNotes(
            ps.ListNotesRequest(
                user_id=user,
                course_id=course.course_id,
                lesson_id="l1",
                page_token=first.next_page_token,
            )
        )
    )
    assert bad_fields(other) == {"page_token"}


async def test_create_retry_returns_the_same_note(progress: Progress, make_course: MakeCourse):
    course = await make_course(2)
    user, request_id = new_id(), new_id()
    first = await create(progress, user, course.course_id, "l1", "once", request_id=request_id)
    retry = await create(progress, user, course.course_id, "l1", "once", request_id=request_id)
    assert retry == first
    assert await list_all(progress, user, course.course_id) == [first]

    # The same id for another lesson, or for another method, is a different call.
    for call in (
        create(progress, user, course.course_id, "l2", "once", request_id=request_id),
        progress.UpdateNote(
            ps.UpdateNoteRequest(
                user_id=user,
                course_id=course.course_id,
                note_id=first.note_id,
                body="x",
                request_id=request_id,
            )
        ),
        progress.RecordAttempt(
            ps.RecordAttemptRequest(
                **key(user, course.course_id, "l1"), score=5, request_id=request_id
            )
        ),
    ):
        error = await failure(call)
        assert bad_fields(error) == {"request_id"}
        assert error_info(error).reason == "REQUEST_ID_REUSED"


async def test_update_and_delete_retries_change_nothing(
    progress: Progress, make_course: MakeCourse
):
    course = await make_course(1)
    user = new_id()
    note = await create(progress, user, course.course_id, "l1", "v1")
    other = await create(progress, user, course.course_id, "l1", "other")

    def update(body: str, request_id: str = "", note_id: str = note.note_id) -> Any:
        return progress.UpdateNote(
            ps.UpdateNoteRequest(
                user_id=user,
                course_id=course.course_id,
                note_id=note_id,
                body=body,
                request_id=request_id,
            )
        )

    update_id = new_id()
    assert (await update("v2", update_id)).note.body == "v2"
    assert (await update("v3")).note.body == "v3"
    # The retry of the "v2" update does not undo the later one.
    assert (await update("v2", update_id)).note.body == "v3"
    # Its id on another note is another call.
    assert bad_fields(await failure(update("v2", update_id, other.note_id))) == {"request_id"}

    delete_id = new_id()
    for _ in range(2):  # the retry of a deletion that succeeded succeeds
        await progress.DeleteNote(
            ps.DeleteNoteRequest(
                user_id=user, course_id=course.course_id, note_id=note.note_id, request_id=delete_id
            )
        )
    assert await list_all(progress, user, course.course_id) == [other]
    # After the deletion, the update's retry finds no note.
    gone = await failure(update("v2", update_id))
    assert gone.code() == grpc.StatusCode.NOT_FOUND


async def test_notes_of_other_learners_and_unknown_notes_are_not_found(
    progress: Progress, make_course: MakeCourse
):
    course = await make_course(1)
    owner = new_id()
    note = await create(progress, owner, course.course_id, "l1", "mine")
    stranger = new_id()
    for user, note_id in ((stranger, note.note_id), (owner, new_id())):
        for call in (
            progress.UpdateNote(
                ps.UpdateNoteRequest(
                    user_id=user, course_id=course.course_id, note_id=note_id, body="theirs"
                )
            ),
            progress.DeleteNote(
                ps.DeleteNoteRequest(user_id=user, course_id=course.course_id, note_id=note_id)
            ),
        ):
            error = await failure(call)
            assert error.code() == grpc.StatusCode.NOT_FOUND
            assert error_info(error).reason == "NOTE_NOT_FOUND"
    # Another course's id does not reach the note either.
    other = await make_course(1)
    error = await failure(
        progress.DeleteNote(
            ps.DeleteNoteRequest(user_id=owner, course_id=other.course_id, note_id=note.note_id)
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert await list_all(progress, owner, course.course_id) == [note]


async def test_lessons_outside_the_outline(
    progress: Progress, catalog: Catalog, make_course: MakeCourse
):
    course = await make_course(2)
    user = new_id()
    unknown = await failure(create(progress, user, course.course_id, "nope", "x"))
    assert (unknown.code(), error_info(unknown).reason) == (
        grpc.StatusCode.NOT_FOUND,
        "LESSON_NOT_FOUND",
    )
    no_course = await failure(create(progress, user, new_id(), "l1", "x"))
    assert error_info(no_course).reason == "COURSE_NOT_FOUND"
    listing = await failure(
        progress.ListNotes(ps.ListNotesRequest(user_id=user, course_id=new_id()))
    )
    assert error_info(listing).reason == "COURSE_NOT_FOUND"

    note = await create(progress, user, course.course_id, "l2", "kept")

    async def outline(*lessons: str) -> None:
        await catalog.UpsertCourse(
            cs.UpsertCourseRequest(
                course_id=course.course_id,
                lessons=[resources_pb2.Lesson(lesson_id=lesson) for lesson in lessons],
            )
        )

    await outline("l1")
    assert await list_all(progress, user, course.course_id) == []
    hidden = await failure(
        progress.ListNotes(
            ps.ListNotesRequest(user_id=user, course_id=course.course_id, lesson_id="l2")
        )
    )
    assert error_info(hidden).reason == "LESSON_NOT_FOUND"
    updating = await failure(
        progress.UpdateNote(
            ps.UpdateNoteRequest(
                user_id=user, course_id=course.course_id, note_id=note.note_id, body="y"
            )
        )
    )
    assert error_info(updating).reason == "NOTE_NOT_FOUND"
    await outline("l1", "l2")
    assert await list_all(progress, user, course.course_id) == [note]


async def test_every_field_is_validated(progress: Progress, make_course: MakeCourse):
    course = await make_course(1)
    user = new_id()
    # Characters, not bytes: 10,000 two-byte characters fit; 10,001 one-byte ones do not.
    long_ok = await create(progress, user, course.course_id, "l1", "é" * 10_000, "a" * 4096)
    assert len(long_ok.body) == 10_000
    cases = [
        (ps.CreateNoteRequest(**key(user, course.course_id, "l1"), body=""), {"body"}),
        (ps.CreateNoteRequest(**key(user, course.course_id, "l1"), body="x" * 10_001), {"body"}),
        (ps.CreateNoteRequest(**key(user, course.course_id, "l1"), body="a\x00b"), {"body"}),
        (
            ps.CreateNoteRequest(**key(user, course.course_id, "l1"), body="b", anchor="é" * 2049),
            {"anchor"},
        ),
        (
            ps.CreateNoteRequest(
                user_id="x", course_id="y", lesson_id="", body="b", anchor="\x00", request_id="z"
            ),
            {"user_id", "course_id", "lesson_id", "anchor", "request_id"},
        ),
    ]
    for request, fields in cases:
        assert bad_fields(await failure(progress.CreateNote(request))) == fields
    update_cases = [
        (
            ps.UpdateNoteRequest(user_id=user, course_id=course.course_id, note_id="n"),
            {"note_id", "body"},
        ),
        (
            ps.UpdateNoteRequest(
                user_id=user, course_id=course.course_id, note_id=long_ok.note_id, body=""
            ),
            {"body"},
        ),
    ]
    for update, fields in update_cases:
        assert bad_fields(await failure(progress.UpdateNote(update))) == fields
    deleting = ps.DeleteNoteRequest(user_id=user, course_id=course.course_id, note_id="x")
    assert bad_fields(await failure(progress.DeleteNote(deleting))) == {"note_id"}
    listing = ps.ListNotesRequest(
        user_id=user, course_id=course.course_id, lesson_id="a\nb", page_size=-1, page_token="junk"
    )
    assert bad_fields(await failure(progress.ListNotes(listing))) == {
        "lesson_id",
        "page_size",
        "page_token",
    }


async def test_erasure_removes_notes(
    progress: Progress, catalog: Catalog, make_course: MakeCourse, db: asyncpg.Pool
):
    course, other_course = await make_course(1), await make_course(1)
    erased, kept = new_id(), new_id()
    for user in (erased, kept):
        for c in (course, other_course):
            await create(progress, user, c.course_id, "l1", "note")

    async def notes_of(**where: str) -> int:
        column, value = next(iter(where.items()))
        return int(
            await db.fetchval(f"SELECT count(*) FROM lesson_notes WHERE {column} = $1::uuid", value)
        )

    assert await notes_of(user_id=erased) == 2
    await progress.DeleteUserProgress(ps.DeleteUserProgressRequest(user_id=erased))
    assert await notes_of(user_id=erased) == 0
    assert await notes_of(user_id=kept) == 2

    await catalog.DeleteCourse(cs.DeleteCourseRequest(course_id=course.course_id))
    assert await notes_of(course_id=course.course_id) == 0
    assert await notes_of(course_id=other_course.course_id) == 1


async def test_note_bodies_never_reach_the_logs(database_url: str, tmp_path: Path):
    """A server at log level DEBUG handles every note call, failing ones included; its log
    holds none of the bodies or anchors."""
    port = free_port()
    log_path = tmp_path / "server.log"
    server = ServerProcess(
        [
            "--database-url",
            database_url,
            "--port",
            str(port),
            "--no-migrate",
            "--metrics-port",
            "off",
            "--log-level",
            "DEBUG",
            "--log-format",
            "json",
        ],
        log_path,
        f"127.0.0.1:{port}",
        env=clean_env(),
    )
    secret = f"confidential-{uuid.uuid4().hex}"
    try:
        await server.wait_ready()
        async with grpc.aio.insecure_channel(server.address) as channel:
            progress = progress_service_pb2_grpc.ProgressServiceStub(channel)
            catalog = catalog_service_pb2_grpc.CatalogServiceStub(channel)
            course_id, user = new_id(), new_id()
            await catalog.UpsertCourse(
                cs.UpsertCourseRequest(
                    course_id=course_id, lessons=[resources_pb2.Lesson(lesson_id="l1")]
                )
            )
            note = await create(progress, user, course_id, "l1", f"body {secret}", f"a-{secret}")
            await progress.UpdateNote(
                ps.UpdateNoteRequest(
                    user_id=user, course_id=course_id, note_id=note.note_id, body=f"new {secret}"
                )
            )
            await list_all(progress, user, course_id)
            for bad in (f"{secret}\x00", f"{secret}" * 1000):
                await failure(create(progress, user, course_id, "l1", bad))
            await failure(create(progress, user, course_id, "missing", f"lost {secret}"))
            await progress.DeleteNote(
                ps.DeleteNoteRequest(user_id=user, course_id=course_id, note_id=note.note_id)
            )
    finally:
        await server.terminate()
        server.kill()
    await asyncio.sleep(0)
    log = log_path.read_text(errors="replace")
    assert "CreateNote" in log  # the calls were logged ...
    assert "UpdateNote" in log
    assert '"level": "DEBUG"' in log or '"level":"DEBUG"' in log  # ... at debug level
    assert secret not in log  # ... without their content


async def test_typed_client_notes(running_server: Any, make_course: MakeCourse):
    course = await make_course(2)
    user = new_id()
    async with ProgressClient(f"127.0.0.1:{running_server.port}") as client:
        first = await client.create_note(
            user_id=user, course_id=course.course_id, lesson_id="l1", body="a", anchor="p3"
        )
        second = await client.create_note(
            user_id=user, course_id=course.course_id, lesson_id="l2", body="b"
        )
        changed = await client.update_note(
            user_id=user, course_id=course.course_id, note_id=first.note_id, body="a2"
        )
        assert (changed.body, changed.anchor) == ("a2", "p3")
        listed = [
            n
            async for n in client.iter_notes(user_id=user, course_id=course.course_id, page_size=1)
        ]
        assert [n.note_id for n in listed] == [second.note_id, first.note_id]
        await client.delete_note(user_id=user, course_id=course.course_id, note_id=second.note_id)
        page = await client.list_notes(user_id=user, course_id=course.course_id, lesson_id="l2")
        assert list(page.notes) == []
