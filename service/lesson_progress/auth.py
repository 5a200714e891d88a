"""Bearer-token authentication and per-method scopes.

Tokens are configured hashed, one per line of the tokens file::

    # name  token hash (sha256:<64 hex digits>)  scopes
    lms     sha256:9f86d081884c7d65...0f00a08    progress:write,progress:read

``lesson-progress hash-token`` prints the hash of a token read from standard input. A
presented token is hashed and compared with every configured hash in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lesson_progress import errors

SCOPES = frozenset(
    {"progress:write", "progress:read", "analytics:read", "catalog:admin", "erasure"}
)

# The scope each method needs. Health and reflection are not listed: they stay open.
METHOD_SCOPES: dict[str, str] = {
    "/lessonprogress.v1.CatalogService/UpsertCourse": "catalog:admin",
    "/lessonprogress.v1.CatalogService/GetCourse": "progress:read",
    "/lessonprogress.v1.CatalogService/DeleteCourse": "erasure",
    "/lessonprogress.v1.ProgressService/StartLesson": "progress:write",
    "/lessonprogress.v1.ProgressService/RecordTime": "progress:write",
    "/lessonprogress.v1.ProgressService/BatchRecordTime": "progress:write",
    "/lessonprogress.v1.ProgressService/RecordAttempt": "progress:write",
    "/lessonprogress.v1.ProgressService/CompleteLesson": "progress:write",
    "/lessonprogress.v1.ProgressService/SaveBookmark": "progress:write",
    "/lessonprogress.v1.ProgressService/CreateNote": "progress:write",
    "/lessonprogress.v1.ProgressService/UpdateNote": "progress:write",
    "/lessonprogress.v1.ProgressService/DeleteNote": "progress:write",
    "/lessonprogress.v1.ProgressService/ListNotes": "progress:read",
    "/lessonprogress.v1.ProgressService/GetLessonProgress": "progress:read",
    "/lessonprogress.v1.ProgressService/ListLessonProgress": "progress:read",
    "/lessonprogress.v1.ProgressService/GetCourseProgress": "progress:read",
    "/lessonprogress.v1.ProgressService/ListAttempts": "progress:read",
    "/lessonprogress.v1.ProgressService/WatchProgress": "progress:read",
    "/lessonprogress.v1.ProgressService/DeleteUserProgress": "erasure",
    "/lessonprogress.v1.AnalyticsService/StreamLessonStats": "analytics:read",
    "/lessonprogress.v1.AnalyticsService/StreamDifficultLessons": "analytics:read",
    "/lessonprogress.v1.AnalyticsService/StreamCourseLearners": "analytics:read",
}

_PREFIX = "sha256:"


class TokenFileError(Exception):
    """The tokens file is malformed; the message names the line."""


@dataclass(frozen=True)
class Caller:
    """A configured caller: its name, token hash and scopes."""

    name: str
    token_hash: bytes
    scopes: frozenset[str]


def hash_token(token: str) -> str:
    """The configuration form of a token: ``sha256:<hex>``."""
    return _PREFIX + hashlib.sha256(token.encode()).hexdigest()


def load_callers(path: Path) -> list[Caller]:
    """Reads the tokens file."""
    callers: list[Caller] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 3:
            raise TokenFileError(f"{path}:{number}: expected 'name sha256:<hex> scope,...'")
        name, digest, scope_list = parts
        if not digest.startswith(_PREFIX) or len(digest) != len(_PREFIX) + 64:
            raise TokenFileError(f"{path}:{number}: the hash must be sha256:<64 hex digits>")
        try:
            token_hash = bytes.fromhex(digest[len(_PREFIX) :])
        except ValueError:
            raise TokenFileError(f"{path}:{number}: the hash is not hexadecimal") from None
        scopes = frozenset(scope_list.split(","))
        if unknown := scopes - SCOPES:
            raise TokenFileError(
                f"{path}:{number}: unknown scope(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(sorted(SCOPES))}"
            )
        callers.append(Caller(name, token_hash, scopes))
    if not callers:
        raise TokenFileError(f"{path}: no tokens configured")
    return callers


class Authenticator:
    """Checks a call's bearer token against the configured callers."""

    def __init__(self, callers: Iterable[Caller]) -> None:
        self.callers = tuple(callers)

    def replace(self, callers: Iterable[Caller]) -> None:
        """Puts new callers in force (one assignment: a call sees the old or the new set)."""
        self.callers = tuple(callers)

    def authorize(self, method: str, metadata: Iterable[tuple[str, str | bytes]]) -> str:
        """The caller's name if it may call ``method``; raises otherwise.

        UNAUTHENTICATED without a known token, PERMISSION_DENIED without the scope; both are
        decided before the request is looked at, so an unauthorised caller learns nothing.
        """
        scope = METHOD_SCOPES.get(method)
        if scope is None:
            return ""
        token = _bearer_token(metadata)
        if token is None:
            raise errors.Unauthenticated(
                "missing bearer token: send metadata 'authorization: Bearer <token>'"
            )
        presented = hashlib.sha256(token.encode()).digest()
        match: Caller | None = None
        callers = self.callers  # one snapshot, even if a reload replaces them meanwhile
        for caller in callers:  # no early exit: the time does not depend on the match
            if hmac.compare_digest(presented, caller.token_hash):
                match = caller
        if match is None:
            raise errors.Unauthenticated("unknown bearer token")
        if scope not in match.scopes:
            raise errors.PermissionDenied(f"the token lacks the scope {scope!r} for {method}")
        return match.name


def _bearer_token(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    for key, value in metadata:
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None
