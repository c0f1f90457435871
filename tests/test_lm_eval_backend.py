"""The lm-eval backend and the bundled smoke data: lm-eval really runs the tiny model on the CPU."""

from __future__ import annotations

import importlib.util
import json
import shutil
import math
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from watcher.evaluators import EvalOutput, EvaluatorError, get_evaluator, known_backends
from watcher.evaluators.lm_eval_run import (
    BUNDLED_TASKS,
    bundled_tasks_dir,
    flatten_results,
    parse_options,
    render_bundled_tasks,
)

SMOKE_TASKS = ["ckpt_watch_smoke_mc", "ckpt_watch_smoke_ppl"]
SMOKE_LIMIT = 8
DATA = resources.files("watcher").joinpath("data")


def _listing(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*")}


@pytest.fixture(scope="session")
def smoke_run(tiny_model_dir, tmp_path_factory) -> tuple[EvalOutput, Path]:
    workdir = tmp_path_factory.mktemp("lm-eval-smoke")
    before = _listing(tiny_model_dir)
    output = get_evaluator("lm_eval").run(
        tiny_model_dir, ("cpu",), {"tasks": SMOKE_TASKS, "limit": SMOKE_LIMIT}, workdir
    )
    assert _listing(tiny_model_dir) == before, "the evaluator must never write into the model dir"
    return output, workdir


def test_smoke_metrics_are_finite_and_plausible(smoke_run):
    metrics = smoke_run[0].metrics
    expected = [
        "ckpt_watch_smoke_mc/acc",
        "ckpt_watch_smoke_mc/acc_stderr",
        "ckpt_watch_smoke_mc/acc_norm",
        "ckpt_watch_smoke_mc/acc_norm_stderr",
        "ckpt_watch_smoke_ppl/word_perplexity",
        "ckpt_watch_smoke_ppl/byte_perplexity",
        "ckpt_watch_smoke_ppl/bits_per_byte",
    ]
    assert set(expected) <= set(metrics), sorted(metrics)
    assert all(type(v) is float and math.isfinite(v) for v in metrics.values()), metrics
    assert 0.0 <= metrics["ckpt_watch_smoke_mc/acc"] <= 1.0
    assert 0.0 <= metrics["ckpt_watch_smoke_mc/acc_norm"] <= 1.0
    assert metrics["ckpt_watch_smoke_ppl/word_perplexity"] > 1.0
    assert metrics["ckpt_watch_smoke_ppl/byte_perplexity"] > 1.0
    assert metrics["ckpt_watch_smoke_ppl/bits_per_byte"] > 0.0
    # lm-eval reports the perplexities' stderr as "N/A"; it must be dropped, not faked.
    assert "ckpt_watch_smoke_ppl/word_perplexity_stderr" not in metrics


def test_smoke_raw_and_versions(smoke_run):
    output, _ = smoke_run
    json.dumps(output.raw, allow_nan=False)
    assert {"results", "configs", "versions", "n-samples"} <= set(output.raw)
    assert "samples" not in output.raw
    assert output.raw["n-samples"]["ckpt_watch_smoke_mc"]["effective"] == SMOKE_LIMIT
    assert output.raw["n-samples"]["ckpt_watch_smoke_mc"]["original"] >= 50
    for package in ("lm_eval", "transformers", "torch"):
        assert output.versions[package]
    assert all(isinstance(v, str) for v in output.versions.values())


def test_bundled_tasks_read_installed_data_and_cache_in_a_folder_of_the_process(smoke_run):
    """Rendered once per process (a warm worker's later jobs reuse them and their datasets cache), not per job."""
    _, workdir = smoke_run
    folder = bundled_tasks_dir()
    assert folder == bundled_tasks_dir() and not folder.is_relative_to(workdir)
    rendered = {p.name: p.read_text() for p in folder.glob("*.yaml")}
    assert set(rendered) == {f"{name}.yaml" for name in BUNDLED_TASKS}
    assert not any("__CKPT_WATCH_" in text for text in rendered.values())
    assert str(Path(str(DATA)) / "smoke") in rendered["ckpt_watch_smoke_mc.yaml"]
    assert any((folder.parent / "hf_datasets_cache").rglob("*.arrow"))
    assert not list(workdir.rglob("*"))  # nothing of the run lands in the job's folder


def _write_user_task(user_dir: Path) -> None:
    user_dir.mkdir(parents=True)
    rows = [{"q": "Is ice cold?", "options": ["yes", "no"], "gold": 0}, {"q": "Is fire cold?", "options": ["yes", "no"], "gold": 1}]
    data = user_dir / "yes_no.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (user_dir / "yes_no.yaml").write_text(
        "task: my_yes_no\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        "output_type: multiple_choice\ntest_split: test\n"
        'doc_to_text: "{{q}}"\ndoc_to_choice: "{{options}}"\ndoc_to_target: gold\n'
        "metric_list:\n  - metric: acc\n"
    )


