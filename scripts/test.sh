#!/usr/bin/env bash
# Set up a virtual environment with CPU torch and the dev extra, then run the test suite.
set -euo pipefail
. "$(dirname "$0")/setup.sh" dev
python -m pytest "$@"
