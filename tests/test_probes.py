"""Built-in probes on the real tiny model, checked against independent computations."""

from __future__ import annotations

import math

import pytest
import torch

from watcher.evaluators import EvaluatorError, get_evaluator
from watcher.evaluators.routing import coefficient_of_variation, gini, routing_metrics, utilisation

# The tiny MoE (watcher/tiny.py) counted by hand: vocab 259, d_model 64, 3 layers, 4 heads of 16, 2 KV heads.
#   embedding (tied with lm_head)  259 * 64                                       = 16576
#   attention per layer            q 64*64+64, k and v 32*64+32 each, o 64*64    = 12416  (x3)
#   norms per layer                2 * 64                                         =   128  (x3), final norm 64
#   MoE layers 0 and 2             router 4*64 + shared expert 3*48*64 + its gate 64 = 9536,
#                                  routed experts 4 * 3*32*64                     = 24576  (x2)
#   dense layer 1                  3 * 96*64                                      = 18432
MOE_TOTAL = 16576 + 3 * (12416 + 128) + 64 + 2 * (9536 + 24576) + 18432
MOE_ROUTED = 2 * 24576
MOE_ACTIVE = MOE_TOTAL - MOE_ROUTED * (1 - 2 / 4)  # top-2 of 4: half of the routed experts' weights are idle


