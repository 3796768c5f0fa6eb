"""Progress bars where the driver's output is a terminal, on top of the plain progress lines every run prints.

A bar is Ray's distributed tqdm (``ray.experimental.tqdm_ray``): the driver draws it whichever process of the
cluster advances it (a training stage's rank 0, or the driver itself), and hides it while other lines print.
Where the driver's output is a file or a pipe (``ray job logs``, CI, ``make demo``) there are no bars, only the
lines. ``LORI_PROGRESS=plain`` turns the bars off on a terminal too.
"""

from __future__ import annotations

import os
import sys


def bars_wanted(stream=None) -> bool:
    """Whether this driver draws bars: its stdout (or ``stream``) is a terminal. Decided in the driver and sent
    with the work (a Ray worker's output is never a terminal)."""
    stream = sys.stdout if stream is None else stream
    return os.environ.get("LORI_PROGRESS", "auto") != "plain" and stream.isatty()


class NoBar:
    """The bar where none is drawn: the same calls, doing nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(shown: bool, desc: str, total: int, unit: str, done: int = 0):
    """A bar over ``total`` ``unit``s of which ``done`` are done already (a resumed stage), or ``NoBar``."""
    if not shown:
        return NoBar()
    from ray.experimental.tqdm_ray import tqdm  # Ray's, where a bar is drawn (bars_wanted runs before Ray starts)
    bar = tqdm(desc=desc, total=total, unit=unit)
    bar.n = done
    bar.refresh()  # drawn now, so that its rate counts from the start of the work, not from its first update
    return bar
