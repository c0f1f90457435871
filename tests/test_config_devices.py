"""Config precedence and device pinning (without touching CUDA)."""

import pytest

from watcher import devices
from watcher.config import ConfigError, build_config, load_toml


def test_flags_override_the_file_and_paths_are_relative_to_it(tmp_path):
    config_file = tmp_path / "conf" / "watch.toml"
    config_file.parent.mkdir()
    config_file.write_text('output_dir = "../run"\ndevice = "cuda:1"\npolicy = "latest"\nsettle = 5\n')
    config = build_config(load_toml(config_file), {"device": "cpu", "settle": None})
    assert config.device == "cpu"  # flag wins
    assert config.policy == "latest" and config.settle == 5.0  # file value kept where no flag
    assert config.output_dir == (tmp_path / "run").resolve()


def test_step_from_folder_names():
    config = build_config({}, {})
    assert config.step_of("checkpoint-500") == 500
    assert config.step_of("step-20") == 20
    assert config.step_of("checkpoint-500.tmp") is None
    assert config.step_of("global_step500") is None
    custom = build_config({"checkpoint_pattern": r"^global_step(\d+)$"}, {})
    assert custom.step_of("global_step500") == 500


@pytest.mark.parametrize("text, visible", [("cpu", []), ("cuda", ["0", "1", "2", "3"]), ("cuda:2", ["2"]),
                                           ("cuda:1,3", ["1", "3"])])  # fmt: skip
def test_device_pinning(monkeypatch, text, visible):
    monkeypatch.setattr(devices, "physical_gpu_count", lambda: 4)
    spec, entries = devices.resolve_device(text, environ={})
    assert entries == visible
    env = devices.child_environment(entries, base={})
    assert env["CUDA_VISIBLE_DEVICES"] == ",".join(visible)
    # Plain `cuda` is every visible GPU; inside a child the pinned GPUs are renumbered from 0.
    assert list(spec.child_devices) == {"cpu": ["cpu"], "cuda": ["cuda:0", "cuda:1", "cuda:2", "cuda:3"],
                                        "cuda:2": ["cuda:0"], "cuda:1,3": ["cuda:0", "cuda:1"]}[text]  # fmt: skip


def test_device_indices_go_through_the_daemons_own_visible_devices(monkeypatch):
    monkeypatch.setattr(devices, "physical_gpu_count", lambda: 8)
    spec = devices.parse_device("cuda:1")
    assert devices.check_available(spec, environ={"CUDA_VISIBLE_DEVICES": "4,6"}) == ["6"]
    with pytest.raises(ConfigError, match="2 visible GPU"):
        devices.check_available(devices.parse_device("cuda:2"), environ={"CUDA_VISIBLE_DEVICES": "4,6"})


def test_the_fake_gpu_seam_stands_in_for_nvidia_smi_in_the_gpu_count(monkeypatch):
    """CKPT_WATCH_FAKE_GPUS (watcher/gpu_inventory.py) is the one seam: the device check counts those GPUs too."""
    monkeypatch.setenv("CKPT_WATCH_FAKE_GPUS", "0:81000:0,1:81000:0,2:81000:30000")
    assert devices.physical_gpu_count() == 3
    assert devices.check_available(devices.parse_device("cuda:1,2"), environ={}) == ["1", "2"]
    with pytest.raises(ConfigError, match="3 visible GPU"):
        devices.check_available(devices.parse_device("cuda:3"), environ={})


def test_no_gpu_at_all(monkeypatch):
    monkeypatch.setattr(devices, "physical_gpu_count", lambda: 0)
    with pytest.raises(ConfigError, match="no NVIDIA GPU"):
        devices.check_available(devices.parse_device("cuda:0"), environ={})


def test_the_daemon_process_never_imports_torch():
    """No torch import means no CUDA initialisation in the daemon: only job children touch the GPU."""
    import subprocess
    import sys

    code = (
        "import sys, watcher.cli, watcher.daemon, watcher.completion, watcher.evaluators\n"
        "from watcher.presets import load_presets; load_presets()\n"
        "heavy = sorted(m for m in ('torch', 'lm_eval', 'transformers', 'datasets') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("name, why", [
    ("checkpoint-99999999999999999999", "larger than"),  # beyond SQLite's signed 64-bit INTEGER
    ("checkpoint-30\n", "control characters"),  # `$` matches before a trailing newline
    ("checkpoint-\u0663\u0660", "ASCII digits"),  # Arabic-Indic 30: int() would read it as step 30
])  # fmt: skip
def test_names_the_pattern_admits_but_that_cannot_be_checkpoints(name, why):
    from watcher.config import BadCheckpointName

    config = build_config({}, {})
    assert config.step_of(name) is None
    with pytest.raises(BadCheckpointName, match=why):
        config.checked_step(name)
    assert config.checked_step("checkpoint-9223372036854775807") == 2**63 - 1
