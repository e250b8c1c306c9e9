"""Configuration: CLI flags whose defaults come from DRIFTSYNC_* environment variables.

Every flag is checked when it is parsed (types below raise argparse.ArgumentTypeError with a
sentence a user can act on), and `Parser` reports any parse error as one line.
"""
from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn

Kind = Callable[[str], Any]


def home() -> Path:
    """Where retrained models and caches live (DRIFTSYNC_HOME)."""
    return Path(os.environ.get("DRIFTSYNC_HOME", Path.home() / ".cache" / "driftsync")).expanduser()


def env_name(flag: str) -> str:
    return "DRIFTSYNC_" + flag.lstrip("-").replace("-", "_").upper()


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (the usage is in --help)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        kw.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)  # keep the examples' lines
        super().__init__(*args, **kw)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false, yes/no, 1/0), got {text!r}")


def optional(kind: Kind) -> Kind:
    """'none' or '' means unset, so env vars can switch a limit off."""

    def convert(text: str) -> Any:
        return None if text.strip().lower() in {"", "none", "off"} else kind(text)

    convert.__name__ = getattr(kind, "__name__", "value")
    if hasattr(kind, "metavar"):
        convert.metavar = kind.metavar  # type: ignore[attr-defined]
    return convert


def auto_or(kind: Kind) -> Kind:
    """'auto' means None: the program decides, per case, by a rule its docs name."""

    def convert(text: str) -> Any:
        return None if text.strip().lower() == "auto" else kind(text)

    convert.__name__ = getattr(kind, "__name__", "value")
    convert.metavar = f"auto|{getattr(kind, 'metavar', None) or 'N'}"  # type: ignore[attr-defined]
    return convert


def _number(kind: type, text: str) -> Any:
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a finite number'}, got {text!r}")
    return value


def bounded(kind: type, low: float | None = None, high: float | None = None, *, above: bool = False) -> Kind:
    """An int or float in [low, high] (or (low, high] with above=True); either bound may be open."""
    lo = "" if low is None else f"{'>' if above else '>='} {low}"
    hi = "" if high is None else f"<= {high}"
    rule = f"from {low} to {high}" if lo and hi and not above else " and ".join(x for x in (lo, hi) if x)

    def convert(text: str) -> Any:
        value = _number(kind, text)
        if (low is not None and (value <= low if above else value < low)) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
        return value

    convert.__name__ = kind.__name__
    return convert


def choice(*names: str) -> Kind:
    """One of names (case-sensitive), checked for env defaults too (argparse's choices= skips defaults)."""

    def convert(text: str) -> str:
        if text not in names:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(names)}; got {text!r}")
        return text

    convert.metavar = "{" + ",".join(names) + "}"  # type: ignore[attr-defined]
    return convert


def checked(validate: Callable[[str], Any], metavar: str | None = None) -> Kind:
    """Keep the text, but only once validate(text) accepts it (its ValueError becomes the message)."""

    def convert(text: str) -> str:
        try:
            validate(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    if metavar:
        convert.metavar = metavar  # type: ignore[attr-defined]
    return convert


def comma_list(allowed: Callable[[], Iterable[str]]) -> Kind:
    """A non-empty comma list whose items are all in allowed() (called lazily: it may import torch)."""

    def validate(text: str) -> None:
        items = [s.strip() for s in text.split(",") if s.strip()]
        names = list(allowed())
        unknown = [s for s in items if s not in names]
        if not items or unknown:
            raise ValueError(f"unknown {', '.join(map(repr, unknown)) or 'empty list'}; choose from {', '.join(names)}")

    return checked(validate)


def _url(text: str) -> None:
    scheme, _, rest = text.partition("://")
    if scheme not in ("http", "https") or not rest:
        raise ValueError(f"expected an http:// or https:// URL, got {text!r}")


def _existing_file(text: str) -> None:
    if not Path(text).is_file():
        raise ValueError(f"{text} is not a file")


def _urls(text: str) -> None:
    for url in text.split(","):
        _url(url.strip())


URL = checked(_url, "URL")
URLS = checked(_urls, "URL[,URL...]")
FILE = checked(_existing_file, "FILE")
PORT = bounded(int, 0, 65535)
POSITIVE_INT = bounded(int, 1)
NONNEGATIVE_INT = bounded(int, 0)
POSITIVE = bounded(float, 0.0, above=True)
NONNEGATIVE = bounded(float, 0.0)
FRACTION = bounded(float, 0.0, 1.0)
SEVERITY = bounded(int, 1, 5)


def log_level(text: str) -> str:
    """A logging level name, any case."""
    return choice("debug", "info", "warning", "error")(text.lower()).upper()


log_level.metavar = "{debug,info,warning,error}"  # type: ignore[attr-defined]


def _shown(default: Any) -> str:
    """A default as a user would type it: yes/no for switches, none for unset."""
    if isinstance(default, bool):
        return "yes" if default else "no"
    return "none" if default is None else str(default)


class _Switch(argparse.BooleanOptionalAction):
    """--flag/--no-flag; a string default (the env variable's text) is parsed like any flag's default."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        help_text = kw.get("help")
        super().__init__(*args, **kw)
        self.help = help_text  # add() states the default itself
        self.type = parse_bool


def add(parser: argparse.ArgumentParser, flag: str, default: Any, kind: Kind = str, help: str = "",
        *, secret: bool = False, **kw: Any) -> None:
    """A flag whose default is read from its DRIFTSYNC_* variable, and says so in --help
    (a secret's value never: only whether it is set).

    The variable's text is handed to argparse as the default, which converts it only for the
    subcommand actually run: `DRIFTSYNC_FPS=none` is valid for `device` and must not break
    another subcommand whose `--fps` has another type. kind=bool makes a --flag/--no-flag switch;
    required=True is satisfied by the variable too.
    """
    env = env_name(flag)
    if env in os.environ:
        default = os.environ[env]
        kw["required"] = False
    if kw.get("required"):
        shown = "required"
    elif secret:
        shown = "default set, hidden" if default is not None else "default unset"
    else:
        shown = f"default {_shown(default)}"
    help = f"{help} [env {env}; {shown}]"
    if kind is bool:
        parser.add_argument(flag, action=_Switch, default=default, help=help, **kw)
        return
    kw.setdefault("metavar", getattr(kind, "metavar", None))
    parser.add_argument(flag, type=kind, default=default, help=help, **kw)