def test_parameters_match_the_model(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = get_evaluator("probes").run(tiny_model_dir, ("cpu",), {"probes": ["parameters"]}, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert out.metrics["params/total"] == sum(p.numel() for p in model.parameters())  # tied lm_head counted once
    assert out.metrics["params/bytes"] == 4 * out.metrics["params/total"]


def test_active_parameters_of_a_dense_model_are_all_of_them(tiny_model_dir, tmp_path):
    out = get_evaluator("probes").run(tiny_model_dir, ("cpu",), {"probes": ["parameters"]}, tmp_path)
    assert out.metrics["params/active"] == out.metrics["params/total"]
    assert out.metrics["params/embedding"] == 259 * 64  # tied: the table is stored once
    assert out.raw["parameters"] == {"moe": False}


def test_active_parameters_of_the_tiny_moe_scale_routed_experts_by_k_over_e(tiny_moe_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = get_evaluator("probes").run(tiny_moe_dir, ("cpu",), {"probes": ["parameters"]}, tmp_path)
    assert (out.metrics["params/total"], out.metrics["params/active"]) == (MOE_TOTAL, MOE_ACTIVE) == (140928, 116352)
    assert out.metrics["params/embedding"] == 259 * 64
    # The same from the loaded model's modules (which hold the experts fused, as [E, ...] tensors).
    model = AutoModelForCausalLM.from_pretrained(tiny_moe_dir)
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for name, p in model.named_parameters() if ".mlp.experts." in name)
    assert (total, routed) == (MOE_TOTAL, MOE_ROUTED)
    assert out.metrics["params/active"] == total - routed * (1 - 2 / 4)
    assert out.raw["parameters"] == {"moe": True, "routed_expert_params": routed, "num_experts": 4,
                                     "experts_per_token": 2}  # fmt: skip


@pytest.mark.parametrize("top_k, idle_share", [(1, 3 / 4), (3, 1 / 4), (4, 0)])
def test_active_parameters_follow_the_number_of_experts_per_token(tiny_moe_dir, top_k, idle_share):
    from watcher.evaluators.probes import parameter_counts, read_config, read_specs

    config = {**read_config(tiny_moe_dir), "num_experts_per_tok": top_k}
    metrics, _ = parameter_counts(read_specs(tiny_moe_dir, "parameters"), config)
    assert metrics["params/active"] == MOE_TOTAL - MOE_ROUTED * idle_share


def test_fused_expert_tensors_count_like_per_expert_ones(tiny_moe_dir, tmp_path):
    """A state_dict saved as is (experts fused as mlp.experts.gate_up_proj [E, ...]) gives the same counts."""
    import shutil

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_moe_dir)
    state = {name: t.contiguous() for name, t in model.state_dict().items() if name != "lm_head.weight"}  # tied
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    fused = tmp_path / "fused"
    fused.mkdir()
    save_file(state, str(fused / "model.safetensors"))
    shutil.copy(tiny_moe_dir / "config.json", fused / "config.json")
    out = get_evaluator("probes").run(fused, ("cpu",), {"probes": ["parameters"]}, tmp_path)
    assert (out.metrics["params/total"], out.metrics["params/active"]) == (MOE_TOTAL, MOE_ACTIVE)


def test_flops_per_token_follow_kaplan_plus_the_logits(tiny_moe_dir, tiny_model_dir, tmp_path):
    probes = get_evaluator("probes")
    out = probes.run(tiny_moe_dir, ("cpu",), {"probes": ["flops"]}, tmp_path)
    # 2 * active non-embedding params + 2 * n_layer * n_ctx * d_attn + 2 * d_model * n_vocab, n_ctx = 512
    # (the config's max_position_embeddings, under the 2048 cap).
    forward = 2 * (MOE_ACTIVE - 259 * 64) + 2 * 3 * 512 * (4 * 16) + 2 * 64 * 259
    assert out.metrics["flops/per_token"] == forward == 429312
    assert out.metrics["flops/per_token_train"] == 3 * forward
    assert out.raw["flops"]["context"] == 512
    short = probes.run(tiny_moe_dir, ("cpu",), {"probes": ["flops"], "flops_context": 128}, tmp_path)
    assert out.metrics["flops/per_token"] - short.metrics["flops/per_token"] == 2 * 3 * (512 - 128) * 64
    # The dense Llama: 2 layers, d_model 64, intermediate 128, 4 heads of 16, 2 KV heads, tied embedding.
    dense = probes.run(tiny_model_dir, ("cpu",), {"probes": ["parameters", "flops"]}, tmp_path)
    per_layer = 64 * 64 + 2 * (32 * 64) + 64 * 64 + 3 * 128 * 64 + 2 * 64
    assert dense.metrics["params/total"] == 259 * 64 + 2 * per_layer + 64
    assert dense.metrics["flops/per_token"] == 2 * (2 * per_layer + 64) + 2 * 2 * 512 * 64 + 2 * 64 * 259


@pytest.mark.parametrize("counts, expected_gini, expected_cv, expected_utilisation", [
    ([4, 0, 0, 0], 0.75, math.sqrt(3), 0.25),  # mean 1, deviations 3,-1,-1,-1: variance 12/4
    ([5, 5, 0, 0], 0.5, 1.0, 0.5),  # sum |xi-xj| = 8 * 5 = 40 over 2 * 16 * 2.5
    ([1, 2, 3, 4], 0.25, math.sqrt(1.25) / 2.5, 1.0),  # sum |xi-xj| = 2 * (1+2+3+1+2+1) = 20 over 2 * 16 * 2.5
    ([3, 3, 3, 3], 0.0, 0.0, 1.0),
    ([0, 0, 0, 0], 0.0, 0.0, 0.0),  # no tokens: 0, not NaN
])  # fmt: skip
def test_routing_statistics_by_hand(counts, expected_gini, expected_cv, expected_utilisation):
    assert gini(counts) == pytest.approx(expected_gini)
    assert coefficient_of_variation(counts) == pytest.approx(expected_cv)
    assert utilisation(counts) == expected_utilisation


def test_routing_aggregates_are_the_mean_over_layers():
    metrics = routing_metrics({2: [96, 96, 32, 32], 0: [64, 64, 0, 0]}, tokens=64)
    assert metrics["routing/layer_0/gini"] == 0.5 and metrics["routing/layer_2/gini"] == 0.25
    assert metrics["routing/gini"] == pytest.approx(0.375)  # pooled counts [160,160,32,32] would give 0.333
    assert metrics["routing/cv"] == pytest.approx(0.75) and metrics["routing/utilisation"] == 0.75
    assert metrics["routing/layer_2/max_share"] == 0.375 and metrics["routing/layer_2/min_share"] == 0.125
    assert (metrics["routing/layers"], metrics["routing/tokens"]) == (2, 64)


# Forced routing for the tiny MoE's two MoE layers: the router logits each token gets, by its row in the batch.
FORCED_LOGITS = {0: lambda row: [5.0, 4.0, 0.0, 0.0],  # every token: experts 0 and 1
                 2: lambda row: [0.0, 0.0, 5.0, 4.0] if row % 4 == 0 else [5.0, 4.0, 0.0, 0.0]}  # fmt: skip


def _force_routing(lm):
    """Make each MoE router compute FORCED_LOGITS itself: its weight reads the first 4 hidden features
    (identity), and a pre-hook puts the wanted logits there. The router's own softmax and top-k then choose."""
    for layer, logits_for in FORCED_LOGITS.items():
        gate = lm.model.layers[layer].mlp.gate
        with torch.no_grad():
            gate.weight.zero_()
            gate.weight[:, :4] = torch.eye(4)

        def feed(module, args, logits_for=logits_for):
            hidden = args[0].reshape(-1, args[0].shape[-1])
            crafted = torch.zeros_like(hidden)
            crafted[:, :4] = torch.tensor([logits_for(row) for row in range(hidden.shape[0])])
            return (crafted,)

        gate.register_forward_pre_hook(feed)
    return lm


def test_routing_statistics_of_a_forced_routing(tiny_moe_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    load = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: _force_routing(load(*a, **k)))
    out = get_evaluator("probes").run(tiny_moe_dir, ("cpu",), {"probes": ["routing"], "routing_tokens": 128,
                                                            "max_length": 64}, tmp_path)  # fmt: skip
    # 128 tokens in two windows of 64, top-2. Layer 0: all to {0,1}. Layer 2: per window 16 rows (row % 4 == 0)
    # to {2,3} and 48 to {0,1}, so [96, 96, 32, 32]. Layer 1 is dense: no router, no metrics.
    layers = out.raw["routing"]["layers"]
    assert {k: v["tokens_per_expert"] for k, v in layers.items()} == {"0": [128, 128, 0, 0], "2": [96, 96, 32, 32]}
    assert layers["2"]["module"] == "model.layers.2.mlp.gate"
    expected = {
        "routing/layer_0/gini": 0.5, "routing/layer_0/cv": 1.0, "routing/layer_0/utilisation": 0.5,
        "routing/layer_0/max_share": 0.5, "routing/layer_0/min_share": 0.0,
        "routing/layer_2/gini": 0.25, "routing/layer_2/cv": 0.5, "routing/layer_2/utilisation": 1.0,
        "routing/layer_2/max_share": 0.375, "routing/layer_2/min_share": 0.125,
        "routing/gini": 0.375, "routing/cv": 0.75, "routing/utilisation": 0.75,
        "routing/layers": 2.0, "routing/tokens": 128.0,
    }  # fmt: skip
    assert out.metrics == pytest.approx(expected)


def test_routing_on_the_unforced_moe_counts_k_decisions_per_token(tiny_moe_dir, tmp_path):
    out = get_evaluator("probes").run(tiny_moe_dir, ("cpu",), {"probes": ["routing"], "routing_tokens": 100}, tmp_path)
    layers = out.raw["routing"]["layers"]
    assert sorted(layers) == ["0", "2"] and all(sum(v["tokens_per_expert"]) == 2 * 100 for v in layers.values())
    assert 0 <= out.metrics["routing/gini"] <= 0.75 and out.metrics["routing/tokens"] == 100


def test_routing_on_a_dense_model_reports_nothing_and_says_why(tiny_model_dir, tmp_path):
    out = get_evaluator("probes").run(tiny_model_dir, ("cpu",), {"probes": ["parameters", "routing"]}, tmp_path)
    assert not any(name.startswith("routing/") for name in out.metrics) and "params/total" in out.metrics
    assert out.raw["routing"]["moe"] is False and "no MoE router" in out.raw["routing"]["note"]


def test_perplexity_is_the_token_weighted_mean_over_the_text(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = tmp_path / "t.txt"
    text.write_text("The cat sat on the mat. " * 8)
    out = get_evaluator("probes").run(tiny_model_dir, ("cpu",), {"probes": ["perplexity"], "text": str(text),
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
    windowed = get_evaluator("probes").run(tiny_model_dir, ("cpu",), {"probes": ["perplexity"], "text": str(text),
                                                                   "max_length": 40}, tmp_path)  # fmt: skip
    assert windowed.metrics["ppl/tokens"] == ids.shape[1] - 1


def test_inference_reports_latency_and_throughput(tiny_model_dir, tmp_path):
    out = get_evaluator("probes").run(tiny_model_dir, ("cpu",), {"probes": ["inference"], "iterations": 2,
                                                              "new_tokens": 8, "batch_size": 2}, tmp_path)  # fmt: skip
    latency, rate = out.metrics["inference/latency_s"], out.metrics["inference/tokens_per_s"]
    assert latency > 0 and rate == pytest.approx(2 * 8 / latency)
    assert "inference/peak_allocated_mb" not in out.metrics  # GPU memory only on cuda


def test_inference_trials_give_the_mean_stdev_and_stderr(tiny_model_dir, tmp_path):
    options = {"probes": ["inference"], "iterations": 1, "new_tokens": 4, "batch_size": 2}
    out = get_evaluator("probes").run(tiny_model_dir, ("cpu",), {**options, "trials": 3}, tmp_path)
    trials = out.raw["inference"]["trials"]
    assert out.metrics["inference/trials"] == 3 and len(trials) == 3
    for name in ("inference/latency_s", "inference/tokens_per_s"):
        values = [trial[name] for trial in trials]
        mean, stdev = out.metrics[name], out.metrics[name + "_stdev"]
        assert min(values) <= mean <= max(values) and mean == pytest.approx(sum(values) / 3)
        assert stdev >= 0 and stdev == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in values) / 2))
        assert out.metrics[name + "_stderr"] == pytest.approx(stdev / math.sqrt(3))
    assert all(trial["inference/tokens_per_s"] == pytest.approx(2 * 4 / trial["inference/latency_s"]) for trial in trials)
    # The sinks log them as they log any metric.
    from watcher.records import Result
    from watcher.sinks.naming import metric_row

    logged = metric_row(Result(result_id="r", step=1, checkpoint="checkpoint-1", variant="regular", preset="p",
                               status="ok", metrics=out.metrics))  # fmt: skip
    assert logged == {f"eval/{name}": value for name, value in out.metrics.items()} and len(logged) == 7
    # One trial (the default): exactly the metric names the probe always had, and no raw.
    one = get_evaluator("probes").run(tiny_model_dir, ("cpu",), options, tmp_path)
    assert sorted(one.metrics) == ["inference/latency_s", "inference/tokens_per_s"] and "inference" not in one.raw
    assert sorted(get_evaluator("probes").run(tiny_model_dir, ("cpu",), {**options, "trials": 1}, tmp_path).metrics) == [
        "inference/latency_s", "inference/tokens_per_s"]  # fmt: skip


@pytest.mark.parametrize("options, message", [({"probes": ["nope"]}, "unknown probe"),
                                              ({"iterations": 0}, "positive integer"),
                                              ({"text": "/no/such/file"}, "file not found"),
                                              ({"probe": ["parameters"]}, "unknown probes option"),
                                              ({"probes": "routing"}, "list of probe names"),
                                              ({"routing_tokens": 0}, "'routing_tokens' must be a positive"),
                                              ({"flops_context": "2k"}, "'flops_context' must be a positive"),
                                              ({"flops_context": True}, "positive integer"),
                                              ({"trials": 0}, "'trials' must be a positive integer"),
                                              ({"trials": 2.5}, "'trials' must be a positive integer"),
                                              ({"trials": "3"}, "'trials' must be a positive integer")])  # fmt: skip
def test_bad_options(options, message):
    with pytest.raises(EvaluatorError, match=message):
        get_evaluator("probes").check_options(options)
