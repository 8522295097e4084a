"""Outputs of a command, written under temporary names and moved into place together.

A command that fails, or is interrupted, before :meth:`StagedOutputs.commit`
leaves every previous output as it was. The moves themselves run with SIGINT
and SIGTERM held back, so an interrupt cannot land between them; one that
arrives during the moves is dropped, since the outputs are then complete. Temporary names start with ``.alphanet-tmp-PID-``;
those of a process that no longer runs (killed mid-run) are removed by the next
command that writes into the same folder.
"""
from __future__ import annotations

import os
import shutil
import signal
import uuid
from typing import Callable

from .io import TEMPORARY_PREFIX

_HELD = {signal.SIGINT, signal.SIGTERM}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(folder: str) -> list[str]:
    """Removes the temporaries that dead ``alphanet`` processes left in ``folder``; returns their names."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(TEMPORARY_PREFIX):
            continue
        pid = name[len(TEMPORARY_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        path = os.path.join(folder, name)
        try:
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
            removed.append(name)
        except OSError:
            pass
    return removed


def _temporary_beside(path: str) -> str:
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f"{TEMPORARY_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}-{name}")


class StagedOutputs:
    """Hands out temporary paths for a command's outputs; :meth:`commit` moves them all into place."""

    def __init__(self) -> None:
        self.files: list[tuple[str, str]] = []    # (temporary, final)
        self.folders: list[tuple[str, str]] = []

    def file(self, path: str) -> str:
        """Where to write the file that will become ``path`` (same folder, same extension)."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        remove_stale(os.path.dirname(os.path.abspath(path)))
        temporary = _temporary_beside(path)
        self.files.append((temporary, path))
        return temporary

    def folder(self, path: str) -> str:
        """A temporary folder whose files will be moved into folder ``path`` (which keeps its other files)."""
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        remove_stale(parent)
        if os.path.isdir(path):
            remove_stale(path)
        temporary = _temporary_beside(path)
        os.makedirs(temporary)
        self.folders.append((temporary, path))
        return temporary

    def commit(self, moving: Callable[[], None] | None = None) -> None:
        """Moves every staged output into place, with SIGINT and SIGTERM held off until done
        (``moving`` runs first, with them held off: a test hook). Python handlers, not a
        signal mask: a process-directed signal may be taken by any of torch's threads."""
        arrived: list[int] = []
        previous = {signum: signal.signal(signum, lambda number, frame: arrived.append(number)) for signum in _HELD}
        try:
            if moving is not None:
                moving()
            for temporary, final in self.folders:
                os.makedirs(final, exist_ok=True)
                for name in sorted(os.listdir(temporary)):
                    os.replace(os.path.join(temporary, name), os.path.join(final, name))
                os.rmdir(temporary)
            for temporary, final in self.files:
                os.replace(temporary, final)
            self.files, self.folders = [], []
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def discard(self) -> None:
        for temporary, _ in self.files:
            if os.path.exists(temporary):
                os.unlink(temporary)
        for temporary, _ in self.folders:
            shutil.rmtree(temporary, ignore_errors=True)
        self.files, self.folders = [], []

    def __enter__(self) -> "StagedOutputs":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()
