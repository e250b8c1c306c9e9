#!/usr/bin/env bash
# docker-compose.yml under a real Docker engine, end to end, with no registry and no bridge:
#
#   sudo bash scripts/compose_e2e.sh          # as root; takes several minutes
#
# 1. installs Debian's docker.io, docker-compose (1.29.2) and debootstrap if they are missing;
# 2. starts its own dockerd (--bridge=none --iptables=false) on a private socket and data root,
#    so it never touches another engine, creates no Docker network and no private address;
# 3. makes the base image with debootstrap (Debian bookworm: python3 3.11, python3-venv,
#    ca-certificates) from this machine's Debian mirror, with this machine's CA certificates,
#    and `docker import`s it as driftsync-base:bookworm: nothing comes from Docker Hub;
# 4. serves the CPU torch wheel that this machine's pip finds over loopback and builds both images
#    (docker build --network host) with BASE_IMAGE and torch's pip source as build arguments;
# 5. `docker-compose -f docker-compose.yml -f docker-compose.host.yml up -d --scale device=3`
#    (host networking), then waits until every device has applied a delta (the server's fleet API,
#    with the admin token, and each replica's own status), with distinct names, as uid 10001;
# 6. `docker-compose down --volumes`, recording each container's exit code from the engine's
#    events: all must be 0;
# 7. removes everything it started: the containers, its engine (and its data root with every
#    image), the wheel server, its temporary directory.
# Timings per phase and `docker image ls` are printed at the end. Not part of .ci/run.
#
# Settings (environment): DEVICES (3), ADAPT_TIMEOUT_S (900), DEBIAN_MIRROR (from apt's sources),
# TORCH_SPEC (torch==2.13.0+cpu), KEEP_WORK=1 (keep the temporary directory, images included).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
DEVICES=${DEVICES:-3}
ADAPT_TIMEOUT_S=${ADAPT_TIMEOUT_S:-900}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0+cpu}
BASE_IMAGE=driftsync-base:bookworm
SERVER_PORT=8700  # docker-compose.yml's; under host networking it must be free on this machine
WORK=$(mktemp -d /tmp/driftsync-compose-e2e.XXXXXX)
export DOCKER_HOST="unix://$WORK/docker.sock" DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0
COMPOSE=(docker-compose -f docker-compose.yml -f docker-compose.host.yml)
DOCKERD_PID="" WHEELS_PID="" UP=0
declare -a TIMINGS=()

