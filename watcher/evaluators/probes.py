"""Built-in probes: measurements of a model folder that need no benchmark harness.

    parameters   parameter counts and weight bytes, from the safetensors headers and config.json alone
                 (milliseconds, any size, no model load)
    flops        forward and training FLOPs per token, estimated from the same headers and config.json
    perplexity   token-weighted perplexity on a held-out text (default: the bundled one), sliding windows
    inference    generation latency per batch, tokens/s, and peak GPU memory (allocated and reserved)
    routing      mixture-of-experts router statistics per MoE layer and their mean over layers (see
                 watcher/evaluators/routing.py); a dense model gets no routing metrics, and raw says why

Options (all optional):
    probes          which probes, in order (default ["parameters"])
    text            a UTF-8 file for perplexity and routing (default: the bundled held-out text)
    max_length      window of tokens per forward pass for perplexity and routing (default: the model's
                    context up to 1024)
    routing_tokens  how many tokens of the text the routing probe runs through the model (default 512: the
                    first 512 tokens; a few hundred decisions per expert for up to ~8 experts, top-2)
    flops_context   the context length n_ctx in the attention term of the FLOPs estimate (default: the
                    model's max_position_embeddings up to 2048, a usual pretraining context)
    iterations      inference: timed generate() calls, the median is reported (default 3)
    new_tokens      inference: tokens generated per call (default 32)
    batch_size      inference: prompts per call (default 1)
    prompt_tokens   inference: tokens per prompt (default 32)
    trials          inference: how many times to make the whole measurement (default 1); with N >= 2 the
                    metrics are the mean over the trials, with their stdev and stderr (see `inference`)

The model is loaded once, on the job's pinned device, for the probes that need it (perplexity, inference,
routing), through the job's watcher.model_input.ModelInput: the same loaded model serves lm-eval's `hf` steps of
the job. parameters and flops read the weights' specs and config.json from it, so they need no folder either: on a
sharded checkpoint they read the shards' metadata.

Metrics:
    params/total      every stored parameter (a tied lm_head is stored, and counted, once)
    params/bytes      their size in the stored dtypes
    params/active     parameters used per token: params/total - R * (1 - k/E), where R is the routed experts'
                      parameters (`experts.N.*` tensors, or fused `experts.gate_up_proj`-style tensors whose first
                      dimension is E), E the number of routed experts and k the experts chosen per token
                      (config.json: num_local_experts / num_experts / n_routed_experts, num_experts_per_tok).
                      Shared experts, routers and everything else count fully. Dense models: = params/total
    params/embedding  the token and position lookup tables and an untied output projection (lm_head), as stored
    flops/per_token   forward FLOPs per token, Kaplan et al. 2020 ("Scaling laws for neural language models",
                      Table 1): 2 * N + 2 * n_layer * n_ctx * d_attn + 2 * d_model * n_vocab, where
                      N = params/active - params/embedding (active non-embedding parameters: one multiply-add,
                      2 FLOPs, per weight per token), the middle term Kaplan's attention row (QK^T and the
                      weighted sum of V, d_attn = num_attention_heads * head_dim; it equals both over n_ctx/2
                      positions, the mean under a causal mask), the last the output logits (Table 1's
                      "de-embed" row, which Kaplan leave out of their non-embedding total but which is a large
                      share of a small model's compute). Embedding lookups cost nothing. n_ctx: flops_context
    flops/per_token_train  3 * flops/per_token (the backward pass costs about twice the forward)
    routing/layer_N/{gini,cv,utilisation,max_share,min_share}  per MoE layer, N the decoder layer's number,
                      of that layer's tokens per expert (definitions: watcher/evaluators/routing.py)
    routing/{gini,cv,utilisation}  their unweighted mean over the MoE layers (not a statistic of pooled counts)
    routing/layers, routing/tokens  MoE layers seen, tokens run; raw["routing"]["layers"]["N"] holds the module
                      name and tokens_per_expert, the counts themselves (each token counts once per chosen expert)
    inference/{latency_s,tokens_per_s}_{stdev,stderr}, inference/trials  with trials = N >= 2 only
    ppl/*, inference/*  see the probe functions
"""

