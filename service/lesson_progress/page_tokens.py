"""Opaque, signed page tokens (AIP-158).

A token carries the position after the last returned row and the query it belongs to,
signed with a key that every replica shares (generated once, stored in the database), so
a token that this service did not issue for this very query is recognised and refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from lesson_progress import errors

_MAC_BYTES = 16
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class PageTokens:
    """Issues and checks page tokens with one signing key."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()[:_MAC_BYTES]

    def issue(self, query: Sequence[object], position: Sequence[object]) -> str:
        """A token for the page after ``position`` of ``query`` (both JSON-serializable)."""
        payload = json.dumps([list(query), list(position)], separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(payload + self._mac(payload)).decode().rstrip("=")

    def parse(self, token: str, query: Sequence[object]) -> list[object]:
        """The position in ``token``; INVALID_ARGUMENT unless it was issued for ``query``."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            raw = b""
        payload, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
        if len(raw) <= _MAC_BYTES or not hmac.compare_digest(mac, self._mac(payload)):
            raise _invalid("was not issued by this service")
        issued_query, position = json.loads(payload)
        if issued_query != list(query):
            raise _invalid("was issued for a different query; repeat the original request")
        return list(position)


def encode_time(value: datetime) -> int:
    """Microseconds since the epoch, exactly."""
    delta = value - _EPOCH
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def decode_time(micros: int) -> datetime:
    """The inverse of ``encode_time``."""
    return _EPOCH + timedelta(microseconds=micros)


def _invalid(description: str) -> errors.InvalidArgument:
    return errors.InvalidArgument.of("page_token", description, reason="INVALID_PAGE_TOKEN")
