# driftsync edge device: onnxruntime, numpy, httpx, msgpack, pydantic, pillow. No torch.
# Build from the repository root (docker-compose.yml does this):
#   docker build -f docker/device.Dockerfile -t driftsync-device .
# Configure with DRIFTSYNC_* variables (see `driftsync device --help`).
#
# Image size, estimated by scripts/device_image_size.py (installed sizes of the
# driftsync[device] closure, Python 3.11, linux x86_64, plus the base image):
#   onnxruntime 80 MB, numpy 71 MB, pillow 22 MB, pydantic + pydantic_core 10 MB,
#   13 smaller packages and driftsync's own code 10 MB: packages 193 MB
#   + python:3.11-slim about 130 MB uncompressed (an estimate, not measured)
#   = about 325 MB uncompressed. torch is not in the closure (torch 2.13.0+cpu alone
#   installs 757 MB).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DRIFTSYNC_HOME=/var/lib/driftsync/home

# Non-root user, the same uid as the server image. The directories exist in the image, owned
# by it, so a fresh named volume mounted on /var/lib/driftsync/devices starts with that ownership.
RUN groupadd --system --gid 10001 driftsync \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/driftsync/home --no-create-home \
        --shell /usr/sbin/nologin driftsync \
 && mkdir -p /var/lib/driftsync/home /var/lib/driftsync/devices \
 && chown -R 10001:10001 /var/lib/driftsync

WORKDIR /opt/driftsync

# Only the device side of the code: the server package (and torch) never enter this image.
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY device_client ./device_client
COPY driftsync ./driftsync
RUN pip install ".[device]" \
 && ! python -c "import torch" 2>/dev/null

USER 10001:10001

CMD ["driftsync", "device"]
