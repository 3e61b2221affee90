# syntax=docker/dockerfile:1
# The listener's image: `sandbox-listener run` on Python 3.11, installed from requirements.lock.
# Build context: the repository root (.dockerignore keeps it to what the install needs).
FROM python:3.11.15-slim-trixie

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

RUN groupadd --system --gid 10001 listener \
    && useradd --system --uid 10001 --gid listener --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin listener

# The pinned dependency tree first, so a code change doesn't reinstall it.
COPY requirements.lock /tmp/requirements.lock
RUN pip install --no-deps -r /tmp/requirements.lock \
    && rm /tmp/requirements.lock

# Then the package itself from a throwaway bind mount of the context, built with the setuptools
# that ships in the base image, so nothing unpinned is fetched. pip check fails the build if
# pyproject.toml gained a dependency that requirements.lock lacks.
RUN --mount=type=bind,target=/tmp/src,rw \
    pip install --no-deps --no-build-isolation /tmp/src \
    && pip check

USER 10001:10001
WORKDIR /tmp

# fly.toml sets LISTENER_HTTP_PORT=8080 for /healthz, /readyz and /metrics.
EXPOSE 8080
STOPSIGNAL SIGTERM
CMD ["sandbox-listener", "run"]
