# driftsync edge device: onnxruntime, numpy, httpx, msgpack, pydantic, pillow. No torch.
# Build from the repository root (docker-compose.yml does this):
#   docker build -f docker/device.Dockerfile -t driftsync-device:0.1.0 .
# Offline, from a local Debian base (what scripts/compose_e2e.sh does; README "Docker"):
#   docker build --network host --build-arg BASE_IMAGE=driftsync-base:bookworm -f docker/device.Dockerfile -t driftsync-device:0.1.0 .
# Configure with DRIFTSYNC_* variables (see `driftsync device --help`).
#
# Two stages: the builder makes a venv with `pip install .[device]` (non-editable, so the code
# lands in site-packages) and drops pip and setuptools from it; the runtime stage copies only
# that venv onto the bare base. No compilers, no pip cache, no source tree in the image.
# Measured by scripts/compose_e2e.sh (`docker image ls`, BENCHMARKS.md "Issue 13"): 367 MB on the
# 155 MB debootstrap base, i.e. 212 MB of venv (scripts/device_image_size.py: 193 MB of installed
# packages, onnxruntime 80 MB and numpy 71 MB the most; torch is not in the closure).
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Debian's python3 refuses a system-wide pip install (PEP 668) and has no `python`: a venv has both.
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Only the device side of the code: the server package (and torch) never enter this image.
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY device_client ./device_client
COPY driftsync ./driftsync
RUN pip install ".[device]" \
 && ! python -c "import torch" 2>/dev/null \
 && pip uninstall -y pip setuptools

FROM ${BASE_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    DRIFTSYNC_HOME=/var/lib/driftsync/home

# Non-root user, the same uid as the server image. Each replica keeps its state in
# /var/lib/driftsync/devices/<its name>, inside its own container (see docker-compose.yml).
RUN groupadd --system --gid 10001 driftsync \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/driftsync/home --no-create-home \
        --shell /usr/sbin/nologin driftsync \
 && mkdir -p /var/lib/driftsync/home /var/lib/driftsync/devices \
 && chown -R 10001:10001 /var/lib/driftsync

COPY --from=build /opt/venv /opt/venv
USER 10001:10001
WORKDIR /var/lib/driftsync/home

CMD ["driftsync", "device"]
