# syntax=docker/dockerfile:1
# ZKEB API image: uv builds a locked virtualenv, a slim runtime runs `zkeb serve` (granian).
#   docker build --build-arg VERSION=0.1.0 --build-arg COMMIT="$(git rev-parse HEAD)" \
#     --build-arg BUILD_DATE="$(date -u +%Y-%m-%dT%H:%M:%SZ)" -t zkeb-api .
# Base images are pinned by tag; Dependabot (.github/dependabot.yml) proposes their updates weekly.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

# ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder
# Optional extras to install, e.g. --build-arg EXTRAS=grpc for OTLP over gRPC (pyproject.toml lists them).
ARG EXTRAS=""
# No blanket bytecode: scripts/image_bytecode.py compiles what the server imports (below), for the dependencies in
# place of their source (one copy of each module in the image, not two; ZKEB's own code keeps its source).
ENV UV_COMPILE_BYTECODE=0 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1 \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv
COPY --from=uv /uv /usr/local/bin/uv
# strip, for the wheels' shared objects: their debug symbols are ~23 MB of the venv (builder stage only).
RUN apt-get update \
    && apt-get install -y --no-install-recommends binutils=2.40-2 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first: this layer is reused until pyproject.toml or uv.lock change.
COPY pyproject.toml uv.lock ./
# What the runtime never reads leaves with the build: the shared objects' symbols, type stubs, C/C++/Cython sources
# and headers, the test suites some wheels ship (greenlet's, certifi's), and the API models of the ~440 AWS services
# botocore carries (22 MB) but those the S3 payload store calls: S3, and STS and SSO for role and SSO credentials
# (scripts/image-check.sh runs the S3 store from the image against a real S3 server); botocore's loader reads each of
# its data files as .json or .json.gz, so they stay, gzipped (its endpoint table alone is 1.2 MB of JSON).
# Test support no `zkeb` process imports goes too: SQLAlchemy's, Alembic's and Litestar's `testing` packages and the
# dialects' `provision` modules they load, and SQLAlchemy's mypy plugin.
# Pygments (5.6 MB) is rich's, for syntax-highlighted tracebacks and code in a terminal: the server prints neither
# (its logs are its own formatters'), and the one import it meets, Mako's (Alembic's templates), falls back without
# it. It stays in the lock, where pytest and the developers' tools need it; the image does not install it
# (tests/unit/core/test_server_imports.py runs the server's imports without it).
RUN uv sync --locked --no-dev --no-editable --no-install-project --no-install-package pygments \
    ${EXTRAS:+--extra "${EXTRAS}"} \
    && find /app/.venv -type f -name '*.so*' -exec strip --strip-unneeded {} + \
    && find /app/.venv/lib -type f \( -name '*.pyi' -o -name '*.pyx' -o -name '*.pxd' -o -name '*.pxi' \
       -o -name '*.c' -o -name '*.cpp' -o -name '*.h' -o -name '*.hpp' \) -delete \
    && find /app/.venv/lib -depth -type d -name tests -path '*/site-packages/*/tests' -exec rm -rf {} + \
    && find /app/.venv/lib/python*/site-packages/botocore/data -mindepth 1 -maxdepth 1 -type d \
       ! -name s3 ! -name sts ! -name sso ! -name sso-oidc -exec rm -rf {} + \
    && find /app/.venv/lib/python*/site-packages/botocore/data -type f -name '*.json' -exec gzip -9n {} + \
    && rm -rf /app/.venv/lib/python*/site-packages/sqlalchemy/testing \
       /app/.venv/lib/python*/site-packages/alembic/testing \
       /app/.venv/lib/python*/site-packages/litestar/testing \
       /app/.venv/lib/python*/site-packages/sqlalchemy/ext/mypy \
       /app/.venv/lib/python*/site-packages/sqlalchemy/dialects/*/provision.py
# Then the project itself, installed as a wheel (no source tree in the runtime).
COPY README.md ./
COPY src ./src
# The app it builds finds its Alembic scripts under the working directory here (in the runtime, under /app).
COPY db/migrations ./db/migrations
COPY scripts/image_bytecode.py ./scripts/
RUN uv sync --locked --no-dev --no-editable --no-install-package pygments ${EXTRAS:+--extra "${EXTRAS}"} \
    && /app/.venv/bin/python -B scripts/image_bytecode.py --sourceless \
    && /app/.venv/bin/python -m compileall -q db/migrations

# ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
# Build metadata first, before the RUN below (whose cache key has the build arguments): placed after the cached
# layers, `ENV ZKEB_COMMIT=${COMMIT}` was reused from an earlier build by buildah's layer cache and the image
# reported the previous commit (seen with scripts/image-check.sh, buildah 1.28).
ARG VERSION=0.0.0+unknown
ARG COMMIT=unknown
ARG BUILD_DATE=unknown
LABEL org.opencontainers.image.title="zkeb-api" \
      org.opencontainers.image.description="ZKEB zero-knowledge encrypted backup server" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${COMMIT}" \
      org.opencontainers.image.created="${BUILD_DATE}"

RUN groupadd --system --gid 10001 zkeb \
    && useradd --system --uid 10001 --gid zkeb --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin zkeb \
    && install -d -o zkeb -g zkeb -m 0750 /var/lib/zkeb

ENV PATH="/app/.venv/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PORT=3000 \
    ZKEB_ENV=production \
    ZKEB_DATA_DIR=/var/lib/zkeb \
    ZKEB_VERSION=${VERSION} \
    ZKEB_COMMIT=${COMMIT} \
    ZKEB_BUILD_DATE=${BUILD_DATE}

WORKDIR /app
# Root-owned and read-only for the service user: the code cannot be rewritten at runtime.
COPY --from=builder /app/.venv /app/.venv
# From the builder, where they were compiled with the rest: every `zkeb serve` and `zkeb db upgrade` reads them.
COPY --from=builder /src/db/migrations /app/db/migrations

USER 10001:10001
EXPOSE 3000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '3000') + '/api/health/live', timeout=4)"]
# CMD, not ENTRYPOINT: Railway's preDeployCommand (`zkeb db upgrade`) and
# `docker run IMAGE zkeb ...` replace it. `zkeb serve` runs granian in-process
# (PID 1), which drains in-flight requests on SIGTERM.
CMD ["zkeb", "serve", "--host", "0.0.0.0"]
