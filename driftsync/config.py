"""Configuration: CLI flags whose defaults come from DRIFTSYNC_* environment variables."""
from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def home() -> Path:
    """Where trained default models and caches live (DRIFTSYNC_HOME)."""
    return Path(os.environ.get("DRIFTSYNC_HOME", Path.home() / ".cache" / "driftsync")).expanduser()


def env_name(flag: str) -> str:
    return "DRIFTSYNC_" + flag.lstrip("-").replace("-", "_").upper()


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def optional(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """'none' or '' means unset, so env vars can switch a limit off."""

    def convert(text: str) -> Any:
        return None if text.strip().lower() in {"", "none", "off"} else kind(text)

    return convert


def add(parser: argparse.ArgumentParser, flag: str, default: Any, kind: Callable[[str], Any] = str, help: str = "",
        *, secret: bool = False, **kw: Any) -> None:
    """A flag whose default is read from its DRIFTSYNC_* variable, and says so in --help
    (a secret's value never: only whether it is set).

    The variable's text is handed to argparse as the default, which converts it only for the
    subcommand actually run: `DRIFTSYNC_FPS=none` is valid for `device` and must not break
    another subcommand whose `--fps` has another type.
    """
    env = env_name(flag)
    if env in os.environ:
        default = os.environ[env]
    shown = ("set, hidden" if default is not None else "unset") if secret else default
    parser.add_argument(flag, type=kind, default=default, help=f"{help} [env {env}; default {shown}]", **kw)
