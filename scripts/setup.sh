#!/usr/bin/env bash
# Create .venv with CPU torch and driftsync installed with the given extra (server or dev).
# Sourced by demo.sh and test.sh.
set -euo pipefail
extra="${1:?usage: setup.sh server|dev}"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[${extra}]"