from __future__ import annotations

import math
import re
import statistics
import time
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from merge import MergeError
from merge.source import TensorSpec
from watcher.evaluators.base import EvalOutput, EvaluatorError, JobContext, reject_unknown_options
from watcher.metrics import stderr_name, stdev_name
from watcher.model_input import ModelInput

_OPTIONS = {"probes", "text", "max_length", "iterations", "new_tokens", "batch_size", "prompt_tokens",
            "routing_tokens", "flops_context", "trials"}  # fmt: skip
_POSITIVE_INTS = ("max_length", "iterations", "new_tokens", "batch_size", "prompt_tokens", "routing_tokens",
                  "flops_context", "trials")  # fmt: skip
DEFAULT_ROUTING_TOKENS = 512
MAX_FLOPS_CONTEXT = 2048

Metrics = dict[str, float]
ProbeResult = tuple[Metrics, dict]  # metrics, and what goes into EvalOutput.raw under the probe's name

# config.json keys, in the order tried; MoE configs name the same thing differently per architecture.
_NUM_EXPERTS_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
_TOP_K_KEYS = ("num_experts_per_tok", "moe_top_k")
# A routed expert's tensors: `...experts.3.w1.weight` (per expert, as save_pretrained writes them) or
# `...experts.gate_up_proj` of shape [E, ...] (fused, as transformers 5 models hold them in memory, so a
# state_dict saved directly). `shared_experts.` / `shared_expert.` never match: the dot before `experts` is required.
_PER_EXPERT = re.compile(r"(?:^|\.)experts\.(\d+)\.")
_FUSED_EXPERTS = re.compile(r"(?:^|\.)experts\.[^.\d][^.]*(?:\.(?:weight|bias))?$")
# Modules whose weights are lookup tables or the output projection, not per-token matrix multiplies.
_EMBEDDING_MODULES = {"embed_tokens", "tok_embeddings", "wte", "wpe", "embed_in", "embed_out", "word_embeddings",
                      "position_embeddings", "embed_positions", "lm_head"}  # fmt: skip


def read_config(model: Path | ModelInput) -> dict:
    """config.json, or {} when there is none (the parameters probe then treats the model as dense)."""
    model = model if isinstance(model, ModelInput) else ModelInput("", folder=Path(model))
    try:
        return model.config()
    except ValueError as exc:
        raise EvaluatorError(f"config.json of {model.checkpoint_name or 'the model'}: not valid JSON ({exc})") from None


def config_value(config: Mapping, keys: tuple[str, ...]) -> Any:
    """The first truthy value among `keys`, at the top level or in `text_config` (multimodal wrappers)."""
    for scope in (config, config.get("text_config") or {}):
        for key in keys:
            if scope.get(key):
                return scope[key]
    return None


def read_specs(model: Path | ModelInput, probe: str) -> dict[str, TensorSpec]:
    model = model if isinstance(model, ModelInput) else ModelInput("", folder=Path(model))
    try:
        return model.specs()
    except MergeError as exc:
        raise EvaluatorError(f"{probe} probe: {exc}") from None


def routed_experts(specs: Mapping[str, TensorSpec], config: Mapping) -> tuple[int, int, int] | None:
    """(routed-expert parameters R, experts E, experts per token k), or None for a dense model."""
    per_expert = {name: spec for name, spec in specs.items() if _PER_EXPERT.search(name)}
    fused = {name: spec for name, spec in specs.items() if _FUSED_EXPERTS.search(name) and spec.shape}
    if not per_expert and not fused:
        return None
    num_experts = config_value(config, _NUM_EXPERTS_KEYS)
    if not num_experts:  # infer it from the tensors: the highest expert index, or a fused tensor's first dim
        indices = [int(_PER_EXPERT.search(name).group(1)) for name in per_expert]
        num_experts = max(indices) + 1 if indices else max(spec.shape[0] for spec in fused.values())
    top_k = config_value(config, _TOP_K_KEYS)
    if not top_k:
        raise EvaluatorError("the weights have routed experts but config.json has no num_experts_per_tok")
    routed = sum(s.numel for s in per_expert.values()) + sum(
        s.numel for s in fused.values() if s.shape[0] == num_experts
    )
    return routed, int(num_experts), int(top_k)


