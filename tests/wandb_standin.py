"""A wire-level stand-in for the W&B server, for tests: the real, unmodified `wandb` client talks to it over HTTP.

W&B's own server needs Docker and the `openwandb` package fails on `resume="must"`, so this answers exactly the
requests that the real client (wandb 0.31, its Go `wandb-core` and the Python public API) was seen to make for
`wandb.init` (new, `resume="must"`, `resume="allow"`, shared mode), `log`, `define_metric`, `finish`, `wandb sync`
and `wandb.Api().run(path)` (state, history). They were captured first (every request logged, see
`Server.requests`) and the answers built from what was seen:

  POST /graphql                  GraphQL, dispatched on the operation name (the `_gql_<Name>` methods); the
                                 public API sends operationName "" and is dispatched on the query's name
  POST /files/E/P/R/file_stream  W&B's file stream: history/summary/events/console lines at line offsets,
                                 `complete` + `exitcode` when the writer finishes the run
  PUT  /upload/...               the upload URLs that CreateRunFiles hands out (config.yaml, metadata, ...)
  POST /sdk/otel/...             the client's own telemetry: accepted and dropped

Per-run state (`RunState`): history rows in line order (each with its `_step`) and who wrote each, summary,
config, state "running"/"finished"/"crashed", and which writer finished it. A request it does not understand
answers HTTP 400 and is kept in `Server.unknown`; the `wandb_online` fixture (tests/conftest.py) fails every
test that leaves one, so a wandb upgrade that speaks differently cannot pass silently.

History, as the wire shows it: a file stream chunk `{"offset": n, "content": [...]}` writes its lines at line n
of the run's history (a rewrite of a line is kept in `RunState.overwritten`); a resumed run continues at the
`historyLineCount` that RunResumeStatus/UpsertBucket report, and `wandb sync` of several folders of one run
resumes it folder by folder. A shared-mode writer sends `X-Wandb-Use-Async-Filestream: true` with its own
`X-Wandb-Async-Client-Id` and counts offsets from 0 itself; the stand-in appends such a writer's lines to the
run's history (one line per (client, offset)). How W&B's real server merges shared-mode writers is not
public; wandb/wandb#12269 reports it overwriting a run's earliest rows, which a stand-in cannot reproduce.
"""

from __future__ import annotations

import gzip
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class RunState:
    entity: str
    project: str
    name: str
    id: str
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any] | None] = field(default_factory=list)  # by line offset; None: a hole
    history_writers: list[str | None] = field(default_factory=list)  # who wrote each line
    events: list[Any] = field(default_factory=list)
    logs: list[Any] = field(default_factory=list)
    state: str = "running"
    finished_by: str | None = None
    exitcode: int | None = None
    overwritten: list[tuple[int, dict, dict]] = field(default_factory=list)  # (offset, old row, new row)
    writers: list[str] = field(default_factory=list)  # who wrote (User-Agent, or a shared writer's client id)
    client_lines: dict[tuple[str, int], int] = field(default_factory=dict)  # (client, its offset) -> line

    def rows(self) -> list[dict[str, Any]]:
        return [row for row in self.history if row is not None]

    def rows_by(self, writer: str) -> list[dict[str, Any]]:
        return [row for row, who in zip(self.history, self.history_writers) if row is not None and who == writer]


