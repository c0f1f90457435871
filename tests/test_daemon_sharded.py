"""The daemon on sharded FSDP2 checkpoints with EMA: both variants merged, evaluated, labelled, cleaned up; their
merged models kept with the best checkpoints (keep_merged_best)."""

from __future__ import annotations

import shutil

from factories import session_distributed_checkpoints
from helpers import ckpt_watch, results

from watcher.retention import read_index

PPL = "ckpt_watch_smoke_ppl/word_perplexity"


def test_the_daemon_merges_and_evaluates_regular_and_ema(tmp_path_factory, tiny_model_dir, tmp_path):
    folders = session_distributed_checkpoints(tmp_path_factory)
    output = tmp_path / "output"
    output.mkdir()
    shutil.copytree(folders["hf-fsdp"], output / "checkpoint-20")
    config = tmp_path / "c.toml"
    # The hf-fsdp factory saves config.json but no tokenizer: lm-eval takes it from the base model. One process per
    # job (warm = false), so the prepare stage's peak memory is the merge's own (a warm worker's high-water mark
    # includes the torch and transformers it imported before the job).
    # keep_best with keep_merged_best: the merged models are kept with the best checkpoint too (hard links, beside
    # keep_merged's copies).
    config.write_text(f'base_model = "{tiny_model_dir}"\nkeep_merged = 1\nwarm = false\nkeep_merged_best = true\n'
                      f'keep_best = [{{ metric = "{PPL}", k = 1 }}, {{ metric = "{PPL}", k = 1, variant = "ema" }}]\n'
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
    assert records["regular"]["metrics"][PPL] != records["ema"]["metrics"][PPL]  # EMA = weights * 0.5 here
    assert records["regular"]["metrics"]["params/total"] == records["ema"]["metrics"]["params/total"] > 0
    for record in records.values():  # lm-eval took the model the job loaded once (the probes here read headers)
        assert (output / "ckpt-watch" / record["log"]).read_text().count("[ckpt-watch] model loaded on") == 1
    scratch = output / "ckpt-watch" / ".work"
    assert not list(scratch.glob("job-*"))  # each job's scratch copy is gone ...
    kept = sorted(p.relative_to(scratch).as_posix() for p in scratch.glob("merged/*/*"))
    assert kept == ["merged/ema/checkpoint-20", "merged/regular/checkpoint-20"]  # ... except the newest K=1
    best = output / "ckpt-watch" / "best"
    kept_in = [best / "ckpt_watch_smoke_ppl" / "word_perplexity", best / "ema" / "ckpt_watch_smoke_ppl" /
               "word_perplexity"]  # fmt: skip
    for folder, variant in zip(kept_in, ("regular", "ema")):
        merged = folder / "checkpoint-20" / "merged"
        assert any((folder / "checkpoint-20").rglob("*.distcp"))  # the shards as saved ...
        assert (merged / "config.json").is_file()  # ... and the merged model, the same files as keep_merged's
        [weights] = merged.glob("*.safetensors")
        assert weights.stat().st_ino == (scratch / "merged" / variant / "checkpoint-20" / weights.name).stat().st_ino
    assert [rule["kept"][0]["merged"] for rule in read_index(best)["rules"]] == [str(f / "checkpoint-20" / "merged")
                                                                                for f in kept_in]  # fmt: skip
    assert not any((best / ".held").iterdir())
