"""The progress bar of ``gpuadam bench``: ``timing`` advances it, ``suite`` makes it."""

from __future__ import annotations

import sys
from typing import Any


class Progress:
    """A progress bar on stderr, only when stderr is a terminal (a log or a pipe gets no ``\\r``
    updates): tqdm when installed, else one rewritten line. Its label names what runs now."""

    def __init__(self, total: int, enabled: bool = True, stream: Any = None) -> None:
        self.stream = sys.stderr if stream is None else stream
        isatty = getattr(self.stream, "isatty", None)
        enabled = enabled and callable(isatty) and bool(isatty())
        self.total, self.done, self.enabled, self.bar, self._text = total, 0, enabled, None, ""
        if enabled:
            try:
                from tqdm import tqdm

                fmt = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]{postfix}"
                self.bar = tqdm(total=total, desc="gpuadam bench", file=self.stream, leave=False, bar_format=fmt)
            except ImportError:
                pass

    def note(self, text: str) -> None:
        """Show ``text`` as what runs now (before it runs: a label after the fact misleads)."""
        self._text = text
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(text[:60], refresh=True)
        else:
            self._line()

    def advance(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
        else:
            self._line()

    def _line(self) -> None:
        pct = 100 * self.done // max(1, self.total)
        print(f"\rgpuadam bench: {pct:3d}% ({self.done}/{self.total}) {self._text[:60]:60s}",
              end="", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=self.stream)
