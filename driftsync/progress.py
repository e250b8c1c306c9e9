"""Progress bars: one style for every step that takes more than a few seconds.

tqdm on stderr shows the count, rate and ETA on one line that updates in place; when stderr is
not a terminal (a log file, CI), it redraws rarely so the log stays short.
"""
from __future__ import annotations

import sys

from tqdm import tqdm


def bar(total: int | None, desc: str, unit: str = "frame") -> tqdm:
    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, mininterval=0.5 if tty else 10.0,
                ascii=not tty, file=sys.stderr)
