"""The lesson-note methods of ProgressService: CreateNote, UpdateNote, DeleteNote, ListNotes.

They live on ProgressService rather than a service of their own: notes belong to a
learner's progress in a lesson, callers already hold a ProgressService stub, and scopes
are granted per method (writes need ``progress:write``, ListNotes ``progress:read``), so a
separate service would buy nothing. ``ProgressServicer`` takes these methods from
``NoteMethods``; this module only turns messages into validated values and back.
"""

from __future__ import annotations

from typing import Any

import grpc

from lesson_progress import convert
from lesson_progress.page_tokens import PageTokens, page_size
from lesson_progress.store.notes import NoteCursor, NoteStore
from lesson_progress.timestamps import from_micros, to_micros
from lesson_progress.validation import Validator
from lessonprogress.v1 import progress_service_pb2 as pb

Context = grpc.aio.ServicerContext[Any, Any]

MAX_ANCHOR_BYTES = 4096
MAX_BODY_CHARACTERS = 10_000


def _anchor(value: str, check: Validator) -> str:
    """An opaque anchor: at most 4 KiB of UTF-8, no NUL (like a bookmark)."""
    size = len(value.encode())
    if size > MAX_ANCHOR_BYTES:
        check.fail("anchor", f"must be at most {MAX_ANCHOR_BYTES} bytes (got {size})")
    elif "\x00" in value:
        check.fail("anchor", "must not contain NUL characters")
    return value


def _body(value: str, check: Validator) -> str:
    """A note body: 1 to 10,000 characters (code points), no NUL. Other control characters
    (new lines, tabs) are text. The description never quotes the body."""
    if not value:
        check.fail("body", "is required")
    elif len(value) > MAX_BODY_CHARACTERS:
        check.fail("body", f"must be at most {MAX_BODY_CHARACTERS} characters (got {len(value)})")
    elif "\x00" in value:
        check.fail("body", "must not contain NUL characters")
    return value


class NoteMethods:
    """The note methods of lessonprogress.v1.ProgressService (mixed into its servicer)."""

    notes: NoteStore
    tokens: PageTokens

    async def CreateNote(
        self, request: pb.CreateNoteRequest, context: Context
    ) -> pb.CreateNoteResponse:
        """Adds a note to a lesson."""
        check = Validator()
        user_id = check.uuid("user_id", request.user_id)
        course_id = check.uuid("course_id", request.course_id)
        lesson_id = check.identifier("lesson_id", request.lesson_id)
        anchor = _anchor(request.anchor, check)
        body = _body(request.body, check)
        request_id = check.optional_uuid("request_id", request.request_id)
        check.done()
        row = await self.notes.create_note(user_id, course_id, lesson_id, anchor, body, request_id)
        return pb.CreateNoteResponse(note=convert.note(row))

    async def UpdateNote(
        self, request: pb.UpdateNoteRequest, context: Context
    ) -> pb.UpdateNoteResponse:
        """Changes a note's anchor and/or body."""
        check = Validator()
        user_id = check.uuid("user_id", request.user_id)
        course_id = check.uuid("course_id", request.course_id)
        note_id = check.uuid("note_id", request.note_id)
        anchor = _anchor(request.anchor, check) if request.HasField("anchor") else None
        body = _body(request.body, check) if request.HasField("body") else None
        if anchor is None and body is None:
            check.fail("body", "set body, anchor or both (nothing to update)")
        request_id = check.optional_uuid("request_id", request.request_id)
        check.done()
        row = await self.notes.update_note(user_id, course_id, note_id, anchor, body, request_id)
        return pb.UpdateNoteResponse(note=convert.note(row))

    async def DeleteNote(
        self, request: pb.DeleteNoteRequest, context: Context
    ) -> pb.DeleteNoteResponse:
        """Deletes a note."""
        check = Validator()
        user_id = check.uuid("user_id", request.user_id)
        course_id = check.uuid("course_id", request.course_id)
        note_id = check.uuid("note_id", request.note_id)
        request_id = check.optional_uuid("request_id", request.request_id)
        check.done()
        await self.notes.delete_note(user_id, course_id, note_id, request_id)
        return pb.DeleteNoteResponse()

    async def ListNotes(
        self, request: pb.ListNotesRequest, context: Context
    ) -> pb.ListNotesResponse:
        """Lists a learner's notes in a course or one of its lessons, newest first."""
        check = Validator()
        user_id = check.uuid("user_id", request.user_id)
        course_id = check.uuid("course_id", request.course_id)
        lesson_id = check.identifier("lesson_id", request.lesson_id) if request.lesson_id else None
        size = page_size(request.page_size, check)
        query = ("ListNotes", user_id, course_id, lesson_id or "")
        position = self.tokens.parse(request.page_token, query, check)
        check.done()
        after = NoteCursor(from_micros(position[0]), position[1]) if position else None
        rows = await self.notes.list_notes(
            user_id, course_id, lesson_id, after=after, limit=size + 1
        )
        rows, next_token = self.tokens.split(
            rows, size, query, lambda last: (to_micros(last["created_at"]), str(last["note_id"]))
        )
        return pb.ListNotesResponse(
            notes=[convert.note(row) for row in rows], next_page_token=next_token
        )
