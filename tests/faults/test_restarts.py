"""PostgreSQL restarted or its backends terminated under concurrent writers.

Writers resend every failed write with its request id until it is OK (as the typed client
does for UNAVAILABLE and ABORTED). Afterwards the stored sums must equal the acknowledged
writes exactly: nothing lost, nothing counted twice, no batch applied in part, course rows
in step with lesson rows. Separately, callers may only ever have seen OK, UNAVAILABLE and
ABORTED: a connection that went away is retryable, never INTERNAL.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from tests.faults.cluster import SERVICE_APPLICATION_NAME, Cluster
from tests.faults.conftest import ServeFactory
from tests.faults.support import (
    Load,
    Outcomes,
    consistency_problems,
    create_database,
    drop_database,
    poll,
    terminate_service_backends,
    time_spent,
)
from tests.support import GENEROUS_TIME_BUDGET
from tests.test_operations import Serve, upsert_course

pytestmark = pytest.mark.postgres_only("the fault suite controls its own PostgreSQL processes")

WRITERS = 16
LESSONS = [f"l{i + 1}" for i in range(4)]
ROUNDS = 3  # faults per scenario


async def _run(cluster: Cluster, directory: Path, fault: str) -> tuple[Outcomes, str, str]:
    url = await create_database(cluster)
    serve = Serve(
        directory,
        url,
        *GENEROUS_TIME_BUDGET,
        "--pool-size",
        "8",
        metrics=False,
        name=f"serve-{fault}",
    )
    try:
        await serve.wait_health()
        async with serve.channel() as channel:
            course_id = await upsert_course(channel, lessons=len(LESSONS))
            async with Load(channel, course_id, LESSONS, WRITERS) as load:
                await load.wait_for_oks(50)
                for _ in range(ROUNDS):
                    if fault == "terminate":
                        assert await terminate_service_backends(url) > 0
                    else:
                        await asyncio.to_thread(cluster.restart, fault)
                    await load.wait_for_oks(50)  # the pool recovers
            serve.assert_running()
        return load.outcomes, url, course_id
    except BaseException:
        serve.kill()
        await drop_database(cluster, url)
        raise
    finally:
        serve.kill()


@pytest.fixture(scope="module", params=["fast", "immediate", "terminate"])
async def faulted(
    request: pytest.FixtureRequest, cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Outcomes, str, str]]:
    """One load run per fault: PostgreSQL restarted fast or immediate, or every service
    backend terminated, ROUNDS times; yields (outcomes, database URL, course id)."""
    fault = str(request.param)
    result = await _run(cluster, tmp_path_factory.mktemp(fault), fault)
    yield result
    await drop_database(cluster, result[1])


async def test_every_acknowledged_write_counts_exactly_once(
    faulted: tuple[Outcomes, str, str],
) -> None:
    outcomes, url, course_id = faulted
    assert outcomes.refused == []
    assert outcomes.unresolved == 0
    assert await time_spent(url, course_id) == dict(outcomes.acknowledged)
    assert await consistency_problems(url, course_id) == []


async def test_callers_see_only_retryable_codes(faulted: tuple[Outcomes, str, str]) -> None:
    outcomes = faulted[0]
    assert outcomes.unexpected() == {}, dict(outcomes.codes)


async def test_every_service_connection_is_named(serve: ServeFactory, database: str) -> None:
    """The LISTEN connection is named like the pool's, so terminating or counting the
    service's connections by application_name finds all of them."""
    child = serve()
    await child.wait_health()
    connection = await asyncpg.connect(database)

    async def listening() -> bool:
        return bool(
            await connection.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE application_name = $1 AND query LIKE 'LISTEN %'",
                SERVICE_APPLICATION_NAME,
            )
        )

    try:
        await poll(listening, "a LISTEN connection named lesson-progress")
    finally:
        await connection.close()
