"""Built-in probes on the real tiny model, checked against independent computations."""

from __future__ import annotations

import math

import pytest
import torch

from watcher.evaluators import EvaluatorError, get_evaluator


def test_parameters_match_the_model(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = get_evaluator("probes").run(tiny_model_dir, "cpu", {"probes": ["parameters"]}, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert out.metrics["params/total"] == sum(p.numel() for p in model.parameters())  # tied lm_head counted once
    assert out.metrics["params/bytes"] == 4 * out.metrics["params/total"]


def test_perplexity_is_the_token_weighted_mean_over_the_text(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = tmp_path / "t.txt"
    text.write_text("The cat sat on the mat. " * 8)
    out = get_evaluator("probes").run(tiny_model_dir, "cpu", {"probes": ["perplexity"], "text": str(text),
                                                              "max_length": 512}, tmp_path)  # fmt: skip
    # The text fits one window: the reference is one forward pass over all of it.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = AutoTokenizer.from_pretrained(tiny_model_dir)(text.read_text(), return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert out.metrics["ppl/tokens"] == ids.shape[1] - 1
    assert out.metrics["ppl/nll_per_token"] == pytest.approx(loss, rel=1e-5)
    assert out.metrics["ppl/perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    # Sliding windows over a longer text score every token exactly once.
    windowed = get_evaluator("probes").run(tiny_model_dir, "cpu", {"probes": ["perplexity"], "text": str(text),
                                                                   "max_length": 40}, tmp_path)  # fmt: skip
    assert windowed.metrics["ppl/tokens"] == ids.shape[1] - 1


def test_inference_reports_latency_and_throughput(tiny_model_dir, tmp_path):
    out = get_evaluator("probes").run(tiny_model_dir, "cpu", {"probes": ["inference"], "iterations": 2,
                                                              "new_tokens": 8, "batch_size": 2}, tmp_path)  # fmt: skip
    latency, rate = out.metrics["inference/latency_s"], out.metrics["inference/tokens_per_s"]
    assert latency > 0 and rate == pytest.approx(2 * 8 / latency)
    assert "inference/peak_allocated_mb" not in out.metrics  # GPU memory only on cuda


@pytest.mark.parametrize("options, message", [({"probes": ["nope"]}, "unknown probe"),
                                              ({"iterations": 0}, "positive integer"),
                                              ({"text": "/no/such/file"}, "file not found"),
                                              ({"probe": ["parameters"]}, "unknown probes option")])  # fmt: skip
def test_bad_options(options, message):
    with pytest.raises(EvaluatorError, match=message):
        get_evaluator("probes").check_options(options)
