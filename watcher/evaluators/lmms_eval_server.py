"""lmms-eval's HTTP server as the place where a job's lmms_eval evaluation runs (option `server_url`).

POST /evaluate, then GET /jobs/{id} until the job is completed, failed or cancelled; the results come back as a
file path on a filesystem both sides share (lmms_eval/entrypoints/protocol.py, http_server.py and
job_scheduler.py in lmms-eval 0.7.3). The server runs the evaluation on a GPU of its own choosing: it accepts
the request's `device` and ignores it. The options (lmms_eval_options.py) and the results parsing (lmms_eval_results.py) are the
local mode's.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from watcher.evaluators.base import EvalOutput, EvaluatorError
from watcher.evaluators.lmms_eval_options import LmmsEvalOptions
from watcher.evaluators.lmms_eval_results import failure_reason, parse_results, read_results_file, versions_from_results

# urllib from the standard library, not requests/httpx: three plain JSON calls do not justify a new dependency
# of ckpt-watch (and httpx is one of the packages whose pins clash between environments).

_TERMINAL = ("completed", "failed", "cancelled")


def run_on_server(
    opts: LmmsEvalOptions, model_dir: Path, device: str, workdir: Path, deadline: float | None
) -> EvalOutput:
    assert opts.server_url is not None
    # The server writes here and reports paths under it: it must be a directory both sides see at this path.
    output = (opts.output_dir or workdir) / f"lmms_eval_output-{uuid.uuid4().hex[:12]}"
    request = {
        "model": opts.model,
        "tasks": list(opts.tasks),
        "model_args": {"pretrained": str(model_dir), **opts.model_args},
        "batch_size": opts.batch_size,
        "device": device,  # accepted by the server and ignored: its own GPU choice applies
        "log_samples": False,
        "output_dir": str(output),
    }
    if opts.limit is not None:
        request["limit"] = opts.limit
    if opts.num_fewshot is not None:
        request["num_fewshot"] = opts.num_fewshot
    url = opts.server_url
    submitted = _http_json(url, "POST", "/evaluate", request)
    job_id = submitted.get("job_id") if isinstance(submitted, dict) else None
    if not isinstance(job_id, str) or not job_id:
        raise RuntimeError(f"lmms-eval server at {url} answered POST /evaluate without a job_id: {submitted!r:.200}")
    print(f"[ckpt-watch] lmms_eval: server {url} job {job_id} ({', '.join(opts.tasks)}; results under {output})",
          flush=True)  # fmt: skip

    status = None
    while True:
        job = _http_json(url, "GET", f"/jobs/{urllib.parse.quote(job_id)}")
        if not isinstance(job, dict):
            raise RuntimeError(f"lmms-eval server at {url} answered GET /jobs/{job_id} with {job!r:.200}")
        if job.get("status") != status:
            status = job.get("status")
            print(f"[ckpt-watch] lmms_eval: server job {job_id} is {status}", flush=True)
        if status in _TERMINAL:
            break
        if deadline is not None and time.monotonic() + opts.poll_interval > deadline:
            _try_cancel(url, job_id)  # only a queued job can be cancelled; a running one runs on
            raise RuntimeError(f"lmms-eval server job {job_id} timed out after {opts.timeout:g} s (option 'timeout')")
        time.sleep(opts.poll_interval)

    if status != "completed":
        error = str(job.get("error") or "")
        print(f"[ckpt-watch] lmms_eval: server job {job_id} {status}:\n{error}", flush=True)
        missing = re.search(r"Tasks not found: ([^.]+)", error)
        if missing:  # the server's lmms-eval does not know a task: the preset's fault, retrying cannot help
            raise EvaluatorError(f"unknown lmms-eval task(s) on server {url}: {missing.group(1).strip()}")
        reason = _summarise_server_error(error) or "no error text"
        raise RuntimeError(f"lmms-eval server job {job_id} {status}: {reason}")
    results_file = _results_path(job.get("result"), url, job_id)
    results = read_results_file(results_file)
    shutil.rmtree(output, ignore_errors=True)  # ours alone (a fresh name); what it held is now in `raw`
    versions = {"lmms_eval.server": url, **versions_from_results(results)}
    out = parse_results(results, versions)
    out.raw.update({"mode": "server", "server_url": url, "job_id": job_id})
    return out


def _http_json(base: str, method: str, path: str, body: dict | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    request = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            text = response.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as exc:
        detail = _http_error_detail(exc)
        if exc.code == 422:  # FastAPI's validation error: our request does not fit this server's schema
            raise EvaluatorError(f"lmms-eval server at {base} rejected {method} {path}: {detail}") from None
        if exc.code == 404 and path.startswith("/jobs/"):
            raise RuntimeError(f"lmms-eval server at {base} no longer knows job {path[6:]} (restarted?)") from None
        raise RuntimeError(f"lmms-eval server at {base}: {method} {path} -> HTTP {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        # Transient (the server is down or restarting): a RuntimeError, so the daemon retries the job later.
        raise RuntimeError(f"lmms-eval server at {base} is unreachable ({method} {path}): {reason}") from None
    try:
        return json.loads(text)
    except ValueError:
        what = f"{method} {path}"
        raise RuntimeError(f"lmms-eval server at {base} answered {what} with non-JSON: {text[:200]!r}") from None


def _http_error_detail(exc: urllib.error.HTTPError) -> str:
    try:
        body = exc.read().decode("utf-8", errors="replace")
        detail = json.loads(body).get("detail", body)
    except Exception:  # noqa: BLE001 - any body at all: this is only for the message
        detail = exc.reason
    return json.dumps(detail)[:300] if not isinstance(detail, str) else detail.splitlines()[0][:300] if detail else ""


def _try_cancel(base: str, job_id: str) -> None:
    try:
        _http_json(base, "DELETE", f"/jobs/{urllib.parse.quote(job_id)}")
    except (RuntimeError, EvaluatorError):
        pass


def _summarise_server_error(error: str) -> str:
    """The server's error is "Evaluation failed with ... Last lines of LOG:\\n<50 log lines>": keep the headline
    and the most telling log line."""
    lines = error.strip().splitlines()
    if not lines:
        return ""
    reason = failure_reason(lines[1:], lines[1:]) if len(lines) > 1 else ""
    return f"{lines[0][:200]} {reason}".strip()


def _results_path(result: Any, url: str, job_id: str) -> Path:
    paths = [entry.get("results") for entry in result.values() if isinstance(entry, dict)] \
        if isinstance(result, dict) else []  # fmt: skip
    paths = [p for p in paths if isinstance(p, str) and p]
    if not paths:
        raise RuntimeError(f"lmms-eval server job {job_id} completed without a results path: {result!r:.200}")
    path = Path(max(paths))  # one model per request; names start with the date, so max() is the newest
    if not path.is_file():
        raise RuntimeError(f"results file {str(path)!r} of lmms-eval server job {job_id} is not readable here; "
                           "server and jobs must share the filesystem (see option 'output_dir')")  # fmt: skip
    return path
