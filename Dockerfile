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
# See deploy/README.md; `./dev test-image` builds this file and runs the image. Stage 1
# generates the gRPC stubs from protos/ (the committed ones are not used), installs the
# runtime dependencies from requirements.lock (pinned, hash-checked) and then the two
# distributions (lesson-progress-client and lesson-progress, no extras: no embedded
# PostgreSQL) into a virtualenv, and removes pip and setuptools from it. Stage 2 is that
# virtualenv and nothing else (the SQL migrations are inside the package), run as an
# unprivileged user.

# A local tag; pin it by digest where a registry is reachable (python:3.11-slim@sha256:...).
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
COPY requirements.lock pyproject.toml README.md ./
COPY clients/python/ clients/python/
COPY protos/ protos/
COPY service/ service/
COPY migrations/ migrations/

# The same protoc command as `./dev stubs` (the file list is split into arguments on purpose).
# protoc-gen-mypy and protoc-gen-mypy_grpc come from /opt/tools/bin.
# hadolint ignore=SC2046
RUN rm -rf clients/python/src/lessonprogress \
    && export PATH="/opt/tools/bin:$PATH" \
    && python -m grpc_tools.protoc -I protos \
        --python_out=clients/python/src --grpc_python_out=clients/python/src \
        --mypy_out=clients/python/src --mypy_grpc_out=clients/python/src \
        $(find protos -name '*.proto' | sort) \
    && find clients/python/src/lessonprogress -type d -exec sh -c 'touch "$1/__init__.py"' _ {} \;

# Third-party packages only from the lock file (every file's hash checked), then the two
# wheels built here with --no-deps: nothing unpinned gets in. `pip check` proves that the
# lock satisfies both distributions' requirements.
RUN /opt/tools/bin/pip wheel --no-deps --wheel-dir /tmp/wheels ./clients/python . \
    && python -m venv /opt/venv \
    && /opt/venv/bin/pip install --require-hashes --no-deps -r requirements.lock \
    && /opt/venv/bin/pip install --no-deps --no-index /tmp/wheels/*.whl \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/python -c "import lesson_progress.server, lesson_progress_client" \
    && /opt/venv/bin/lesson-progress --help >/dev/null \
    && /opt/venv/bin/python -m pip uninstall --yes --quiet pip setuptools \
    && find /opt/venv -name __pycache__ -prune -exec rm -rf {} +

# --- runtime -----------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

RUN groupadd --system --gid 10001 lesson-progress \
    && useradd --system --uid 10001 --gid lesson-progress --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin lesson-progress

COPY --from=builder /opt/venv /opt/venv

# Listen on every interface; the server refuses that without LESSON_PROGRESS_AUTH_TOKENS_FILE
# unless LESSON_PROGRESS_INSECURE=true. No embedded PostgreSQL here: DATABASE_URL is
# required (`serve` and `migrate` say so when it is missing).
ENV PATH="/opt/venv/bin:$PATH" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LESSON_PROGRESS_HOST=0.0.0.0 \
    LESSON_PROGRESS_PORT=50051 \
    LESSON_PROGRESS_METRICS_PORT=9464

WORKDIR /app
USER 10001:10001

# 50051: gRPC (the API, health, reflection). 9464: Prometheus /metrics.
EXPOSE 50051 9464

# Exit 0 only when the server answers SERVING (database reachable, no migration pending).
# It dials LESSON_PROGRESS_PORT on loopback (LESSON_PROGRESS_HOST when that is not a
# wildcard). With TLS on, also set LESSON_PROGRESS_HEALTH_TLS_CA to the CA that signed the
# server (and LESSON_PROGRESS_HEALTH_TLS_SERVER_NAME to a name in its certificate).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["lesson-progress", "health", "--timeout", "4"]

# SIGTERM (docker stop, Kubernetes) drains in-flight calls for LESSON_PROGRESS_SHUTDOWN_GRACE.
ENTRYPOINT ["lesson-progress"]
CMD ["serve"]
