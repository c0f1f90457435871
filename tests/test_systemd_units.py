"""The units in systemd/, checked with systemd's own tools (`systemd-analyze verify` and `security --offline`).

`verify` insists that ExecStart's binary exists, so each test renders the shipped unit into a temp dir with the
path of a stub `ckpt-watch` script; everything else is verified exactly as shipped. Nothing is started.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"
SYSTEM_UNIT = SYSTEMD / "ckpt-watch@.service"
USER_UNIT = SYSTEMD / "user" / "ckpt-watch@.service"
SHIPPED_EXEC = {SYSTEM_UNIT: "/usr/local/bin/ckpt-watch", USER_UNIT: "%h/.local/bin/ckpt-watch"}
INSTANCE = "ckpt-watch@test.service"
OK_OR_BETTER = ("PERFECT", "SAFE", "OK")  # systemd's scale: 0 PERFECT, <1 SAFE, <5 OK, <7.5 MEDIUM, ...

# The drop-in systemd/README.md tells admins to add (`systemctl edit ckpt-watch@NAME`): it must verify too.
SITE_DROP_IN = """\
[Service]
ReadOnlyPaths=/data/runs/llama-7b
ReadWritePaths=/data/runs/llama-7b/ckpt-watch /scratch/ckpt-watch
SupplementaryGroups=video
"""

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed (Debian: apt install systemd)"
)


# --- unit file contents -------------------------------------------------------------------------------------------


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Section -> key -> values (a key may repeat, e.g. DeviceAllow=), comments and blank lines skipped."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def seconds(span: str) -> float:
    """A systemd time span ("90s", "15min", "1h 30s", "90") in seconds."""
    units = {"ms": 1e-3, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span)
    assert parts and "".join(n + u for n, u in parts) == span.replace(" ", ""), f"cannot parse time span {span!r}"
    return sum(float(n) * units[u or "s"] for n, u in parts)


@pytest.mark.parametrize("unit", [SYSTEM_UNIT, USER_UNIT], ids=["system", "user"])
def test_unit_fits_the_daemon(unit):
    from watcher.config import WatchConfig
    from watcher.daemon import STOP_GRACE, TICK

    service = parse_unit(unit)["Service"]
    one = {key: values[-1] for key, values in service.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert one["Restart"] == "on-failure"
    assert one["KillSignal"] == "SIGTERM"
    # SIGTERM to the daemon alone: it gives the running job its grace period itself.
    assert one["KillMode"] == "mixed"
    assert re.fullmatch(r"/bin/kill -(HUP|SIGHUP|s HUP) \$MAINPID", one["ExecReload"])
    # The job's grace, then SIGTERM-to-SIGKILL of its process group, then a margin.
    assert seconds(one["TimeoutStopSec"]) >= WatchConfig().stop_grace + STOP_GRACE + 10
    # Pinged from the main loop, which ticks every TICK s and runs nothing slow (W&B delivers in a thread).
    assert 30 * TICK <= seconds(one["WatchdogSec"]) <= 300
    assert "--config" in one["ExecStart"] and one["ExecStart"].endswith("/ckpt-watch/%i.toml")
    assert one.get("MemoryDenyWriteExecute", "no") == "no", "PyTorch's CPU kernels JIT into W+X memory"
    assert one.get("PrivateDevices", "no") == "no", "PrivateDevices=yes hides /dev/nvidia*"
    assert one.get("ProcSubset", "all") == "all", "the NVIDIA driver reads /proc/driver/nvidia"


def test_system_unit_specifics():
    unit = parse_unit(SYSTEM_UNIT)
    service = unit["Service"]
    assert service["ExecStart"][-1].startswith(SHIPPED_EXEC[SYSTEM_UNIT] + " --config /etc/ckpt-watch/%i.toml")
    assert service["User"] == ["ckpt-watch"] and "DynamicUser" not in service
    assert service["DevicePolicy"] == ["closed"]
    allowed = {entry.split()[0]: entry.split()[1] for entry in service["DeviceAllow"]}
    assert allowed.get("char-nvidia*") == "rw" and allowed.get("/dev/nvidiactl") == "rw"
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "read-only",
                       "PrivateTmp": "yes"}.items():  # fmt: skip
        assert service[key] == [value], key
    families = set(service["RestrictAddressFamilies"][-1].split())
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= families
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_user_unit_specifics():
    unit = parse_unit(USER_UNIT)
    service = unit["Service"]
    assert "User" not in service and "Group" not in service
    assert service["ExecStart"][-1].startswith(SHIPPED_EXEC[USER_UNIT] + " --config %E/ckpt-watch/%i.toml")
    assert unit["Install"]["WantedBy"] == ["default.target"]


# --- systemd-analyze ----------------------------------------------------------------------------------------------


def render(unit: Path, tmp_path: Path, drop_in: str | None = None) -> Path:
    """Copy `unit` into a temp dir with ExecStart pointing at an executable stub; returns the instance's path."""
    stub = tmp_path / "bin" / "ckpt-watch"
    stub.parent.mkdir(parents=True, exist_ok=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = unit.read_text()
    assert text.count(SHIPPED_EXEC[unit]) == 1
    units = tmp_path / "units"
    units.mkdir()
    (units / unit.name).write_text(text.replace(SHIPPED_EXEC[unit], str(stub)))
    if drop_in:
        (units / f"{unit.name}.d").mkdir()
        (units / f"{unit.name}.d" / "site.conf").write_text(drop_in)
    return units / INSTANCE


def analyze(args: list[str], tmp_path: Path, user: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, SYSTEMD_LOG_COLOR="0", SYSTEMD_COLORS="0", SYSTEMD_PAGER="", LC_ALL="C.UTF-8")
    command = ["systemd-analyze"]
    if user:
        # The offline user manager wants a runtime dir; the test's own keeps the host's out of it.
        runtime = tmp_path / "runtime"
        runtime.mkdir(mode=0o700, exist_ok=True)
        env["XDG_RUNTIME_DIR"] = str(runtime)
        command.append("--user")
    return subprocess.run(command + args, check=False, capture_output=True, text=True, env=env, timeout=60)


def our_warnings(stderr: str, instance: Path) -> list[str]:
    """stderr lines about our unit (by name or by its temp dir); lines about the host's own units are not ours."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    ours = [line for line in lines if "ckpt-watch" in line or str(instance.parent) in line]
    for line in lines:
        if line not in ours:
            print("host noise from systemd-analyze (ignored):", line)
    return ours


@needs_systemd_analyze
@pytest.mark.parametrize("drop_in", [None, SITE_DROP_IN], ids=["shipped", "with-site-drop-in"])
def test_system_unit_verifies(tmp_path, drop_in):
    instance = render(SYSTEM_UNIT, tmp_path, drop_in)
    result = analyze(["verify", str(instance)], tmp_path)
    assert result.returncode == 0, result.stderr
    assert our_warnings(result.stderr, instance) == []


@needs_systemd_analyze
def test_user_unit_verifies(tmp_path):
    instance = render(USER_UNIT, tmp_path)
    result = analyze(["verify", str(instance)], tmp_path, user=True)
    if result.returncode != 0 and "Failed to initialize manager" in result.stderr:
        pytest.skip(f"systemd-analyze --user cannot run offline here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    assert our_warnings(result.stderr, instance) == []


@needs_systemd_analyze
def test_system_unit_exposure_is_ok_or_better(tmp_path):
    instance = render(SYSTEM_UNIT, tmp_path)
    result = analyze(["security", "--offline=true", "--no-pager", str(instance)], tmp_path)
    if result.returncode != 0 and "--offline" in result.stderr:
        pytest.skip(f"this systemd-analyze has no offline security analysis (systemd < 250): {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    match = re.search(rf"Overall exposure level for {re.escape(INSTANCE)}: (\d+\.\d+) ([A-Z]+)", result.stdout)
    assert match, result.stdout[-2000:]
    score, level = float(match[1]), match[2]
    print(f"exposure: {score} {level}")
    assert level in OK_OR_BETTER, result.stdout
    assert score < 5.0


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers is not installed")
def test_sysusers_file_creates_the_units_user(tmp_path):
    (tmp_path / "etc").mkdir()
    sysusers = SYSTEMD / "ckpt-watch.sysusers"
    result = subprocess.run(["systemd-sysusers", f"--root={tmp_path}", str(sysusers)], check=False,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    users = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc" / "passwd").read_text().splitlines()}
    service = parse_unit(SYSTEM_UNIT)["Service"]
    entry = users[service["User"][-1]]
    assert entry[5] == "/var/lib/" + service["StateDirectory"][-1]  # home = the unit's writable state dir
    assert "nologin" in entry[6]
