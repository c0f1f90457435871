"""The W&B sink: every result into the training run itself, at its checkpoint's step.

W&B drops any `log(step=N)` whose N is below the run's current step, so `step=` is never passed. Instead
`train/global_step` (the HF Trainer's own x-axis) is declared the step metric of every eval metric and logged in
the same row: rows for step 500 and then step 200 both land, each at its place on the training curve. Names are
`eval/<task>/<metric>` and `eval_ema/<task>/<metric>` (watcher/sinks/naming.py). W&B keeps only the last
writer's metric definitions, so the complete set (the trainer's `*` included) is declared every time.

Which run (`wandb = "auto" | "off" | "[ENTITY/]PROJECT/RUN_ID"`): with `auto`, in order, what our trainer
callback recorded in OUTPUT_DIR/ckpt-watch-run.json; WANDB_RUN_ID / WANDB_PROJECT / WANDB_ENTITY given to the
daemon; the newest run in the trainer's local `wandb/` folder (OUTPUT_DIR/wandb, its parent's, $WANDB_DIR/wandb),
whose id comes from its `run-<id>.wandb` file name. No run found: the results go to no W&B run, said once.

A training run that is still being written (`wandb_live`):
  defer   (default) results wait in the outbox until the training run has finished, then the run is resumed
          (`resume="must"`) and they are replayed in step order. Finished means: the trainer's local log ends
          with its exit record, or the trainer's process (recorded by our callback, same host) is gone, or the
          W&B API says the run is no longer running. If none of these can tell, results wait for
          `ckpt-watch sync`, which a person runs once training has ended.
  shared  attach to the live run as a non-primary writer (W&B's shared mode: `mode="shared"`,
          `x_primary=False`, `x_label="ckpt-watch"`, `x_update_finish_state=False` so that the run stays
          running); the trainer must run in shared mode too. W&B calls a second writer on a live run
          unsupported (wandb/wandb#12269: the server overwrote a run's earliest rows); a warning says so.
Every writer leaves out system metrics, console capture and metadata (`writer_settings`).
Offline runs (the training run is offline, or WANDB_MODE=offline) are written as offline runs of the same id
under RESULTS_DIR/wandb/, which never touches the trainer's files; `wandb sync` uploads them into the run
(`upload_command` gives the exact command; `ckpt-watch sync` and `status` print it). In `defer` mode they too
wait until training has ended, so that one offline run (one folder) holds them all, not one per checkpoint.

In `defer` mode the daemon also hands results over only once it has no job left (`wait_for_idle`, see
watcher/outbox.py): one resume (one offline folder) per session's results, not one per checkpoint.

At most once: after a crash, `holds` tells the outbox which results the run already has (`RunHistory`: our
offline `.wandb` logs, or the W&B public API's history of the online run), matched by `train/global_step` and
the values, never by `_step` (which wandb/wandb#12474 may drop from offline logs).

Alert firings (watcher/alerts.py; this sink declares `alerts`) become W&B alerts on the training run,
`run.alert(title, text, level)` in the same child, after the rows: W&B sends them on (e-mail, Slack) as the
run's alerts; in an offline run they are records of the `.wandb` log that `wandb sync` uploads. They wait as
results do: in `defer` mode until training has ended (a `stop_training` rule ends it at the next save). After a
crash, one in flight is sent again only if our offline logs lack it; for an online run W&B cannot be asked, so
it is not sent again (at most once).

Each delivery runs in a child process (`python -m watcher.sinks.wandb_run SPEC PARENT_PID`) with a hard time
limit: wandb starts a service process, threads and exit hooks, and a hung network call must not wedge the
daemon's loop. The child guards its tree (watcher/processes.py): it and the `wandb-core` service it starts go
with the daemon, and its spec lives in a folder of its own (RESULTS_DIR/.deliveries/<id>/) that goes with it.
Tested against the real client through a wire-level stand-in server (tests/wandb_standin.py).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from watcher import processes
from watcher.ledgers import AlertRecord
from watcher.integrations.run_record import RUN_RECORD, process_alive, read_run_record
from watcher.records import Result
from watcher.sinks.base import SinkBase, SinkSettings, SinkUnavailable
from watcher.sinks.naming import STEP_KEY, metric_row, prefix_of
from watcher.sinks.wandb_files import LocalRun, find_local_runs

if TYPE_CHECKING:
    from watcher.sinks import SinkPlace

log = logging.getLogger("ckpt-watch")

LIVE_MODES = ("defer", "shared")
DELIVERY_TIMEOUT = 600.0  # seconds for one delivery (init, rows, finish), then the child is killed
WAIT = 60.0  # seconds before asking again while no run is found or the training run is live
API_TIMEOUT = 20.0  # seconds for one question to the W&B public API (is the run running? which rows has it?)
DELIVERIES = ".deliveries"  # RESULTS_DIR/.deliveries/<id>/: one folder per delivery child, removed with it


@dataclass(frozen=True)
class WandbTarget:
    """The training run to log into, and how it was found."""

    id: str
    project: str | None
    entity: str | None
    offline: bool = False
    source: str = ""
    trainer_log: str | None = None  # the trainer's run-<id>.wandb, when it is on this machine
    trainer_pid: int | None = None  # from our callback's run record
    trainer_host: str | None = None
    trainer_state: str | None = None  # "running" | "finished", from the same record

    @property
    def path(self) -> str:
        return "/".join(p for p in (self.entity, self.project, self.id) if p)


def parse_setting(setting: str) -> tuple[str | None, str | None, str] | None:
    """"[ENTITY/]PROJECT/RUN_ID" -> (entity, project, id); None for "auto"/"off". ValueError if malformed."""
    if setting in ("auto", "off"):
        return None
    parts = setting.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"wandb must be auto, off or [ENTITY/]PROJECT/RUN_ID, got {setting!r}")
    return (parts[0] if len(parts) == 3 else None, parts[-2], parts[-1])


def find_target(setting: str, output_dir: Path, environ: dict[str, str] | None = None) -> WandbTarget | None:
    environ = dict(os.environ if environ is None else environ)
    offline_env = environ.get("WANDB_MODE") in ("offline", "dryrun")
    explicit = parse_setting(setting)
    if explicit:
        entity, project, run_id = explicit
        return WandbTarget(run_id, project, entity, offline_env, "configured")
    record = read_run_record(output_dir) or {}
    recorded = record.get("wandb") if isinstance(record.get("wandb"), dict) else {}
    if recorded.get("id"):
        return WandbTarget(recorded["id"], recorded.get("project"), recorded.get("entity"),
                           offline_env or recorded.get("mode") == "offline", str(output_dir / RUN_RECORD),
                           _trainer_log(recorded), record.get("pid"), record.get("hostname"),
                           record.get("state"))  # fmt: skip
    if environ.get("WANDB_RUN_ID") and environ.get("WANDB_PROJECT"):
        return WandbTarget(environ["WANDB_RUN_ID"], environ["WANDB_PROJECT"], environ.get("WANDB_ENTITY"),
                           offline_env, "WANDB_RUN_ID")  # fmt: skip
    for folder in _wandb_dirs(output_dir, environ):
        runs = find_local_runs(folder)
        if runs:
            run = runs[0]
            project = run.project or environ.get("WANDB_PROJECT")
            return WandbTarget(run.id, project, run.entity or environ.get("WANDB_ENTITY"),
                               offline_env or run.offline, str(run.log), str(run.log))  # fmt: skip
    return None


def training_is_live(target: WandbTarget) -> tuple[bool | None, str]:
    """(True, why) if the trainer still writes the run, (False, why) if it has finished, (None, why) unknown."""
    if target.trainer_log:
        local = _describe(Path(target.trainer_log))
        if local is not None and local.exited:
            return False, f"the trainer's log {target.trainer_log} ends with the run's exit record"
    # A training process that is still alive may still hold the run open, even after training returned
    # ("finished" in the record): W&B finishes a run at the process's exit.
    alive = process_alive({"pid": target.trainer_pid, "hostname": target.trainer_host})
    if alive is not None:
        verb = "is still running" if alive else "has exited"
        return alive, f"the training process (pid {target.trainer_pid}) {verb}"
    if not target.offline:
        try:
            import wandb

            state = wandb.Api(timeout=API_TIMEOUT).run(target.path).state
        except Exception as exc:  # noqa: BLE001 - no answer is "unknown", not an error
            state, why = None, f"the W&B API could not say ({type(exc).__name__})"
        else:
            return state == "running", f"the W&B API says the run is {state}"
    else:
        why = "nothing on this machine says whether it has finished"
    if target.trainer_state == "finished":
        return False, "the trainer's run record says training finished (on another host)"
    return None, why


def build(config: SinkSettings, place: SinkPlace) -> WandbSink | None:
    """`wandb = "off"`: none; else the run is found at delivery (`find_target`)."""
    if config.wandb == "off":
        return None
    return WandbSink(config.wandb, config.wandb_live, place.output_dir, place.results_dir, place.force, place.ledger)


class WandbSink(SinkBase):
    name = "wandb"
    slow = True  # the daemon delivers in the background (watcher/outbox.py): a resume can take minutes
    idempotent = False  # a repeated row is a second point: `holds` asks the run's history instead
    alerts = True  # the alert rules' firings become W&B alerts on the training run (`run.alert`)

    def __init__(self, setting: str, live_mode: str, output_dir: Path, results_dir: Path, force: bool = False,
                 ledger: processes.Ledger | None = None):  # fmt: skip
        self.setting, self.live_mode = setting, live_mode
        self.output_dir, self.results_dir = Path(output_dir), Path(results_dir)
        self.force = force  # `ckpt-watch sync`: a person says training is over unless we know it is not
        # defer: the daemon hands over results once it has no job left, so a session's results make one resume
        # (one offline run folder), not one per checkpoint (watcher/outbox.py); shared: as they come
        self.wait_for_idle = live_mode == "defer"
        self.ledger = ledger  # where the delivery child's process group is recorded while it runs
        self._said_no_run = False
        if live_mode == "shared" and setting != "off":
            log.warning("wandb_live = \"shared\": ckpt-watch writes into the training run while it trains, as a "
                        "second writer. W&B calls this unsupported: a second shared-mode writer has made the server "
                        "overwrite a run's earliest history rows (wandb/wandb#12269). Prefer \"defer\" (the default) "
                        "unless you need the curves during training.")  # fmt: skip

    def deliver(self, results: Sequence[Result], alerts: Sequence[AlertRecord] = ()) -> None:
        rows = [row for result in sorted(results, key=lambda r: (r.step, r.variant)) if (row := wandb_row(result))]
        if not rows and not alerts:
            return  # only failed results: nothing to draw
        target = find_target(self.setting, self.output_dir)
        if target is None:
            # By the time a checkpoint is complete, a W&B-logging trainer has long created its run (train begin),
            # so none found means none is used: these results go to no W&B run.
            if not self._said_no_run:
                log.info("no W&B run found for %s (no callback record, WANDB_RUN_ID or local wandb/ run): results "
                         "are not logged to W&B; set --wandb PROJECT/RUN_ID to name one", self.output_dir)  # fmt: skip
                self._said_no_run = True
            return
        if target.project is None:
            raise SinkUnavailable(f"W&B run {target.id} found ({target.source}) but not its project; set "
                                  "WANDB_PROJECT or `wandb = \"PROJECT/RUN_ID\"`", retry_after=WAIT, nothing_sent=True)  # fmt: skip
        shared = self.live_mode == "shared" and not target.offline
        if self.live_mode == "defer":
            # Offline too: every wandb.init makes an offline run folder of its own, so results written once training
            # has ended make one folder for all of them (not one per checkpoint), and `wandb sync` of the
            # trainer's finished run comes first (the order tests/test_wandb_server.py shows to work).
            live, why = training_is_live(target)
            if live or (live is None and not self.force):
                then = " as one offline run" if target.offline else ""
                raise SinkUnavailable(f"training run {target.path} may still be written ({why}); results wait to be "
                                      f"written{then} once it has ended, or by `ckpt-watch sync` (wandb_live = \"defer\")",
                                      retry_after=WAIT, nothing_sent=True)  # fmt: skip
        self._run_child({"target": asdict(target), "rows": rows, "shared": shared, "dir": str(self.results_dir),
                         "definitions": metric_definitions(), "alerts": [wandb_alert(a) for a in alerts]})  # fmt: skip

    def holds_alerts(self, alerts: Sequence[AlertRecord]) -> set[int]:
        """Of alerts handed to a delivery that never reported back: those our offline logs of the run have; for
        an online run, all of them (W&B cannot be asked which alerts a run has: at most once, never twice)."""
        target = find_target(self.setting, self.output_dir)
        if target is None or target.project is None:
            return set()
        if not target.offline:
            log.warning("W&B: %d alert(s) may or may not have reached run %s before ckpt-watch stopped; not sent "
                        "again (they are in alerts.jsonl)", len(alerts), target.path)  # fmt: skip
            return {alert.id for alert in alerts}
        from watcher.sinks.wandb_files import alert_records

        sent = set()
        for log_file in (self.results_dir / "wandb").glob(f"offline-run-*/run-{target.id}.wandb"):
            sent |= {(record["title"], record["text"]) for record in alert_records(log_file)}
        return {alert.id for alert in alerts if (wandb_alert(alert)["title"], wandb_alert(alert)["text"]) in sent}

    def holds(self, results: Sequence[Result]) -> set[str]:
        """The results whose row the training run already has (see `RunHistory`); raises SinkUnavailable when
        W&B cannot be asked (the results then stay pending: never sent blind)."""
        rows = {result.result_id: wandb_row(result) for result in results}
        target = find_target(self.setting, self.output_dir)
        if target is None or target.project is None:
            return set()  # `deliver` says why; nothing of ours can be there
        history = RunHistory(target, self.results_dir)
        try:
            return {result_id for result_id, row in rows.items() if not row or history.has(row)}
        except SinkUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - a question W&B cannot answer now: ask again later
            raise SinkUnavailable(f"cannot check which rows the W&B run {target.path} has ({type(exc).__name__}: "
                                  f"{str(exc)[:200]}); results stay pending", retry_after=WAIT,
                                  nothing_sent=True) from None  # fmt: skip

    def _run_child(self, spec: dict[str, Any]) -> None:
        folder = self.results_dir / DELIVERIES / uuid.uuid4().hex
        folder.mkdir(parents=True)
        try:
            (folder / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
            # A private W&B service: one inherited through WANDB_SERVICE (from a process that used wandb and
            # started us) may still hold the run from its own session ("run ID is in use").
            env = {key: value for key, value in os.environ.items() if key != "WANDB_SERVICE"}
            done = processes.run([sys.executable, "-m", __name__, str(folder / "spec.json"), str(os.getpid())],
                                 timeout=DELIVERY_TIMEOUT, guardian=True, ledger=self.ledger,
                                 role="wandb delivery", folder=folder, capture_output=True, text=True,
                                 stdin=subprocess.DEVNULL, env=env)  # fmt: skip
        except subprocess.TimeoutExpired:
            raise SinkUnavailable(f"W&B delivery took over {DELIVERY_TIMEOUT:g} s and was stopped") from None
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        if done.returncode != 0:
            lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
            raise SinkUnavailable(f"W&B: {lines[-1][:300] if lines else f'exit status {done.returncode}'}")


@dataclass
class RunHistory:
    """The history rows a W&B run already has, from where ckpt-watch wrote them: our own offline runs
    (RESULTS_DIR/wandb/offline-run-*/run-<id>.wandb) for an offline target, the W&B public API for an online
    one. A small interface so that the outbox's "does the target hold this already?" stays one question."""

    target: WandbTarget
    results_dir: Path
    _rows: list[dict[str, Any]] | None = None

    def rows(self) -> list[dict[str, Any]]:
        if self._rows is None:
            self._rows = self._offline_rows() if self.target.offline else self._online_rows()
        return self._rows

    def has(self, row: dict[str, Any]) -> bool:
        """A row with the same train/global_step and every value of `row` (float-exact: JSON round-trips)."""
        return any(all(_same_value(seen.get(key), value) for key, value in row.items()) for seen in self.rows())

    def _offline_rows(self) -> list[dict[str, Any]]:
        from watcher.sinks.wandb_files import WandbLogError, history_rows

        found: list[dict[str, Any]] = []
        for log_file in sorted((self.results_dir / "wandb").glob(f"offline-run-*/run-{self.target.id}.wandb")):
            try:
                found.extend(history_rows(log_file))
            except (OSError, WandbLogError):
                continue  # not a W&B log (bad header): it holds no rows `wandb sync` could upload
        return found

    def _online_rows(self) -> list[dict[str, Any]]:
        import wandb

        run = wandb.Api(timeout=API_TIMEOUT).run(self.target.path)
        return list(run.scan_history())


