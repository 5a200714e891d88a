"""One introspection of PostgreSQL's built-in types per process instead of one per connection.

asyncpg decodes most scalar types itself but looks up everything else, arrays of uuid,
varchar, integer or timestamptz included, with an introspection query the first time each
connection meets them. On one PostgreSQL that query takes a millisecond or two; on a Citus
coordinator it took 310-350 ms (measured on Citus 13.2: it scans pg_class once per composite
type there), so every new pooled connection stalled its first heartbeat or course-progress
call by a third of a second, and a burst that grew two servers' pools at once queued calls
past the pool's 5 s wait (UNAVAILABLE).

Built-in types (OIDs below 16384) are the same in every database of a major version, so
their introspection rows can be shared by every connection of the process: ``Connection``
answers from the shared rows when it has all the types asked for and asks the server
otherwise (types created by migrations always go to the server). ``Database.connect``
introspects the array types the service uses once, before it serves calls.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from types import SimpleNamespace
from typing import Any, ClassVar

import asyncpg

# PostgreSQL's FirstNormalObjectId: OIDs below it belong to objects of initdb.
FIRST_NORMAL_OBJECT_ID = 16384

# A statement whose result has every array type the service's statements pass or return;
# running it once fills the shared rows.
WARM_UP = """
SELECT NULL::uuid[], NULL::varchar[], NULL::text[], NULL::boolean[], NULL::integer[],
       NULL::bigint[], NULL::double precision[], NULL::numeric[], NULL::timestamptz[]
"""


class Connection(asyncpg.Connection):
    """An asyncpg connection that shares the introspection of built-in types."""

    _builtin_rows: ClassVar[dict[int, Any]] = {}

    # asyncpg's own signature (it calls this method), hence the timeout parameter.
    async def _introspect_types(
        self,
        typeoids: Iterable[int],
        timeout: float | None,  # noqa: ASYNC109
    ) -> Any:
        wanted = list(typeoids)
        shared = _with_dependencies(wanted)
        if shared is not None:
            # Nothing was sent, so the anonymous statement asyncpg prepared is intact: a
            # named stand-in for the introspection statement tells it not to prepare again.
            return shared, SimpleNamespace(name="shared")
        rows, statement = await super()._introspect_types(wanted, timeout)  # type: ignore[misc]
        for row in rows:
            if row["oid"] < FIRST_NORMAL_OBJECT_ID:
                self._builtin_rows[row["oid"]] = row
        return rows, statement


def _with_dependencies(oids: Sequence[int]) -> list[Any] | None:
    """The shared rows of ``oids`` and of the types they are built on, those first (the
    order of the introspection query), or None if any is not shared yet."""
    rows = Connection._builtin_rows
    ordered: list[Any] = []
    seen: set[int] = set()

    def visit(oid: int) -> bool:
        if not oid or oid in seen:
            return True
        row = rows.get(oid)
        if row is None:
            return False
        seen.add(oid)
        parts = [
            row["elemtype"],
            row["basetype"],
            row["range_subtype"],
            *(row["attrtypoids"] or []),
        ]
        if not all(visit(part) for part in parts):
            return False
        ordered.append(row)
        return True

    return ordered if all(visit(oid) for oid in oids) else None
