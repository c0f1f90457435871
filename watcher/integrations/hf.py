"""`CkptWatchCallback`: one line in a Hugging Face `Trainer` script tells the ckpt-watch daemon everything.

    from watcher.integrations.hf import CkptWatchCallback
    trainer.add_callback(CkptWatchCallback())          # or Trainer(..., callbacks=[CkptWatchCallback()])

On world process zero only, it writes:

* after every checkpoint save, `checkpoint-N/ckpt-watch-complete.json`: the verified completion sentinel, with
  the step and a manifest of every file and its size (format: watcher.integrations.sentinel). The daemon then
  knows the checkpoint is complete as soon as the manifest matches the folder, without guessing from the layout.
  Extra fields: "epoch", "num_input_tokens_seen" (when the Trainer counts tokens), "total_flos", "writer".
* on train begin, after every save and on train end, `OUTPUT_DIR/ckpt-watch-run.json`: the run record (format:
  watcher.integrations.run_record): the active W&B run (entity, project, id, mode, local dir) for the daemon's
  `auto` run discovery, the TensorBoard logging dir, the pid and host, and "state" ("running", then "finished"
  once training returns; the W&B `defer` mode waits for it).

On every rank, at each save, it answers the daemon's stop request OUTPUT_DIR/ckpt-watch-stop.json (written when an
alert rule with `stop_training = true` fires; format: watcher.integrations.sentinel) by setting
`control.should_training_stop = True`: training ends right after the checkpoint just saved, and the callback logs
one line saying so. A request written before this training began (`requested_at` before `on_train_begin`: it
was meant for an earlier run, stopped and now resumed) is ignored, with one log line.

Writes are atomic (temp file + fsync + rename + directory fsync). A failed write is logged and never stops
training. This is the only ckpt-watch module that imports transformers; the daemon never imports it.

When it runs, in transformers 5.24 (trainer.py):

* `Trainer._maybe_log_save_evaluate` calls `self._save_checkpoint(model, trial)` and only then
  `self.callback_handler.on_save(...)`. `_save_checkpoint` writes the weights (`save_model`), optimizer,
  scheduler, scaler, RNG state and `trainer_state.json`, then rotates old checkpoints (`rotate_checkpoints`,
  `save_total_limit`, by folder mtime; the newest folder is always kept). So in `on_save` the folder
  `OUTPUT_DIR/checkpoint-{global_step}` is whole on this process and older ones may already be gone. Each rank
  writes its own `rng_state_{rank}.pth` with no barrier before `on_save`, hence the barrier below on
  multi-process runs (every rank runs `on_save`; only world process zero writes).
* Callbacks run in list order (`CallbackHandler.call_event`): `DefaultFlowCallback`, then the `report_to`
  integrations (`WandbCallback`, `TensorBoardCallback`, ...), then `callbacks=[...]`, then `add_callback(...)`.
  `WandbCallback.on_train_begin` calls `wandb.init` (unless a run exists) so, used as documented, the W&B run is
  known by our `on_train_begin`. The record is refreshed at every save and at train end anyway, so a callback
  order that puts `WandbCallback` after this one (or a `wandb.init` in `on_log`) is caught at the first save.
* transformers 5.x has no `TrainingArguments.logging_dir`: `TensorBoardCallback` picks its dir in
  `on_train_begin` (`TENSORBOARD_LOGGING_DIR`, else `OUTPUT_DIR/runs/<time>_<host>`). The record takes, in order:
  the `logging_dir` given to this callback, `args.logging_dir` (transformers 4.x), the `logging_dir` of the
  Trainer's `TensorBoardCallback`, `$TENSORBOARD_LOGGING_DIR`; else null.
* Stopping: `Trainer._inner_training_loop` runs `on_step_end`, then `_maybe_log_save_evaluate` (which saves and
  calls `on_save`, trainer.py 2284-2286), then checks `if self.control.should_epoch_stop or
  self.control.should_training_stop: break` (trainer.py 1971-1974) before the next step; after the loop only
  `on_epoch_end` and its `_maybe_log_save_evaluate`, which saves only for `save_strategy="epoch"` (or at
  `max_steps`), and `_finalize_training` (no save) follow. So `should_training_stop = True` in `on_save` of step N
  ends training at step N, with checkpoint-N the last checkpoint. `on_train_begin` resets the flag
  (trainer_callback.py 491), so a resumed training starts afresh.
* Every rank must stop at the same save, or the others wait in the next collective forever. Only world process
  zero reads the request and its answer is broadcast to every rank (torch.distributed, when initialised with
  more than one process): reading the file on every rank is not enough even on a shared filesystem, as the
  daemon may write it between two ranks' reads of the same save.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
import weakref
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler

from watcher.integrations.run_record import current_wandb_run, now_iso, write_run_record
from watcher.integrations.sentinel import is_stale, read_stop_request, write_sentinel

log = logging.getLogger(__name__)

WRITER = "ckpt-watch/hf"


class CkptWatchCallback(TrainerCallback):
    """Writes the completion sentinel after each save and the run record (see the module docstring).

    Args:
        logging_dir: the TensorBoard logging dir to record, when the Trainer's own cannot be found.
        barrier: on multi-process runs, wait for every rank in `on_save` before writing the sentinel (so files
            that other ranks write, like `rng_state_{rank}.pth`, are whole). Every rank must run the callback.
        sentinel: write `ckpt-watch-complete.json` into each checkpoint.
        run_record: write `OUTPUT_DIR/ckpt-watch-run.json`.
    """

    def __init__(
        self, logging_dir: str | os.PathLike | None = None, barrier: bool = True, sentinel: bool = True,
        run_record: bool = True,
    ):
        self.logging_dir = os.path.abspath(logging_dir) if logging_dir else None
        self.barrier = barrier
        self.sentinel = sentinel
        self.run_record = run_record
        self._handler: weakref.ref[CallbackHandler] | None = None
        self._wandb: dict[str, Any] | None = None
        self._started_at: str | None = None
        self._began: float | None = None  # time.time() at on_train_begin: older stop requests are stale
        self._said_stale: str | None = None  # the stale request's requested_at, logged once

    # -- Trainer events --------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        self._find_handler()
        self._began = time.time()
        if not state.is_world_process_zero:
            return
        self._started_at = now_iso()
        self._wandb = None  # a new train() (a new hyperparameter-search trial) may log into a new run
        self._write_record(args, state, "running")

    def on_save(self, args, state, control, **kwargs):
        self._find_handler()
        if self.barrier and getattr(args, "world_size", 1) > 1:
            from accelerate import PartialState

            PartialState().wait_for_everyone()
        if state.is_world_process_zero:
            if self.sentinel:
                self._write_sentinel(args, state)
            self._write_record(args, state, "running")
        if self._agreed(self._stop_request(args, state) if state.is_world_process_zero else None, args):
            control.should_training_stop = True

    # -- the daemon's stop request --------------------------------------------------------------------------

    def _stop_request(self, args, state) -> str | None:
        """Why to stop now (the request's reason, logged here), or None: no request, or a stale one."""
        request = read_stop_request(args.output_dir)
        if request is None:
            return None
        if is_stale(request, self._began):
            if self._said_stale != request.get("requested_at"):
                log.info("ckpt-watch: ignoring the stop request in %s: written at %s, before this training began",
                         args.output_dir, request.get("requested_at"))  # fmt: skip
                self._said_stale = request.get("requested_at")
            return None
        reason = str(request.get("reason") or request.get("rule") or "no reason given")
        log.warning("ckpt-watch: stopping training after step %d (checkpoint saved), as the daemon asks: %s",
                    state.global_step, reason)  # fmt: skip
        return reason

    @staticmethod
    def _agreed(reason: str | None, args) -> bool:
        """World process zero's answer on every rank (see the module docstring)."""
        if getattr(args, "world_size", 1) > 1:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                answer = [reason]
                dist.broadcast_object_list(answer, src=0)
                reason = answer[0]
        return reason is not None

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self._write_record(args, state, "finished")

    # -- the two files -----------------------------------------------------------------------------------

    def _write_sentinel(self, args, state) -> None:
        # Trainer._save_checkpoint saves into _get_output_dir(trial)/checkpoint-{global_step}; the run dir is
        # OUTPUT_DIR except during hyperparameter search (OUTPUT_DIR/run-<trial>), which is not watched.
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not folder.is_dir():
            log.warning("ckpt-watch: %s not found after save; no completion sentinel written", folder)
            return
        extra: dict[str, Any] = {"writer": WRITER}
        if state.epoch is not None:
            extra["epoch"] = float(state.epoch)
        if getattr(state, "num_input_tokens_seen", 0):
            extra["num_input_tokens_seen"] = int(state.num_input_tokens_seen)
        if getattr(state, "total_flos", 0):
            extra["total_flos"] = float(state.total_flos)
        try:
            write_sentinel(folder, state.global_step, **extra)
        except Exception as exc:  # never stop training over the watcher's files
            log.warning("ckpt-watch: could not write the completion sentinel in %s: %s", folder, exc)

    def _write_record(self, args, state, run_state: str) -> None:
        if not self.run_record:
            return
        wandb_run = current_wandb_run()
        if wandb_run is not None:
            self._wandb = wandb_run
        record = {
            "format": 1,
            "writer": WRITER,
            "output_dir": os.path.abspath(args.output_dir),
            "wandb": self._wandb,
            "logging_dir": self._resolve_logging_dir(args),
            "global_step": int(state.global_step),
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "state": run_state,
            "started_at": self._started_at or now_iso(),
            "updated_at": now_iso(),
        }
        try:
            write_run_record(args.output_dir, record)
        except Exception as exc:
            log.warning("ckpt-watch: could not write the run record in %s: %s", args.output_dir, exc)

    def _resolve_logging_dir(self, args) -> str | None:
        candidates = [self.logging_dir, getattr(args, "logging_dir", None)]
        handler = self._handler() if self._handler is not None else None
        if handler is not None:
            from transformers.integrations import TensorBoardCallback

            candidates += [
                getattr(cb, "logging_dir", None) for cb in handler.callbacks if isinstance(cb, TensorBoardCallback)
            ]
        candidates.append(os.environ.get("TENSORBOARD_LOGGING_DIR"))
        for candidate in candidates:
            if isinstance(candidate, (str, os.PathLike)) and str(candidate):
                return os.path.abspath(os.path.expanduser(candidate))
        return None

    def _find_handler(self) -> None:
        """Remember the Trainer's CallbackHandler (the caller of this event), to read its TensorBoardCallback.

        Callbacks are never handed the Trainer or its handler, and `add_callback` comes after `on_init_end`;
        `CallbackHandler.call_event` calls the event method directly, so the handler is a frame or two up.
        """
        if self._handler is not None and self._handler() is not None:
            return
        frame = sys._getframe(1)
        for _ in range(4):
            frame = frame.f_back
            if frame is None:
                return
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, CallbackHandler):
                self._handler = weakref.ref(candidate)
                return
