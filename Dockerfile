# syntax=docker/dockerfile:1
#
# The lesson progress gRPC service.
#
#   docker build -t lesson-progress .
#   docker run --rm -p 50051:50051 -p 9464:9464 \
#     -e DATABASE_URL=postgresql://user:password@db:5432/progress \
#     -e LESSON_PROGRESS_AUTH_TOKENS_FILE=/run/secrets/tokens -v "$PWD/tokens:/run/secrets/tokens:ro" \
#     lesson-progress
#
# See deploy/README.md. Stage 1 generates the gRPC stubs from protos/ (the committed ones
# are not used) and installs the package into a virtualenv; stage 2 is that virtualenv, the
# SQL migrations and nothing else, run as an unprivileged user.

ARG PYTHON_IMAGE=python:3.11-slim

# --- builder -----------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# The code generators, pinned as in pyproject.toml's [dev] extra; they stay in this stage.
RUN python -m venv /opt/tools \
    && /opt/tools/bin/pip install grpcio-tools==1.85.1 mypy-protobuf==5.1.0

WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY service/ service/

# The same protoc command as `./dev stubs` (the file list is split into arguments on purpose).
# protoc-gen-mypy and protoc-gen-mypy_grpc come from /opt/tools/bin.
# hadolint ignore=SC2046
RUN rm -rf service/lessonprogress \
    && export PATH="/opt/tools/bin:$PATH" \
    && python -m grpc_tools.protoc -I protos \
        --python_out=service --grpc_python_out=service \
        --mypy_out=service --mypy_grpc_out=service \
        $(find protos -name '*.proto' | sort) \
    && find service/lessonprogress -type d -exec sh -c 'touch "$1/__init__.py"' _ {} \;

# The service and its runtime dependencies (not the [dev] extra), installed non-editable.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install . \
    && /opt/venv/bin/python -c "import lesson_progress.server, lessonprogress.v1.progress_service_pb2_grpc" \
    && /opt/venv/bin/lesson-progress --help >/dev/null

# --- runtime -----------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

RUN groupadd --system --gid 10001 lesson-progress \
    && useradd --system --uid 10001 --gid lesson-progress --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin lesson-progress

COPY --from=builder /opt/venv /opt/venv
COPY migrations/ /app/migrations/

# The package is installed into site-packages, where config.DEFAULT_MIGRATIONS_DIR does not
# lead to the migrations: point at the copy above. Listen on every interface; the server
# refuses that without LESSON_PROGRESS_AUTH_TOKENS_FILE unless LESSON_PROGRESS_INSECURE=true.
ENV PATH="/opt/venv/bin:$PATH" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LESSON_PROGRESS_MIGRATIONS_DIR=/app/migrations \
    LESSON_PROGRESS_HOST=0.0.0.0 \
    LESSON_PROGRESS_PORT=50051 \
    LESSON_PROGRESS_METRICS_PORT=9464

WORKDIR /app
USER 10001:10001

# 50051: gRPC (the API, health, reflection). 9464: Prometheus /metrics.
EXPOSE 50051 9464

# Exit 0 only when the server answers SERVING (database reachable, no migration pending).
# With TLS on, also set LESSON_PROGRESS_HEALTH_TLS_CA to the CA that signed the server.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["lesson-progress", "health", "--timeout", "4"]

# SIGTERM (docker stop, Kubernetes) drains in-flight calls for LESSON_PROGRESS_SHUTDOWN_GRACE.
ENTRYPOINT ["lesson-progress"]
CMD ["serve"]