log() { printf '[compose-e2e %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
fail() { log "FAILED: $*"; exit 1; }
phase_start() { PHASE=$1; PHASE_T0=$(date +%s.%N); log "== $PHASE"; }
phase_end() {
    local took; took=$(python3 -c "print(f'{$(date +%s.%N) - $PHASE_T0:.1f}')")
    TIMINGS+=("$(printf '%-28s %8s s' "$PHASE" "$took")"); log "== $PHASE: ${took} s"
}

cleanup() {
    local rc=$?
    set +e
    log "cleaning up"
    cd "$REPO"
    if [ "$UP" = 1 ]; then "${COMPOSE[@]}" down --volumes --timeout 40 >>"$WORK/compose.log" 2>&1; fi
    [ -n "$WHEELS_PID" ] && kill "$WHEELS_PID" 2>/dev/null && wait "$WHEELS_PID" 2>/dev/null
    if [ -n "$DOCKERD_PID" ]; then
        kill "$DOCKERD_PID" 2>/dev/null
        for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$DOCKERD_PID" 2>/dev/null && { log "dockerd did not stop: killing it"; kill -9 "$DOCKERD_PID"; }
        wait "$DOCKERD_PID" 2>/dev/null
    fi
    [ -f "${IMAGES_TXT:-/nonexistent}" ] && IMAGES=$(cat "$IMAGES_TXT")
    if [ "${KEEP_WORK:-0}" = 1 ]; then
        log "kept $WORK"
    else
        # dockerd leaves its default network namespace mounted in its exec root
        awk -v w="$WORK/" 'index($2, w) == 1 { print $2 }' /proc/mounts | sort -r | xargs -r -n1 umount -l
        rm -rf "$WORK" || log "could not remove all of $WORK"
    fi
    if [ "${#TIMINGS[@]}" -gt 0 ]; then
        printf '\nTimings:\n'; printf '  %s\n' "${TIMINGS[@]}"
    fi
    [ -n "${IMAGES:-}" ] && printf '\nImages:\n%s\n' "$IMAGES"
    [ "$rc" = 0 ] && log "PASSED" || log "FAILED (exit $rc)"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[ "$(id -u)" = 0 ] || fail "run as root (it installs packages, runs dockerd and debootstrap)"
cd "$REPO"
log "work directory $WORK"

phase_start "packages"
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -q >"$WORK/apt.log" 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >>"$WORK/apt.log" 2>&1 \
        || { tail -20 "$WORK/apt.log"; fail "apt-get install ${missing[*]}"; }
fi
log "$(dockerd --version); $(docker-compose version --short 2>/dev/null | head -1 | sed 's/^/docker-compose /')"
phase_end

phase_start "engine start"
python3 - "$SERVER_PORT" <<'EOF' || fail "port $SERVER_PORT is taken on this machine: the host-network server needs it"
import socket, sys
with socket.socket() as s:
    s.bind(("127.0.0.1", int(sys.argv[1])))
EOF
dockerd --bridge=none --iptables=false --ip-masq=false --host "$DOCKER_HOST" --data-root "$WORK/docker" \
    --exec-root "$WORK/exec" --pidfile "$WORK/docker.pid" >"$WORK/dockerd.log" 2>&1 &
DOCKERD_PID=$!
for _ in $(seq 120); do docker info >/dev/null 2>&1 && break; kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
docker info >/dev/null 2>&1 || { tail -20 "$WORK/dockerd.log"; fail "dockerd did not start"; }
log "engine $(docker version --format '{{.Server.Version}}'), storage $(docker info --format '{{.Driver}}')"
phase_end

phase_start "base image (debootstrap)"
MIRROR=${DEBIAN_MIRROR:-$(python3 - <<'EOF'
import glob, re
text = "\n".join(open(p).read() for p in ["/etc/apt/sources.list", *glob.glob("/etc/apt/sources.list.d/*.sources"),
                                         *glob.glob("/etc/apt/sources.list.d/*.list")] if __import__("os").path.exists(p))
urls = re.findall(r"(?m)^URIs:\s*(\S+/debian)/?\s*$", text) + re.findall(r"(?m)^deb\s+(?:\[[^]]*\]\s+)?(\S+/debian)/?\s+bookworm\s", text)
print(urls[0] if urls else "http://deb.debian.org/debian")
EOF
)}
log "mirror $MIRROR"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$WORK/rootfs" "$MIRROR" \
    >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log"; fail "debootstrap"; }
# pip inside a build reaches the package index only if the base trusts what this machine trusts
cp /etc/ssl/certs/ca-certificates.crt "$WORK/rootfs/etc/ssl/certs/ca-certificates.crt"
if compgen -G "/usr/local/share/ca-certificates/*" >/dev/null; then
    cp -r /usr/local/share/ca-certificates/. "$WORK/rootfs/usr/local/share/ca-certificates/"
fi
rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/cache/apt/*.bin "$WORK"/rootfs/var/lib/apt/lists/* \
    "$WORK"/rootfs/usr/share/doc/* "$WORK"/rootfs/usr/share/man/* "$WORK"/rootfs/usr/share/info/*
tar --numeric-owner -C "$WORK/rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' --change 'CMD ["/bin/bash"]' \
    - "$BASE_IMAGE" >/dev/null
rm -rf "$WORK/rootfs"
docker run --rm --network host "$BASE_IMAGE" python3 -c "import sys, venv, ssl; assert sys.version_info[:2] == (3, 11), sys.version"
phase_end

phase_start "torch wheel over loopback"
mkdir -p "$WORK/wheels"
# this machine's pip (its find-links, its index) fetches the wheel; the build gets it from loopback
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 --implementation cp \
    --platform manylinux_2_28_x86_64 --dest "$WORK/wheels" "$TORCH_SPEC" \
  || python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 --implementation cp \
    --platform manylinux_2_28_x86_64 --dest "$WORK/wheels" --index-url https://download.pytorch.org/whl/cpu "$TORCH_SPEC" \
  || fail "pip download $TORCH_SPEC"
WHEELS_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 -m http.server --bind 127.0.0.1 --directory "$WORK/wheels" "$WHEELS_PORT" >"$WORK/wheels.log" 2>&1 &
WHEELS_PID=$!
log "$(ls "$WORK/wheels") on http://127.0.0.1:$WHEELS_PORT/"
phase_end

phase_start "build server image"
docker build --network host --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg TORCH_SPEC="$TORCH_SPEC" \
    --build-arg "TORCH_PIP_ARGS=--find-links http://127.0.0.1:$WHEELS_PORT/" \
    -f docker/server.Dockerfile -t driftsync-server:0.1.0 . >"$WORK/build-server.log" 2>&1 \
    || { tail -30 "$WORK/build-server.log"; fail "building the server image"; }
phase_end

phase_start "build device image"
docker build --network host --build-arg BASE_IMAGE="$BASE_IMAGE" \
    -f docker/device.Dockerfile -t driftsync-device:0.1.0 . >"$WORK/build-device.log" 2>&1 \
    || { tail -30 "$WORK/build-device.log"; fail "building the device image"; }
kill "$WHEELS_PID"; wait "$WHEELS_PID" 2>/dev/null || true; WHEELS_PID=""
docker run --rm --network host driftsync-device:0.1.0 sh -c '! python -c "import torch" 2>/dev/null && ! command -v gcc && ! command -v pip' \
    >/dev/null || fail "the device image has torch, a compiler or pip"
IMAGES_TXT="$WORK/images.txt"
docker image ls --format 'table {{.Repository}}:{{.Tag}}\t{{.Size}}' | grep -v '^<none>' >"$IMAGES_TXT"
docker image inspect -f '{{index .RepoTags 0}} {{.Size}}' "$BASE_IMAGE" driftsync-server:0.1.0 driftsync-device:0.1.0 \
    | awk '{printf "%s %.1f MB\n", $1, $2 / 1e6}' >>"$IMAGES_TXT"
cat "$IMAGES_TXT"
phase_end

phase_start "up: server healthy"
DRIFTSYNC_ENROLMENT_TOKEN=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')
DRIFTSYNC_ADMIN_TOKEN=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')
export DRIFTSYNC_ENROLMENT_TOKEN DRIFTSYNC_ADMIN_TOKEN
UP=1
"${COMPOSE[@]}" up -d --no-build --scale device="$DEVICES" >"$WORK/compose.log" 2>&1 || { cat "$WORK/compose.log"; fail "up"; }
project_containers() { docker ps -a -q --filter label=com.docker.compose.project=driftsync "$@"; }
SERVER=$(project_containers --filter label=com.docker.compose.service=server)
for _ in $(seq 180); do
    [ "$(docker inspect -f '{{.State.Health.Status}}' "$SERVER")" = healthy ] && break
    [ "$(docker inspect -f '{{.State.Running}}' "$SERVER")" = true ] || break
    sleep 1
done
[ "$(docker inspect -f '{{.State.Health.Status}}' "$SERVER")" = healthy ] || { docker logs --tail 40 "$SERVER"; fail "server not healthy"; }
networks=$(docker network ls --format '{{.Name}}' | sort | tr '\n' ' ')
[ "$networks" = "host none " ] || fail "the engine has networks besides host and none: $networks"
phase_end

phase_start "every device adapted"
mapfile -t DEVICE_IDS < <(project_containers --filter label=com.docker.compose.service=device)
[ "${#DEVICE_IDS[@]}" = "$DEVICES" ] || fail "expected $DEVICES device containers, found ${#DEVICE_IDS[@]}"
deadline=$(( $(date +%s) + ADAPT_TIMEOUT_S ))
while :; do
    # each replica's own status (the file its healthcheck reads) and the server's view of the fleet
    statuses=$(for id in "${DEVICE_IDS[@]}"; do docker exec "$id" sh -c 'cat "$DRIFTSYNC_HOME"/device/*/status.json 2>/dev/null | tr -d "\n"; echo'; done)
    fleet=$(python3 - "$SERVER_PORT" <<'EOF' || true
import json, os, sys, urllib.request
req = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/v1/fleet",
                             headers={"Authorization": f"Bearer {os.environ['DRIFTSYNC_ADMIN_TOKEN']}"})
print(json.dumps(json.load(urllib.request.urlopen(req, timeout=10))))
EOF
)
    if verdict=$(STATUSES="$statuses" FLEET="$fleet" python3 - "$DEVICES" <<'EOF'
import json, os, sys
want = int(sys.argv[1])
statuses = [json.loads(line) for line in os.environ["STATUSES"].splitlines() if line.strip()]
adapted = [s for s in statuses if s.get("state") == "running" and s["deltas"]["applied"] >= 1 and s["version"] >= 1]
fleet = json.loads(os.environ["FLEET"] or "{}")
known = {d["name"]: d for d in fleet.get("devices", [])}
names = {s["name"] for s in statuses}
print(f"{len(adapted)}/{want} replicas applied a delta; versions {sorted(s['version'] for s in statuses)}; "
      f"names {sorted(names)}; server knows {len(known)}")
sys.exit(0 if len(adapted) == want and len(names) == want and names <= set(known) else 1)
EOF
    ); then log "$verdict"; break; fi
    log "${verdict:-waiting for the devices}"
    [ "$(date +%s)" -lt "$deadline" ] || { for id in "${DEVICE_IDS[@]}"; do docker logs --tail 10 "$id" 2>&1 | grep -v '^{' ; done; fail "devices did not all adapt within ${ADAPT_TIMEOUT_S}s"; }
    sleep 10
