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
from typing import Any

from lesson_progress.validation import Validator

_MAC_BYTES = 16


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

    def parse(self, token: str, query: Sequence[object], check: Validator) -> list[Any] | None:
        """The position in ``token``, or None for the first page.

        Records a violation of ``page_token`` in ``check`` unless this service issued the
        token for ``query``. The query is only compared once the other fields are valid:
        a token cannot match a query with malformed ids, and saying so would mislead.
        """
        if not token:
            return None
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            raw = b""
        payload, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
        if len(raw) <= _MAC_BYTES or not hmac.compare_digest(mac, self._mac(payload)):
            check.fail("page_token", "was not issued by this service")
            return None
        issued_query, position = json.loads(payload)
        if not check.violations and issued_query != list(query):
            check.fail("page_token", "was issued for a different query; repeat that query")
        return list(position)