def embedding_numel(specs: Mapping[str, TensorSpec]) -> int:
    def module_of(name: str) -> str:  # "model.embed_tokens.weight" -> "embed_tokens"
        return name.rsplit(".", 1)[0].rsplit(".", 1)[-1]

    return sum(spec.numel for name, spec in specs.items() if module_of(name) in _EMBEDDING_MODULES)


def parameter_counts(specs: Mapping[str, TensorSpec], config: Mapping) -> ProbeResult:
    total = sum(s.numel for s in specs.values())
    moe = routed_experts(specs, config)
    active = float(total)
    raw: dict = {"moe": moe is not None}
    if moe:
        routed, num_experts, top_k = moe
        # Each token runs k of the E routed experts: the other E - k experts' share of R is idle for it.
        active = total - routed * (1 - top_k / num_experts)
        raw.update(routed_expert_params=routed, num_experts=num_experts, experts_per_token=top_k)
    metrics = {"params/total": float(total), "params/bytes": float(sum(s.nbytes for s in specs.values())),
               "params/active": active, "params/embedding": float(embedding_numel(specs))}  # fmt: skip
    return metrics, raw


def count_parameters(source: ModelInput, options: dict[str, Any], model: Callable[[], Any]) -> ProbeResult:
    return parameter_counts(read_specs(source, "parameters"), read_config(source))


