"""The web demo's folder of inversions and edit downloads, kept under a size bound.

An *entry* is what one request wrote: an inversion (``<key>.*`` files in the folder, the key being 24
hex digits) or one edit's downloads (the folder ``edits/<id>/``); an atomic write's temporary
(``.<key>.<suffix>.<random>.tmp``) belongs to the entry it is being written for. An entry's last use is
the newest modification time of its files, which ``touch`` renews, so the order survives a restart,
and a server started with a smaller bound trims the folder before it serves. ``make_room`` removes the
least recently used entries until the folder is under its bound, skipping every entry a request or a
session holds (``pin``); other files in the folder are never touched.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

_INVERSION_FILE = re.compile(r"^\.?([0-9a-f]{24})\.")
EDITS = "edits"


@dataclass
class Entry:
    name: str  # the key of an inversion, or "edits/<id>"
    paths: list[Path]
    size: int  # bytes
    last_used: float  # newest modification time of its files


class BoundedCache:
    def __init__(self, root: Path, max_bytes: int):
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self._pins: dict[str, int] = {}
        self._lock = threading.Lock()
        self.total = 0  # the folder's bytes after the last make_room (what it found, less what it removed)

    # ------------------------------------------------------------------ what is there
    def entries(self) -> dict[str, Entry]:
        found: dict[str, Entry] = {}

        def add(name: str, path: Path) -> None:
            try:
                stat = path.stat()
            except FileNotFoundError:  # removed meanwhile
                return
            entry = found.setdefault(name, Entry(name, [], 0, 0.0))
            entry.paths.append(path)
            entry.size += 0 if path.is_dir() else stat.st_size  # the bytes of files, as ``du --apparent-size``
            entry.last_used = max(entry.last_used, stat.st_mtime)

        if self.root.is_dir():
            for path in self.root.iterdir():
                match = _INVERSION_FILE.match(path.name)
                if match and path.is_file():
                    add(match.group(1), path)
        edits = self.root / EDITS
        if edits.is_dir():
            for folder in edits.iterdir():
                if folder.is_dir() and not folder.is_symlink():
                    name = f"{EDITS}/{folder.name}"
                    add(name, folder)
                    for path in folder.iterdir():
                        if path.is_file():
                            add(name, path)
        return found

    def size(self) -> int:
        return sum(entry.size for entry in self.entries().values())

    # ------------------------------------------------------------------ use
    def pin(self, name: str) -> None:
        with self._lock:
            self._pins[name] = self._pins.get(name, 0) + 1

    def unpin(self, name: str) -> None:
        with self._lock:
            count = self._pins.get(name, 0) - 1
            if count > 0:
                self._pins[name] = count
            else:
                self._pins.pop(name, None)

    def touch(self, name: str) -> None:
        """Mark the entry as used now (its newest file's time is its last use)."""
        entry = self.entries().get(name)
        if entry:
            now = time.time()
            for path in entry.paths:
                try:
                    os.utime(path, (now, now))
                except OSError:
                    pass

    # ------------------------------------------------------------------ the bound
    def make_room(self, extra_bytes: int = 0, room_for: str | None = None) -> list[str]:
        """Remove least recently used entries no one holds until the folder plus ``extra_bytes`` fits the
        bound; returns the names removed and leaves the folder's size in ``total``. Entries in use stay, even
        if the bound cannot then be met. ``room_for``: an entry about to be written; room is made for the
        largest entry of its kind (inversions or edit downloads) on top of ``extra_bytes``. One walk of the
        folder."""
        removed = []
        with self._lock:
            entries = sorted(self.entries().values(), key=lambda e: e.last_used)
            if room_for is not None:
                extra_bytes += max((e.size for e in entries if _is_edit(e.name) == _is_edit(room_for)), default=0)
            total = sum(e.size for e in entries) + extra_bytes
            for entry in entries:
                if total <= self.max_bytes:
                    break
                if entry.name in self._pins:
                    continue
                self._remove(entry)
                total -= entry.size
                removed.append(entry.name)
            self.total = total - extra_bytes
        return removed

    def fits(self) -> bool:
        return self.size() <= self.max_bytes

    def remove(self, name: str) -> None:
        """Remove one entry (a failed request's partial files)."""
        entry = self.entries().get(name)
        if entry is not None:
            self._remove(entry)

    def _remove(self, entry: Entry) -> None:
        # An inversion's record goes first: without it the entry no longer counts as finished.
        for path in sorted(entry.paths, key=lambda p: not p.name.endswith(".demo.json")):
            try:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            except OSError:
                pass


def _is_edit(name: str) -> bool:
    return name.startswith(EDITS)


def megabytes(value: float) -> int:
    """``--cache_max_mb`` in bytes (a positive, finite number of MB)."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise UserError(f"--cache_max_mb must be a positive number of megabytes, not {value!r}.")
    return int(value * 1024 * 1024)
