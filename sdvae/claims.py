"""Units of work shared through a folder: whoever creates `claims/<unit>.json` first does the unit.

Every process that works on one output (torchrun ranks, a Slurm array, several machines on one shared file
system) goes through the same list of units and claims each one before doing it, so no scheduler is needed: a
claim is a file created with O_EXCL, which one process wins. The holder touches its claim while it works; a
claim whose holder is gone (its pid is dead on this host, or it has not been touched for `timeout` seconds) is
broken by renaming it aside, which again one process wins, and the unit is claimed afresh.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

HEARTBEAT_SECONDS = 30


class Claims:
    def __init__(self, folder: str | Path, timeout: float = 600.0):
        self.folder, self.timeout = Path(folder), timeout
        self.folder.mkdir(parents=True, exist_ok=True)
        self.held: set[str] = set()
        self._stop = threading.Event()
        self._beat = None

    def path(self, unit: str) -> Path:
        return self.folder / f"{unit}.json"

    def claim(self, unit: str) -> bool:
        """True when this process now holds `unit`; False when a live process does."""
        for _ in range(3):  # a broken stale claim may be re-taken by another process first
            try:
                fd = os.open(self.path(unit), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._break_if_stale(unit):
                    return False
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(dict(host=socket.gethostname(), pid=os.getpid(), started=time.time()), f)
            self.held.add(unit)
            return True
        return False

    def release(self, unit: str) -> None:
        self.held.discard(unit)
        self.path(unit).unlink(missing_ok=True)

    def holder(self, unit: str) -> dict | None:
        try:
            return json.loads(self.path(unit).read_text())
        except (OSError, ValueError):
            return None

    def _break_if_stale(self, unit: str) -> bool:
        path = self.path(unit)
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return True  # released meanwhile: try again
        info = self.holder(unit)
        dead_here = (info is not None and info.get("host") == socket.gethostname()
                     and not _pid_alive(int(info.get("pid", -1))))
        if not (dead_here or age > self.timeout or info is None and age > HEARTBEAT_SECONDS):
            return False
        try:
            os.rename(path, self.folder / f".stale-{unit}-{uuid.uuid4().hex[:8]}")  # one breaker wins
        except FileNotFoundError:
            return True
        for stale in self.folder.glob(f".stale-{unit}-*"):
            stale.unlink(missing_ok=True)
        return True

    def __enter__(self) -> "Claims":
        self._beat = threading.Thread(target=self._heartbeat, daemon=True)
        self._beat.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for unit in list(self.held):  # a claim left by an error would only delay the next run
            self.release(unit)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            for unit in list(self.held):
                try:
                    os.utime(self.path(unit))
                except OSError:
                    pass


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True
