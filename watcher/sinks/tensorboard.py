"""The TensorBoard sink: event files in a folder of their own, one TensorBoard run beside the trainer's.

Every ok result becomes scalar points `eval/<task>/<metric>` (regular weights) and `eval_ema/<task>/<metric>`
(EMA weights), names from watcher/sinks/naming.py, at the checkpoint's training step, with the result's
`finished_at` as wall time. Failed results write nothing. The trainer's `train/epoch` and `train/tokens`
("progress" in the record) are not written: TensorBoard's x-axis is the step only (it cannot plot against
another scalar, as W&B can), the trainer's own run already has `train/epoch` on that axis, and a copy under the
same tag would draw a second, sparser line into the trainer's chart.

The folder (`resolve_tensorboard_dir`) is never one the trainer writes into: TensorBoard makes a run of every
folder holding event files, so ours shows up as the run `ckpt-watch-eval` next to the trainer's `<date>_<host>`
when TensorBoard is pointed at OUTPUT_DIR or OUTPUT_DIR/runs, and the same tags overlay in one chart.

The event files, their durability and their step order are watcher/sinks/event_files.py's job: a batch is on
disk when `deliver` returns, and a write error raises (the outbox retries). A crash between that and the
journal's note leaves the batch in flight; before sending it again the outbox asks `holds`, which reads our
event files back, so a point is never written twice (at most once: this sink is not idempotent).
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from watcher.records import Result
from watcher.sinks.base import SinkBase, SinkSettings, SinkUnavailable
from watcher.sinks.event_files import FILE_TAG, EventFileWriter, event_files, f32, read_points
from watcher.sinks.naming import metric_row

if TYPE_CHECKING:
    from watcher.sinks import SinkPlace

__all__ = ["AutoTensorBoardSink", "TensorBoardSink", "build", "read_points", "resolve_tensorboard_dir"]

EVAL_RUN = "ckpt-watch-eval"  # the folder, and so the run's name in TensorBoard


def build(config: SinkSettings, place: SinkPlace) -> AutoTensorBoardSink | None:
    """`tensorboard = "off"`: none; else the folder is resolved at delivery (see AutoTensorBoardSink)."""
    return AutoTensorBoardSink(config.tensorboard, place.output_dir) if config.tensorboard != "off" else None


class TensorBoardSink(SinkBase):
    """Scalar points in `log_dir` (created when first needed); see the module docstring."""

    name = "tensorboard"
    idempotent = False  # a repeated batch would repeat points: `holds` reads the event files back instead

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self._writer = EventFileWriter(self.log_dir)

    def deliver(self, results: Sequence[Result]) -> None:
        self._writer.write(sorted(((r.step, _walltime(r), row) for r in results if (row := metric_row(r))),
                                  key=lambda point: point[0]))  # fmt: skip

    def holds(self, results: Sequence[Result]) -> set[str]:
        """The results whose every point is in our event files already, at its step with its value (read from
        disk: after a crash that is the only truth). A result without points holds trivially."""
        on_disk = {(step, tag): value for step, _, row in read_points(self.log_dir) for tag, value in row.items()}
        return {result.result_id for result in results
                if all(on_disk.get((result.step, tag)) == f32(value)
                       for tag, value in metric_row(result).items())}  # fmt: skip

    def close(self) -> None:
        self._writer.close()

    @property
    def path(self) -> Path | None:
        """The event file being written, if one is open."""
        return self._writer.path


def resolve_tensorboard_dir(setting: str, output_dir: Path, logging_dir: Path | None) -> Path | None:
    """The TensorBoard sink's folder, or None for no TensorBoard sink.

    setting "off": None. A path: that folder (a relative one under OUTPUT_DIR). "auto":

    * the trainer's logging dir is known (`logging_dir`, from the run record), exists (transformers 4.x
      records `args.logging_dir` even when the Trainer does not report to TensorBoard; its TensorBoardCallback
      creates the folder in `on_train_begin`, before the run record is written) and is a folder directly
      under a folder named `runs` (transformers' default OUTPUT_DIR/runs/<date>_<host>, also a
      TENSORBOARD_LOGGING_DIR shaped like it): `runs/ckpt-watch-eval`, beside it;
    * any other known logging dir (a custom TENSORBOARD_LOGGING_DIR, a hyperparameter-search trial):
      `<logging_dir>/ckpt-watch-eval`, a subfolder (the trainer writes its event files in the logging dir
      itself, never in a subfolder), shown as the run `<name>/ckpt-watch-eval` wherever TensorBoard sees the
      trainer's run;
    * else, if OUTPUT_DIR/runs exists (the trainer logs TensorBoard there): OUTPUT_DIR/runs/ckpt-watch-eval;
    * else None: the trainer does not use TensorBoard.

    The first rule gives the same folder as the third, so results of one OUTPUT_DIR stay one run across daemon
    restarts, trainer resumes (each makes a new runs/<date>_<host>) and a run record written late.

    Raises ValueError for a folder that holds event files other than ours (the trainer's run, say): TensorBoard
    would merge our points into that run, and we would write among the trainer's files.
    """
    if setting == "off":
        return None
    output_dir = Path(output_dir)
    if logging_dir is not None:
        logging_dir = Path(logging_dir).expanduser()
        if not logging_dir.is_absolute():
            logging_dir = output_dir / logging_dir
    if setting == "auto":
        if logging_dir is not None and logging_dir.is_dir():
            folder = logging_dir.parent / EVAL_RUN if logging_dir.parent.name == "runs" else logging_dir / EVAL_RUN
            if folder == logging_dir:  # the trainer's own logging dir is runs/ckpt-watch-eval
                folder = logging_dir / EVAL_RUN
        elif (output_dir / "runs").is_dir():
            folder = output_dir / "runs" / EVAL_RUN
        else:
            return None
    else:
        folder = Path(setting).expanduser()
        if not folder.is_absolute():
            folder = output_dir / folder
    if logging_dir is not None and _same(folder, logging_dir):
        raise ValueError(f"TensorBoard folder {folder} is the trainer's logging dir; use a folder of its own")
    foreign = sorted(p.name for p in event_files(folder) if not p.name.endswith(FILE_TAG))
    if foreign:
        raise ValueError(f"TensorBoard folder {folder} holds event files that ckpt-watch did not write "
                         f"({foreign[0]}); use a folder of its own")  # fmt: skip
    return folder


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return a == b


def _walltime(result: Result) -> float:
    """`finished_at` (ISO 8601, "+00:00" or "Z") as epoch seconds; now if it is missing or unreadable."""
    text = result.finished_at
    if isinstance(text, str) and text:
        try:
            moment = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
        except ValueError:
            pass
        else:
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=timezone.utc)
            return moment.timestamp()
    return time.time()


class AutoTensorBoardSink(SinkBase):
    """The configured TensorBoard sink: its folder is resolved at each delivery until there is one.

    The daemon often starts before the trainer (a service), when neither our callback's run record nor
    OUTPUT_DIR/runs exists yet. While no folder resolves the trainer does not use TensorBoard, and results
    are acknowledged without a point (there is no TensorBoard run to put them next to).
    """

    name = "tensorboard"
    idempotent = False

    def __init__(self, setting: str, output_dir: Path):
        self.setting, self.output_dir = setting, Path(output_dir)
        self._sink: TensorBoardSink | None = None

    def deliver(self, results: Sequence[Result]) -> None:
        sink = self._resolve()
        if sink is not None:
            sink.deliver(results)

    def holds(self, results: Sequence[Result]) -> set[str]:
        sink = self._resolve()
        return sink.holds(results) if sink is not None else set()

    def _resolve(self) -> TensorBoardSink | None:
        if self._sink is None:
            from watcher.integrations.run_record import read_run_record

            logging_dir = (read_run_record(self.output_dir) or {}).get("logging_dir")
            try:
                folder = resolve_tensorboard_dir(self.setting, self.output_dir, Path(logging_dir) if logging_dir else None)
            except ValueError as exc:
                raise SinkUnavailable(str(exc), retry_after=300, nothing_sent=True) from None
            if folder is not None:
                self._sink = TensorBoardSink(folder)
        return self._sink

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close()
