#!/usr/bin/env bash
# Make a virtual environment with torch 2.13.0 (CPU build unless an NVIDIA GPU is present) and
# driftsync installed editable with the given extra (server or dev), then activate it.
# Sourced by demo.sh and test.sh. Reinstalls nothing that is current; prints one line per step it
# actually runs. The venv is $DRIFTSYNC_VENV (default .venv, relative to the repository root).
set -euo pipefail
extra="${1:?usage: setup.sh server|dev}"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv="${DRIFTSYNC_VENV:-.venv}"
torch_version=2.13.0
pip_opts=(--disable-pip-version-check -q)
[ -t 1 ] && pip_opts=(--disable-pip-version-check --progress-bar on)  # a terminal sees download rate and ETA

if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating the virtual environment $venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --disable-pip-version-check -q --upgrade pip
fi
. "$venv/bin/activate"

if ! python -c "import sys, importlib.metadata as m; sys.exit(m.version('torch').split('+')[0] != '$torch_version')" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found: installing torch $torch_version with CUDA from the default index"
    python -m pip install "${pip_opts[@]}" "torch==$torch_version"
  else
    echo "setup: no GPU: installing the CPU build of torch $torch_version"
    if ! python -m pip install "${pip_opts[@]}" --timeout 10 --retries 0 \
        --index-url https://download.pytorch.org/whl/cpu "torch==$torch_version" 2>/dev/null; then
      echo "setup: the CPU wheel index (download.pytorch.org/whl/cpu) failed; installing torch from the default index"
      python -m pip install "${pip_opts[@]}" "torch==$torch_version"
    fi
  fi
fi

# The editable install is current when pyproject.toml has not changed since it ran for this extra
# (dev includes server).
stamp="$venv/.driftsync-install"
want="$(python -c "import hashlib; print(hashlib.sha256(open('pyproject.toml', 'rb').read()).hexdigest())")"
if ! grep -qx "$want $extra" "$stamp" 2>/dev/null && ! grep -qx "$want dev" "$stamp" 2>/dev/null; then
  echo "setup: installing driftsync[$extra] (editable)"
  python -m pip install "${pip_opts[@]}" -e ".[$extra]"
  { grep "^$want " "$stamp" 2>/dev/null || true; echo "$want $extra"; } | sort -u > "$stamp.tmp"
  mv "$stamp.tmp" "$stamp"
fi
