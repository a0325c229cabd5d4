"""The migration outcomes this host decided as a target, kept on disk.

A source that lost the commit's answer asks the target what it did; the
answer must survive a restart of the target's ferryd, or a target that
resumed a VM and then restarted would answer "aborted" and the source would
resume its copy too. So every outcome is written (and fsync'd) before it
takes effect: ``pending`` before the target's QEMU is started, ``committed``
before the VM is resumed, ``aborted`` once its QEMU has ended.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ferry.domain.migration_state import Outcome, next_outcome
from ferry.errors import FerryError

# Outcomes older than this are forgotten: a source in doubt asks within
# seconds, or within the time it takes an operator to restart a daemon.
KEEP_SECONDS = 7 * 24 * 3600


class OutcomeBook:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[str, tuple[Outcome, float]] = {}
        self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as err:
            raise FerryError(f"{self.path}: unreadable migration outcomes: {err}") from err
        if not isinstance(data, dict):
            raise FerryError(f"{self.path}: damaged migration outcomes: not an object")
        for mid, entry in data.items():
            try:
                self._entries[str(mid)] = (Outcome(entry["outcome"]), float(entry["at"]))
            except (KeyError, TypeError, ValueError) as err:
                raise FerryError(f"{self.path}: damaged outcome of {mid}: {err}") from err

    def get(self, migration_id: str) -> Outcome | None:
        entry = self._entries.get(migration_id)
        return entry[0] if entry else None

    def pending(self) -> list[str]:
        return [mid for mid, (o, _) in self._entries.items() if o is Outcome.PENDING]

    def begin(self, migration_id: str) -> None:
        """A new incoming migration: ``pending``, on disk before anything starts."""
        if migration_id in self._entries:
            raise FerryError(f"migration {migration_id[:8]} was already prepared on this host")
        self._entries[migration_id] = (Outcome.PENDING, time.time())
        self._save()

    def decide(self, migration_id: str, outcome: Outcome) -> None:
        """Record the decision durably; deciding the same outcome again is a no-op."""
        current = self.get(migration_id)
        if current is outcome:
            return
        if current is None:
            # Never begun here (a crash between QEMU and book): record it all the same.
            current = Outcome.PENDING
        next_outcome(migration_id[:8], current, outcome)
        self._entries[migration_id] = (outcome, time.time())
        self._save()

    def _save(self) -> None:
        horizon = time.time() - KEEP_SECONDS
        self._entries = {
            mid: (o, at) for mid, (o, at) in self._entries.items() if at >= horizon or not o.decided
        }
        data = {mid: {"outcome": o.value, "at": at} for mid, (o, at) in self._entries.items()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)
        # The rename itself must reach the disk before the caller acts on it.
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
