#!/usr/bin/env bash
# Set up a virtual environment with CPU torch and the server extra, then run the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[server]"
driftsync demo "$@"