def _same_value(seen: Any, value: Any) -> bool:
    if isinstance(seen, bool) or isinstance(value, bool) or not isinstance(seen, (int, float)):
        return False
    return float(seen) == float(value)


def upload_command(results_dir: Path, target: WandbTarget | None) -> str | None:
    """The `wandb sync` command that uploads our offline runs not yet uploaded (None: there are none).

    The trainer's own offline run comes first in it when it is on this machine and not uploaded yet: given one
    command, `wandb sync` uploads the folders of one run in order of their start time, the trainer's first.
    Without `--include-synced`, a folder already uploaded is skipped, so running it twice adds nothing.
    """
    from watcher.sinks.wandb_files import unsynced_offline_runs

    ours = unsynced_offline_runs(Path(results_dir) / "wandb")
    if not ours:
        return None
    folders = [run.log.parent for run in ours]
    if target is not None and target.trainer_log:
        trainer = Path(target.trainer_log)
        if trainer.parent.name.startswith("offline-run-") and not Path(f"{trainer}.synced").exists():
            folders.insert(0, trainer.parent)
    return "wandb sync " + " ".join(shlex.quote(str(folder)) for folder in folders)


def upload_note(setting: str, output_dir: Path, results_dir: Path) -> str | None:
    """Two lines for `ckpt-watch sync` and `status` when offline results wait for `wandb sync` (else None)."""
    if setting == "off":
        return None
    try:
        target = find_target(setting, Path(output_dir))
    except ValueError:
        target = None
    command = upload_command(results_dir, target)
    if command is None:
        return None
    return ("W&B: the results are in offline runs, not uploaded yet; to upload them into the training run (its "
            f"own offline run first), run:\n  {command}")  # fmt: skip


