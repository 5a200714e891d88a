"""Security: bearer tokens and scopes, secure defaults, TLS and mutual TLS.

The auth matrix runs every RPC of ``METHOD_SCOPES`` with a token of every scope, with no
token and with an unknown token, against an in-process server configured with a tokens
file; requests are built generically from the method descriptors. Start-up refusals run
``lesson-progress serve`` as a child process. Certificates are made by ``openssl`` for each
module (tests/certs.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import signal
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor, message, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from lesson_progress import server
from lesson_progress.auth import METHOD_SCOPES, SCOPES, hash_token
from lessonprogress.v1 import (
    analytics_service_pb2,
    catalog_service_pb2,
    catalog_service_pb2_grpc,
    progress_service_pb2,
    resources_pb2,
)
from tests import certs
from tests.conftest import new_id, server_config
from tests.test_operations import (
    HEALTH_NAMES,
    SERVICE_NAMES,
    SERVING,
    Serve,
    reflect,
    run_cli,
)

CALL_TIMEOUT = 30.0  # seconds; only a hang guard

SERVICES: list[descriptor.ServiceDescriptor] = [
    catalog_service_pb2.DESCRIPTOR.services_by_name["CatalogService"],
    progress_service_pb2.DESCRIPTOR.services_by_name["ProgressService"],
    analytics_service_pb2.DESCRIPTOR.services_by_name["AnalyticsService"],
]
METHODS: dict[str, descriptor.MethodDescriptor] = {
    f"/{service.full_name}/{method.name}": method
    for service in SERVICES
    for method in service.methods
}
AUTH_CODES = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
OK = grpc.StatusCode.OK


# --- generic calls ----------------------------------------------------------------------------


def build_request(method: descriptor.MethodDescriptor, *, well_formed: bool) -> message.Message:
    """A request for ``method``: its id fields hold fresh ids (that name nothing that exists)
    or, when not ``well_formed``, values that are not ids at all."""
    request = message_factory.GetMessageClass(method.input_type)()
    for field in method.input_type.fields:
        if field.type != field.TYPE_STRING or field.is_repeated or not field.name.endswith("_id"):
            continue
        if not well_formed:
            value = "not an id \u2603"
        elif field.name == "lesson_id":
            value = "l1"
        else:
            value = new_id()
        setattr(request, field.name, value)
    return request


async def invoke(
    channel: grpc.aio.Channel,
    path: str,
    request: message.Message | bytes,
    metadata: Sequence[tuple[str, str]] = (),
) -> grpc.StatusCode:
    """Calls ``path`` (unary or server streaming, reading the whole stream) and returns the
    final status code. ``request`` may be raw bytes, sent as they are."""
    method = METHODS[path]
    response_cls = message_factory.GetMessageClass(method.output_type)

    def serialize(value: message.Message | bytes) -> bytes:
        return value if isinstance(value, bytes) else value.SerializeToString()

    try:
        if method.server_streaming:
            stream = channel.unary_stream(
                path, request_serializer=serialize, response_deserializer=response_cls.FromString
            )
            async for _ in stream(request, metadata=metadata, timeout=CALL_TIMEOUT):
                pass
        else:
            unary = channel.unary_unary(
                path, request_serializer=serialize, response_deserializer=response_cls.FromString
            )
            await unary(request, metadata=metadata, timeout=CALL_TIMEOUT)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return OK


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


# --- the auth matrix -----------------------------------------------------------------------------


class AuthServer:
    """An in-process server with a tokens file: one token per scope, and one with all."""

    def __init__(self, running: server.RunningServer, tokens: dict[str, str], all_scopes: str):
        self.running = running
        self.tokens = tokens
        self.all_scopes = all_scopes
        self.address = f"127.0.0.1:{running.port}"


@pytest.fixture(scope="module")
async def auth_server(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[AuthServer]:
    tokens = {scope: f"{scope.replace(':', '-')}-{uuid.uuid4().hex}" for scope in sorted(SCOPES)}
    all_scopes = f"all-{uuid.uuid4().hex}"
    path = tmp_path_factory.mktemp("auth") / "tokens"
    lines = ["# name  hash  scopes", ""]
    lines += [
        f"{scope.replace(':', '_')}  {hash_token(token)}  {scope}  # one scope"
        for scope, token in tokens.items()
    ]
    lines.append(f"everything {hash_token(all_scopes)} {','.join(sorted(SCOPES))}")
    path.write_text("\n".join(lines) + "\n")
    running = await server.start(server_config(database_url, auth_tokens_file=path))
    try:
        yield AuthServer(running, tokens, all_scopes)
    finally:
        await running.stop(grace=1)


def test_every_rpc_needs_a_known_scope() -> None:
    # A method missing from METHOD_SCOPES would be open to every caller.
    assert set(METHOD_SCOPES) == set(METHODS)
    assert set(METHOD_SCOPES.values()) <= SCOPES
    assert set(METHOD_SCOPES.values()) == SCOPES  # every scope grants something
    erasure = {path.rsplit("/", 1)[1] for path, s in METHOD_SCOPES.items() if s == "erasure"}
    assert erasure == {"DeleteUserProgress", "DeleteCourse"}


@pytest.mark.parametrize("path", sorted(METHOD_SCOPES), ids=lambda p: p.rsplit(".", 1)[1])
async def test_auth_matrix(auth_server: AuthServer, path: str) -> None:
    method = METHODS[path]
    needed = METHOD_SCOPES[path]
    outcomes: dict[str, grpc.StatusCode] = {}
    async with grpc.aio.insecure_channel(auth_server.address) as channel:

        async def attempt(label: str, request: Any, metadata: Sequence[tuple[str, str]]) -> None:
            outcomes[label] = await invoke(channel, path, request, metadata)

        well_formed = build_request(method, well_formed=True)
        malformed = build_request(method, well_formed=False)
        garbage = b"\xff\xff\xff"  # does not even parse as a message
        for scope, token in auth_server.tokens.items():
            # A wrong scope learns nothing: PERMISSION_DENIED before validation, parsing
            # and any existence check.
            await attempt(
                f"{scope} well-formed", build_request(method, well_formed=True), bearer(token)
            )
            await attempt(f"{scope} malformed ids", malformed, bearer(token))
            await attempt(f"{scope} unparsable", garbage, bearer(token))
        await attempt(
            "all scopes", build_request(method, well_formed=True), bearer(auth_server.all_scopes)
        )
        for label, metadata in {
            "no token": (),
            "unknown token": bearer(f"unknown-{uuid.uuid4().hex}"),
            "empty bearer": (("authorization", "Bearer "),),
            "other scheme": (("authorization", f"Basic {auth_server.tokens[needed]}"),),
            "hash as token": bearer(hash_token(auth_server.tokens[needed])),
        }.items():
            await attempt(f"{label} well-formed", well_formed, metadata)
            await attempt(f"{label} malformed ids", malformed, metadata)

    expected: dict[str, object] = {}
    for scope in auth_server.tokens:
        if scope == needed:
            expected[f"{scope} well-formed"] = "passes auth"
            expected[f"{scope} malformed ids"] = grpc.StatusCode.INVALID_ARGUMENT
            expected[f"{scope} unparsable"] = grpc.StatusCode.INVALID_ARGUMENT
        else:
            for kind in ("well-formed", "malformed ids", "unparsable"):
                expected[f"{scope} {kind}"] = grpc.StatusCode.PERMISSION_DENIED
    expected["all scopes"] = "passes auth"
    for label in ("no token", "unknown token", "empty bearer", "other scheme", "hash as token"):
        expected[f"{label} well-formed"] = grpc.StatusCode.UNAUTHENTICATED
        expected[f"{label} malformed ids"] = grpc.StatusCode.UNAUTHENTICATED

    actual = {
        label: "passes auth" if expected[label] == "passes auth" and code not in AUTH_CODES
        else code
        for label, code in outcomes.items()
    }  # fmt: skip
    assert actual == expected, f"{path} needs {needed}"


async def test_right_scope_reaches_the_handler(auth_server: AuthServer) -> None:
    """With the right token a call does what it does without auth: here a course is
    registered, read and erased; erasure with another scope changes nothing."""
    course_id = new_id()
    async with grpc.aio.insecure_channel(auth_server.address) as channel:
        stub = catalog_service_pb2_grpc.CatalogServiceStub(channel)
        await stub.UpsertCourse(
            catalog_service_pb2.UpsertCourseRequest(
                course_id=course_id,
                title="secured",
                lessons=[resources_pb2.Lesson(lesson_id="l1", title="one")],
            ),
            metadata=bearer(auth_server.tokens["catalog:admin"]),
            timeout=CALL_TIMEOUT,
        )
        got = await stub.GetCourse(
            catalog_service_pb2.GetCourseRequest(course_id=course_id),
            metadata=bearer(auth_server.tokens["progress:read"]),
            timeout=CALL_TIMEOUT,
        )
        assert got.course.title == "secured"
        # Erasure with the wrong scope changes nothing.
        assert (
            await invoke(
                channel,
                "/lessonprogress.v1.CatalogService/DeleteCourse",
                catalog_service_pb2.DeleteCourseRequest(course_id=course_id),
                bearer(auth_server.tokens["catalog:admin"]),
            )
            == grpc.StatusCode.PERMISSION_DENIED
        )
        await stub.DeleteCourse(
            catalog_service_pb2.DeleteCourseRequest(course_id=course_id),
            metadata=bearer(auth_server.tokens["erasure"]),
            timeout=CALL_TIMEOUT,
        )
        assert (
            await invoke(
                channel,
                "/lessonprogress.v1.CatalogService/GetCourse",
                catalog_service_pb2.GetCourseRequest(course_id=course_id),
                bearer(auth_server.tokens["progress:read"]),
            )
            == grpc.StatusCode.NOT_FOUND
        )


async def test_health_and_reflection_need_no_token(auth_server: AuthServer) -> None:
    async with grpc.aio.insecure_channel(auth_server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in HEALTH_NAMES:
            response = await health.Check(
                health_pb2.HealthCheckRequest(service=name), timeout=CALL_TIMEOUT
            )
            assert response.status == SERVING, name
        (listed,) = await reflect(
            channel, [reflection_pb2.ServerReflectionRequest(list_services="")]
        )
        names = {service.name for service in listed.list_services_response.service}
        assert {*SERVICE_NAMES, "grpc.health.v1.Health"} <= names


# --- secure by default -------------------------------------------------------------------------


def test_serve_refuses_an_open_api_beyond_loopback(tmp_path: Path, database_url: str) -> None:
    result = run_cli(
        ["serve", "--database-url", database_url, "--host", "0.0.0.0", "--metrics-port", "off"],
        tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert "0.0.0.0" in result.stderr
    assert "AUTH_TOKENS_FILE" in result.stderr
    assert "--insecure" in result.stderr
    assert "Traceback" not in result.stderr


def log_entries(log: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


async def test_serve_insecure_flag_starts_and_warns_loudly(
    tmp_path: Path, database_url: str
) -> None:
    with Serve(tmp_path, database_url, "--insecure", host="0.0.0.0", metrics=False) as served:
        await served.wait_health(SERVING)
        served.send(signal.SIGTERM)
        assert await served.wait_exit() == 0, served.log_tail()
        warnings = [
            entry
            for entry in log_entries(served.log())
            if entry["level"] in ("WARNING", "ERROR", "CRITICAL") and "INSECURE" in entry["message"]
        ]
        assert warnings, served.log_tail()
        assert "0.0.0.0" in warnings[0]["message"]


async def test_serve_with_tokens_starts_beyond_loopback(tmp_path: Path, database_url: str) -> None:
    token = f"tok-{uuid.uuid4().hex}"
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(f"reader {hash_token(token)} progress:read\n")
    with Serve(
        tmp_path,
        database_url,
        "--auth-tokens-file",
        str(tokens_file),
        host="0.0.0.0",
        metrics=False,
    ) as served:
        await served.wait_health(SERVING)
        async with served.channel() as channel:
            path = "/lessonprogress.v1.CatalogService/GetCourse"
            request = catalog_service_pb2.GetCourseRequest(course_id=new_id())
            assert await invoke(channel, path, request) == grpc.StatusCode.UNAUTHENTICATED
            assert await invoke(channel, path, request, bearer(token)) == grpc.StatusCode.NOT_FOUND
        served.send(signal.SIGTERM)
        assert await served.wait_exit() == 0, served.log_tail()
        assert "INSECURE" not in served.log()


GOOD_HASH = hash_token("good")
BAD_TOKEN_FILES = {
    "unknown scope": (
        f"# callers\nlms {GOOD_HASH} progress:read,progress:admin\n",
        2,
        "progress:admin",
    ),
    "short hash": ("lms sha256:abcdef progress:read\n", 1, "sha256"),
    "not hex": (f"ok {GOOD_HASH} erasure\nlms sha256:{'zz' * 32} progress:read\n", 2, "hex"),
    "no prefix": (f"lms {hashlib.sha256(b'x').hexdigest()} progress:read\n", 1, "sha256"),
    "missing scopes": (f"\n\nlms {GOOD_HASH}\n", 3, "scope"),
}


@pytest.mark.parametrize(
    ("content", "line", "named"), list(BAD_TOKEN_FILES.values()), ids=list(BAD_TOKEN_FILES)
)
def test_serve_refuses_a_bad_tokens_file(
    tmp_path: Path, database_url: str, content: str, line: int, named: str
) -> None:
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(content)
    result = run_cli(
        [
            "serve",
            "--database-url",
            database_url,
            "--auth-tokens-file",
            str(tokens_file),
            "--metrics-port",
            "off",
        ],
        tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert re.search(rf"{re.escape(str(tokens_file))}:{line}\b", result.stderr), result.stderr
    assert named in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_a_tokens_file_without_tokens(tmp_path: Path, database_url: str) -> None:
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("# nobody yet\n\n")
    result = run_cli(
        ["serve", "--database-url", database_url, "--auth-tokens-file", str(tokens_file)],
        tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert str(tokens_file) in result.stderr
    assert "no tokens" in result.stderr


def test_hash_token_cli(tmp_path: Path) -> None:
    token = f"s3cret-{uuid.uuid4().hex}"
    result = run_cli(["hash-token"], tmp_path, stdin=token + "\n")
    assert result.returncode == 0, result.stderr
    expected = "sha256:" + hashlib.sha256(token.encode()).hexdigest()
    assert result.stdout.strip() == expected
    assert hash_token(token) == expected
    assert token not in result.stdout + result.stderr

    empty = run_cli(["hash-token"], tmp_path, stdin="")
    assert empty.returncode == 2
    assert empty.stdout == ""


# --- TLS ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> certs.Pki:
    return certs.make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> certs.Pki:
    """Another CA and its certificates: trusted by nobody here."""
    return certs.make_pki(tmp_path_factory.mktemp("foreign-pki"))


@contextlib.asynccontextmanager
async def serving(database_url: str, **overrides: object) -> AsyncIterator[str]:
    """An in-process server with ``overrides``; yields its address."""
    running = await server.start(server_config(database_url, **overrides))
    try:
        yield f"127.0.0.1:{running.port}"
    finally:
        await running.stop(grace=1)


def credentials(ca: certs.KeyPair, client: certs.KeyPair | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=ca.cert.read_bytes(),
        private_key=client.key.read_bytes() if client else None,
        certificate_chain=client.cert.read_bytes() if client else None,
    )


async def outcome(
    address: str,
    creds: grpc.ChannelCredentials | None,
    options: Sequence[tuple[str, Any]] = (),
) -> tuple[grpc.StatusCode, grpc.StatusCode]:
    """(health Check, GetCourse of an unknown course) through a new channel."""
    if creds is None:
        channel = grpc.aio.insecure_channel(address, options=options)
    else:
        channel = grpc.aio.secure_channel(address, creds, options=options)
    async with channel:
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT
            )
            assert response.status == SERVING
            health = OK
        except grpc.aio.AioRpcError as exc:
            health = exc.code()
        call = await invoke(
            channel,
            "/lessonprogress.v1.CatalogService/GetCourse",
            catalog_service_pb2.GetCourseRequest(course_id=new_id()),
        )
    return health, call


UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
NOT_FOUND = grpc.StatusCode.NOT_FOUND


async def test_tls(database_url: str, pki: certs.Pki, foreign: certs.Pki) -> None:
    async with serving(
        database_url, tls_cert_file=pki.server.cert, tls_key_file=pki.server.key
    ) as address:
        # Trusting the CA: works, by IP (SAN IP:127.0.0.1) and by name (SAN DNS:localhost).
        assert await outcome(address, credentials(pki.ca)) == (OK, NOT_FOUND)
        by_name = (("grpc.ssl_target_name_override", "localhost"),)
        assert await outcome(address, credentials(pki.ca), by_name) == (OK, NOT_FOUND)
        # A client certificate is not needed, but does no harm.
        assert await outcome(address, credentials(pki.ca, pki.client)) == (OK, NOT_FOUND)
        # Plaintext, or trusting another CA: no connection.
        assert await outcome(address, None) == (UNAVAILABLE, UNAVAILABLE)
        assert await outcome(address, credentials(foreign.ca)) == (UNAVAILABLE, UNAVAILABLE)
        # A name the certificate does not carry.
        wrong_name = (("grpc.ssl_target_name_override", "elsewhere.example"),)
        assert await outcome(address, credentials(pki.ca), wrong_name) == (
            UNAVAILABLE,
            UNAVAILABLE,
        )


async def test_mutual_tls(database_url: str, pki: certs.Pki, foreign: certs.Pki) -> None:
    async with serving(
        database_url,
        tls_cert_file=pki.server.cert,
        tls_key_file=pki.server.key,
        tls_client_ca_file=pki.ca.cert,
    ) as address:
        assert await outcome(address, credentials(pki.ca, pki.client)) == (OK, NOT_FOUND)
        # No client certificate, or one signed by a CA the server does not trust: the
        # handshake fails.
        assert await outcome(address, credentials(pki.ca)) == (UNAVAILABLE, UNAVAILABLE)
        assert await outcome(address, credentials(pki.ca, foreign.client)) == (
            UNAVAILABLE,
            UNAVAILABLE,
        )
        assert await outcome(address, None) == (UNAVAILABLE, UNAVAILABLE)


async def test_health_cli_over_tls(tmp_path: Path, database_url: str, pki: certs.Pki) -> None:
    # The real command line: serve with --tls-cert/--tls-key, probe with health --tls-ca.
    with Serve(
        tmp_path,
        database_url,
        "--tls-cert",
        str(pki.server.cert),
        "--tls-key",
        str(pki.server.key),
        metrics=False,
        credentials=credentials(pki.ca),
    ) as served:
        await served.wait_health(SERVING)
        probe = ["health", "--address", served.address, "--timeout", "10"]
        secure = await asyncio.to_thread(run_cli, [*probe, "--tls-ca", str(pki.ca.cert)], tmp_path)
        assert secure.returncode == 0, secure.stdout + secure.stderr
        assert "SERVING" in secure.stdout
        for name in SERVICE_NAMES:
            one = await asyncio.to_thread(
                run_cli, [*probe, "--tls-ca", str(pki.ca.cert), "--service", name], tmp_path
            )
            assert one.returncode == 0, (name, one.stdout, one.stderr)
        plaintext = await asyncio.to_thread(run_cli, probe, tmp_path)
        assert plaintext.returncode == 1
        assert "Traceback" not in plaintext.stderr
        served.send(signal.SIGTERM)
        assert await served.wait_exit() == 0, served.log_tail()


async def test_health_cli_over_mutual_tls(
    tmp_path: Path, database_url: str, pki: certs.Pki
) -> None:
    # serve with --tls-client-ca: the probe needs its own certificate (--tls-cert/--tls-key).
    with Serve(
        tmp_path,
        database_url,
        "--tls-cert",
        str(pki.server.cert),
        "--tls-key",
        str(pki.server.key),
        "--tls-client-ca",
        str(pki.ca.cert),
        metrics=False,
        credentials=credentials(pki.ca, pki.client),
    ) as served:
        await served.wait_health(SERVING)
        probe = ["health", "--address", served.address, "--timeout", "10"]
        probe += ["--tls-ca", str(pki.ca.cert)]
        without_cert = await asyncio.to_thread(run_cli, probe, tmp_path)
        assert without_cert.returncode == 1
        assert "Traceback" not in without_cert.stderr
        client = ["--tls-cert", str(pki.client.cert), "--tls-key", str(pki.client.key)]
        with_cert = await asyncio.to_thread(run_cli, [*probe, *client], tmp_path)
        assert with_cert.returncode == 0, with_cert.stdout + with_cert.stderr
        assert "SERVING" in with_cert.stdout
        served.send(signal.SIGTERM)
        assert await served.wait_exit() == 0, served.log_tail()