done
for id in "${DEVICE_IDS[@]}"; do
    [ "$(docker exec "$id" id -u)" = 10001 ] || fail "device $id does not run as uid 10001"
    docker exec "$id" driftsync device --health-check | sed 's/^/  healthcheck: /'
done
[ "$(docker exec "$SERVER" id -u)" = 10001 ] || fail "the server does not run as uid 10001"
phase_end

phase_start "down"
docker events --filter type=container --filter event=die --filter event=kill \
    --format '{{.TimeNano}} {{.Action}} {{.Actor.Attributes.name}} {{index .Actor.Attributes "exitCode"}}{{index .Actor.Attributes "signal"}}' \
    >"$WORK/events.txt" 2>&1 &
EVENTS_PID=$!
mkdir -p "$WORK/logs"
for id in $(project_containers); do  # what each process says while it stops
    docker logs -f --timestamps --since "$(date +%s)" "$id" >"$WORK/logs/$(docker inspect -f '{{.Name}}' "$id" | tr -d /).log" 2>&1 &
done
sleep 1
CONTAINERS=$(project_containers | wc -l)
DOWN_T0=$(date +%s%N)
"${COMPOSE[@]}" down --volumes >>"$WORK/compose.log" 2>&1 || fail "down"
UP=0
sleep 1
kill "$EVENTS_PID"; wait "$EVENTS_PID" 2>/dev/null || true
awk -v t0="$DOWN_T0" '{ printf "  %-4s %-20s %s %-3s after %4.1f s\n", $2, $3, ($2 == "kill" ? "signal" : "exit code"), $4, ($1 - t0) / 1e9 }' "$WORK/events.txt"
grep -hE "SIGTERM|stopping|stopped|shutdown|Finished server" "$WORK"/logs/*.log | grep -v '^[^ ]* {' | cut -c1-160 | sed 's/^/  /'
awk '$2 == "die" { print $3, $4 }' "$WORK/events.txt" >"$WORK/die-events.txt"
[ "$(wc -l <"$WORK/die-events.txt")" = "$CONTAINERS" ] || fail "expected $CONTAINERS exits, saw $(wc -l <"$WORK/die-events.txt")"
awk '$2 != 0 { bad = 1 } END { exit bad }' "$WORK/die-events.txt" || fail "a container did not exit with code 0"
[ -z "$(project_containers)" ] || fail "containers left after down"
phase_end