class Server:
    """`with Server() as server:` serves on 127.0.0.1 (a free port); `server.url` is WANDB_BASE_URL."""

    def __init__(self) -> None:
        self.runs: dict[tuple[str, str, str], RunState] = {}
        self.requests: list[dict[str, Any]] = []
        self.unknown: list[str] = []
        self.lock = threading.RLock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._httpd.handle_error = lambda request, address: None  # clients that hang up early (telemetry) are fine
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> "Server":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def run(self, project: str, name: str, entity: str = "tester") -> RunState:
        with self.lock:
            return self.runs[(entity, project, name)]

    # --- GraphQL --------------------------------------------------------------------------------------------

    def graphql(self, body: dict[str, Any]) -> dict[str, Any]:
        operation = body.get("operationName") or _operation_of(body.get("query", ""))
        handler = getattr(self, f"_gql_{operation}", None)
        if handler is None:
            raise _NotUnderstood(f"GraphQL operation {operation!r}")
        return {"data": handler(body.get("variables") or {})}

    def _find(self, entity: str | None, project: str | None, name: str) -> RunState | None:
        return self.runs.get((entity or "tester", project or "uncategorized", name))

    def _gql_Viewer(self, _: dict) -> dict:
        return {"viewer": {"id": "dXNlcjox", "entity": "tester", "username": "tester", "email": "t@example.com",
                           "flags": "{}", "teams": {"edges": []}, "admin": False}}  # fmt: skip

    def _gql_GetDefaultEntity(self, _: dict) -> dict:
        return {"viewer": {"id": "dXNlcjox", "entity": "tester"}}

    def _gql_UpsertBucket(self, v: dict) -> dict:
        entity, project = v.get("entity") or "tester", v.get("project") or "uncategorized"
        name = v.get("name") or v.get("id")
        if not name:
            raise _NotUnderstood("UpsertBucket without a run name")
        with self.lock:
            run = self.runs.get((entity, project, name))
            inserted = run is None
            if inserted:
                run = self.runs[(entity, project, name)] = RunState(entity, project, name, f"run-{len(self.runs)}")
            if v.get("config"):
                run.config.update(json.loads(v["config"]))
            if v.get("summaryMetrics"):
                run.summary.update(json.loads(v["summaryMetrics"]))
            return {"upsertBucket": {"bucket": self._bucket(run), "inserted": inserted}}

    def _bucket(self, run: RunState) -> dict:
        return {"id": run.id, "name": run.name, "displayName": run.name, "description": None,
                "config": json.dumps(run.config), "sweepName": None, "historyLineCount": len(run.history),
                "project": {"id": "cHJvamVjdDox", "name": run.project, "entity": {"id": "ZW50aXR5OjE=", "name": run.entity}}}  # fmt: skip

    def _gql_RunResumeStatus(self, v: dict) -> dict:
        with self.lock:
            run = self._find(v.get("entity"), v.get("project"), v["name"])
            model = {"id": "cHJvamVjdDox", "name": v.get("project"),
                     "entity": {"id": "ZW50aXR5OjE=", "name": v.get("entity") or "tester"}, "bucket": None}  # fmt: skip
            if run is not None:
                rows = run.rows()
                model["bucket"] = {
                    "id": run.id, "name": run.name, "displayName": run.name, "summaryMetrics": json.dumps(run.summary),
                    "logLineCount": len(run.logs), "historyLineCount": len(run.history),
                    "eventsLineCount": len(run.events), "historyTail": json.dumps([json.dumps(r) for r in rows[-1:]]),
                    "eventsTail": json.dumps([]), "config": json.dumps(run.config), "tags": [], "notes": None,
                    "wandbConfig": json.dumps({"t": run.config.get("_wandb", {}).get("value", {}).get("t", {})}),
                }  # fmt: skip
            return {"model": model}

    def _gql_OrganizationCoreWeaveOrganizationID(self, _: dict) -> dict:
        return {"entity": {"organization": None}}

    def _gql_CreateRunFiles(self, v: dict) -> dict:
        run = self._find(v.get("entity"), v.get("project"), v["run"])
        if run is None:
            raise _NotUnderstood(f"CreateRunFiles for unknown run {v['run']!r}")
        files = [{"name": name, "uploadUrl": f"{self.url}/upload/{run.id}/{name}"} for name in v["files"]]
        return {"createRunFiles": {"runID": run.id, "uploadHeaders": [], "files": files}}

    def _gql_Run(self, v: dict) -> dict:
        """The public API's `Api().run(path)`."""
        run = self._find(v.get("entity"), v.get("project"), v["name"])
        if run is None:
            return {"project": {"run": None}}
        return {"project": {"run": {
            "projectId": 1, "id": run.id, "tags": [], "name": run.name, "displayName": run.name,
            "sweepName": None, "state": run.state, "config": json.dumps(run.config), "group": None, "jobType": None,
            "commit": None, "readOnly": False, "createdAt": "2026-01-01T00:00:00", "heartbeatAt": "2026-01-01T00:00:00",
            "description": None, "notes": None, "systemMetrics": "{}", "summaryMetrics": json.dumps(run.summary),
            "historyLineCount": len(run.history), "user": {"name": "tester", "username": "tester"},
            "historyKeys": self._history_keys(run),
        }}}  # fmt: skip

    def _history_keys(self, run: RunState) -> dict:
        keys = sorted({key for row in run.rows() for key in row})
        return {"lastStep": max((row.get("_step", 0) for row in run.rows()), default=-1),
                "keys": {key: {"typeCounts": [{"type": "number", "count": 1}]} for key in keys}}  # fmt: skip

    def _gql_RunHistoryKeys(self, v: dict) -> dict:
        run = self._find(v.get("entity"), v.get("project"), v["name"])
        return {"project": {"run": None if run is None else {"historyKeys": self._history_keys(run)}}}

    def _gql_HistoryPage(self, v: dict) -> dict:
        """`scan_history()`: rows with minStep <= _step < maxStep, as JSON strings, in _step order."""
        run = self._find(v.get("entity"), v.get("project"), v["run"])
        if run is None:
            return {"project": {"run": None}}
        rows = sorted((r for r in run.rows() if v["minStep"] <= r.get("_step", 0) < v["maxStep"]),
                      key=lambda r: r.get("_step", 0))[: v["pageSize"]]  # fmt: skip
        return {"project": {"run": {"history": [json.dumps(r) for r in rows]}}}

    def _gql_RunParquetHistory(self, v: dict) -> dict:
        """`scan_history()` (through wandb-core): no exported parquet files, every row as "live" data."""
        run = self._find(v.get("entity"), v.get("project"), v["runName"])
        if run is None:
            return {"project": {"run": None}}
        return {"project": {"run": {"parquetHistory": {"parquetUrls": [], "liveData": run.rows()}}}}

    def file_stream(self, entity: str, project: str, name: str, body: dict, writer: str, client: str | None) -> dict:
        """`client`: the X-Wandb-Async-Client-Id of a shared-mode writer (X-Wandb-Use-Async-Filestream), whose
        line offsets count its own lines: the server appends them to the run's history (one row per (client,
        offset)). Without it, the offsets are the run's own line numbers."""
        known = {"files", "complete", "exitcode", "preempting", "uploaded", "dropped"}
        if set(body) - known:
            raise _NotUnderstood(f"file_stream fields {sorted(set(body) - known)}")
        with self.lock:
            run = self.runs.get((entity, project, name))
            if run is None:
                raise _NotUnderstood(f"file_stream for unknown run {entity}/{project}/{name}")
            if client is not None:
                writer = client
            if writer not in run.writers:
                run.writers.append(writer)
            for file_name, chunk in (body.get("files") or {}).items():
                offset, lines = int(chunk.get("offset", 0)), chunk.get("content") or []
                if file_name == "wandb-history.jsonl":
                    for i, line in enumerate(lines):
                        if client is None:
                            self._put_row(run, offset + i, json.loads(line), writer)
                        else:
                            self._put_client_row(run, client, offset + i, json.loads(line))
                elif file_name == "wandb-summary.json":  # each writer sends its whole summary
                    for line in lines:
                        run.summary.update(json.loads(line))
                elif file_name in ("wandb-events.jsonl", "output.log"):  # system metrics, console lines
                    kept = run.events if file_name == "wandb-events.jsonl" else run.logs
                    if client is None:
                        _put_lines(kept, offset, lines)
                    else:
                        kept.extend(lines)
                else:
                    raise _NotUnderstood(f"file_stream file {file_name!r}")
            if body.get("complete"):
                run.state = "finished" if body.get("exitcode") in (0, None) else "crashed"
                run.exitcode, run.finished_by = body.get("exitcode"), writer
        return {"exitcode": None, "limits": {}}

    def _put_row(self, run: RunState, offset: int, row: dict, writer: str) -> None:
        while len(run.history) <= offset:
            run.history.append(None)
            run.history_writers.append(None)
        old = run.history[offset]
        if old is not None and old != row:
            run.overwritten.append((offset, old, row))
        run.history[offset], run.history_writers[offset] = row, writer

    def _put_client_row(self, run: RunState, client: str, offset: int, row: dict) -> None:
        line = run.client_lines.get((client, offset))
        if line is None:
            run.client_lines[(client, offset)] = len(run.history)
            run.history.append(row)
            run.history_writers.append(client)
        else:
            self._put_row(run, line, row, client)