def test_group_together_with_a_user_task_dir(tiny_model_dir, tmp_path):
    """The bundled group, plus a user task from `include_path` whose data lies next to it."""
    user_dir = tmp_path / "my_tasks"
    _write_user_task(user_dir)
    output = get_evaluator("lm_eval").run(
        tiny_model_dir,
        ("cpu",),
        {"tasks": ["ckpt_watch_smoke", "my_yes_no"], "limit": 2, "include_path": str(user_dir), "batch_size": 4},
        tmp_path / "work",
    )
    assert {"ckpt_watch_smoke_mc/acc", "ckpt_watch_smoke_ppl/bits_per_byte", "my_yes_no/acc"} <= set(output.metrics)
    assert output.raw["group_subtasks"]["ckpt_watch_smoke"] == SMOKE_TASKS


def test_flatten_results():
    results = {
        "gsm8k": {
            "alias": "gsm8k",
            "exact_match,strict-match": 0.25,
            "exact_match_stderr,strict-match": 0.01,
            "exact_match,flexible-extract": 0.5,
            "exact_match_stderr,flexible-extract": "N/A",
        },
        "wikitext": {
            "name": "wikitext",
            "sample_len": 62,
            "word_perplexity,none": 17.5,
            "word_perplexity_stderr,none": "N/A",
            "bits_per_byte,none": float("nan"),
            "byte_perplexity,none": float("inf"),
        },
        "mmlu": {"alias": "mmlu", "acc,none": 1, "acc_stderr,none": 0.004, "flag,none": True},
    }
    assert flatten_results(results) == {
        "gsm8k/exact_match@strict-match": 0.25,
        "gsm8k/exact_match_stderr@strict-match": 0.01,
        "gsm8k/exact_match@flexible-extract": 0.5,
        "wikitext/word_perplexity": 17.5,
        "mmlu/acc": 1.0,
        "mmlu/acc_stderr": 0.004,
    }
    assert all(type(v) is float for v in flatten_results(results).values())
    nonfinite: dict[str, str] = {}
    flatten_results(results, nonfinite)
    assert nonfinite == {"wikitext/bits_per_byte": "nan", "wikitext/byte_perplexity": "inf"}  # for the `nan` alerts


def test_unknown_task_is_named(tiny_model_dir, tmp_path):
    with pytest.raises(EvaluatorError, match="no_such_task_xyz") as error:
        get_evaluator("lm_eval").run(
            tiny_model_dir, ("cpu",), {"tasks": ["ckpt_watch_smoke_mc", "no_such_task_xyz"]}, tmp_path
        )
    assert "ckpt_watch_smoke_mc" not in str(error.value)


def test_task_both_alone_and_in_its_group_is_an_options_error(tiny_model_dir, tmp_path):
    with pytest.raises(EvaluatorError, match="Duplicate task 'ckpt_watch_smoke_mc'"):
        get_evaluator("lm_eval").run(
            tiny_model_dir, ("cpu",), {"tasks": ["ckpt_watch_smoke", "ckpt_watch_smoke_mc"]}, tmp_path
        )


