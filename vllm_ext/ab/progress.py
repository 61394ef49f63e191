"""What the A/B harness is doing, for whoever watches it: a line as each slow phase
starts (a server starting, the equivalence prompts, a capacity search) and, during a
replay, a live bar on a terminal or, in a log or a pipe, a plain line every ~10 s and
one at the end:

    [sarathi] seed 0 (1/2): 12/16 requests done, 534 tokens, 41 s elapsed

Everything goes to stderr (stdout keeps the results); `Progress(enabled=False)`
(--no-progress) says nothing."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

LINE_EVERY_S = 10.0  # a log gets a line this often: enough to see it move, few enough to read
TICK_S = 0.5  # how often a replay's counts are looked at (and a terminal's bar redrawn)


class Progress:
    """The reporter: `phase(text)` for a one-line step, `replay(desc, total)` for a
    replay's counts. On a terminal unless told otherwise (`tty`)."""

    def __init__(self, enabled: bool = True, stream: TextIO | None = None, tty: bool | None = None,
                 every_s: float = LINE_EVERY_S, clock: Callable[[], float] = time.monotonic,
                 tick_s: float | None = TICK_S) -> None:
        self.enabled = enabled
        self._stream = stream  # None: sys.stderr as it is when written to
        self._tty = tty
        self.every_s = every_s
        self.clock = clock
        self.tick_s = tick_s  # None: no ticker thread; the caller calls tick() itself

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    @property
    def tty(self) -> bool:
        return self._tty if self._tty is not None else self.stream.isatty()

    def write(self, line: str) -> None:
        if self.enabled:
            print(line, file=self.stream, flush=True)

    def phase(self, text: str) -> None:
        """A step that takes a while and shows nothing else, as it starts."""
        self.write(text)

    def replay(self, desc: str, total: int) -> "ReplayProgress":
        return ReplayProgress(self, desc, total)


class ReplayProgress:
    """`with progress.replay(desc, n) as p:` the replay counts into `p.tokens(k)` and
    `p.request_done()`; a ticker thread shows the counts (the bar redrawn, or a line when
    one is due) and `__exit__` once more at the end. The counting side does no I/O: it
    runs in the event loop that timestamps the tokens."""

    def __init__(self, progress: Progress, desc: str, total: int) -> None:
        self.progress, self.desc, self.total = progress, desc, total
        self.done = self.received = 0
        self.started = self._shown = progress.clock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._bar = None
        if progress.enabled and progress.tty:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="req", leave=False, dynamic_ncols=True,
                             file=progress.stream)
        else:
            progress.phase(f"{desc}: replaying {total} requests")

    def tokens(self, k: int) -> None:
        self.received += k

    def request_done(self, *_) -> None:
        self.done += 1

    def line(self) -> str:
        elapsed = self.progress.clock() - self.started
        return (f"{self.desc}: {self.done}/{self.total} requests done, {self.received} tokens, "
                f"{elapsed:.0f} s elapsed")

    def tick(self, final: bool = False) -> None:
        """Show the counts: the bar at every tick, a line when one is due or at the end."""
        now = self.progress.clock()
        if self._bar is not None:
            self._bar.n = self.done
            self._bar.set_postfix_str(f"{self.received} tokens")  # redraws
        elif final or now - self._shown >= self.progress.every_s:
            self.progress.write(self.line())
            self._shown = now

    def _tick_until_stopped(self) -> None:
        while not self._stop.wait(self.progress.tick_s):
            self.tick()

    def __enter__(self) -> "ReplayProgress":
        if self.progress.enabled and self.progress.tick_s:
            self._ticker = threading.Thread(target=self._tick_until_stopped, name="ab-progress",
                                            daemon=True)
            self._ticker.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        self.tick(final=True)
        if self._bar is not None:
            self._bar.close()