def wandb_row(result: Result) -> dict[str, float | int]:
    metrics = metric_row(result)
    return {STEP_KEY: result.step, **result.progress, **metrics} if metrics else {}


def wandb_alert(alert: AlertRecord) -> dict[str, str]:
    """`run.alert`'s arguments for a firing: the title names the checkpoint and the rule (W&B wants under 64
    characters and holds back a second alert of one title within `wait_duration`), the text is the message."""
    record = alert.record
    title = f"ckpt-watch: {record['checkpoint']}: {record['rule']}"
    return {"title": title if len(title) < 64 else title[:62] + "…", "text": record["message"],
            "level": "ERROR" if record.get("stop_training") else "WARN"}  # fmt: skip


def metric_definitions() -> list[dict[str, Any]]:
    """The complete set, declared at every delivery: the trainer's (as transformers' WandbCallback declares
    them) and ours. W&B keeps the definitions of the last writer only."""
    return [
        {"name": STEP_KEY},
        {"name": "*", "step_metric": STEP_KEY, "step_sync": True},
        *({"name": f"{prefix_of(v)}/*", "step_metric": STEP_KEY, "step_sync": True} for v in ("regular", "ema")),
    ]


def _trainer_log(recorded: dict[str, Any]) -> str | None:
    """The trainer's `run-<id>.wandb`, from the run folder (sync_dir) or the files dir inside it (dir)."""
    folders = [Path(recorded["sync_dir"])] if recorded.get("sync_dir") else []
    if recorded.get("dir"):
        folders += [Path(recorded["dir"]).parent, Path(recorded["dir"])]
    for folder in folders:
        log = folder / f"run-{recorded['id']}.wandb"
        if log.is_file():
            return str(log)
    return None


