"""A small, host-side telemetry store: what techniques decided, for dashboards, reports and benchmarks.

Techniques write plain Python values (already copied off the device, at epoch ends or every N steps);
readers never reach into a technique. Everything here pickles and serialises to JSON.
"""

from __future__ import annotations

import json
import threading
from collections import defaultdict

__all__ = ["Telemetry"]


class Telemetry:
    """Records grouped by source (a technique or probe name) and stream (`"epoch"`, `"step"`, ...).

    >>> t = Telemetry()
    >>> t.record("infobatch", "epoch", epoch=0, kept=100)
    >>> t.records("infobatch", "epoch")[-1]["kept"]
    100
    """

    def __init__(self):
        self._data: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
        self._meta: dict[str, dict] = {}
        self._lock = threading.Lock()
        self.version = 0  # bumped on every write: readers redraw only when it moved

    def record(self, source: str, stream: str, **values) -> None:
        with self._lock:
            self._data[source][stream].append(values)
            self.version += 1

    def set_meta(self, source: str, **values) -> None:
        """Facts about a source that do not change per record (a planned schedule, a configuration)."""
        with self._lock:
            self._meta.setdefault(source, {}).update(values)
            self.version += 1

    def meta(self, source: str) -> dict:
        return dict(self._meta.get(source, {}))

    def records(self, source: str, stream: str) -> list[dict]:
        with self._lock:
            return list(self._data.get(source, {}).get(stream, []))

    def series(self, source: str, stream: str, key: str) -> list:
        return [r[key] for r in self.records(source, stream) if key in r]

    def latest(self, source: str, stream: str) -> dict | None:
        recs = self._data.get(source, {}).get(stream)
        return dict(recs[-1]) if recs else None

    @property
    def sources(self) -> list[str]:
        return sorted(set(self._data) | set(self._meta))

    def clear(self, source: str | None = None) -> None:
        with self._lock:
            if source is None:
                self._data.clear()
                self._meta.clear()
            else:
                self._data.pop(source, None)
                self._meta.pop(source, None)
            self.version += 1

    def to_dict(self) -> dict:
        with self._lock:
            return {"records": {s: {k: list(v) for k, v in streams.items()} for s, streams in self._data.items()},
                    "meta": {s: dict(m) for s, m in self._meta.items()}}

    def to_json(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f)

    # Locks and defaultdict factories don't pickle; the data do.
    def __getstate__(self):
        return self.to_dict() | {"version": self.version}

    def __setstate__(self, state):
        self.__init__()
        for source, streams in state["records"].items():
            for stream, recs in streams.items():
                self._data[source][stream].extend(recs)
        self._meta.update(state["meta"])
        self.version = state["version"]
