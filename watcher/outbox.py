"""The outbox: deliver every committed result to every sink, retrying a sink that is down with backoff.

Results are committed to the journal before any sink sees them; a delivery is recorded per sink only after the
sink took the whole batch. So W&B being unreachable, unauthenticated or waiting for a live training run to end
(`SinkUnavailable`) only delays that sink: its results stay pending, in the journal, across restarts, and the
other sinks go on. `ckpt-watch sync` runs one round at once and reports what is still pending.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from watcher.journal import Journal
from watcher.sinks import Sink, SinkUnavailable

log = logging.getLogger("ckpt-watch")

FIRST_RETRY = 30.0  # seconds after the first failure of a sink; doubles with each further one
MAX_RETRY = 900.0


@dataclass
class _SinkState:
    next_attempt: float = 0.0  # time.monotonic() before which the sink is not tried again
    failures: int = 0
    last_reason: str = ""


@dataclass
class Outbox:
    journal: Journal
    sinks: list[Sink]
    _state: dict[str, _SinkState] = field(default_factory=dict)

    def deliver_pending(self, force: bool = False) -> dict[str, int]:
        """One round: each sink whose backoff has passed (all of them with `force`) gets its pending results.

        Returns the number of results still pending per sink.
        """
        pending: dict[str, int] = {}
        now = time.monotonic()
        for sink in self.sinks:
            state = self._state.setdefault(sink.name, _SinkState())
            records = self.journal.undelivered(sink.name)
            if records and (force or now >= state.next_attempt):
                try:
                    sink.deliver(records)
                except SinkUnavailable as exc:
                    self._failed(sink.name, state, str(exc), exc.retry_after, logging.WARNING)
                except Exception as exc:  # noqa: BLE001 - a broken sink must not stop the daemon or lose results
                    self._failed(sink.name, state, f"{type(exc).__name__}: {exc}", None, logging.ERROR)
                else:
                    self.journal.mark_delivered_many([r["result_id"] for r in records], sink.name)
                    if state.failures:
                        log.info("%s: delivered %d pending result(s) again", sink.name, len(records))
                    self._state[sink.name] = _SinkState()
                    records = []
            pending[sink.name] = len(records)
        return pending

    def next_attempt_in(self) -> float | None:
        """Seconds until a sink that failed should be tried again (None: no sink is waiting)."""
        waiting = [s.next_attempt for s in self._state.values() if s.failures]
        return max(0.0, min(waiting) - time.monotonic()) if waiting else None

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:  # noqa: BLE001 - closing must never hide the real exit status
                log.warning("%s: closing failed: %s", sink.name, exc)

    def _failed(self, name: str, state: _SinkState, reason: str, retry_after: float | None, level: int) -> None:
        state.failures += 1
        delay = retry_after if retry_after is not None else min(MAX_RETRY, FIRST_RETRY * 2 ** (state.failures - 1))
        state.next_attempt = time.monotonic() + delay
        if reason != state.last_reason:  # the same reason every few minutes is noise; a new one is news
            log.log(level, "%s: results stay pending (%s); trying again in %.0f s", name, reason, delay)
            state.last_reason = reason
