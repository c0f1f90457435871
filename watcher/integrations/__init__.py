"""Small pieces that run inside the TRAINING process and the files they leave for the daemon.

* `watcher.integrations.hf`: `CkptWatchCallback`, a `transformers.TrainerCallback` (the only module here that
  imports transformers; the daemon never imports it).
* `watcher.integrations.sentinel`: the verified completion sentinel (`checkpoint-N/ckpt-watch-complete.json`),
  for any training loop.
* `watcher.integrations.run_record`: the run record (`OUTPUT_DIR/ckpt-watch-run.json`): which W&B run and
  which logging dir the training uses; `read_run_record` is the daemon's reader.

This package's `__init__` imports nothing, so the daemon can import the light modules without transformers.
"""
