# driftsync cloud server: FastAPI + CPU torch + the embedded default models (shipped in the package).
# Build from the repository root (docker-compose.yml does this):
#   docker build -f docker/server.Dockerfile -t driftsync-server .
# Configure with DRIFTSYNC_* variables (see `driftsync serve --help`); state lives in
# DRIFTSYNC_STATE_DIR=/var/lib/driftsync/server, a volume in docker-compose.yml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DRIFTSYNC_HOME=/var/lib/driftsync/home \
    DRIFTSYNC_STATE_DIR=/var/lib/driftsync/server

# Non-root user. The directories exist in the image, owned by it, so a fresh named volume
# mounted on them starts with that ownership.
RUN groupadd --system --gid 10001 driftsync \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/driftsync/home --no-create-home \
        --shell /usr/sbin/nologin driftsync \
 && mkdir -p /var/lib/driftsync/home /var/lib/driftsync/server \
 && chown -R 10001:10001 /var/lib/driftsync

WORKDIR /opt/driftsync

# CPU torch from its own index, in its own layer: source changes do not re-download it.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

COPY pyproject.toml README.md ./
COPY shared ./shared
COPY device_client ./device_client
COPY server ./server
COPY driftsync ./driftsync
# torch is already satisfied, so this adds only the rest of the server extra.
RUN pip install ".[server]"

USER 10001:10001

# The embedded default student and teacher ship as package data: check that they arrived intact,
# so the first `driftsync serve` starts in seconds.
RUN python -c "from server.models import embedded; [embedded.verify_packaged(n) for n in embedded.PACKAGED]"

EXPOSE 8700
CMD ["driftsync", "serve"]
