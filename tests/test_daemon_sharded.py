"""The daemon on sharded FSDP2 checkpoints with EMA: both variants merged, evaluated, labelled, cleaned up."""

from __future__ import annotations

import shutil

from factories import session_distributed_checkpoints
from helpers import ckpt_watch, results


def test_the_daemon_merges_and_evaluates_regular_and_ema(tmp_path_factory, tiny_model_dir, tmp_path):
    folders = session_distributed_checkpoints(tmp_path_factory)
    output = tmp_path / "output"
    output.mkdir()
    shutil.copytree(folders["hf-fsdp"], output / "checkpoint-20")
    config = tmp_path / "c.toml"
    # The hf-fsdp factory saves config.json but no tokenizer: lm-eval takes it from the base model. One process per
    # job (warm = false), so the prepare stage's peak memory is the merge's own (a warm worker's high-water mark
    # includes the torch and transformers it imported before the job).
    config.write_text(f'base_model = "{tiny_model_dir}"\nkeep_merged = 1\nwarm = false\n'
                      '[presets.quick]\n[[presets.quick.evaluators]]\nbackend = "probes"\n'
                      '[[presets.quick.evaluators]]\nbackend = "lm_eval"\ntasks = ["ckpt_watch_smoke_ppl"]\nlimit = 3\n')  # fmt: skip
    run = ckpt_watch(output, "--scan", "--config", config, "--preset", "quick")
    assert run.returncode == 0, run.stderr
    records = {r["variant"]: r for r in results(output)}
    assert sorted(records) == ["ema", "regular"]
    assert all(r["status"] == "ok" and r["step"] == 20 and r["layout"] == "hf-fsdp-dcp" for r in records.values())
    assert records["regular"]["timings"]["prepare_s"] > 0
    stages = records["regular"]["stages"]  # walltime and memory per stage
    assert sorted(stages) == ["0-probes", "1-lm_eval", "prepare", "verify"]
    assert all(s["walltime_s"] >= 0 and s["peak_rss_mb"] > 0 for s in stages.values())
    # The merge streams without torch (tens of MB); lm-eval loads torch and the model.
    assert stages["prepare"]["peak_rss_mb"] < 200 < stages["1-lm_eval"]["peak_rss_mb"]
    ppl = "ckpt_watch_smoke_ppl/word_perplexity"
    assert records["regular"]["metrics"][ppl] != records["ema"]["metrics"][ppl]  # EMA = weights * 0.5 here
    assert records["regular"]["metrics"]["params/total"] == records["ema"]["metrics"]["params/total"] > 0
    for record in records.values():  # lm-eval took the model the job loaded once (the probes here read headers)
        assert (output / "ckpt-watch" / record["log"]).read_text().count("[ckpt-watch] model loaded on") == 1
    scratch = output / "ckpt-watch" / ".work"
    assert not list(scratch.glob("job-*"))  # each job's scratch copy is gone ...
    kept = sorted(p.relative_to(scratch).as_posix() for p in scratch.glob("merged/*/*"))
    assert kept == ["merged/ema/checkpoint-20", "merged/regular/checkpoint-20"]  # ... except the newest K=1
