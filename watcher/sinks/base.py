"""The sink contract: what every sink is, and says about itself, so that the outbox asks rather than guesses.

A sink has a `name` (its key in the journal's deliveries table) and `deliver(results)`, which delivers a batch
of committed results (`watcher.records.Result`, in the journal's commit order) or raises. The journal commits
every result first; the outbox then hands each sink the results it has not acknowledged, noting them in flight
first, and marks them delivered only when `deliver` returned. A crash in between leaves them in flight: at the
next attempt the outbox asks a sink that is not `idempotent` which of them its target already `holds` and sends
only the others (watcher/outbox.py). An `idempotent` sink simply takes the batch again (the files sink).

The capabilities, declared by every sink (`SinkBase` gives the defaults, so a sink states only what differs):

    slow           deliver in a background thread, so the daemon's loop goes on (W&B resumes a run over the net)
    wait_for_idle  hand results over only once the daemon has no job left (W&B `defer`: one resume per session)
    idempotent     a repeated batch leaves the target as one delivery does; when False, `holds` must answer
    alerts         takes the alert rules' firings too (watcher/alerts.py): `deliver(results, alerts)` is handed
                   the journal's `AlertRecord`s it has not taken, with its results (either list may be empty),
                   tracked per sink like results; after a crash `holds_alerts` says which it already has

`SinkUnavailable` says "not now": W&B unreachable, or a training run still being written in `defer` mode. The
outbox keeps the results pending and retries with backoff (`retry_after`, when the sink knows better).
"""

from __future__ import annotations

from typing import Protocol, Sequence

from watcher.ledgers import AlertRecord
from watcher.records import Result


class SinkUnavailable(RuntimeError):
    """The sink cannot take results now; they stay pending. The message is one line for the log.

    `nothing_sent`: raised before anything reached the target (e.g. waiting for the training run to end), so
    the batch is not left in flight and will not need checking against the target at the next attempt."""

    def __init__(self, reason: str, retry_after: float | None = None, nothing_sent: bool = False):
        super().__init__(reason)
        self.retry_after = retry_after
        self.nothing_sent = nothing_sent


class Sink(Protocol):
    name: str
    slow: bool
    wait_for_idle: bool
    idempotent: bool
    alerts: bool

    def deliver(self, results: Sequence[Result], alerts: Sequence[AlertRecord] = ()) -> None:
        """Deliver all of `results` (and `alerts`, to a sink that declares `alerts`) or raise (SinkUnavailable
        for "later", anything else is logged as an error)."""
        ...

    def holds_alerts(self, alerts: Sequence[AlertRecord]) -> set[int]:
        """The alert ids among `alerts` (handed over before, by an attempt that never reported back) that the
        target already has; asked of a sink that declares `alerts`. One it cannot tell about counts as held:
        an alert is delivered at most once."""
        ...

    def holds(self, results: Sequence[Result]) -> set[str]:
        """The result ids among `results` that the target already has (raise when it cannot be asked). Asked
        only of a sink that is not `idempotent`, which must answer from the target itself (after a crash, the
        only truth)."""
        ...

    def close(self) -> None:
        """Release what the sink holds (open runs, writers); called when the daemon stops."""
        ...


class SinkSettings(Protocol):
    """The configuration a sink's `build` reads (watcher.config.WatchConfig has these; named here so that the
    sinks do not import the configuration, which imports them to check its W&B settings)."""

    wandb: str
    wandb_live: str
    tensorboard: str


class SinkBase:
    """The defaults of the contract: a fast, idempotent sink with nothing to release."""

    name: str = ""
    slow: bool = False
    wait_for_idle: bool = False
    idempotent: bool = True
    alerts: bool = False

    def deliver(self, results: Sequence[Result], alerts: Sequence[AlertRecord] = ()) -> None:
        raise NotImplementedError

    def holds_alerts(self, alerts: Sequence[AlertRecord]) -> set[int]:
        return {alert.id for alert in alerts}

    def holds(self, results: Sequence[Result]) -> set[str]:
        """An idempotent sink is never asked; this answer ("nothing known to be there") resends the batch."""
        return set()

    def close(self) -> None:
        pass
