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
from watcher.evaluators.lm_eval_run import LmEvalOptions, evaluate, parse_options, takes_loaded_model


class LmEvalBackend:
    name = "lm_eval"

    def check_options(self, options: dict[str, Any]) -> None:
        parse_options(options)

    def takes_loaded_model(self, options: dict[str, Any], devices: Sequence[str]) -> bool:
        # hf on one device takes a model object; data-parallel hf and vLLM start their own processes and load
        # a folder there.
        return takes_loaded_model(parse_options(options), len(devices))

    def run(
        self, model_dir: Path | None, devices: Sequence[str], options: dict[str, Any], workdir: Path,
        context: JobContext | None = None,
    ) -> EvalOutput:
        opts = parse_options(options)
        shared = context.model if context is not None else None
        if shared is not None and takes_loaded_model(opts, len(devices)):
            output = evaluate(shared, devices[0], opts)  # the job's one load
        else:
            if model_dir is None:  # this step cannot take the loaded model after all: it needs the folder
                model_dir = shared.folder()
            output = self._run_on_folder(Path(model_dir), devices, opts, options, Path(workdir))
        if output is None:
            raise RuntimeError("lm_eval.simple_evaluate returned no results")
        return output

    def _run_on_folder(self, model_dir: Path, devices: Sequence[str], opts: LmEvalOptions, options: dict[str, Any],
                       workdir: Path) -> EvalOutput | None:  # fmt: skip
        if not model_dir.is_dir():
            raise EvaluatorError(f"model dir {str(model_dir)!r} does not exist or is not a directory")
        if opts.model in ("hf", "vllm") and not (model_dir / "config.json").is_file():
            raise EvaluatorError(f"model dir {str(model_dir)!r} has no config.json, so it is not a Hugging Face model")
        if opts.model == "hf" and len(devices) > 1:
            # Data-parallel: one process and one full model copy per GPU (lm-eval's own multi-GPU mode).
            return run_data_parallel(model_dir, dict(options), workdir, len(devices))
        if opts.model == "vllm" and len(devices) > 1:
            # vLLM spreads one model over the GPUs itself; data-parallel vLLM in lm-eval needs ray, which is
            # rarely installed. A model_args entry of the user's wins.
            opts = dataclasses.replace(opts, model_args={"tensor_parallel_size": len(devices), **opts.model_args})
        return evaluate(model_dir, devices[0] if len(devices) == 1 else "cuda", opts)
