"""The lmms_eval backend: options, parsing lmms-eval's results JSON, local and server mode, and their failures.

lmms-eval itself lives in an environment of its own. The tests that run the real thing need its interpreter:
$CKPT_WATCH_LMMS_PYTHON, or else /work/lmms-venv/bin/python where that exists (the development machine's); without
either they are skipped (as in CI). Everything else uses a stand-in interpreter script and a stand-in HTTP server,
since those tests check ckpt-watch's handling, not lmms-eval.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from helpers import ckpt_watch, results
from watcher.evaluators import EvaluatorError, get_evaluator
from watcher.presets import load_presets

FIXTURE = Path(__file__).parent / "data" / "lmms_eval_results.json"  # written by the real lmms-eval 0.7.3
FIXTURE_BUILDER = Path(__file__).parent / "lmms_eval_fixture.py"
DEV_LMMS_PYTHON = Path("/work/lmms-venv/bin/python")


def _lmms_python() -> Path | None:
    configured = os.environ.get("CKPT_WATCH_LMMS_PYTHON")
    if configured:
        return Path(configured)
    return DEV_LMMS_PYTHON if DEV_LMMS_PYTHON.exists() else None


LMMS_PYTHON = _lmms_python()
needs_lmms = pytest.mark.skipif(
    LMMS_PYTHON is None,
    reason="no lmms-eval environment: set CKPT_WATCH_LMMS_PYTHON to the python of a venv with "
    "`pip install 'lmms-eval[server]' decord` to run lmms-eval for real",
)

STANDIN = """#!{python}
# Stands in for lmms-eval's interpreter: answers the version query, then acts as $STANDIN_MODE says.
import json, os, shutil, sys, time
from pathlib import Path

if sys.argv[1] == "-c":
    versions = os.environ.get("STANDIN_VERSIONS", "ok")
    if versions == "garbage":
        print("this is not json")
    else:
        print(json.dumps({{"python": "3.0", "lmms_eval": None if versions == "none" else "0.0+standin",
                          "torch": "2.0+standin", "transformers": None}}))
    sys.exit(0)
flags = dict(zip(sys.argv[3::2], sys.argv[4::2]))  # after "-m lmms_eval"; every flag we pass takes a value
if os.environ.get("STANDIN_RECORD"):
    env = {{k: os.environ.get(k) for k in ("PYTHONPATH", "VIRTUAL_ENV", "RANK", "CUDA_VISIBLE_DEVICES", "MARKER")}}
    Path(os.environ["STANDIN_RECORD"]).write_text(json.dumps({{"argv": sys.argv, "env": env, "cwd": os.getcwd()}}))
mode = os.environ.get("STANDIN_MODE", "ok")
if mode == "crash-20" and "checkpoint-20" not in flags["--model_args"]:
    mode = "ok"
print("loading the model ...", flush=True)
if mode in ("crash", "crash-20"):
    print("Traceback (most recent call last):", file=sys.stderr)
    print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", file=sys.stderr)
    print("some trailing noise", file=sys.stderr)
    sys.exit(1)
if mode == "garbage":
    sys.stdout.buffer.write(b"\\x00\\xff garbage ]]] {{not json\\n")
    sys.exit(0)
if mode == "unknown_task":
    print("2026-01-01 | \\x1b[31mERROR   \\x1b[0m | lmms_eval.__main__:cli_evaluate:614 - Error during evaluation: "
          "Tasks not found: no_such_task. Try `lmms-eval --tasks list`")
    sys.exit(0)  # as lmms-eval does after catching the error
if mode == "sleep":
    time.sleep(60)
out = Path(flags["--output_path"]) / "standin__model"
out.mkdir(parents=True)
if mode == "bad_json":
    (out / "20260101_000000_results.json").write_text("{{not json")
else:
    shutil.copy({fixture!r}, out / "20260101_000000_results.json")