def _wandb_dirs(output_dir: Path, environ: dict[str, str]) -> list[Path]:
    candidates = [output_dir / "wandb", output_dir.parent / "wandb"]
    if environ.get("WANDB_DIR"):
        candidates.insert(0, Path(environ["WANDB_DIR"]) / "wandb")
    return [c for c in candidates if c.is_dir()]


def _describe(log: Path) -> LocalRun | None:
    from watcher.sinks.wandb_files import WandbLogError, describe_run

    try:
        return describe_run(log)
    except (OSError, WandbLogError):
        return None


def writer_settings(shared: bool) -> dict[str, Any]:
    """wandb.Settings for every ckpt-watch writer: it adds rows to someone else's run, nothing else.

    No system metrics, console capture, metadata, requirements or code (they would land in the trainer's run
    next to, or over, the trainer's own). In shared mode also `x_update_finish_state=False`: wandb 0.31 has a
    writer finish the run by default, and the trainer's live run must stay running until the trainer ends it
    (prime-rl sets the same flags for its evaluator, PrimeIntellect-ai/prime-rl#3256).
    """
    settings: dict[str, Any] = {"silent": True, "console": "off", "x_disable_stats": True, "x_disable_meta": True,
                                "x_disable_machine_info": True, "x_save_requirements": False, "save_code": False}  # fmt: skip
    # W&B's own WANDB_INIT_TIMEOUT wins; the default 90 s is short for resuming a long run on a busy server.
    if not os.environ.get("WANDB_INIT_TIMEOUT"):
        settings["init_timeout"] = 180
    if shared:
        settings.update(mode="shared", x_primary=False, x_label="ckpt-watch", x_update_finish_state=False)
    return settings