def flops_per_token(active: float, embedding: float, config: Mapping, context: int | None = None) -> ProbeResult:
    """Kaplan et al. 2020, Table 1, plus the output logits; see the module docstring for every term."""
    n_layer = config_value(config, ("num_hidden_layers", "n_layer", "num_layers"))
    d_model = config_value(config, ("hidden_size", "n_embd", "d_model"))
    heads = config_value(config, ("num_attention_heads", "n_head"))
    vocab = config_value(config, ("vocab_size",))
    missing = [key for key, value in (("num_hidden_layers", n_layer), ("hidden_size", d_model),
                                      ("num_attention_heads", heads), ("vocab_size", vocab)) if not value]  # fmt: skip
    if missing:
        raise EvaluatorError(f"flops probe: config.json has no {missing[0]}")
    d_attn = heads * (config_value(config, ("head_dim",)) or d_model // heads)
    if context is None:
        context = min(config_value(config, ("max_position_embeddings", "n_positions")) or MAX_FLOPS_CONTEXT,
                      MAX_FLOPS_CONTEXT)  # fmt: skip
    non_embedding = active - embedding
    # 2 FLOPs (multiply, add) per active weight; Kaplan's attention term; the d_model x n_vocab logits matmul,
    # which Kaplan leave out but which is about a fifth of Llama-3.2-1B's forward (128k vocabulary).
    forward = 2 * non_embedding + 2 * n_layer * context * d_attn + 2 * d_model * vocab
    raw = {"context": context, "n_layer": n_layer, "d_model": d_model, "d_attn": d_attn, "n_vocab": vocab,
           "non_embedding_active_params": non_embedding}  # fmt: skip
    return {"flops/per_token": float(forward), "flops/per_token_train": 3.0 * forward}, raw


def flops(source: ModelInput, options: dict[str, Any], model: Callable[[], Any]) -> ProbeResult:
    config = read_config(source)
    if not config:
        raise EvaluatorError(f"flops probe: {source.checkpoint_name} has no config.json")
    params, _ = parameter_counts(read_specs(source, "flops"), config)
    return flops_per_token(params["params/active"], params["params/embedding"], config, options.get("flops_context"))


def perplexity(source: ModelInput, options: dict[str, Any], model: Callable[[], Any]) -> ProbeResult:
    """Token-weighted: the mean negative log-likelihood over every predicted token of the whole text, with
    overlapping windows so that each token (after the first window) is predicted with half a window of context."""
    import torch

    lm, tokenizer, device = model()
    ids = heldout_ids(tokenizer, options)
    window = _window(lm, options)
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
    return {"ppl/perplexity": math.exp(mean), "ppl/nll_per_token": mean, "ppl/tokens": float(counted)}, {}


def inference(source: ModelInput, options: dict[str, Any], model: Callable[[], Any]) -> ProbeResult:
    """Generation latency (the median of `iterations` timed generate() calls) and tokens/s; with `trials = N`
    (N >= 2) that measurement N times: the mean of the N as inference/latency_s and inference/tokens_per_s, their
    sample standard deviations (`_stdev`), standard errors of the mean (`_stderr` = stdev / sqrt(N), what
    `ckpt-watch compare` tests differences with), inference/trials, and each trial's values in raw."""
    import torch

    lm, tokenizer, device = model()
    batch, prompt = options.get("batch_size", 1), options.get("prompt_tokens", 32)
    new, iterations = options.get("new_tokens", 32), options.get("iterations", 3)
    trials = options.get("trials", 1)
    generator = torch.Generator().manual_seed(0)
    vocab = min(len(tokenizer), lm.config.vocab_size)
    inputs = torch.randint(0, vocab, (batch, prompt), generator=generator).to(device)
    settings = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False,
                "pad_token_id": tokenizer.pad_token_id or tokenizer.eos_token_id or 0}  # fmt: skip
    cuda = device.startswith("cuda")
    measured = []  # per trial: the median latency of its iterations
    with torch.no_grad():
        lm.generate(inputs, attention_mask=torch.ones_like(inputs), **settings)  # warm-up: kernels, caches
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(trials):
            latencies = []
            for _ in range(iterations):
                begin = time.perf_counter()
                lm.generate(inputs, attention_mask=torch.ones_like(inputs), **settings)
                if cuda:
                    torch.cuda.synchronize()
                latencies.append(time.perf_counter() - begin)
            measured.append(sorted(latencies)[len(latencies) // 2])
    per_trial = {"inference/latency_s": measured, "inference/tokens_per_s": [batch * new / t for t in measured]}
    metrics: Metrics = {}
    raw: dict = {}
    if trials == 1:  # exactly the single measurement's metrics, as before trials existed
        metrics = {name: values[0] for name, values in per_trial.items()}
    else:
        for name, values in per_trial.items():
            stdev = statistics.stdev(values)  # the sample standard deviation (N - 1)
            metrics.update({name: statistics.fmean(values), stdev_name(name): stdev,
                            stderr_name(name): stdev / math.sqrt(trials)})  # fmt: skip
        metrics["inference/trials"] = float(trials)
        raw = {"trials": [{name: values[i] for name, values in per_trial.items()} for i in range(trials)]}
    if cuda:
        metrics["inference/peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        metrics["inference/peak_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
    return metrics, raw


def routing(source: ModelInput, options: dict[str, Any], model: Callable[[], Any]) -> ProbeResult:
    """Router statistics over the first `routing_tokens` tokens of the text, fed in windows of `max_length`.

    Every routing decision counts: with top-k routing a token adds one to each of its k experts, so a layer's
    tokens_per_expert sums to k * tokens. Layers without a router (dense layers of a MoE model) are absent.
    """
    import torch

    from watcher.evaluators.routing import RouterRecorder, routing_metrics

    lm, tokenizer, device = model()
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    recorder = RouterRecorder(lm, getattr(config, "num_experts_per_tok", None))
    if not recorder.routers:
        return {}, {"moe": False, "note": f"{type(lm).__name__} has no MoE router modules: no routing statistics"}
    ids = heldout_ids(tokenizer, options)
    ids = ids[: options.get("routing_tokens", DEFAULT_ROUTING_TOKENS)]
    window = _window(lm, options)
    with torch.no_grad(), recorder:
        for start in range(0, len(ids), window):
            lm(ids[start : start + window].unsqueeze(0).to(device), use_cache=False)
    raw = {"moe": True, "tokens": len(ids), "experts_per_token": recorder.top_k,
           "layers": {str(layer): {"module": recorder.names[layer], "tokens_per_expert": counts}
                      for layer, counts in sorted(recorder.counts.items())}}  # fmt: skip
    return routing_metrics(recorder.counts, len(ids)), raw


_PROBES: dict[str, Callable[..., ProbeResult]] = {"parameters": count_parameters, "flops": flops,
                                                  "perplexity": perplexity, "inference": inference,
                                                  "routing": routing}  # fmt: skip


def _heldout_text(options: dict[str, Any]) -> str:
    path = options.get("text")
    if path:
        return Path(path).read_text(encoding="utf-8")
    return resources.files("watcher").joinpath("data/smoke/heldout.txt").read_text(encoding="utf-8")


def heldout_ids(tokenizer, options: dict[str, Any]):
    """The held-out text's token ids, one 1-D tensor; the probes feed them to the model in windows.

    Tokenised whole, as one text, with the tokenizer's warning that the ids exceed the model's length turned off
    (verbose=False): the windows keep every forward pass within it. Tokenising the text in pieces instead would
    change the ids: a BPE tokenizer merges differently across a cut, and a Llama-style one adds BOS to each piece.
    """
    return tokenizer(_heldout_text(options), return_tensors="pt", verbose=False).input_ids[0]


def _window(lm, options: dict[str, Any]) -> int:
    """Tokens per forward pass: the `max_length` option, else the model's context up to 1024."""
    return options.get("max_length") or min(getattr(lm.config, "max_position_embeddings", 1024) or 1024, 1024)


class ProbesBackend:
    name = "probes"

    def check_options(self, options: dict[str, Any]) -> None:
        reject_unknown_options("probes", options, _OPTIONS)
        names = options.get("probes", ["parameters"])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise EvaluatorError(f"probes option 'probes' must be a list of probe names, got {names!r}")
        unknown = [n for n in names if n not in _PROBES]
        if unknown:
            raise EvaluatorError(f"unknown probe {unknown[0]!r}; known probes: {', '.join(sorted(_PROBES))}")
        for key in _POSITIVE_INTS:
            value = options.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise EvaluatorError(f"probes option {key!r} must be a positive integer, got {value!r}")
        if "text" in options and not Path(options["text"]).is_file():
            raise EvaluatorError(f"probes option 'text': file not found: {options['text']}")

    def takes_loaded_model(self, options: dict[str, Any], devices: Sequence[str]) -> bool:
        return True  # every probe reads specs/config or the loaded model, in this process

    def run(
        self, model_dir: Path | None, devices: Sequence[str], options: dict[str, Any], workdir: Path,
        context: JobContext | None = None,
    ) -> EvalOutput:
        self.check_options(options)
        names = options.get("probes", ["parameters"])
        device = devices[0]  # probes measure one model copy: on a multi-GPU job, the first GPU
        source = context.model if context is not None and context.model is not None else None
        if source is None:
            if model_dir is None or not Path(model_dir).is_dir():
                raise EvaluatorError(f"model dir {str(model_dir)!r} does not exist or is not a directory")
            source = ModelInput(Path(model_dir).name, folder=Path(model_dir))
        loaded: list = []

        def model():
            """The job's loaded model, on the pinned device, for the probes that need it."""
            if not loaded:
                lm, tokenizer = source.load(device)
                loaded.append((lm, tokenizer, device))
            return loaded[0]

        metrics: dict[str, float] = {}
        raw: dict[str, Any] = {"probes": names}
        for name in names:
            probe_metrics, probe_raw = _PROBES[name](source, options, model)
            metrics.update(probe_metrics)
            if probe_raw:
                raw[name] = probe_raw
        versions = {}
        if loaded:
            import torch
            import transformers

            versions = {"torch": torch.__version__, "transformers": transformers.__version__}
        return EvalOutput(metrics=metrics, raw=raw, versions=versions)
