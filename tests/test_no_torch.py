"""The device side must run where torch cannot be installed."""
from __future__ import annotations

import os
import subprocess
import sys

# torch, and the server extra's other packages: `pip install driftsync[device]` has none of them
BLOCK_TORCH = "import sys\nfor m in ('torch', 'fastapi', 'uvicorn', 'onnx', 'yaml'): sys.modules[m] = None\n"


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + code], capture_output=True, text=True, timeout=120)


def test_device_package_imports_without_torch():
    result = _run(
        "import device_client, device_client.client, device_client.replay, device_client.runtime\n"
        "import device_client.daemon, device_client.sources, device_client.sinks, device_client.status\n"
        "import device_client.spool, driftsync.data.loaders\n"
        "import shared.protocol, shared.codec, driftsync.data.streams\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "print('ok')"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_device_help_runs_without_torch():
    result = _run("from driftsync.cli import main\nmain(['device', '--help'])")
    assert result.returncode == 0, result.stderr
    assert "--server" in result.stdout and "DRIFTSYNC_SERVER" in result.stdout


def test_blocking_really_blocks_torch():
    result = _run("import torch")
    assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr or "ImportError" in result.stderr


def test_an_env_var_meant_for_one_subcommand_does_not_break_another():
    """DRIFTSYNC_FPS=none is valid for `device` (as fast as possible); `loadtest` has a float --fps."""
    env = dict(os.environ, DRIFTSYNC_FPS="none", DRIFTSYNC_REPEAT="true")
    out = subprocess.run([sys.executable, "-m", "driftsync", "device", "--help"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    parsed = subprocess.run([sys.executable, "-c", "from driftsync.cli import main; import sys; "
                             "sys.argv=['driftsync']; main(['export', '--help'])"], capture_output=True, text=True,
                            timeout=120, env=env)
    assert parsed.returncode == 0, parsed.stderr


def test_api_replica_imports_without_torch():
    """`driftsync serve --role api` needs fastapi and uvicorn but neither torch nor onnx."""
    result = subprocess.run([sys.executable, "-c", (
        "import sys\nfor m in ('torch', 'onnx'): sys.modules[m] = None\n"
        "import server.api_role, server.app, server.broker_redis, server.store, server.store_postgres\n"
        "from driftsync.cli import main\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "print('ok')")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
