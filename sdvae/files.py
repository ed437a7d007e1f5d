"""Files that are never half-written, folders with one writer at a time, and full disks named as such.

A reader (a resumed run, a loader, a diffusion trainer) sees the old file or folder or the new one, never a
part of either: everything is written under a hidden temporary name, fsync'ed, then renamed into place.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = ".sdvae.lock"
STALE_PATTERNS = (".*.tmp", ".deleting-*", ".*.old")  # what a kill between our writes and renames leaves


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """File contents and folder entries to disk: a power loss after the rename cannot leave empty files."""
    for root, _, files in os.walk(folder):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(Path(root))


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)  # the rename itself survives a crash
    return path


def atomic_json(path: str | Path, value) -> Path:
    return atomic_write(path, json.dumps(value, indent=2) + "\n")


@contextlib.contextmanager
def atomic_folder(final: str | Path):
    """Yields a temporary folder beside `final`; when the block succeeds its files are synced and it replaces
    `final`. When the block fails (a full disk, a kill signal) the temporary folder is removed."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp")
    remove_tree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        fsync_tree(tmp)
        replace_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_folder(new: Path, final: Path) -> None:
    old = final.with_name(f".{final.name}.old")
    if final.exists():  # moved aside, not deleted in place: a kill mid-delete would leave a partial `final`
        remove_tree(old)
        os.replace(final, old)
    os.replace(new, final)
    fsync_path(final.parent)
    remove_tree(old)


def remove_tree(path: Path) -> None:
    """Rename to a hidden name that nothing reads, then delete: a kill mid-delete leaves only that name."""
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        path.unlink()
        return
    aside = path.with_name(f".deleting-{path.name.lstrip('.')}")
    if aside != path:
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """What killed runs left in `folder`; only safe to call while holding its lock."""
    stale = sorted({p for pattern in STALE_PATTERNS for p in Path(folder).glob(pattern)})
    for path in stale:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return stale


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC / EDQUOT, also when torch's C++ writer reports it as a short write ("unexpected pos")."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(error)
        if "No space left" in text or "Disk quota exceeded" in text or "unexpected pos" in text:
            return True
        error = error.__cause__ or error.__context__
    return False


def printable(path) -> str:
    """A file name as text that can always be printed and stored: bytes that are not UTF-8 are escaped."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def describe_error(error: BaseException) -> str:
    """One line for a skipped file's reason."""
    text = " ".join(str(error).split())
    if isinstance(error, OSError) and error.strerror:
        text = error.strerror  # not the path again: the caller names the file
    return f"{type(error).__name__}: {text}" if not isinstance(error, ValueError) or not text else text


def write_failure(error: BaseException, what: str, intact: str) -> RuntimeError:
    """One line for a failed write: what was being written, why, and what is still intact."""
    reason = "no space left on device" if is_disk_full(error) else f"{type(error).__name__}: {error}".splitlines()[0]
    return RuntimeError(f"{reason} while writing {what}; {intact}")


class FolderLocked(RuntimeError):
    pass


class FolderLock:
    """An exclusive lock on a folder for as long as one run or cache build writes into it. It is an flock: the
    OS drops it when the holder exits or is killed, so no stale lock outlives its process."""

    def __init__(self, folder: str | Path, what: str = "run"):
        self.folder, self.what, self.fd = Path(folder), what, None

    def acquire(self) -> "FolderLock":
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not O_TRUNC: the holder's details stay readable
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderLocked(f"{self.folder} is in use by another sdvae {self.what} ({self.holder()}); wait "
                               f"for it to finish or use another folder") from None
        except OSError as e:  # a file system without locks (some network mounts): run, but say what is lost
            import warnings

            warnings.warn(f"{self.folder} cannot be locked ({e}): a second {self.what} into it would not be stopped")
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        os.write(fd, json.dumps(dict(pid=os.getpid(), host=socket.gethostname(), started=started,
                                     command=" ".join(sys.argv))).encode())
        self.fd = fd
        return self

    def holder(self) -> str:
        try:
            info = json.loads((self.folder / LOCK_NAME).read_text())
            return f"pid {info['pid']} on {info['host']}, started {info['started']}"
        except (OSError, ValueError, KeyError):
            return "holder starting up"

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
