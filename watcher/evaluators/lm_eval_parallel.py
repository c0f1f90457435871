"""lm-eval data-parallel over several GPUs: one process per GPU through `accelerate launch`.

lm-eval's `hf` model splits the requests across processes only when it runs under accelerate with more than
one process (lm_eval/models/huggingface.py: `accelerator.num_processes > 1` and `gpus > 1`), each rank holding
a full copy of the model on its own GPU; rank 0 gathers the results. So a job pinned to `cuda:1,2` runs

    python -m watcher.evaluators.lm_eval_parallel launch PARENT_PID --config_file ... -m watcher.evaluators.lm_eval_parallel rank REQUEST

from the job's child process: `launch` starts accelerate's launcher (torch elastic), `rank` is one evaluation
process (lm_eval_run.py's `evaluate`). Rank 0 writes the EvalOutput as JSON next to the request, and the backend
reads it back.

Process hygiene, since a training job shares the host: accelerate is given its own config file (a user's
~/.cache/huggingface/accelerate/default_config.yaml may ask for DeepSpeed or another GPU count) and a free
port (torchrun's default 29500 is the port the training job on this host is most likely using). torch elastic
starts each rank in a new session, out of reach of a process-group kill, so every level asks the kernel to
signal it when its parent dies (watcher/processes.py): the launcher gets SIGTERM (its handler stops the ranks),
the ranks get SIGKILL; and the job child, a subreaper, stops whatever of this tree is left when it goes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from watcher import processes as process_groups
from watcher.atomic import write_json_atomic
from watcher.evaluators.base import EvalOutput, EvaluatorError
from watcher.evaluators.lm_eval_run import evaluate, parse_options


def run_data_parallel(model_dir: Path, options: dict[str, Any], workdir: Path, processes: int,
                      cpu: bool = False) -> EvalOutput:  # fmt: skip
    """Evaluate with `processes` lm-eval processes, one per visible GPU (`cpu=True`: on the CPU, for tests)."""
    request = workdir / "lm_eval_parallel_request.json"
    result = workdir / "lm_eval_parallel_result.json"
    result.unlink(missing_ok=True)
    write_json_atomic(request, {"model_dir": str(model_dir), "options": options, "workdir": str(workdir),
                                "device": "cpu" if cpu else "cuda", "result": str(result)})  # fmt: skip
    accelerate_config = workdir / "accelerate_config.json"
    write_json_atomic(accelerate_config, {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "NO" if processes == 1 else ("MULTI_CPU" if cpu else "MULTI_GPU"),
        "num_processes": processes, "num_machines": 1, "machine_rank": 0, "gpu_ids": "all",
        "mixed_precision": "no", "dynamo_config": {}, "use_cpu": cpu, "main_training_function": "main",
    })  # fmt: skip
    argv = [sys.executable, "-m", __name__, "launch", str(os.getpid()),
            "--config_file", str(accelerate_config), "--main_process_port", str(free_port()),
            "-m", __name__, "rank", str(request)]  # fmt: skip
    done = process_groups.run(argv, cwd=workdir)  # output goes straight into the job's log
    if result.is_file():
        outcome = json.loads(result.read_text(encoding="utf-8"))
        if "error" in outcome:  # a wrong request (unknown task, ...) is permanent, as in one process
            raise EvaluatorError(outcome["error"])
        if done.returncode == 0:
            return EvalOutput(**outcome)
    raise RuntimeError(f"lm-eval on {processes} processes through accelerate launch exited with status "
                       f"{done.returncode} and no results; see the log above")  # fmt: skip


def free_port() -> int:
    """A TCP port free right now on this host; the kernel picks it, so it never collides with a training job's."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _launch(parent_pid: int, accelerate_args: list[str]) -> int:
    process_groups.die_with_parent(parent_pid, signal.SIGTERM)
    from accelerate.commands.launch import launch_command, launch_command_parser

    launch_command(launch_command_parser().parse_args(accelerate_args))
    return 0


def _rank(request_path: Path) -> int:
    process_groups.die_with_parent(os.getppid(), signal.SIGKILL)
    request = json.loads(request_path.read_text(encoding="utf-8"))
    rank = int(os.environ.get("RANK", "0"))
    try:
        output = evaluate(Path(request["model_dir"]), request["device"], parse_options(request["options"]))
    except EvaluatorError as exc:
        if rank == 0:
            write_json_atomic(Path(request["result"]), {"error": str(exc)})
        return 0
    if output is not None:  # only rank 0 gets results back from lm-eval
        write_json_atomic(Path(request["result"]), dataclasses.asdict(output))
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["launch"]:
        return _launch(int(argv[1]), argv[2:])
    if argv[:1] == ["rank"]:
        return _rank(Path(argv[1]))
    raise SystemExit(f"usage: python -m {__name__} launch PARENT_PID ACCELERATE_ARGS... | rank REQUEST")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
