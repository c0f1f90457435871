"""Bad input: one clear line on stderr, the right exit status, never a traceback."""

import random
import struct
import subprocess
import sys

import pytest



def _run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "watcher", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd)


def _assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_missing_output_dir(tmp_path):
    _assert_one_line_error(_run(str(tmp_path / "nope"), "--scan"), "output dir not found", "nope")


def test_no_output_dir_at_all():
    _assert_one_line_error(_run("--scan"), "no output dir")


def test_unknown_flag(tmp_path):
    _assert_one_line_error(_run(str(tmp_path), "--frobnicate"), "--frobnicate")


def test_unknown_preset(tmp_path):
    _assert_one_line_error(_run(str(tmp_path), "--scan", "--preset", "nonesuch"), "unknown preset 'nonesuch'", "smoke")


def test_bad_toml(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("device = [unclosed\n")
    _assert_one_line_error(_run(str(tmp_path), "--config", str(config)), "not valid TOML", "bad.toml")


def test_unknown_config_key(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('devise = "cuda:1"\n')
    _assert_one_line_error(_run(str(tmp_path), "--config", str(config)), "unknown key 'devise'")


def test_unavailable_device(tmp_path):
    _assert_one_line_error(_run(str(tmp_path), "--scan", "--device", "cuda:3"), "cuda:3", "not available")


def test_malformed_device(tmp_path):
    _assert_one_line_error(_run(str(tmp_path), "--scan", "--device", "gpu1"), "--device")


def test_bad_config_value(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('policy = "sometimes"\n')
    _assert_one_line_error(_run(str(tmp_path), "--config", str(config)), "policy")


def test_empty_output_dir_scan_is_nothing_to_do(tmp_path):
    result = _run(str(tmp_path), "--scan", "-q")
    assert result.returncode == 0, result.stderr
    assert "nothing to do" in result.stderr and not list(tmp_path.iterdir())  # no journal in a folder named by mistake


def test_a_typo_in_a_preset_is_caught_at_start(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[presets.mine]\n[[presets.mine.evaluators]]\nbackend = "lm_eval"\ntasks = ["x"]\nlimt = 5\n')
    _assert_one_line_error(_run(str(tmp_path), "--config", str(config), "--preset", "mine"), "preset 'mine'", "limt")


def test_a_second_daemon_on_the_same_results_dir_is_refused(tmp_path):
    import fcntl

    (tmp_path / "checkpoint-1").mkdir()  # something to scan (with nothing, a scan takes no lock)
    lock_path = tmp_path / "ckpt-watch" / "ckpt-watch.lock"
    lock_path.parent.mkdir()
    with open(lock_path, "w") as held:
        held.write("4242")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running daemon holds
        _assert_one_line_error(_run(str(tmp_path), "--scan"), "another ckpt-watch (pid 4242)")


@pytest.mark.parametrize("text, fragment", [
    ("device = 5\n", "device"),
    ("output_dir = 5\n", "output_dir"),
    ("presets = 5\n", "presets"),
    ('checkpoint_pattern = "^checkpoint-\\\\d+$"\n', "checkpoint_pattern"),  # no group: would match no step
    ("settle = nan\n", "settle"),
    ("settle = inf\n", "settle"),
    ("rescan_interval = 0\n", "rescan_interval"),
    ("poll = 0\n", "poll"),
    ("poll = 0.01\n", "poll"),
    ("max_attempts = true\n", "max_attempts"),
    ('wandb_live = 3\n', "wandb_live"),
    ('verbosity = "x"\n', "verbosity"),
    ('scratch_dir = ""\n', "scratch_dir"),
    ("[presets.smoke]\nevaluators = 5\n", "evaluators"),
    ('[presets.smoke]\ntime_budget = nan\n[[presets.smoke.evaluators]]\nbackend = "probes"\n', "time_budget"),
])  # fmt: skip
def test_a_bad_config_value_is_one_line_and_exit_2(tmp_path, text, fragment):
    config = tmp_path / "c.toml"
    config.write_text(text)
    # output_dir from the file only: a positional OUTPUT_DIR would override it
    where = [] if text.startswith("output_dir") else [str(tmp_path)]
    _assert_one_line_error(_run(*where, "--config", str(config), "--scan"), fragment)


def test_random_bytes_as_the_config_file(tmp_path):
    config = tmp_path / "c.toml"
    config.write_bytes(b"\xd7\xff" + random.Random(10).randbytes(510))  # not UTF-8, as most random bytes
    _assert_one_line_error(_run(str(tmp_path), "--config", str(config), "--scan"), "not valid TOML", "c.toml")


@pytest.mark.parametrize("flags, fragment", [(["--poll", "0"], "poll"), (["--settle", "nan"], "settle")])
def test_a_bad_flag_value_is_one_line_and_exit_2(tmp_path, flags, fragment):
    _assert_one_line_error(_run(str(tmp_path), *flags, "--scan"), fragment)


def test_merge_of_a_safetensors_file_claiming_a_huge_header_is_one_line(tmp_path):
    checkpoint = tmp_path / "checkpoint-5"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(struct.pack("<Q", 10**15) + b"{}" * 16)
    (checkpoint / "config.json").write_text("{}")
    result = _run("merge", str(checkpoint), "-o", str(tmp_path / "merged"))
    assert result.returncode == 1, result.stderr  # merge's status for a checkpoint it cannot read
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "model.safetensors" in lines[0] and "1000000000000000" in lines[0], lines[0]
    assert not (tmp_path / "merged").exists()
