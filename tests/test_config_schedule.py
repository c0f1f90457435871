"""`[[schedule]]` entries, `keep_best` rules, `cpu_jobs` and `gpu_busy_mib` in the config file: parsing, defaults,
one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from watcher.config import ConfigError, KeepBestRule, ScheduleEntry, build_config, load_toml


def _config(tmp_path, text: str, **flags):
    path = tmp_path / "watch.toml"
    path.write_text(text)
    return build_config(load_toml(path), flags)


def test_entries_are_parsed_and_their_defaults_come_from_the_top_level(tmp_path):
    config = _config(tmp_path, """
policy = "latest"
variants = ["regular"]
cpu_jobs = 2
gpu_busy_mib = 2048
[[schedule]]
preset = "30s"
[[schedule]]
preset = "5min"
every = 4
every_steps = 1000
priority = 1
policy = "all"
variants = ["regular", "ema"]
[[schedule]]
preset = "full"
final = true
priority = 10
""")
    assert config.cpu_jobs == 2 and config.gpu_busy_mib == 2048
    assert config.schedule_entries() == [
        ScheduleEntry("30s", policy="latest", variants=("regular",)),
        ScheduleEntry("5min", every=4, every_steps=1000, priority=1, policy="all", variants=("regular", "ema")),
        ScheduleEntry("full", final=True, priority=10, policy="latest", variants=("regular",)),
    ]
    build_config({"schedule": config.schedule}, {})  # a reload with entries already checked keeps them


def test_without_entries_the_preset_option_runs_on_every_checkpoint(tmp_path):
    config = _config(tmp_path, 'preset = "1min"\n', policy="latest")
    assert config.schedule_entries() == [ScheduleEntry("1min", policy="latest", variants=("regular", "ema"))]
    assert (config.cpu_jobs, config.gpu_busy_mib) == (1, 1024)


@pytest.mark.parametrize("entry, message", [
    ('preset = "30s"\nevry = 2', "unknown key 'evry' in schedule entry 1 (preset '30s'); known keys: preset, every,"),
    ("every = 2", "schedule entry 1 needs a preset name, got None"),
    ('preset = "30s"\nevery = 0', "schedule entry 1 (preset '30s'): every must be a positive integer, got 0"),
    ('preset = "30s"\nevery_steps = 1.5', "every_steps must be a positive integer, got 1.5"),
    ('preset = "30s"\nevery = true', "every must be a positive integer, got True"),
    ('preset = "30s"\nfinal = "yes"', "final must be true or false, got 'yes'"),
    ('preset = "30s"\npriority = 1.0', "priority must be an integer, got 1.0"),
    ('preset = "30s"\npolicy = "newest"', "policy must be one of all, latest, got 'newest'"),
    ('preset = "30s"\nvariants = []', "variants must be a non-empty list of regular, ema, got []"),
    ('preset = "30s"\nvariants = ["swa"]', "variants must be a non-empty list"),
])  # fmt: skip
def test_a_bad_entry_is_one_line_naming_it(tmp_path, entry, message):
    with pytest.raises(ConfigError) as caught:
        _config(tmp_path, f'[[schedule]]\npreset = "smoke"\n[[schedule]]\n{entry}\n'.replace("entry 1", "entry 2"))
    text = str(caught.value)
    assert message.replace("entry 1", "entry 2") in text and "\n" not in text


@pytest.mark.parametrize("text, message", [
    ("cpu_jobs = 0", "cpu_jobs must be a positive integer, got 0"),
    ("gpu_busy_mib = -1", "gpu_busy_mib must be a non-negative integer (MiB), got -1"),
    ('schedule = "full"', "schedule must be a list of [[schedule]] tables"),
    ("schedule = [1]", "schedule entry 1 must be a table, got 1"),
    ('keep_best = "acc"', 'keep_best must be a list of rules: keep_best = [{ metric = "...", k = 3 }] or [[keep_best]]'),
    ('keep_best_copy = "no"', "keep_best_copy must be true or false, got 'no'"),
    ("keep_merged_best = 1", "keep_merged_best must be true or false, got 1"),
])  # fmt: skip
def test_bad_pool_and_schedule_options(tmp_path, text, message):
    with pytest.raises(ConfigError) as caught:
        _config(tmp_path, text + "\n")
    assert str(caught.value) == message


def test_the_cli_reports_a_bad_entry_in_one_line_with_status_2(tmp_path):
    config = tmp_path / "watch.toml"
    config.write_text(f'output_dir = "{tmp_path}"\n[[schedule]]\npreset = "30s"\nevery = -3\n')
    out = subprocess.run([sys.executable, "-m", "watcher", "--config", str(config), "--scan"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().endswith("schedule entry 1 (preset '30s'): every must be a positive integer, got -3")
    assert out.stderr.count("\n") == 1


# --- keep_best ----------------------------------------------------------------------------------------------------


def test_keep_best_rules_inline_or_as_tables(tmp_path):
    inline = _config(tmp_path, 'keep_best = [{ metric = "ckpt_watch_smoke_mc/acc", mode = "max", k = 2 }]\n')
    assert inline.keep_best == [KeepBestRule("ckpt_watch_smoke_mc/acc", mode="max", k=2, variant="regular")]
    assert (inline.keep_best_copy, inline.keep_merged_best) == (True, False)
    tables = _config(tmp_path, '[[keep_best]]\nmetric = "perplexity"\n[[keep_best]]\nmetric = "perplexity"\n'
                               'variant = "ema"\nk = 1\n')  # fmt: skip
    assert tables.keep_best == [KeepBestRule("perplexity"), KeepBestRule("perplexity", k=1, variant="ema")]
    assert build_config({"keep_best": tables.keep_best}, {}).keep_best == tables.keep_best  # a reload keeps them


@pytest.mark.parametrize("rules, message", [
    ('{ metric = "acc", kk = 1 }', "unknown key 'kk' in keep_best rule 1 (metric 'acc'); known keys: metric, mode, k,"),
    ('{ k = 2 }', "keep_best rule 1 needs a metric name, got None"),
    ('{ metric = "" }', "keep_best rule 1 needs a metric name, got ''"),
    ('{ metric = "acc", k = 0 }', "keep_best rule 1 (metric 'acc'): k must be a positive integer, got 0"),
    ('{ metric = "acc", mode = "up" }', "mode must be one of max, min, auto, got 'up'"),
    ('{ metric = "acc", variant = "swa" }', "variant must be one of regular, ema, got 'swa'"),
    ('{ metric = "a/../b" }', "the metric must be a path of plain names"),
    ('{ metric = "./acc" }', "the metric must be a path of plain names"),
    ('{ metric = "a//b" }', "the metric must be a path of plain names"),
    ('{ metric = "ema/acc" }', "a regular metric cannot start with 'ema/'"),
    ('{ metric = "acc" }, { metric = "acc", k = 1 }', "two keep_best rules for metric 'acc' (regular)"),
    ("1", "keep_best rule 1 must be a table, got 1"),
])  # fmt: skip
def test_a_bad_keep_best_rule_is_one_line_naming_it(tmp_path, rules, message):
    with pytest.raises(ConfigError) as caught:
        _config(tmp_path, f"keep_best = [{rules}]\n")
    assert message in str(caught.value) and "\n" not in str(caught.value)

