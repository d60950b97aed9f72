"""Cache entries shared by concurrent jobs: built once under a file lock, written whole.

Several jobs (the main job's parallel runs, several users of one ``paths.cache_dir``) may ask for the
same entry (reference statistics, the classifier extractor, the noise-aware classifier) at once.
:func:`load_or_build` gives every one of them the same valid entry:

- a valid entry is loaded without any lock (the common case costs nothing);
- otherwise the process takes an exclusive ``fcntl.flock`` on ``<entry>.lock``, checks again (another
  process may have built it meanwhile) and builds it only if it is still missing;
- the entry is written to a temporary file in the same folder, fsynced and renamed into place, so a
  reader sees no entry or a whole one, never a half-written file;
- while building, the lock file holds the builder's pid; a builder that dies (killed, out of memory)
  leaves that pid behind, and the kernel releases its lock, so the next process sees that the build
  was interrupted, warns, removes the dead builder's temporary files and builds the entry again.
"""
from __future__ import annotations

import fcntl
import logging
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from models.checkpoints import atomic_write  # noqa: F401  (the one atomic writer; re-exported for the caches)

log = logging.getLogger(__name__)
T = TypeVar("T")


class CacheWarning(UserWarning):
    """A cache entry was invalid or its last build was interrupted: it is rebuilt."""


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


@contextmanager
def build_lock(path: Path) -> Iterator[bool]:
    """Exclusive right to build ``path`` among processes; yields whether the previous build of it
    was interrupted (its builder died while holding the lock)."""
    lock = lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)      # waits while another process builds it
        try:
            f.seek(0)
            previous = f.read().strip()
            if previous:                           # a builder's pid left behind: it never finished
                for stale in path.parent.glob(f".{path.name}.*.tmp"):
                    stale.unlink(missing_ok=True)
            f.seek(0)
            f.truncate()
            f.write(str(os.getpid()))
            f.flush()
            try:
                yield bool(previous)
            finally:                               # finished, or failed cleanly: nothing to report
                f.seek(0)
                f.truncate()
                f.flush()
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def load_or_build(path: Path, load: Callable[[Path], T], build: Callable[[], T], save: Callable[[Path, T], None],
                  what: str) -> tuple[T, bool]:
    """(entry, built_now). ``load`` raises ValueError on an invalid file (it is then rebuilt with a
    :class:`CacheWarning`); ``save`` must write atomically (:func:`atomic_write`)."""
    if path.is_file():
        try:
            return load(path), False
        except ValueError:
            pass                                   # re-checked under the lock: maybe it is being replaced
    with build_lock(path) as interrupted:
        if path.is_file():
            try:
                return load(path), False
            except ValueError as err:
                _warn(f"{what} {path} is invalid ({err}); rebuilding it")
        elif interrupted:
            _warn(f"the last build of {what} {path} was interrupted (its process died); rebuilding it")
        value = build()
        save(path, value)
        return value, True


def _warn(message: str) -> None:
    warnings.warn(message, CacheWarning, stacklevel=3)
    log.warning(message)
