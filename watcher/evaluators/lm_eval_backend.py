"""Evaluate a checkpoint with EleutherAI's lm-evaluation-harness: the `lm_eval` backend.

This module picks where the evaluation runs; lm_eval_run.py is one run in a process (options, bundled tasks,
`lm_eval.simple_evaluate`, results).

Model types: `hf` (transformers, the default) and `vllm` (when vLLM is installed in this environment). On a
job pinned to several GPUs (`--device cuda:1,2`), `hf` runs data-parallel, one process per GPU through
`accelerate launch` (see lm_eval_parallel.py), and `vllm` splits the model over them (tensor_parallel_size).

torch, lm_eval and datasets are imported inside lm_eval_run.evaluate() only, so that looking the backend up is
cheap.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from watcher.evaluators.base import EvalOutput, EvaluatorError, JobContext
from watcher.evaluators.lm_eval_parallel import run_data_parallel
from watcher.evaluators.lm_eval_run import evaluate, parse_options


class LmEvalBackend:
    name = "lm_eval"

    def check_options(self, options: dict[str, Any]) -> None:
        parse_options(options)

    def run(
        self, model_dir: Path, devices: Sequence[str], options: dict[str, Any], workdir: Path,
        context: JobContext | None = None,
    ) -> EvalOutput:
        opts = parse_options(options)
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise EvaluatorError(f"model dir {str(model_dir)!r} does not exist or is not a directory")
        if opts.model in ("hf", "vllm") and not (model_dir / "config.json").is_file():
            raise EvaluatorError(f"model dir {str(model_dir)!r} has no config.json, so it is not a Hugging Face model")
        if opts.model == "hf" and len(devices) > 1:
            # Data-parallel: one process and one full model copy per GPU (lm-eval's own multi-GPU mode).
            return run_data_parallel(model_dir, dict(options), Path(workdir), len(devices))
        if opts.model == "vllm" and len(devices) > 1:
            # vLLM spreads one model over the GPUs itself; data-parallel vLLM in lm-eval needs ray, which is
            # rarely installed. A model_args entry of the user's wins.
            opts = dataclasses.replace(opts, model_args={"tensor_parallel_size": len(devices), **opts.model_args})
        output = evaluate(model_dir, devices[0] if len(devices) == 1 else "cuda", opts, Path(workdir))
        if output is None:
            raise RuntimeError("lm_eval.simple_evaluate returned no results")
        return output