def _deliver(spec: dict[str, Any]) -> None:
    """In the child: resume (or, shared, attach to) the run, declare the metrics, log the rows, finish."""
    import wandb

    target = spec["target"]
    run = wandb.init(
        id=target["id"], project=target["project"], entity=target["entity"], dir=spec["dir"],
        resume=None if spec["shared"] else "must" if not target["offline"] else "allow",
        mode="offline" if target["offline"] else None, settings=wandb.Settings(**writer_settings(spec["shared"])),
    )  # fmt: skip
    for definition in spec["definitions"]:
        run.define_metric(**definition)
    for row in spec["rows"]:
        run.log(row)  # never step=: train/global_step in the row is the x-axis
    for alert in spec.get("alerts", []):
        run.alert(**alert, wait_duration=1)  # 0 would mean W&B's default, one minute between equal titles
    run.finish()
    wandb.teardown()  # ends the wandb-core service now, not at interpreter exit


if __name__ == "__main__":
    processes.guard(int(sys.argv[2]))  # this child, and the wandb-core it starts, go with the daemon
    try:
        _deliver(json.loads(Path(sys.argv[1]).read_text(encoding="utf-8")))
        processes.stop_descendants(os.getpid(), processes.GUARD_GRACE)  # wandb-core, should it linger
    except Exception as exc:  # noqa: BLE001 - one line for the daemon's log, the whole story on stderr above it
        import traceback

        traceback.print_exc()
        print(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}", file=sys.stderr)
        sys.exit(1)