class _NotUnderstood(Exception):
    pass


def _operation_of(query: str) -> str | None:
    match = re.search(r"\b(?:query|mutation)\s+(\w+)", query)
    return match[1] if match else None


def _put_lines(lines: list, offset: int, content: list) -> None:
    while len(lines) < offset + len(content):
        lines.append(None)
    lines[offset : offset + len(content)] = content


_FILE_STREAM = re.compile(r"^/files/(?P<entity>[^/]+)/(?P<project>[^/]+)/(?P<run>[^/]+)/file_stream$")


def _handler(server: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet: the tests read `server.requests`
            pass

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            data = self.rfile.read(length) if length else b""
            if self.headers.get("Content-Encoding") == "gzip":
                data = gzip.decompress(data)
            return data

        def _answer(self, status: int, payload: Any) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _serve(self) -> None:
            data = self._body()
            path = self.path.split("?", 1)[0]
            writer = self.headers.get("User-Agent", "?")
            entry = {"method": self.command, "path": path, "agent": writer, "body": data[:20000],
                     "headers": dict(self.headers)}  # fmt: skip
            with server.lock:
                server.requests.append(entry)
            try:
                if self.command == "POST" and path == "/graphql":
                    body = json.loads(data)
                    entry["operation"] = body.get("operationName")
                    self._answer(200, server.graphql(body))
                elif self.command == "POST" and (match := _FILE_STREAM.match(path)):
                    client = self.headers.get("X-Wandb-Async-Client-Id")
                    if self.headers.get("X-Wandb-Use-Async-Filestream") != "true":
                        client = None
                    self._answer(200, server.file_stream(match["entity"], match["project"], match["run"],
                                                         json.loads(data), writer, client))  # fmt: skip
                elif self.command == "PUT" and path.startswith("/upload/"):
                    self._answer(200, {})
                elif self.command == "POST" and path.startswith("/sdk/otel/"):
                    self._answer(200, {})  # the client's own telemetry
                else:
                    raise _NotUnderstood(f"{self.command} {path}")
            except _NotUnderstood as exc:
                with server.lock:
                    server.unknown.append(str(exc))
                self._answer(400, {"errors": [{"message": f"stand-in W&B server does not understand {exc}"}]})

        do_GET = do_POST = do_PUT = _serve

    return Handler
