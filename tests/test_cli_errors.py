"""Bad input: one clear line on stderr, the right exit status, never a traceback."""

import subprocess
import sys



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
    assert (tmp_path / "ckpt-watch" / "journal.sqlite").exists()


def test_a_typo_in_a_preset_is_caught_at_start(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[presets.mine]\n[[presets.mine.evaluators]]\nbackend = "lm_eval"\ntasks = ["x"]\nlimt = 5\n')
    _assert_one_line_error(_run(str(tmp_path), "--config", str(config), "--preset", "mine"), "preset 'mine'", "limt")


def test_a_second_daemon_on_the_same_results_dir_is_refused(tmp_path):
    import fcntl

    lock_path = tmp_path / "ckpt-watch" / "ckpt-watch.lock"
    lock_path.parent.mkdir()
    with open(lock_path, "w") as held:
        held.write("4242")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running daemon holds
        _assert_one_line_error(_run(str(tmp_path), "--scan"), "another ckpt-watch (pid 4242)")
