"""Alert rules (`[[alerts]]`, watcher/config.py `AlertRule`): evaluated each time a result is committed.

The pure part, `findings`, says at which checkpoints a rule holds, from the results alone (watcher/standings.py
gives each checkpoint's value and the best so far). A rule is evaluated at a checkpoint over the checkpoints
that have a value of its metric ("evaluated" ones), by step: it holds when its condition holds at this
checkpoint and at the `consecutive - 1` evaluated checkpoints before it. A result is evaluated at its own
checkpoint and at every later evaluated checkpoint (a result that arrives out of order can change their best so
far, or complete their run of `consecutive`); a rule added to the configuration later therefore never fires for
checkpoints evaluated before it existed, unless an earlier step's result arrives after it.

What firing does, in this order (`Alerts.result_recorded`):
  1. the journal's `alerts` table takes it, once per rule and checkpoint generation (a re-save of the folder is
     new weights: it may fire again); a firing already there is not repeated, across restarts too;
  2. one warning in the log;
  3. RESULTS_DIR/alerts.jsonl, one line per firing, rewritten atomically from the journal (so a crash or a full
     disk never leaves it torn or short for long: the next firing or start writes it whole);
  4. with `stop_training`, the stop request OUTPUT_DIR/ckpt-watch-stop.json (watcher/integrations/sentinel.py);
  5. sinks that take alerts (`alerts = True`: W&B, `run.alert` on the training run) get it from the outbox with
     their next delivery, at most once per sink, tracked in the journal like results (watcher/outbox.py).
A problem here (a bad metric, a full disk) is logged and never loses a result or stops the daemon.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from watcher.atomic import write_bytes_atomic
from watcher.config import AlertRule
from watcher.integrations.sentinel import write_stop_request
from watcher.journal import Journal
from watcher.records import Result, iso_time
from watcher.standings import Standing, best, newest_results, resolve_mode, values_of

log = logging.getLogger("ckpt-watch")

ALERTS_FILE = "alerts.jsonl"


@dataclass(frozen=True)
class Point:
    """One evaluated checkpoint of a rule: its value (NaN for the `nan` condition's non-finite reports)."""

    step: int
    checkpoint: str
    generation: int
    value: float
    result_id: str


@dataclass(frozen=True)
class Finding:
    """A checkpoint at which a rule holds, and why, in words."""

    point: Point
    message: str
    best: Standing | None = None  # the best so far (drop_from_best)


def findings(rule: AlertRule, results: Sequence[Result], from_step: int) -> list[Finding]:
    """The evaluated checkpoints at or after `from_step` at which `rule` holds. ValueError when `mode = "auto"`
    cannot tell the direction of a `drop_from_best` metric."""
    mode = resolve_mode(rule.mode, rule.metric, results) if rule.drop_from_best is not None else None
    points = _points(rule, results)
    found = []
    for index, point in enumerate(points):
        if point.step < from_step or index + 1 < rule.consecutive:
            continue
        window = points[index + 1 - rule.consecutive : index + 1]
        reasons = [_holds(rule, p, results, mode) for p in window]
        if all(reason is not None for reason in reasons):
            message, standing = reasons[-1]  # type: ignore[misc]
            if rule.consecutive > 1:
                names = ", ".join(p.checkpoint for p in window)
                message += f", for {rule.consecutive} consecutive checkpoints ({names})"
            found.append(Finding(point, f"{message} [{rule.name}]", standing))
    return found


def _points(rule: AlertRule, results: Sequence[Result]) -> list[Point]:
    """The rule's evaluated checkpoints by step: those with a finite value (standings), and for `nan` also those
    whose newest successful result reports the metric as NaN/inf."""
    finite = [Point(s.step, s.checkpoint, s.generation, s.value, s.result.result_id)
              for s in values_of(results, rule.metric, rule.variant)]  # fmt: skip
    if not rule.nan:
        return finite
    # As standings.values_of picks, with the non-finite reports counted.
    newest = newest_results(results, rule.variant, lambda r: rule.metric in r.metrics or rule.metric in r.nonfinite)
    nonfinite = [Point(r.step, r.checkpoint, r.generation, math.nan, r.result_id)
                 for r in newest.values() if rule.metric in r.nonfinite]  # fmt: skip
    return sorted([p for p in finite if p.checkpoint not in {n.checkpoint for n in nonfinite}] + nonfinite,
                  key=lambda p: (p.step, p.checkpoint))  # fmt: skip


def _holds(rule: AlertRule, point: Point, results: Sequence[Result], mode: str | None
           ) -> tuple[str, Standing | None] | None:  # fmt: skip
    """Why the rule's condition holds at `point` (a message and the best so far), or None when it does not."""
    what = f"{rule.metric} at {point.checkpoint} is {point.value:g}"
    if rule.nan:
        return (what, None) if math.isnan(point.value) else None
    if rule.below is not None:
        return (f"{what}, below {rule.below:g}", None) if point.value < rule.below else None
    if rule.above is not None:
        return (f"{what}, above {rule.above:g}", None) if point.value > rule.above else None
    assert mode is not None and rule.drop_from_best is not None
    so_far = best(results, rule.metric, mode, rule.variant, before_step=point.step)
    if so_far is None:
        return None
    drop = so_far.value - point.value if mode == "max" else point.value - so_far.value
    relative = isinstance(rule.drop_from_best, str)
    limit = float(str(rule.drop_from_best).strip()[:-1]) / 100 * abs(so_far.value) if relative \
        else float(rule.drop_from_best)  # fmt: skip
    if drop <= 0 or drop < limit:
        return None
    share = f" ({drop / abs(so_far.value):.1%})" if so_far.value else ""
    worse = "down" if mode == "max" else "up"
    return (f"{what}, {worse} {drop:g}{share} from the best so far, {so_far.value:g} at {so_far.checkpoint}",
            so_far)  # fmt: skip


@dataclass(frozen=True)
class Firing:
    """What a firing records (the journal's `record`, a line of alerts.jsonl, what a sink gets)."""

    rule: AlertRule
    finding: Finding
    fired_at: float

    def record(self) -> dict:
        point, standing = self.finding.point, self.finding.best
        return {"rule": self.rule.name, "metric": self.rule.metric, "variant": self.rule.variant,
                "condition": self.rule.condition, "consecutive": self.rule.consecutive,
                "checkpoint": point.checkpoint, "generation": point.generation, "step": point.step,
                "value": point.value if math.isfinite(point.value) else None, "result_id": point.result_id,
                "best": {"checkpoint": standing.checkpoint, "step": standing.step, "value": standing.value}
                if standing else None, "message": self.finding.message, "stop_training": self.rule.stop_training,
                "fired_at": iso_time(self.fired_at)}  # fmt: skip


class Alerts:
    """A watched run's alert rules: evaluated at each committed result; see the module docstring."""

    def __init__(self, journal: Journal, output_dir: Path, results_dir: Path, rules: Callable[[], list[AlertRule]],
                 prefix: str = ""):  # fmt: skip
        """`rules`: the rules now (a reload may change them)."""
        self.journal, self.output_dir, self.results_dir = journal, Path(output_dir), Path(results_dir)
        self.rules, self.prefix = rules, prefix
        self._undecided: set[str] = set()  # rules whose direction `auto` could not tell (said once each)

    def result_recorded(self, result: Result) -> None:
        """A result was committed: evaluate every rule it concerns and fire those that hold."""
        rules = [rule for rule in self.rules() if rule.variant == result.variant and result.ok]
        if not rules:
            return
        try:
            results = self.journal.results()
            for rule in rules:
                self._evaluate(rule, results, result.step)
        except Exception as exc:  # noqa: BLE001 - an alert problem never loses a result or stops the daemon
            log.error("%salert rules not evaluated for %s: %s: %s", self.prefix, result.checkpoint,
                      type(exc).__name__, exc)  # fmt: skip

    def _evaluate(self, rule: AlertRule, results: list[Result], from_step: int) -> None:
        try:
            found = findings(rule, results, from_step)
        except ValueError as exc:  # mode = "auto" and the metric does not say which direction is better
            if rule.name not in self._undecided:
                log.warning("%salert rule %r is not evaluated: %s", self.prefix, rule.name, exc)
                self._undecided.add(rule.name)
            return
        for finding in found:
            self._fire(rule, finding)

    def _fire(self, rule: AlertRule, finding: Finding) -> None:
        firing = Firing(rule, finding, time.time())
        point = finding.point
        fired = self.journal.alerts.fire(rule.name, point.checkpoint, point.generation, point.step, firing.record())
        if fired is None:
            return  # fired for this checkpoint before
        stop = " (asking training to stop)" if rule.stop_training else ""
        log.warning("%salert: %s%s", self.prefix, finding.message, stop)
        self.write_file()
        if rule.stop_training:
            value = point.value if math.isfinite(point.value) else None
            try:
                write_stop_request(self.output_dir, rule=rule.name, metric=rule.metric, variant=rule.variant,
                                   step=point.step, value=value, reason=finding.message)  # fmt: skip
            except OSError as exc:
                log.error("%scould not write the stop request in %s: %s", self.prefix, self.output_dir, exc)

    def write_file(self) -> None:
        """RESULTS_DIR/alerts.jsonl: one line per firing in the journal, in firing order (written only when it
        differs, atomically). A failure is logged: the journal has the firings, the next firing or start writes
        the file whole."""
        path = self.results_dir / ALERTS_FILE
        text = "".join(json.dumps(a.record, sort_keys=True) + "\n" for a in self.journal.alerts.all())
        try:
            if path.read_text(encoding="utf-8") == text:
                return
        except (OSError, UnicodeDecodeError):
            if not text:
                return
        try:
            write_bytes_atomic(path, text.encode())
        except OSError as exc:
            log.error("%scould not write %s: %s", self.prefix, path, exc)


def read_alerts(results_dir: Path) -> list[dict]:
    """The firings in RESULTS_DIR/alerts.jsonl (for scripts and tests)."""
    path = Path(results_dir) / ALERTS_FILE
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] \
        if path.is_file() else []  # fmt: skip

