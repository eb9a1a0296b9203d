"""Preprocessing progress: the counts that go into the report, and what a person watching sees.

On a terminal, a bar over the input's bytes on disk (compressed bytes for compressed files, so the
fraction is right for any mix of inputs) with elapsed time, ETA and MB/s, followed by documents
read, kept and tokens written::

    preprocess  42%|████▏     | 8.44MB/20.1MB [00:02<00:03, 4.12MB/s, 1,234 docs, 1,200 kept, 2.30M tokens]

Without a terminal (a batch job's log) the same figures go to the log as one line every
``LOG_SECONDS`` (60) seconds; ``enabled=False`` silences both.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter

from tqdm import tqdm

from megagpt2.corpus.cleaning import DROP_REASONS
from megagpt2.corpus.readers import InputPosition

log = logging.getLogger("preprocess_data")

LOG_SECONDS = 60.0  # without a terminal: one progress line per this many seconds

REPAIRS = ("invalid_utf8_documents", "invalid_utf8_sequences", "nul_documents", "nul_characters")


_BAR = "{desc} {percentage:3.0f}%|{bar}| {n_fmt}B/{total_fmt}B [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


def _clock(seconds: float) -> str:
    """H:MM:SS (or M:SS under an hour), as tqdm prints times."""
    return tqdm.format_interval(max(seconds, 0.0))


class Progress:
    """Documents read / kept, drops, repairs, tokens and CPU seconds, plus the bar or log lines."""

    def __init__(self, position: InputPosition, enabled: bool | None, log_seconds: float | None = None) -> None:
        self.read, self.kept, self.bytes, self.tokens = 0, 0, 0, 0
        self.dropped: Counter = Counter({reason: 0 for reason in DROP_REASONS})
        self.repairs: Counter = Counter({name: 0 for name in REPAIRS})
        self.seconds: Counter = Counter()
        self.position = position
        self.start = time.perf_counter()
        show_bar = sys.stderr.isatty() if enabled is None else enabled
        self._bar = tqdm(
            total=position.total,
            unit="B",
            unit_scale=True,
            desc="preprocess",
            bar_format=_BAR,
            disable=not show_bar,
            mininterval=1.0,
            dynamic_ncols=True,
            file=sys.stderr,
        )
        every = LOG_SECONDS if log_seconds is None else log_seconds
        self._log_seconds = every if enabled is None and not show_bar else None
        self._last_postfix = self._last_log = self.start

    def counts(self) -> str:
        return f"{self.read:,} docs, {self.kept:,} kept, {tqdm.format_sizeof(self.tokens)} tokens"

    def line(self) -> str:
        """One log line: input read of total, counts, elapsed, ETA and MB/s."""
        done, total = self.position.bytes_read, self.position.total
        elapsed = time.perf_counter() - self.start
        eta = elapsed * (total - done) / done if done else float("nan")
        share = f" ({100 * done / total:.0f}%)" if total else ""
        return (
            f"read {done / 1e6:,.1f} of {total / 1e6:,.1f} MB{share}, {self.counts()}, "
            f"elapsed {_clock(elapsed)}, ETA {_clock(eta) if eta == eta else '?'}, "
            f"{done / 1e6 / max(elapsed, 1e-9):.1f} MB/s"
        )

    def tick(self) -> None:
        """Called after each chunk is written: refresh the bar (or log a line when it is time)."""
        now = time.perf_counter()
        if not self._bar.disable:
            self._bar.update(self.position.bytes_read - self._bar.n)
            if now - self._last_postfix >= 1.0:
                self._last_postfix = now
                self._bar.set_postfix_str(self.counts(), refresh=False)
        elif self._log_seconds is not None and now - self._last_log >= self._log_seconds:
            self._last_log = now
            log.info("%s", self.line())

    def close(self) -> None:
        if not self._bar.disable:
            self._bar.update(self.position.bytes_read - self._bar.n)
            self._bar.set_postfix_str(self.counts(), refresh=False)
        self._bar.close()
