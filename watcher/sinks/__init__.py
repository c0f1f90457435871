"""Sinks: where committed results are delivered (files, W&B, TensorBoard), one module each.

The contract is small: a sink has a `name` (its key in the journal's deliveries table) and
`deliver(records)`, which delivers a batch of result records (the journal's commit order) or raises. The
journal commits every result first; the daemon then hands each sink the records it has not acknowledged (the
outbox), noting them in flight first, and marks them delivered only when `deliver` returned. A crash in between
leaves them in flight: at the next attempt the outbox asks the sink's optional `holds(records)` which of them
its target already has and sends only the others (watcher/outbox.py). A sink without `holds` must tolerate a
repeat (the files sink is idempotent).

`SinkUnavailable` says "not now": W&B unreachable, or a training run still being written in `defer` mode. The
daemon keeps the records pending and retries with backoff (`retry_after`, when the sink knows better).
"""

from __future__ import annotations

from typing import Any, Protocol

from watcher.sinks.files import FileSink, read_results

__all__ = ["CheckedSink", "FileSink", "Sink", "SinkUnavailable", "read_results"]


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

    def deliver(self, records: list[dict[str, Any]]) -> None:
        """Deliver all of `records` or raise (SinkUnavailable for "later", anything else is logged as an error)."""
        ...

    def close(self) -> None:
        """Release what the sink holds (open runs, writers); called when the daemon stops."""
        ...


class CheckedSink(Sink, Protocol):
    """A sink whose target can be asked what it already holds (W&B, TensorBoard): at-most-once delivery."""

    def holds(self, records: list[dict[str, Any]]) -> set[str]:
        """The result ids among `records` that the target already has (raise when it cannot be asked)."""
        ...
