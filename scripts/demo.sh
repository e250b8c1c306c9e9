#!/usr/bin/env bash
# Set up a virtual environment with CPU torch and the server extra, then run the demo.
set -euo pipefail
. "$(dirname "$0")/setup.sh" server
driftsync demo "$@"
