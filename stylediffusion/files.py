"""Writing files so that a fault never leaves a half-written file or a stray temporary behind.

``atomic_write`` is the one way the project writes a result file: into a temporary file in the same
folder, then renamed over the final name (atomic on POSIX), the temporary removed on any failure.
A file-system fault (disk full, read-only folder, a folder where a file should be...) becomes a
``UserError`` naming the path, so the CLIs answer with one line; the previous version of the file,
e.g. the last good partial inversion, stays as it was.
"""
from __future__ import annotations

import csv
import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import UserError

# errno values that mean "the file system refused", not "the program is wrong".
FILESYSTEM_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EISDIR,
                     errno.ENOTDIR, errno.EEXIST, errno.EFBIG, errno.ENAMETOOLONG, errno.EIO, errno.ELOOP}
_WHY = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
        errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
        errno.EPERM: "permission denied", errno.EISDIR: "a folder is in the way",
        errno.ENOTDIR: "a file is in the way of a folder", errno.EEXIST: "a file is in the way of a folder",
        errno.EFBIG: "the file is too large for the file system", errno.ENAMETOOLONG: "the name is too long",
        errno.EIO: "input/output error", errno.ELOOP: "too many symbolic links"}


def filesystem_error(err: OSError, path: str | Path | None = None, action: str = "write") -> UserError:
    """The one-line UserError for a file-system fault while ``action``-ing ``path``."""
    where = path if path is not None else (err.filename or "a file")
    why = _WHY.get(err.errno, err.strerror or type(err).__name__)
    return UserError(f"cannot {action} '{where}': {why} ({os.strerror(err.errno) if err.errno else err}).")


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` to fill a temporary file next to ``path``, then rename it to ``path``."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
        write(tmp)
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        raise filesystem_error(err, path) from err
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def writable_folder(folder: str | Path, what: str) -> Path:
    """Refuse, before any work, a folder that cannot be created or written: a file in its place or in
    the place of one of its parents, or a read-only/unwritable nearest existing ancestor."""
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        if probe.is_symlink():  # a dangling link: mkdir would fail on it
            raise UserError(f"{what} '{folder}': '{probe}' is a broken symbolic link.")
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "is a file" if probe == folder else f"lies under '{probe}', which is a file"
        raise UserError(f"{what} '{folder}' {where}: pass a folder.")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{what} '{folder}' cannot be written: '{probe}' is read-only for this user.")
    if probe.exists():
        try:
            if os.statvfs(probe).f_flag & os.ST_RDONLY:
                raise UserError(f"{what} '{folder}' cannot be written: '{probe}' is on a read-only file system.")
        except (AttributeError, OSError):  # no statvfs here: the write itself will say so
            pass
    return folder


def writable_file(path: str | Path, what: str) -> Path:
    """A file path the run may create or replace: not a folder, in a writable folder."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} '{path}' is a folder: pass a file name (e.g. '{path / 'inversion.safetensors'}').")
    writable_folder(path.parent if str(path.parent) else Path("."), f"the folder of {what}")
    return path


def append_csv_rows(path: str | Path, columns: list[str], rows: list[dict]) -> None:
    """Append result rows to a resumable log (the header when the file is new), flushed: an interrupted
    run loses at most the rows not yet appended."""
    path = Path(path)
    new = not path.is_file()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        if new:
            writer.writeheader()
        writer.writerows(rows)
        f.flush()
