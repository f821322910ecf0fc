"""Finished pieces of a long evaluation, kept in a folder: a rerun of the same command
resumes where the last one stopped, and the same command started in a second shell
shares the work (each piece is claimed by one process through a lock file).

A full-size evaluation is hours of independent pieces -- one selection per method
family, one evaluation per seed and family. Each :class:`Unit` names the pieces it
needs, and its file's name carries a hash of everything its result depends on (the
settings, the requests, the selected recipe, kmem's version), so a changed command
never reuses a stale piece.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

Payload = Any  # what a unit computes: JSON-serialisable


@dataclass(frozen=True)
class Unit:
    """One piece of work.

    Attributes:
        name: unique among the units of a run; also the start of its file's name.
        key: everything the result depends on, given the results of ``needs`` (by name):
            hashed into the file name.
        compute: the result, given the results of ``needs``.
        needs: names of the units whose results this one reads.
    """

    name: str
    key: Callable[[Mapping[str, Payload]], Mapping[str, Any]]
    compute: Callable[[Mapping[str, Payload]], Payload]
    needs: Sequence[str] = field(default_factory=tuple)


def digest(key: Mapping[str, Any]) -> str:
    """16 hex digits of SHA-256 over ``key`` as canonical JSON."""
    text = json.dumps(key, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Parts:
    """Units' results as JSON files in ``folder``, computed at most once across reruns and
    concurrent processes. ``poll`` seconds between checks while another process holds a
    unit this one needs; ``log`` gets one line per reused, claimed or awaited unit."""

    def __init__(self, folder: str | Path, *, poll: float = 30.0, log: TextIO | None = sys.stderr):
        self.folder = Path(folder)
        self.poll = poll
        self.log = log

    def _say(self, text: str) -> None:
        if self.log is not None:
            print(f"parts: {text}", file=self.log, flush=True)

    def path(self, unit: Unit, done: Mapping[str, Payload]) -> Path:
        needs = {n: done[n] for n in unit.needs}
        safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in unit.name)
        return self.folder / f"{safe}-{digest(unit.key(needs))}.json"

    def run(self, units: Sequence[Unit]) -> dict[str, Payload]:
        """Every unit's result by name: read where a file has it, else computed (under a
        lock) and written; units another process holds are awaited. ``ValueError`` for a
        duplicate name or a need that is not a unit."""
        names = [u.name for u in units]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate unit names in {names}")
        missing = {n for u in units for n in u.needs} - set(names)
        if missing:
            raise ValueError(f"units need {sorted(missing)}, which are not units")
        self.folder.mkdir(parents=True, exist_ok=True)
        done: dict[str, Payload] = {}
        pending = list(units)
        while pending:
            progressed = False
            for unit in [u for u in pending if all(n in done for n in u.needs)]:
                path = self.path(unit, done)
                if path.exists():
                    done[unit.name] = json.loads(path.read_text())
                    self._say(f"{unit.name}: finished earlier, read from {path}")
                elif self._claim(path):
                    try:
                        self._say(f"{unit.name}: computing")
                        result = unit.compute({n: done[n] for n in unit.needs})
                        tmp = path.with_suffix(f".{os.getpid()}.tmp")
                        tmp.write_text(json.dumps(result))
                        os.replace(tmp, path)  # whole or absent: a killed run leaves no half file
                    finally:
                        _lock(path).unlink(missing_ok=True)
                    done[unit.name] = result
                else:
                    continue  # another process computes it: go on with the rest
                pending.remove(unit)
                progressed = True
            if pending and not progressed:
                held = [u.name for u in pending if all(n in done for n in u.needs)]
                self._say(f"waiting for another process to finish {', '.join(held)}")
                time.sleep(self.poll)
        return done

    def _claim(self, path: Path) -> bool:
        """Take ``path``'s lock; False while a live process holds it (a dead one's lock on
        this host is taken over)."""
        lock = _lock(path)
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if not _stale(lock):
                    return False
                lock.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{socket.gethostname()} {os.getpid()}")
            return True
        return False


def _lock(path: Path) -> Path:
    return path.with_suffix(".lock")


def _stale(lock: Path) -> bool:
    """The lock was left by a process of this host that no longer runs."""
    try:
        host, pid = lock.read_text().split()
    except (OSError, ValueError):
        return False  # being written right now, or unreadable: assume it is held
    if host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False
