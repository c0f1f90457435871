"""Built-in probes: measurements of a model folder that need no benchmark harness.

    parameters   parameter count and weight bytes, from the safetensors headers alone (milliseconds, any size)
    perplexity   token-weighted perplexity on a held-out text (default: the bundled one), sliding windows
    inference    generation latency per batch, tokens/s, and peak GPU memory (allocated and reserved)

Options: `probes = [...]` (default ["parameters"]), `text` (a UTF-8 file for perplexity), `max_length`
(window, default the model's context up to 1024), `iterations` (default 3), `new_tokens` (default 32),
`batch_size` (default 1), `prompt_tokens` (default 32). The model is loaded once, on the job's pinned device,
for the probes that need it. (Still to come: active parameters for MoE, FLOPs per token, routing statistics.)
"""

from __future__ import annotations

import math
import time
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from merge import MergeError
from merge.safetensors_source import SafetensorsSource
from watcher.evaluators.base import EvalOutput, EvaluatorError, JobContext

_OPTIONS = {"probes", "text", "max_length", "iterations", "new_tokens", "batch_size", "prompt_tokens"}
_POSITIVE_INTS = ("max_length", "iterations", "new_tokens", "batch_size", "prompt_tokens")


def count_parameters(model_dir: Path, options: dict[str, Any], model: "Callable[[], Any]") -> dict[str, float]:
    try:
        source = SafetensorsSource(model_dir)
    except MergeError as exc:
        raise EvaluatorError(f"parameters probe: {exc}") from None
    specs = source.specs().values()
    source.close()
    return {"params/total": float(sum(s.numel for s in specs)), "params/bytes": float(sum(s.nbytes for s in specs))}


def perplexity(model_dir: Path, options: dict[str, Any], model: "Callable[[], Any]") -> dict[str, float]:
    """Token-weighted: the mean negative log-likelihood over every predicted token of the whole text, with
    overlapping windows so that each token (after the first window) is predicted with half a window of context."""
    import torch

    lm, tokenizer, device = model()
    path = options.get("text")
    text = Path(path).read_text(encoding="utf-8") if path else _bundled_heldout()
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    window = options.get("max_length") or min(getattr(lm.config, "max_position_embeddings", 1024) or 1024, 1024)
    stride = max(1, window // 2)
    total_nll, counted, start = 0.0, 0, 0
    with torch.no_grad():
        while start < len(ids) - 1:
            end = min(start + window, len(ids))
            chunk = ids[start:end].unsqueeze(0).to(device)
            labels = chunk.clone()
            first_new = 0 if start == 0 else window - stride  # tokens already scored by the previous window
            labels[:, :first_new] = -100
            logits = lm(chunk).logits[:, :-1].float()
            targets = labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                                    ignore_index=-100, reduction="sum")  # fmt: skip
            total_nll += nll.item()
            counted += int((targets != -100).sum())
            if end == len(ids):
                break
            start += stride
    mean = total_nll / max(counted, 1)
    return {"ppl/perplexity": math.exp(mean), "ppl/nll_per_token": mean, "ppl/tokens": float(counted)}


def inference(model_dir: Path, options: dict[str, Any], model: "Callable[[], Any]") -> dict[str, float]:
    import torch

    lm, tokenizer, device = model()
    batch, prompt = options.get("batch_size", 1), options.get("prompt_tokens", 32)
    new, iterations = options.get("new_tokens", 32), options.get("iterations", 3)
    generator = torch.Generator().manual_seed(0)
    vocab = min(len(tokenizer), lm.config.vocab_size)
    inputs = torch.randint(0, vocab, (batch, prompt), generator=generator).to(device)
    settings = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False,
                "pad_token_id": tokenizer.pad_token_id or tokenizer.eos_token_id or 0}  # fmt: skip
    cuda = device.startswith("cuda")
    with torch.no_grad():
        lm.generate(inputs, attention_mask=torch.ones_like(inputs), **settings)  # warm-up: kernels, caches
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        latencies = []
        for _ in range(iterations):
            begin = time.perf_counter()
            lm.generate(inputs, attention_mask=torch.ones_like(inputs), **settings)
            if cuda:
                torch.cuda.synchronize()
            latencies.append(time.perf_counter() - begin)
    latency = sorted(latencies)[len(latencies) // 2]
    metrics = {"inference/latency_s": latency, "inference/tokens_per_s": batch * new / latency}
    if cuda:
        metrics["inference/peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        metrics["inference/peak_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
    return metrics


_PROBES = {"parameters": count_parameters, "perplexity": perplexity, "inference": inference}


def _bundled_heldout() -> str:
    return resources.files("watcher").joinpath("data/smoke/heldout.txt").read_text(encoding="utf-8")


class ProbesBackend:
    name = "probes"

    def check_options(self, options: dict[str, Any]) -> None:
        unknown_keys = set(options) - _OPTIONS
        if unknown_keys:
            raise EvaluatorError(f"unknown probes option(s): {', '.join(sorted(unknown_keys))}; "
                                 f"known: {', '.join(sorted(_OPTIONS))}")  # fmt: skip
        names = options.get("probes", ["parameters"])
        unknown = [n for n in names if n not in _PROBES]
        if unknown:
            raise EvaluatorError(f"unknown probe {unknown[0]!r}; known probes: {', '.join(sorted(_PROBES))}")
        for key in _POSITIVE_INTS:
            value = options.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise EvaluatorError(f"probes option {key!r} must be a positive integer, got {value!r}")
        if "text" in options and not Path(options["text"]).is_file():
            raise EvaluatorError(f"probes option 'text': file not found: {options['text']}")

    def run(
        self, model_dir: Path, device: str, options: dict[str, Any], workdir: Path, context: JobContext | None = None
    ) -> EvalOutput:
        self.check_options(options)
        names = options.get("probes", ["parameters"])
        loaded: list = []

        def model():
            """Load the model once, on the pinned device, for the probes that need it."""
            if not loaded:
                from transformers import AutoModelForCausalLM, AutoTokenizer

                lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").to(device).eval()
                loaded.append((lm, AutoTokenizer.from_pretrained(model_dir), device))
            return loaded[0]

        metrics: dict[str, float] = {}
        for name in names:
            metrics.update(_PROBES[name](Path(model_dir), options, model))
        versions = {}
        if loaded:
            import torch
            import transformers

            versions = {"torch": torch.__version__, "transformers": transformers.__version__}
        return EvalOutput(metrics=metrics, raw={"probes": names}, versions=versions)
