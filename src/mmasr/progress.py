"""Progress of long loops (training, n-best decoding, encoder caches), watchable where the user looks.

Under Snakemake or SLURM a job's stderr goes to its log file: there :class:`Progress` writes one log
line every ``MMASR_PROGRESS_SECONDS`` seconds of wall clock (default 30) and one at the end, with
position/total, the loop's own numbers (loss, learning rate), items per second, elapsed time and
ETA. In a terminal it shows a tqdm bar instead (the lines would tear it).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from tqdm import tqdm

log = logging.getLogger("mmasr.progress")

T = TypeVar("T")
DEFAULT_EVERY_S = 30.0


def progress_every_s() -> float:
    """Seconds between two progress lines: ``MMASR_PROGRESS_SECONDS`` (default 30)."""
    raw = os.environ.get("MMASR_PROGRESS_SECONDS", "")
    try:
        value = float(raw) if raw else DEFAULT_EVERY_S
    except ValueError:
        raise ValueError(f"MMASR_PROGRESS_SECONDS must be a number of seconds, got {raw!r}") from None
    return max(0.0, value)


def format_duration(seconds: float) -> str:
    """``h:mm:ss`` (``?`` when unknown)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def plural(unit: str) -> str:
    """``batch`` -> ``batches``, ``step`` -> ``steps``."""
    return unit + ("es" if unit.endswith(("s", "sh", "ch", "x")) else "s")


def format_fields(fields: dict[str, Any]) -> str:
    """``loss 2.314 lr 4.1e-04``: floats to 4 significant digits, others as they are."""
    parts = []
    for k, v in fields.items():
        if v is None:
            continue
        parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    return " ".join(parts)


class Progress:
    """Progress of one loop over ``total`` units (steps, batches) starting at ``initial`` (a resumed run).

    ``update(n, items=..., **fields)`` after each unit: ``items`` counts what the rate is about
    (utterances, pictures; default: the units), ``fields`` are shown as they are (loss, lr).
    ``bar``: show a tqdm bar when stderr is a terminal (``False``: never; the log lines are written
    either way when there is no bar). ``clock`` and ``every_s`` are for tests.
    """

    def __init__(self, total: int, desc: str, *, unit: str = "step", initial: int = 0, item_name: str | None = None,
                 bar: bool = True, every_s: float | None = None, clock: Callable[[], float] = time.monotonic,
                 terminal: bool | None = None):
        self.total, self.desc, self.unit, self.initial = int(total), desc, unit, int(initial)
        self.item_name = item_name or plural(unit)
        self.every_s = progress_every_s() if every_s is None else every_s
        self.clock = clock
        self.done, self.items, self.fields = self.initial, 0, {}
        self.t0 = self.last = clock()
        terminal = sys.stderr.isatty() if terminal is None else terminal
        self.bar = tqdm(total=self.total, initial=self.initial, desc=desc, unit=unit, mininterval=2.0) \
            if bar and terminal else None
        self.closed = False

    def update(self, n: int = 1, items: int | None = None, **fields: Any) -> None:
        self.done += n
        self.items += n if items is None else items
        self.fields = fields
        if self.bar is not None:
            self.bar.update(n)
            if fields:
                self.bar.set_postfix_str(format_fields(fields), refresh=False)
            return
        now = self.clock()
        if now - self.last >= self.every_s and self.done < self.total:
            self.last = now
            log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        """The progress line as it would be logged now."""
        now = self.clock() if now is None else now
        elapsed = now - self.t0
        run = self.done - self.initial
        rate = self.items / elapsed if elapsed > 0 else math.nan
        eta = (self.total - self.done) * elapsed / run if run > 0 else math.nan
        pct = 100.0 * self.done / self.total if self.total else 100.0
        parts = [f"{self.desc}: {self.done}/{self.total} {plural(self.unit)} ({pct:.0f}%)"]
        if self.fields:
            parts.append(format_fields(self.fields))
        parts.append(f"{rate:.3g} {self.item_name}/s" if math.isfinite(rate) else f"? {self.item_name}/s")
        parts.append(f"{format_duration(elapsed)} elapsed, ETA {format_duration(eta)}")
        return " | ".join(parts)

    def close(self) -> None:
        """End the bar, or log the final line (always, so even a short job's log says what it did)."""
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        else:
            log.info("%s", self.line())

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(iterable: Iterable[T], desc: str, *, total: int | None = None, unit: str = "batch",
          items: Callable[[T], int] | None = None, item_name: str | None = None, bar: bool = True) -> Iterator[T]:
    """``for x in track(batches, "n-best"):`` a :class:`Progress` around an iterable (``items(x)``
    counts the items of one element for the rate, e.g. the utterances of a batch)."""
    seq = iterable if total is not None else list(iterable)
    n = total if total is not None else len(seq)  # type: ignore[arg-type]
    with Progress(n, desc, unit=unit, item_name=item_name, bar=bar) as progress:
        for x in seq:
            yield x
            progress.update(1, items=items(x) if items else None)
