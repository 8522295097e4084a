"""Progress bars: tqdm on a terminal or in a notebook, silent elsewhere."""
from __future__ import annotations

import os
import sys


class NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def wanted(progress: bool) -> bool:
    """Bars are shown when asked for and stderr is a terminal or a Jupyter kernel runs us."""
    return progress and (os.isatty(2) or "ipykernel" in sys.modules)


def bar(enabled: bool, **kwargs):
    """A tqdm progress bar, or a silent stand-in when disabled or tqdm is missing."""
    if not enabled:
        return NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return NoBar()
    return tqdm(**kwargs)