"""


@pytest.fixture
def standin(tmp_path) -> Path:
    script = tmp_path / "standin python"  # a space: no shell is involved
    script.write_text(STANDIN.format(python=sys.executable, fixture=str(FIXTURE)))
    script.chmod(0o755)
    return script


@pytest.fixture
def model_dir(tmp_path) -> Path:
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text("{}")
    return path


# --- options ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    ({"tasks": ["t"]}, r"one of 'python' or 'server_url'.*\[backends\.lmms_eval\] python = "),
    ({"tasks": ["t"], "python": "/bin/sh", "server_url": "http://h:1"}, "exclude each other"),
    ({"tasks": [], "server_url": "http://h:1"}, "'tasks' must be a non-empty list"),
    ({"tasks": ["a,b"], "server_url": "http://h:1"}, "cannot contain commas"),
    ({"tasks": ["t"], "server_url": "http://h:1", "shots": 1}, "unknown lmms_eval option"),
    ({"tasks": ["t"], "server_url": "ftp://h"}, "http"),
    ({"tasks": ["t"], "python": "/no/such/python"}, "does not exist or is not executable"),
    ({"tasks": ["t"], "python": "python3"}, "absolute path"),
    ({"tasks": ["t"], "server_url": "http://h:1", "model_args": {"pretrained": "x"}}, "must not set 'pretrained'"),
    ({"tasks": ["t"], "server_url": "http://h:1", "model_args": {"x": "a,b"}}, "without commas"),
    ({"tasks": ["t"], "server_url": "http://h:1", "model_args": "dtype=x"}, "must be a table"),
    ({"tasks": ["t"], "server_url": "http://h:1", "limit": 0}, "'limit' must be a positive number"),
    ({"tasks": ["t"], "server_url": "http://h:1", "batch_size": "auto"}, "'batch_size' must be a positive integer"),
    ({"tasks": ["t"], "server_url": "http://h:1", "num_fewshot": -1}, "'num_fewshot'"),
    ({"tasks": ["t"], "server_url": "http://h:1", "timeout": 0}, "'timeout' must be a positive number"),
    ({"tasks": ["t"], "server_url": "http://h:1", "poll_interval": True}, "'poll_interval'"),
    ({"tasks": ["t"], "server_url": "http://h:1", "model": "a b"}, "'model' must be"),
    ({"tasks": ["t"], "server_url": "http://h:1", "include_path": "/tmp"}, "include_path' does not work with server"),
    ({"tasks": ["t"], "python": sys.executable, "include_path": "/no/such/dir"}, "is not a directory"),
    ({"tasks": ["t"], "python": sys.executable, "output_dir": "/tmp"}, "server mode"),
])  # fmt: skip
def test_bad_options_are_rejected(options, message):
    with pytest.raises(EvaluatorError, match=message):
        get_evaluator("lmms_eval").check_options(options)


def test_backend_settings_fill_in_every_lmms_eval_evaluator(tmp_path):
    tables = {"vqa": {"evaluators": [{"backend": "lmms_eval", "tasks": ["mme"], "limit": 8}]}}
    preset = load_presets(tables, {"lmms_eval": {"python": sys.executable}})["vqa"]
    assert preset.evaluators[0].options == {"python": sys.executable, "tasks": ["mme"], "limit": 8}
    with pytest.raises(Exception, match="preset 'vqa'.*'python' or 'server_url'"):
        load_presets(tables, {})


# --- parsing a real results file --------------------------------------------------------------------------------


def test_a_real_results_file_is_flattened_like_lm_eval():
    from watcher.evaluators.lmms_eval_results import parse_results

    out = parse_results(json.loads(FIXTURE.read_text()))
    # "exact_match_stderr_clustered,none" is "N/A" in the file: dropped, like lm-eval's.
    assert out.metrics == {"ckpt_watch_tiny_vqa/exact_match": 0.0, "ckpt_watch_tiny_vqa/exact_match_stderr": 0.0,
                           "ckpt_watch_tiny_vqa/exact_match_stderr_clt": 0.0}  # fmt: skip
    assert {"results", "configs", "versions", "n-shot", "higher_is_better", "n-samples"} <= set(out.raw)
    assert "samples" not in out.raw and "task_hashes" not in out.raw
    json.dumps(out.raw, allow_nan=False)


def test_filters_and_groups_are_named_like_lm_eval():
    from watcher.evaluators.lmms_eval_results import parse_results

    out = parse_results({"results": {"mme": {"alias": "mme", "score,none": 1.5, "acc,flex": float("nan")}},
                         "groups": {"grp": {"acc,strict-match": 0.5}}})  # fmt: skip
    assert out.metrics == {"mme/score": 1.5, "grp/acc@strict-match": 0.5}


# --- local mode with a stand-in interpreter -----------------------------------------------------------------------


def test_local_mode_runs_lmms_eval_in_its_own_environment(standin, model_dir, tmp_path, monkeypatch, capfd):
    record = tmp_path / "record.json"
    monkeypatch.setenv("STANDIN_RECORD", str(record))
    for name, value in {"PYTHONPATH": "/ours", "VIRTUAL_ENV": "/ours/venv", "RANK": "3", "MARKER": "kept",
                        "CUDA_VISIBLE_DEVICES": "1"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    tasks_dir = tmp_path / "my tasks"
    tasks_dir.mkdir()
    options = {"python": str(standin), "tasks": ["mme", "ok_vqa"], "limit": 4, "num_fewshot": 0,
               "include_path": str(tasks_dir), "model_args": {"dtype": "bfloat16", "use_cache": True}}  # fmt: skip
    workdir = tmp_path / "work"
    out = get_evaluator("lmms_eval").run(model_dir, ("cuda:0",), options, workdir)

    assert out.metrics["ckpt_watch_tiny_vqa/exact_match"] == 0.0
    assert out.versions == {"lmms_eval": "0.0+standin", "lmms_eval.python": "3.0", "lmms_eval.torch": "2.0+standin"}
    seen = json.loads(record.read_text())
    flags = dict(zip(seen["argv"][3::2], seen["argv"][4::2]))
    assert seen["argv"][1:3] == ["-m", "lmms_eval"]
    assert flags == {"--model": "llava_hf", "--tasks": "mme,ok_vqa", "--batch_size": "1", "--device": "cuda:0",
                     "--model_args": f"pretrained={model_dir},dtype=bfloat16,use_cache=True,device_map=cuda:0",
                     "--output_path": str(workdir / "lmms_eval_output"), "--limit": "4", "--num_fewshot": "0",
                     "--include_path": str(tasks_dir)}  # fmt: skip
    # Ours scrubbed, the rest (CUDA_VISIBLE_DEVICES pinned by the daemon) inherited; it runs in the workdir.
    assert seen["env"] == {"PYTHONPATH": None, "VIRTUAL_ENV": None, "RANK": None, "CUDA_VISIBLE_DEVICES": "1",
                           "MARKER": "kept"}  # fmt: skip
    assert seen["cwd"] == str(workdir)
    assert "loading the model" in capfd.readouterr().out  # its output reaches the job's log


@pytest.mark.parametrize("mode, versions, error, message", [
    ("crash", "ok", RuntimeError, r"exited with status 1: torch\.OutOfMemoryError: CUDA out of memory"),
    ("garbage", "ok", RuntimeError, r"wrote no results file under .*: .*garbage"),
    ("bad_json", "ok", RuntimeError, r"results file .* is unreadable"),
    ("unknown_task", "ok", EvaluatorError, r"^unknown lmms-eval task\(s\): no_such_task$"),
    ("ok", "none", EvaluatorError, r"has no lmms-eval installed"),
    ("ok", "garbage", EvaluatorError, r"is not a working Python interpreter"),
])  # fmt: skip
def test_failures_raise_with_a_one_line_reason(standin, model_dir, tmp_path, monkeypatch, mode, versions, error,
                                               message):  # fmt: skip
    monkeypatch.setenv("STANDIN_MODE", mode)
    monkeypatch.setenv("STANDIN_VERSIONS", versions)
    with pytest.raises(error, match=message) as caught:
        get_evaluator("lmms_eval").run(model_dir, ("cpu",), {"python": str(standin), "tasks": ["t"]}, tmp_path / "w")
    assert "\n" not in str(caught.value)


def test_a_run_over_its_timeout_is_stopped(standin, model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("STANDIN_MODE", "sleep")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"timed out after 1 s"):
        get_evaluator("lmms_eval").run(model_dir, ("cpu",), {"python": str(standin), "tasks": ["t"], "timeout": 1},
                                       tmp_path / "w")  # fmt: skip
    assert time.monotonic() - start < 30


def test_a_model_path_with_a_comma_is_refused(standin, tmp_path):
    bad = tmp_path / "a,b"
    bad.mkdir()
    with pytest.raises(EvaluatorError, match="comma"):
        get_evaluator("lmms_eval").run(bad, ("cpu",), {"python": str(standin), "tasks": ["t"]}, tmp_path / "w")


def test_the_daemon_records_a_crashing_lmms_eval_and_carries_on(copy_trainer_output, standin, tmp_path):
    output = copy_trainer_output()
    shutil.rmtree(output / "checkpoint-10")
    config = tmp_path / "c.toml"
    config.write_text(f"max_attempts = 1\n[backends.lmms_eval]\npython = {json.dumps(str(standin))}\n"
                      '[presets.mm]\n[[presets.mm.evaluators]]\nbackend = "lmms_eval"\ntasks = ["mme"]\n')  # fmt: skip
    run = ckpt_watch(output, "--scan", "--config", config, "--preset", "mm",
                     env={**os.environ, "STANDIN_MODE": "crash-20"})  # fmt: skip
    assert run.returncode == 1, run.stderr
    by_step = {r["step"]: r for r in results(output)}
    assert by_step[20]["status"] == "failed"
    assert "lmms-eval exited with status 1: torch.OutOfMemoryError: CUDA out of memory" in by_step[20]["error"]
    assert by_step[30]["status"] == "ok" and by_step[30]["metrics"]["ckpt_watch_tiny_vqa/exact_match"] == 0.0
    assert by_step[30]["versions"]["lmms_eval"] == "0.0+standin"


# --- server mode against a stand-in server ----------------------------------------------------------------------


class _StandInServer:
    """POST /evaluate and GET /jobs/{id} as lmms-eval's server answers them (entrypoints/http_server.py)."""

    def __init__(self, outcome: str):
        self.outcome, self.requests, self.polls = outcome, [], 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                if server.outcome == "reject":
                    return self._reply(422, {"detail": [{"loc": ["body", "tasks"], "msg": "Field required"}]})
                self._reply(200, {"job_id": "job-1", "status": "queued", "position_in_queue": 0, "message": "ok"})

            def do_GET(self):
                server.polls += 1
                if server.outcome == "vanish":
                    return self._reply(404, {"detail": "Job job-1 not found"})
                job = {"job_id": "job-1", "status": "running" if server.polls < 2 else server.outcome}
                if job["status"] == "completed":
                    results = Path(server.requests[-1]["output_dir"]) / "m"
                    results.mkdir(parents=True)
                    shutil.copy(FIXTURE, results / "20260101_000000_results.json")
                    job["result"] = {"m": {"results": str(results / "20260101_000000_results.json"), "samples": []}}
                elif job["status"] == "failed":
                    job["error"] = ("Evaluation failed with return code 1. Last lines of /tmp/x/eval.log:\n"
                                    "Traceback (most recent call last):\nValueError: bad image")  # fmt: skip
                self._reply(200, job)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server_factory():
    servers = []

    def make(outcome):
        servers.append(_StandInServer(outcome))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def test_server_mode_submits_polls_and_reads_the_results_file(server_factory, model_dir, tmp_path):
    server = server_factory("completed")
    options = {"server_url": server.url + "/", "tasks": ["mme"], "limit": 8, "poll_interval": 0.05,
               "model_args": {"max_pixels": 12845056}}  # fmt: skip
    out = get_evaluator("lmms_eval").run(model_dir, ("cuda:0",), options, tmp_path / "w")
    assert out.metrics["ckpt_watch_tiny_vqa/exact_match"] == 0.0
    assert out.versions == {"lmms_eval.server": server.url}
    assert out.raw["job_id"] == "job-1" and out.raw["mode"] == "server"
    (request,) = server.requests
    assert request["model_args"] == {"pretrained": str(model_dir), "max_pixels": 12845056}
    assert request["device"] == "cuda:0" and request["log_samples"] is False and request["limit"] == 8
    assert request["model"] == "llava_hf" and request["tasks"] == ["mme"]
    assert Path(request["output_dir"]).parent == tmp_path / "w"
    assert not Path(request["output_dir"]).exists()  # removed once read


