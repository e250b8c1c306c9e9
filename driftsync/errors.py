"""Expected failures: the CLI prints them as one line and exits non-zero, without a traceback."""
from __future__ import annotations


class UserError(Exception):
    """Something the user can fix (a bad value, an unreachable server, a missing file); the message says how."""