def test_unknown_backend_lists_known_ones():
    assert "lm_eval" in known_backends()
    with pytest.raises(EvaluatorError, match="lm_eval"):
        get_evaluator("helm")


@pytest.mark.parametrize(
    "options, message",
    [
        ({}, "tasks"),
        ({"tasks": []}, "tasks"),
        ({"tasks": ["x"], "limt": 5}, "limt"),
        ({"tasks": ["x"], "limit": 0}, "limit"),
        ({"tasks": ["x"], "num_fewshot": -1}, "num_fewshot"),
        ({"tasks": ["x"], "batch_size": "big"}, "batch_size"),
        ({"tasks": ["x"], "model_args": {"pretrained": "gpt2"}}, "pretrained"),
        ({"tasks": ["x"], "include_path": "/no/such/dir"}, "/no/such/dir"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(EvaluatorError, match=message):
        parse_options(options)


def test_good_options_and_defaults():
    opts = parse_options({"tasks": "ckpt_watch_smoke", "batch_size": "auto:2", "limit": 0.5})
    assert opts.tasks == ["ckpt_watch_smoke"]
    assert (opts.model, opts.dtype, opts.num_fewshot) == ("hf", "auto", None)
    assert parse_options({"tasks": ["a"]}).batch_size == 8


def test_model_dir_without_config_is_rejected(tmp_path):
    with pytest.raises(EvaluatorError, match="config.json"):
        get_evaluator("lm_eval").run(tmp_path, ("cpu",), {"tasks": ["ckpt_watch_smoke_mc"]}, tmp_path / "work")


def test_registry_imports_no_heavy_modules():
    code = (
        "import sys; from watcher.evaluators import get_evaluator, known_backends; "
        "known_backends(); get_evaluator('lm_eval'); "
        "heavy = [m for m in ('torch', 'lm_eval', 'transformers', 'datasets') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_render_bundled_tasks_escapes_odd_paths(tmp_path):
    import yaml

    workdir = tmp_path / 'odd "dir" \\ with spaces'
    rendered = render_bundled_tasks(workdir) / "ckpt_watch_smoke_mc.yaml"
    config = yaml.safe_load(rendered.read_text())
    assert config["dataset_kwargs"]["cache_dir"] == str(workdir / "hf_datasets_cache")
    assert Path(config["dataset_kwargs"]["data_files"]["test"]).is_file()


# ---- the bundled data itself


def test_mc_questions_are_sane():
    rows = [json.loads(line) for line in DATA.joinpath("smoke/mc.jsonl").read_text().splitlines() if line.strip()]
    assert len(rows) >= 50
    for row in rows:
        assert row["question"].strip()
        assert len(row["choices"]) == 4 and len(set(row["choices"])) == 4
        assert isinstance(row["answer"], int) and 0 <= row["answer"] < 4
    assert len({row["answer"] for row in rows}) == 4
    assert len({row["question"] for row in rows}) == len(rows)


def test_prose_sizes_and_no_overlap():
    heldout = DATA.joinpath("smoke/heldout.txt").read_text(encoding="utf-8")
    train = DATA.joinpath("smoke/train.txt").read_text(encoding="utf-8")
    assert 6_000 <= len(heldout.encode()) <= 10_000
    assert 20_000 <= len(train.encode()) <= 40_000
    paragraphs = [p for p in heldout.split("\n\n") if p.strip()]
    assert len(paragraphs) >= 6
    # Held-out perplexity means nothing if the model trained on the same sentences.
    train_sentences = {s.strip() for s in train.replace("\n", " ").split(". ")}
    heldout_sentences = {s.strip() for s in heldout.replace("\n", " ").split(". ")}
    assert not (train_sentences & heldout_sentences - {""})


def test_data_parallel_launch_gives_the_single_process_results(smoke_run, tiny_model_dir, tmp_path):
    """The `--device cuda:1,2` path (accelerate launch, rank 0 writes the results) run as one CPU process: the
    plumbing is the same on GPUs, where lm-eval splits the requests; it was run on two H100s (README)."""
    from watcher.evaluators.lm_eval_parallel import run_data_parallel

    single, _ = smoke_run
    options = {"tasks": SMOKE_TASKS, "limit": SMOKE_LIMIT}
    launched = run_data_parallel(tiny_model_dir, options, tmp_path, processes=1, cpu=True)
    assert launched.metrics == pytest.approx(single.metrics, rel=1e-6) and launched.metrics
    assert launched.versions["accelerate"] and launched.raw["n-samples"] == single.raw["n-samples"]
    # A wrong request stays a permanent error across the process boundary.
    with pytest.raises(EvaluatorError, match="unknown lm-eval task.*no_such_task"):
        run_data_parallel(tiny_model_dir, {"tasks": ["no_such_task"]}, tmp_path, processes=1, cpu=True)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_without_vllm_installed_is_a_preset_error():
    with pytest.raises(EvaluatorError, match="needs vLLM installed"):
        parse_options({"tasks": ["ckpt_watch_smoke_mc"], "model": "vllm"})


def test_a_user_task_through_the_config_file(copy_trainer_output, tmp_path):
    """A preset in the user's config runs their own task YAML; include_path is relative to the config file."""
    from helpers import ckpt_watch, results

    output = copy_trainer_output()
    for name in ("checkpoint-10", "checkpoint-20"):
        shutil.rmtree(output / name)
    config_dir = tmp_path / "etc"
    _write_user_task(config_dir / "my_tasks")
    (config_dir / "watch.toml").write_text('[presets.mine]\n[[presets.mine.evaluators]]\nbackend = "lm_eval"\n'
                                           'tasks = ["my_yes_no"]\ninclude_path = "my_tasks"\n')  # fmt: skip
    run = ckpt_watch(output, "--scan", "--config", config_dir / "watch.toml", "--preset", "mine", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    [record] = results(output)
    assert record["status"] == "ok" and set(record["metrics"]) == {"my_yes_no/acc", "my_yes_no/acc_stderr"}
    full = json.loads((output / "ckpt-watch" / "checkpoint-30" / "regular" / "mine.json").read_text())
    assert full["raw"]["lm_eval"]["n-samples"]["my_yes_no"]["effective"] == 2


def test_what_cannot_change_within_a_process_is_done_once(monkeypatch):
    """A warm worker runs many jobs in one process: lm-eval's machine description (torch's collect_env: `pip
    list`, nvidia-smi in subprocesses) is collected once, and a task template compiled once per text."""
    import lm_eval.evaluator
    import lm_eval.utils
    import torch.utils.collect_env

    from watcher.evaluators.lm_eval_run import _per_process_caches

    calls = []
    monkeypatch.setattr(torch.utils.collect_env, "get_pretty_env_info", lambda: calls.append(1) or "the machine")
    # lm-eval's own function (an earlier job of this test process may have wrapped it); undone after the test
    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", getattr(lm_eval.evaluator.add_env_info, "__wrapped__",
                                                                   lm_eval.evaluator.add_env_info))  # fmt: skip
    if "from_string" in vars(lm_eval.utils.env):  # an earlier job of this test process memoised it
        monkeypatch.delattr(lm_eval.utils.env, "from_string")
    _per_process_caches()
    _per_process_caches()  # a second job: wraps nothing twice
    first, second = {}, {}
    lm_eval.evaluator.add_env_info(first)
    lm_eval.evaluator.add_env_info(second)
    assert len(calls) == 1 and first == second and first["pretty_env_info"] == "the machine"

    template = lm_eval.utils.env.from_string("Q: {{question}}")
    assert lm_eval.utils.env.from_string("Q: {{question}}") is template
    assert lm_eval.utils.apply_template("Q: {{question}}", {"question": "why?"}) == "Q: why?"
    assert lm_eval.utils.apply_template("A: {{answer}}", {"answer": "42"}) == "A: 42"
    assert lm_eval.utils.env.from_string("{{x}}", globals={"x": 1}).render() == "1"  # the other form still works