@pytest.mark.parametrize("outcome, error, message", [
    ("failed", RuntimeError, r"job job-1 failed: Evaluation failed with return code 1\..* ValueError: bad image"),
    ("cancelled", RuntimeError, r"server job job-1 cancelled"),
    ("vanish", RuntimeError, r"no longer knows job job-1"),
    ("reject", EvaluatorError, r"rejected POST /evaluate: .*Field required"),
])  # fmt: skip
def test_server_failures_raise_with_the_servers_reason(server_factory, model_dir, tmp_path, outcome, error, message):
    server = server_factory(outcome)
    options = {"server_url": server.url, "tasks": ["mme"], "poll_interval": 0.05}
    with pytest.raises(error, match=message) as caught:
        get_evaluator("lmms_eval").run(model_dir, ("cpu",), options, tmp_path / "w")
    assert "\n" not in str(caught.value)


def test_an_unreachable_server_is_a_transient_failure_naming_the_url(model_dir, tmp_path):
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(RuntimeError, match=f"lmms-eval server at {url} is unreachable") as caught:
        get_evaluator("lmms_eval").run(model_dir, ("cpu",), {"server_url": url, "tasks": ["t"]}, tmp_path / "w")
    assert not isinstance(caught.value, EvaluatorError)  # retried by the daemon, unlike a bad preset


