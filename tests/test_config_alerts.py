"""`[[alerts]]` rules in the config file: parsing, default names, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from watcher.config import AlertRule, ConfigError, build_config, load_toml


def _config(tmp_path, text: str):
    path = tmp_path / "watch.toml"
    path.write_text(text)
    return build_config(load_toml(path), {})


def test_rules_are_parsed_with_their_defaults_and_derived_names(tmp_path):
    config = _config(tmp_path, """
[[alerts]]
metric = "mmlu/acc"
drop_from_best = "5%"
stop_training = true
[[alerts]]
metric = "loss"
variant = "ema"
above = 3
consecutive = 2
[[alerts]]
name = "diverged"
metric = "loss"
nan = true
[[alerts]]
metric = "loss"
mode = "min"
drop_from_best = 0.5
""")
    assert config.alerts == [
        AlertRule("mmlu/acc drop_from_best 5%", "mmlu/acc", drop_from_best="5%", stop_training=True),
        AlertRule("loss[ema] above 3", "loss", variant="ema", above=3.0, consecutive=2),
        AlertRule("diverged", "loss", nan=True),
        AlertRule("loss drop_from_best 0.5", "loss", mode="min", drop_from_best=0.5),
    ]
    assert _config(tmp_path, "").alerts == []


@pytest.mark.parametrize("rule, message", [
    ('metric = "a"\nbelow = 1\nstop = true', "unknown key 'stop' in alert rule 1 ('a'); known keys: name, metric,"),
    ("below = 1", "alert rule 1 needs a metric name, got None"),
    ('metric = "a"', "alert rule 1 ('a') needs exactly one condition of drop_from_best, below, above, nan, got none"),
    ('metric = "a"\nbelow = 1\nabove = 2', "needs exactly one condition of drop_from_best, below, above, nan, got "
                                           "below, above"),
    ('metric = "a"\nbelow = "1"', "alert rule 1 ('a'): below must be a finite number, got '1'"),
    ('metric = "a"\nabove = nan', "above must be a finite number, got nan"),
    ('metric = "a"\ndrop_from_best = "5"', "drop_from_best must be a positive number (an absolute drop) or a "
                                          "percentage like \"5%\" (relative to the best so far), got '5'"),
    ('metric = "a"\ndrop_from_best = -0.1', "drop_from_best must be a positive number"),
    ('metric = "a"\ndrop_from_best = "x%"', "drop_from_best must be a positive number"),
    ('metric = "a"\nnan = "yes"', "alert rule 1 ('a'): nan must be true or false, got 'yes'"),
    ('metric = "a"\nnan = 1', "nan must be true or false, got 1"),
    ('metric = "a"\nbelow = 1\nconsecutive = 0', "consecutive must be a positive integer, got 0"),
    ('metric = "a"\nbelow = 1\nmode = "up"', "mode must be one of auto, max, min, got 'up'"),
    ('metric = "a"\nbelow = 1\nvariant = "swa"', "variant must be one of regular, ema, got 'swa'"),
    ('metric = "a"\nbelow = 1\nstop_training = "yes"', "stop_training must be true or false, got 'yes'"),
    ('name = 3\nmetric = "a"\nbelow = 1', "alert rule 1: name must be a one-line string, got 3"),
])  # fmt: skip
def test_a_bad_rule_is_one_line_naming_it(tmp_path, rule, message):
    with pytest.raises(ConfigError) as caught:
        _config(tmp_path, f"[[alerts]]\n{rule}\n")
    text = str(caught.value)
    assert message in text and "\n" not in text


def test_rule_names_are_unique(tmp_path):
    with pytest.raises(ConfigError, match="two alert rules are named 'a below 1': give each a unique name"):
        _config(tmp_path, '[[alerts]]\nmetric = "a"\nbelow = 1\n[[alerts]]\nmetric = "a"\nbelow = 1.0\n')
    with pytest.raises(ConfigError, match=r"alerts must be a list of \[\[alerts\]\] tables"):
        _config(tmp_path, 'alerts = "on"\n')


def test_the_cli_reports_a_bad_rule_in_one_line_with_status_2(tmp_path):
    config = tmp_path / "watch.toml"
    config.write_text(f'output_dir = "{tmp_path}"\n[[alerts]]\nmetric = "a"\nbelow = 1\nconsecutive = -1\n')
    out = subprocess.run([sys.executable, "-m", "watcher", "--config", str(config), "--scan"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().endswith("alert rule 1 ('a'): consecutive must be a positive integer, got -1")
    assert out.stderr.count("\n") == 1
