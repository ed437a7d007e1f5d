"""Files that are never half-written, folders with one writer at a time, and full disks named as such.

A reader (a resumed run, a loader, a diffusion trainer) sees the old file or folder or the new one, never a
part of either: everything is written under a hidden temporary name, fsync'ed, then renamed into place.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path

from PIL import Image

LOCK_NAME = ".sdvae.lock"
OUTPUT_RECORD = ".sdvae-output.json"  # in each folder an sdvae command writes: the command and what it wrote
STALE_PATTERNS = (".*.tmp", ".deleting-*", ".*.old")  # what a kill between our writes and renames leaves


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """File contents and folder entries to disk: a power loss after the rename cannot leave empty files. Every file
    gets the mode a plain open() gives under the user's umask: writers that make their own temporary files
    (safetensors, accelerate) leave 0600, which other users of a shared cluster cannot read."""
    mode = default_file_mode()
    for root, _, files in os.walk(folder):
        for name in files:
            os.chmod(Path(root) / name, mode)
            fsync_path(Path(root) / name)
        fsync_path(Path(root))


def default_file_mode() -> int:
    umask = os.umask(0o022)  # the only way to read it is to set it; put back at once
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")  # processes writing one file at once
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


class ForeignOutput(FileExistsError):
    """An output path holds something sdvae did not write: it is never replaced without --overwrite."""


def output_folder_is_ours(folder: Path, whole: bool) -> bool:
    """A folder sdvae may write into (whole=False) or replace (whole=True): empty, or holding our record; to be
    replaced, also nothing but what the record lists (a file added later would be lost)."""
    entries = {p.name for p in folder.iterdir()}
    if all(e == LOCK_NAME or e.startswith(f".{OUTPUT_RECORD}.") for e in entries):  # empty, or ours just starting
        return True
    if not whole and LOCK_NAME in entries:  # the lock: a run or cache of ours
        return True
    try:
        record = json.loads((folder / OUTPUT_RECORD).read_text())
        listed = set(record["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return not whole or not entries - listed - {OUTPUT_RECORD, LOCK_NAME}


def file_is_ours(path: Path) -> bool:
    """A file sdvae wrote: safetensors with sdvae's metadata (exports, latent files), a PNG it tagged."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if path.suffix == ".png":
                with Image.open(path) as image:
                    return str(image.info.get("Software", "")).startswith("sdvae")
            length = int.from_bytes(head, "little") if len(head) == 8 else 0
            if not 0 < length <= 100_000_000:
                return False
            metadata = json.loads(f.read(length)).get("__metadata__") or {}
    except Exception:  # unreadable, not safetensors, not a PNG: not something we can tell is ours
        return False
    return any(k.startswith("sdvae.") for k in metadata) or {"scaled", "source"} <= set(metadata)


def refuse_foreign_output(path: str | Path, overwrite: bool, whole: bool = True,
                          remedy: str = "choose another output or add --overwrite") -> None:
    """The one rule for every output: a path that does not exist, or that sdvae wrote itself, may be written (and
    replaced, atomically); anything else is refused with one line unless `overwrite`. whole=False: a folder that
    is written into file by file (encode, decode, eval, probe, cache-latents), whose other files stay."""
    path = Path(path)
    if overwrite or not (path.exists() or path.is_symlink()):
        return
    if path.is_dir() and not path.is_symlink():
        if output_folder_is_ours(path, whole):
            return
        what = "a folder holding files sdvae did not write" + ("" if not whole else " (it would be replaced whole)")
    elif path.is_file() and not path.is_symlink() and file_is_ours(path):
        return
    else:
        what = "a file sdvae did not write" if path.is_file() else "a link or special file"
    raise ForeignOutput(f"{printable(path)} exists and is {what}; {remedy}")


def record_output(folder: str | Path, command: str) -> None:
    """Mark `folder` as written by sdvae, listing what it holds now (what a later run may replace)."""
    folder = Path(folder)
    files = sorted(p.name for p in folder.iterdir() if p.name not in (OUTPUT_RECORD, LOCK_NAME))
    atomic_json(folder / OUTPUT_RECORD, dict(written_by="sdvae", command=command, files=files,
                                             time=time.strftime("%Y-%m-%d %H:%M:%S %Z")))


@contextlib.contextmanager
def output_folder(final: str | Path, command: str, overwrite: bool = False):
    """atomic_folder for an output a user named: refused when it holds what sdvae did not write (unless
    `overwrite`), and recorded as ours when it is written."""
    refuse_foreign_output(final, overwrite)
    with atomic_folder(final) as tmp:
        yield tmp
        record_output(tmp, command)


def prepare_output_folder(folder: str | Path, command: str, overwrite: bool = False) -> Path:
    """A folder that a command writes into file by file: refused when it holds what sdvae did not write (unless
    `overwrite`), then created and recorded as ours."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{printable(folder)} is a file; the output is a folder")
    refuse_foreign_output(folder, overwrite, whole=False)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / OUTPUT_RECORD).is_file():
        record_output(folder, command)
    return folder


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


@contextlib.contextmanager
def text_path(path: str | Path):
    """`path` as a str that native readers and writers (safetensors, onnxruntime, diffusers through them) accept:
    the path itself, or, where its bytes are not UTF-8 (which they cannot take), a temporary link with a UTF-8
    name to it."""
    path = Path(path)
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        with tempfile.TemporaryDirectory(prefix="sdvae-path-") as tmp:
            link = Path(tmp) / f"link{path.suffix if path.suffix.isascii() else ''}"
            os.symlink(os.path.abspath(path), link)
            yield str(link)
        return
    yield str(path)


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