# --- the real lmms-eval --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def lmms_assets(tmp_path_factory) -> dict[str, str]:
    """A tiny random LLaVA checkpoint and an offline image task, built by lmms-eval's own environment."""
    out = tmp_path_factory.mktemp("lmms-assets")
    done = subprocess.run([str(LMMS_PYTHON), str(FIXTURE_BUILDER), str(out)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_lmms
def test_real_lmms_eval_in_its_own_environment(lmms_assets, tmp_path):
    options = {"python": str(LMMS_PYTHON), "tasks": ["ckpt_watch_tiny_vqa"], "include_path": lmms_assets["tasks"],
               "limit": 4}  # fmt: skip
    out = get_evaluator("lmms_eval").run(Path(lmms_assets["model"]), ("cpu",), options, tmp_path / "w")
    assert set(out.metrics) >= {"ckpt_watch_tiny_vqa/exact_match", "ckpt_watch_tiny_vqa/exact_match_stderr"}
    assert 0.0 <= out.metrics["ckpt_watch_tiny_vqa/exact_match"] <= 1.0
    assert out.raw["n-samples"]["ckpt_watch_tiny_vqa"]["effective"] == 4
    assert out.versions["lmms_eval"] and out.versions["lmms_eval.torch"] and out.versions["lmms_eval.transformers"]


@needs_lmms
def test_real_lmms_eval_server(lmms_assets, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           # the server cannot take include_path; see tests/lmms_eval_fixture.py for this stand-in for installing
           "PYTHONPATH": lmms_assets["server_site"], "CKPT_WATCH_LMMS_EXTRA_TASKS": lmms_assets["tasks"]}  # fmt: skip
    env.pop("VIRTUAL_ENV", None)
    log = open(tmp_path / "server.log", "wb")
    server = subprocess.Popen([str(LMMS_PYTHON), "-m", "lmms_eval", "serve", "--host", "127.0.0.1", "--port",
                               str(port)], stdout=log, stderr=subprocess.STDOUT, env=env)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as response:
                    assert json.loads(response.read())["status"] == "healthy"
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
                time.sleep(0.5)
        # The server picks its own device and ignores the request's: on this CPU-only machine the model is told.
        options = {"server_url": url, "tasks": ["ckpt_watch_tiny_vqa"], "limit": 4, "poll_interval": 0.5,
                   "model_args": {"device": "cpu", "device_map": "cpu"}}  # fmt: skip
        backend = get_evaluator("lmms_eval")
        out = backend.run(Path(lmms_assets["model"]), ("cuda:0",), options, tmp_path / "w")
        assert "ckpt_watch_tiny_vqa/exact_match" in out.metrics
        assert out.raw["config"]["model_args"].startswith(f"pretrained={lmms_assets['model']}")
        with pytest.raises(EvaluatorError, match="unknown lmms-eval task.*no_such_task"):
            backend.run(Path(lmms_assets["model"]), ("cpu",), {**options, "tasks": ["no_such_task"]}, tmp_path / "w2")
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
