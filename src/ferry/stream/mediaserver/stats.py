"""Play statistics: plays per file and the most recent plays, optionally persisted."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any


class Stats:
    """Plays per file and the most recent plays, optionally persisted as JSON."""

    RECENT = 50

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.recent: deque[dict[str, Any]] = deque(maxlen=self.RECENT)
        self.requests = 0
        self.bytes_sent = 0
        self.started = time.time()
        if path is not None:
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            self.counts.update({str(k): int(v) for k, v in data.get("counts", {}).items()})
            for item in data.get("recent", [])[-self.RECENT :]:
                self.recent.append(dict(item))
        except (OSError, ValueError, TypeError, AttributeError):
            # A missing or damaged stats file must not keep the server from starting.
            pass

    def request(self, nbytes: int) -> None:
        with self._lock:
            self.requests += 1
            self.bytes_sent += nbytes

    def play(self, path: str, client: str) -> None:
        with self._lock:
            self.counts[path] += 1
            self.recent.append({"time": time.time(), "client": client, "path": path})
            snapshot = self._snapshot_locked()
        self._save(snapshot)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return self._snapshot_locked()

    def _snapshot_locked(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "requests": self.requests,
            "bytes_sent": self.bytes_sent,
            "counts": dict(self.counts),
            "most_played": self.counts.most_common(20),
            "recent": list(reversed(self.recent)),
        }

    def _save(self, snapshot: dict[str, Any]) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(f".{self.path.name}.{threading.get_ident()}.tmp")
        try:
            tmp.write_text(json.dumps(snapshot), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as err:
            print(f"ferry-media-server: cannot save stats to {self.path}: {err}", file=sys.stderr)
