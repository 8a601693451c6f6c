"""Atomic outputs: write under a temporary name, fsync, rename; a completeness marker last.

A crash at any point leaves either the previous good output or the new one, never a mix:

    with atomic_file(path) as tmp:        # one file
        tmp.write_bytes(...)
    with atomic_dir(partition) as tmp:    # a directory of files, swapped in whole
        write_parts(tmp)

Readers check `is_complete(dir)` (the `_SUCCESS` marker) before trusting a directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MARKER = "_SUCCESS"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_file(path: Path | str) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync it and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path | str, obj: Any) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    return Path(path)


def recover(path: Path) -> None:
    """Undo a swap that a crash interrupted: put the previous good directory back."""
    backup = path.with_name(f".{path.name}.old")
    if backup.exists():
        if not path.exists():
            os.replace(backup, path)
        else:
            shutil.rmtree(backup)


@contextlib.contextmanager
def atomic_dir(path: Path | str, marker: bool = True) -> Iterator[Path]:
    """Yield an empty temp directory; on success mark it complete and swap it in for `path`.

    The swap is two renames (old -> .old, new -> path); `recover()` (run on entry) finishes
    or undoes one that a crash cut short, so `path` is always a complete directory or absent.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync_file(f)
        if marker:
            (tmp / MARKER).write_text("")
            _fsync_file(tmp / MARKER)
        _fsync_dir(tmp)
        backup = path.with_name(f".{path.name}.old")
        if path.exists():
            os.replace(path, backup)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        shutil.rmtree(backup, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_complete(path: Path | str) -> bool:
    return (Path(path) / MARKER).is_file()


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tree_hash(files: dict[str, str]) -> str:
    """One hash for a set of files given as {relative name: sha256}."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}\0{files[name]}\n".encode())
    return h.hexdigest()


class Busy(Exception):
    """Another process holds a lock this one would not wait for."""


@contextlib.contextmanager
def file_lock(path: Path, wait: bool = True, what: str = "") -> Iterator[None]:
    """An exclusive lock between processes on this machine (fcntl on `path`, created if missing; the
    kernel releases it if the holder dies). wait False: raise Busy at once when another process holds
    it. A process must not take the same lock twice (the second waits forever)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise Busy(f"{what or path} is held by another process ({path})") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
