"""Who holds what in a served app: each browser tab's (or API client's) Workspace, its models freed as soon as its tab
closes (or after it sits idle); the dense models themselves are shared through pool.ModelPool."""

from __future__ import annotations

import threading
import time

from .pool import ModelPool
from .workspace import Workspace

IDLE_SECONDS = 1800  # a session nobody has used for this long (its tab likely gone without saying so) is freed
REAP_INTERVAL = 20


class Sessions:
    """Each browser tab's (or API client's) Workspace, by Gradio session hash."""

    def __init__(self, pool: ModelPool, idle_seconds: float = IDLE_SECONDS):
        self.pool = pool
        self.idle_seconds = idle_seconds
        self._lock = threading.Lock()
        self._workspaces: dict[str, object] = {}
        self._used: dict[str, float] = {}
        self._reaper: threading.Thread | None = None

    def get(self, session_id: str):
        with self._lock:
            if session_id not in self._workspaces:
                self._workspaces[session_id] = Workspace(self.pool)
            self._used[session_id] = time.monotonic()
            if self._reaper is None:
                self._reaper = threading.Thread(target=self._reap, daemon=True, name="wanda-gui-session-reaper")
                self._reaper.start()
            return self._workspaces[session_id]

    def close(self, session_id: str) -> None:
        """The tab closed: stop what runs for it and free its models."""
        with self._lock:
            ws = self._workspaces.pop(session_id, None)
            self._used.pop(session_id, None)
        if ws is not None:
            ws.close()

    def close_idle(self) -> None:
        now = time.monotonic()
        with self._lock:
            idle = [s for s, t in self._used.items() if now - t > self.idle_seconds and not self._workspaces[s].busy]
        for session_id in idle:
            self.close(session_id)

    def _reap(self) -> None:
        while True:
            time.sleep(REAP_INTERVAL)
            self.close_idle()

    def __len__(self) -> int:
        with self._lock:
            return len(self._workspaces)
