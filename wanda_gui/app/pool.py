"""Dense models shared read-only between sessions: one per (source, revision, device, dtype, access), and a cap on
how many sessions hold models at once."""

from __future__ import annotations

import hashlib
import threading
from typing import Callable

from ..core.devices import resolve_device, resolve_dtype
from ..core.errors import UserError
from ..core.memory import release_memory


def model_key(source: str, revision: str | None, device: str, dtype: str | None, token: str | None,
              trust_remote_code: bool) -> tuple:
    """What makes two loads the same model. The token is part of it (hashed), so that a session without access to a
    gated model never gets the copy another session loaded with a token."""
    torch_device = resolve_device(device)
    access = hashlib.sha256(token.encode()).hexdigest() if token else None
    return (source, revision or None, str(torch_device), str(resolve_dtype(dtype, torch_device)), access, trust_remote_code)


class ModelPool:
    """Dense models shared read-only between sessions, with a cap on how many sessions hold models at once.

    A holder is any hashable owner (a Workspace). A holder may also take its model private (pruning in place when
    no copy fits): it then leaves the sharing table, and still counts against the cap until it releases.
    """

    def __init__(self, max_sessions: int = 4):
        self.max_sessions = max_sessions
        self._lock = threading.Lock()
        self._models: dict[tuple, object] = {}
        self._holders: dict[tuple, set] = {}
        self._private: dict[object, object] = {}
        self._loading: dict[tuple, threading.Lock] = {}
        self._admitted: set = set()  # holders admitted and loading, so two can't slip under the cap together

    def _holding(self) -> set:
        return {h for hs in self._holders.values() for h in hs} | set(self._private) | self._admitted

    def acquire(self, holder, key: tuple, load: Callable[[], object]):
        """The shared dense model for key, loading it once however many sessions ask at the same time."""
        with self._lock:
            if holder not in self._holding() and len(self._holding()) >= self.max_sessions:
                raise UserError(f"The server is busy: {self.max_sessions} sessions hold models now (its limit). "
                                "Try again in a few minutes; models are freed when their tabs close.")
            self._admitted.add(holder)
            key_lock = self._loading.setdefault(key, threading.Lock())
        try:
            with key_lock:
                with self._lock:
                    loaded = self._models.get(key)
                if loaded is None:
                    loaded = load()
                with self._lock:
                    self._models[key] = loaded
                    self._holders.setdefault(key, set()).add(holder)
            return loaded
        finally:
            with self._lock:
                self._admitted.discard(holder)

    def holders(self, loaded) -> int:
        with self._lock:
            return sum(len(self._holders.get(k, ())) for k, m in self._models.items() if m is loaded)

    def take_private(self, holder, loaded) -> bool:
        """Make `loaded` the holder's alone (to prune it in place); False when another session shares it."""
        with self._lock:
            keys = [k for k, m in self._models.items() if m is loaded]
            if any(self._holders.get(k, set()) - {holder} for k in keys):
                return False
            for k in keys:
                self._models.pop(k)
                self._holders.pop(k, None)
            self._private[holder] = loaded
            return True

    def release(self, holder) -> None:
        """Drop the holder's claims; a model nobody holds any more is freed."""
        with self._lock:
            self._private.pop(holder, None)
            for key in list(self._holders):
                self._holders[key].discard(holder)
                if not self._holders[key]:
                    del self._holders[key]
                    self._models.pop(key, None)
        release_memory()

    def sessions_holding(self) -> int:
        with self._lock:
            return len(self._holding())
