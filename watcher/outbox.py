"""The outbox: deliver every committed result to every sink, retrying a sink that is down with backoff.

Results are committed to the journal before any sink sees them; a delivery is recorded per sink only after the
sink took the whole batch.

At most once per (result, sink), even across kill -9: a batch is noted in the journal as *in flight* before the
sink sees it. A result still in flight when a sink is next asked to take it (the daemon was killed between the
sink's write and the journal's note, or an attempt failed half-way) is first checked against what the target
already holds (`sink.holds`: our own offline `.wandb` files, the W&B run's history through the public API,
our TensorBoard event files); only what the target lacks is sent, and what it holds is marked delivered. An
`idempotent` sink (the files sink) is not asked: it simply takes the batch again. A check that cannot be made
(W&B unreachable) leaves the results pending: they are never sent blind. What a sink can do it declares
(watcher/sinks/base.py): `slow`, `wait_for_idle`, `idempotent`.

W&B being unreachable, unauthenticated or waiting for a live training run to end
(`SinkUnavailable`) only delays that sink: its results stay pending, in the journal, across restarts, and the
other sinks go on. `ckpt-watch sync` runs one round at once and reports what is still pending.

A slow sink (`slow = True`: W&B, which resumes a run over the network) is delivered to in a background thread
when the daemon asks for it, so that its main loop keeps watching, supervising and pinging systemd's watchdog;
the journal is only ever touched from the main thread (`poll`).

Alert firings (watcher/alerts.py) travel the same way to a sink that declares `alerts` (W&B): they go with its
results (a firing with none), noted in flight first and delivered once; one still in flight from an attempt that
never reported back is sent again only if `sink.holds_alerts` says the target lacks it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from watcher.journal import Journal
from watcher.ledgers import AlertRecord
from watcher.records import Result
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
class _Delivery:
    """A delivery running in a background thread: the result ids it carries and how it ended."""

    ids: list[str]
    thread: threading.Thread | None = None  # None: delivered in the caller's thread
    error: BaseException | None = None
    suspect: set[str] = field(default_factory=set)  # of `ids`, those in flight before (checked before sending)
    held: set[str] = field(default_factory=set)  # of `ids`, those the target already had (not sent again)
    alerts: list[AlertRecord] = field(default_factory=list)  # alert firings it carries (a sink with `alerts`)
    suspect_alerts: set[int] = field(default_factory=set)  # of their ids, those in flight before
    held_alerts: set[int] = field(default_factory=set)  # of their ids, those the target already had

    @property
    def alert_ids(self) -> list[int]:
        return [alert.id for alert in self.alerts]


@dataclass
class Outbox:
    journal: Journal
    sinks: list[Sink]
    _state: dict[str, _SinkState] = field(default_factory=dict)
    _running: dict[str, _Delivery] = field(default_factory=dict)
    waiting_for_idle: bool = False  # a sink that batches (`wait_for_idle`) has results and waits for an idle daemon

    def deliver_pending(self, force: bool = False, background: bool = False, include_slow: bool = True,
                        idle: bool = True) -> dict[str, int]:  # fmt: skip
        """One round: each sink whose backoff has passed (all of them with `force`) gets its pending results.

        `background`: slow sinks deliver in a thread (see `poll`); `include_slow=False` leaves them out.
        `idle=False` (the daemon has jobs to run) holds back sinks with `wait_for_idle`: W&B in `defer` mode
        takes all the results of a session in one delivery (one resume, one offline run folder), not one per
        checkpoint; the daemon asks again once it is idle (`waiting_for_idle`).
        Returns the number of results still pending per sink (in-flight ones count as pending).
        """
        pending: dict[str, int] = {}
        now = time.monotonic()
        self.waiting_for_idle = False
        for sink in self.sinks:
            state = self._state.setdefault(sink.name, _SinkState())
            records = self.journal.undelivered(sink.name)
            alerts = self.journal.alerts.undelivered(sink.name) if sink.alerts else []
            due = (records or alerts) and (force or now >= state.next_attempt) and sink.name not in self._running
            if due and sink.slow and not include_slow:
                due = False
            if due and not idle and sink.wait_for_idle:
                due, self.waiting_for_idle = False, True
            if due:
                ids = [r.result_id for r in records]
                suspect = self.journal.in_flight(sink.name).intersection(ids)
                self.journal.mark_in_flight(ids, sink.name)
                suspect_alerts = self.journal.alerts.in_flight(sink.name) & {alert.id for alert in alerts}
                self.journal.alerts.mark([alert.id for alert in alerts], sink.name, "in_flight")
                delivery = _Delivery(ids, suspect=suspect, alerts=alerts, suspect_alerts=suspect_alerts)
                if sink.slow and background:
                    delivery.thread = threading.Thread(target=_send, args=(sink, records, suspect, delivery),
                                                       name=f"deliver-{sink.name}", daemon=True)  # fmt: skip
                    self._running[sink.name] = delivery
                    delivery.thread.start()
                else:
                    _send(sink, records, suspect, delivery)
                    self._ended(sink.name, delivery)
                    if delivery.error is None:
                        records = []
            pending[sink.name] = len(records)
        return pending

    def poll(self) -> None:
        """Record the outcome of background deliveries that have ended (in the journal, from this thread)."""
        for name, delivery in list(self._running.items()):
            if delivery.thread is None or not delivery.thread.is_alive():
                del self._running[name]
                self._ended(name, delivery)

    def wait(self, timeout: float | None = None) -> None:
        """Let background deliveries end (up to `timeout` seconds in all), then record them."""
        end = None if timeout is None else time.monotonic() + timeout
        for delivery in list(self._running.values()):
            if delivery.thread is not None:
                delivery.thread.join(None if end is None else max(0.0, end - time.monotonic()))
        self.poll()

    def _ended(self, name: str, delivery: _Delivery) -> None:
        state = self._state.setdefault(name, _SinkState())
        error, ids = delivery.error, delivery.ids
        if delivery.held:  # the target had these already: delivered, whatever happened to the rest
            self.journal.mark_delivered_many(sorted(delivery.held), name)
            log.info("%s: %d result(s) were already there (sent before ckpt-watch stopped); not sent again",
                     name, len(delivery.held))  # fmt: skip
        if delivery.held_alerts:
            self.journal.alerts.mark(sorted(delivery.held_alerts), name, "delivered")
        if isinstance(error, SinkUnavailable) and error.nothing_sent:  # what was not suspect before is not now
            self.journal.clear_in_flight(sorted(set(ids) - delivery.suspect - delivery.held), name)
            self.journal.alerts.clear_in_flight(set(delivery.alert_ids) - delivery.suspect_alerts
                                                - delivery.held_alerts, name)  # fmt: skip
        if isinstance(error, SinkUnavailable):
            self._failed(name, state, str(error), error.retry_after, logging.WARNING)
        elif isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise error
        elif error is not None:
            self._failed(name, state, f"{type(error).__name__}: {error}", None, logging.ERROR)
        else:
            self.journal.mark_delivered_many(ids, name)
            self.journal.alerts.mark(delivery.alert_ids, name, "delivered")
            if state.failures:
                log.info("%s: delivered %d pending result(s) again", name, len(ids))
            self._state[name] = _SinkState()

    def waiting_reason(self, name: str) -> str:
        """Why a sink's results are still pending, as its last failed delivery said ("" if none failed yet)."""
        if name in self._running:
            return "delivering now"
        state = self._state.get(name)
        return state.last_reason if state is not None else ""

    def next_attempt_in(self) -> float | None:
        """Seconds until a sink that failed should be tried again (None: no sink is waiting)."""
        waiting = [s.next_attempt for s in self._state.values() if s.failures]
        return max(0.0, min(waiting) - time.monotonic()) if waiting else None

    def replace_sinks(self, sinks: list[Sink]) -> None:
        """A reload: these sinks from the next round on. A delivery in flight finishes and is recorded as usual
        (its sink is closed by the next `close`); backoff state carries over by sink name."""
        for sink in self.sinks:
            if sink.name not in self._running:
                sink.close()
        self.sinks = sinks

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


def _send(sink: Sink, records: list[Result], suspect: set[str], delivery: _Delivery) -> None:
    """Hand `records` to `sink`, less those among `suspect` (in flight before) that its target already holds
    (asked of a sink that is not idempotent; an idempotent one takes them again).

    Runs in the caller's thread or a background one; touches no journal (the main thread records the outcome).
    """
    try:
        if suspect and not sink.idempotent:
            delivery.held = set(sink.holds([r for r in records if r.result_id in suspect])) & suspect
        if delivery.suspect_alerts:
            again = [alert for alert in delivery.alerts if alert.id in delivery.suspect_alerts]
            delivery.held_alerts = set(sink.holds_alerts(again)) & delivery.suspect_alerts
        rest = [r for r in records if r.result_id not in delivery.held]
        alerts = [alert for alert in delivery.alerts if alert.id not in delivery.held_alerts]
        if alerts:
            sink.deliver(rest, alerts)
        elif rest:
            sink.deliver(rest)
    except BaseException as exc:  # noqa: BLE001 - a broken sink must not stop the daemon or lose results
        delivery.error = exc
