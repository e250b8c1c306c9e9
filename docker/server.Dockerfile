# driftsync cloud server: FastAPI + CPU torch + the embedded default models (shipped in the package).
# Build from the repository root (docker-compose.yml does this):
#   docker build -f docker/server.Dockerfile -t driftsync-server:0.1.0 .
# Offline, from a local Debian base and a local torch wheel (what scripts/compose_e2e.sh does; README "Docker"):
#   docker build --network host --build-arg BASE_IMAGE=driftsync-base:bookworm \
#     --build-arg TORCH_SPEC=torch==2.13.0+cpu --build-arg "TORCH_PIP_ARGS=--find-links http://127.0.0.1:PORT/" \
#     -f docker/server.Dockerfile -t driftsync-server:0.1.0 .
# Configure with DRIFTSYNC_* variables (see `driftsync serve --help`); state lives in
# DRIFTSYNC_STATE_DIR=/var/lib/driftsync/server, a volume in docker-compose.yml.
#
# No training at build time, nor at first start: the embedded default student and teacher ship as
# package data (server/models/weights/*.pt, about 2 MB); the last step only verifies their digests.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
# Where pip gets CPU torch: its own index by default; a --find-links directory (served over
# loopback) for an offline build.
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Debian's python3 refuses a system-wide pip install (PEP 668) and has no `python`: a venv has both.
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch in its own layer: source changes do not fetch it again.
RUN pip install ${TORCH_PIP_ARGS} "${TORCH_SPEC}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY device_client ./device_client
COPY server ./server
COPY driftsync ./driftsync
# torch is already satisfied, so this adds only the rest of the server extra, and the scale
# profile's PostgreSQL and Redis clients. pip leaves the image (setuptools stays: torch requires it).
RUN pip install ".[server,scale]" \
 && pip uninstall -y pip

FROM ${BASE_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    DRIFTSYNC_HOME=/var/lib/driftsync/home \
    DRIFTSYNC_STATE_DIR=/var/lib/driftsync/server

# Non-root user. The directories exist in the image, owned by it, so a fresh named volume
# mounted on them starts with that ownership.
RUN groupadd --system --gid 10001 driftsync \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/driftsync/home --no-create-home \
        --shell /usr/sbin/nologin driftsync \
 && mkdir -p /var/lib/driftsync/home /var/lib/driftsync/server \
 && chown -R 10001:10001 /var/lib/driftsync

COPY --from=build /opt/venv /opt/venv
USER 10001:10001
WORKDIR /var/lib/driftsync/home

# The shipped weights arrived intact, so the first `driftsync serve` starts in seconds.
RUN python -c "from server.models import embedded; [embedded.verify_packaged(n) for n in embedded.PACKAGED]"

EXPOSE 8700
CMD ["driftsync", "serve"]
