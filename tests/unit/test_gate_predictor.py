"""The next-layer gate predictor: its ranking against a plain numpy computation of the model's gate
(weights read with the `gguf` library alone) and against the router's own routing, its hints (fanout,
depth, the last layer, the probability floor, global ids), its per-layer accuracy, and the
`predictors` checks that keep it to runs with a model."""

from __future__ import annotations

import functools

import gguf
import numpy as np
import pytest

from mer.config import PipelineConfig
from mer.errors import ConfigError, ShapeError
from mer.model.attention import next_positions
from mer.model.model import MoEModel
from mer.models import tiny_model_path
from mer.predict.accuracy import LayerAccuracy
from mer.predict.fusion import GATE, check_model_for_predictors, fuse, make_predictors
from mer.predict.gate import GatePredictor, GateTarget, GateWeights, load_gate_predictor
from tests.support.deepseek2_models import write_tiny_deepseek2_gguf
from tests.support.gguf_models import write_tiny_moe_gguf
from tests.support.glm4moe_models import write_tiny_glm4moe_gguf

EXPERTS_PER_LAYER = 8  # the tiny model: 6 MoE layers x 8 experts, top-2, d_model 192
MOE_LAYERS = 6


@pytest.fixture(scope="module")
def tiny() -> tuple[MoEModel, GateWeights]:
    return MoEModel.load(tiny_model_path()), GateWeights.load(tiny_model_path())


def residuals(model: MoEModel, count: int = 6) -> np.ndarray:
    """Real post-attention residuals of the first block (a few prompt tokens), plus random ones."""
    cache = model.new_kv_cache(count)
    hidden = model.embed(list(range(10, 10 + count)))
    real = model.attention_block(0, hidden, cache, next_positions(cache, 0, count))
    rng = np.random.default_rng(3)
    return np.concatenate([real, rng.standard_normal((count, model.hparams.d_model), dtype=np.float32) * 2])


@functools.lru_cache(maxsize=4)
def gguf_f32_tensors(path) -> dict[str, np.ndarray]:
    """The GGUF's gate and norm tensors as float64, read by `gguf` directly (once per file: opening the
    tiny model's GGUF parses its 4,096-entry vocabulary, ~0.3 s)."""
    return {tensor.name: np.asarray(tensor.data, dtype=np.float64) for tensor in gguf.GGUFReader(path).tensors
            if tensor.name.endswith(("ffn_gate_inp.weight", "ffn_norm.weight"))}


def numpy_gate_probabilities(path, block: int, hidden: np.ndarray, eps: float) -> np.ndarray:
    """softmax(W @ rms_norm(h) * norm) in float64, from the GGUF's f32 tensors read by `gguf` directly."""
    tensors = gguf_f32_tensors(path)
    gate = tensors[f"blk.{block}.ffn_gate_inp.weight"]  # [experts, d_model]
    norm = tensors[f"blk.{block}.ffn_norm.weight"]
    x = hidden.astype(np.float64)
    normed = x / np.sqrt(np.mean(x * x) + eps) * norm
    logits = gate @ normed
    exp = np.exp(logits - logits.max())
    return exp / exp.sum()


def test_the_ranking_is_the_softmax_of_the_gate_computed_with_plain_numpy(tiny):
    model, weights = tiny
    assert weights.num_layers == MOE_LAYERS and weights.num_experts == EXPERTS_PER_LAYER and weights.d_model == 192
    for moe_layer in range(weights.num_layers):
        for hidden in residuals(model):
            expected = numpy_gate_probabilities(tiny_model_path(), moe_layer, hidden, model.hparams.rms_norm_eps)
            ranking = weights.ranking(moe_layer, hidden)
            assert [expert for expert, _ in ranking] == list(np.argsort(-expected, kind="stable"))
            probabilities = np.array([probability for _, probability in sorted(ranking)])
            np.testing.assert_allclose(probabilities, expected, rtol=1e-5, atol=1e-7)
            assert abs(probabilities.sum() - 1.0) < 1e-5


def test_the_ranking_routes_exactly_as_the_router_on_the_residual_it_has_there(tiny):
    model, weights = tiny
    k = model.hparams.top_k
    for block, moe_layer in model.moe_layers.items():
        hidden = residuals(model)
        routing = model.route(block, model.ffn_input(block, hidden))
        for row, residual in enumerate(hidden):
            ranking = weights.ranking(moe_layer, residual)
            assert [expert for expert, _ in ranking[:k]] == routing.experts[row].tolist()
            top = np.array([probability for _, probability in ranking[:k]], dtype=np.float32)
            np.testing.assert_allclose(top / top.sum(), routing.weights[row], rtol=1e-6)  # Mixtral renormalises


def test_qwen2moe_hints_are_the_routers_choices_with_its_unnormalised_weights(tmp_path):
    """qwen2moe routes by softmax top-k without renormalising (and adds a shared expert the predictor
    ignores: it is resident): the ranking picks the router's experts, and the hint scores are exactly
    the routing weights the router gives them, on a residual of the model's own forward pass."""
    info = write_tiny_moe_gguf(tmp_path / "qwen2moe.gguf", arch="qwen2moe", n_layers=3, n_experts=8, top_k=2,
                               dtypes=("q4_0",) * 3, dense_dtype="q8_0", tokenizer="bpe", vocab_size=384, seed=2)
    model, weights = MoEModel.load(info.path), GateWeights.load(info.path)
    cache = model.new_kv_cache(6)
    hidden = model.embed([5, 60, 7, 200, 9, 31])
    positions = next_positions(cache, 0, 6)
    for block, moe_layer in model.moe_layers.items():
        hidden = model.attention_block(block, hidden, cache, positions)  # the residual the predictor receives
        normed = model.ffn_input(block, hidden)
        routing = model.route(block, normed)
        for row, residual in enumerate(hidden):
            ranking = weights.ranking(moe_layer, residual)[:2]
            assert [expert for expert, _ in ranking] == routing.experts[row].tolist()
            np.testing.assert_allclose([p for _, p in ranking], routing.weights[row], rtol=1e-6)
        assert (routing.weights.sum(axis=1) < 1 - 1e-3).all()  # not renormalised
        hidden = hidden + model.shared_expert(block, normed)  # move on (the routed part does not matter here)
    gate = GatePredictor(weights, global_id)
    gate.observe_hidden(0, 0, hidden[0])
    gate.observe(0, [0, 1])
    assert [hint for hint, _ in gate.predict(2, 2)] == [global_id(layer, e) for layer in (1, 2)
                                                          for e, _ in weights.ranking(layer, hidden[0])[:2]]


@pytest.mark.parametrize("style", ["v2-lite", "v3", "glm4moe"])
def test_deepseek2_and_glm4moe_hints_are_the_routers_choices_with_each_routing_function(tmp_path, style):
    """deepseek2: softmax scores without renormalisation (v2-lite), or sigmoid scores ranked with the
    selection bias inside the best groups (v3: 4 groups of 4, 2 used); glm4moe: sigmoid scores ranked with
    the selection bias, no groups (and its NextN block, skipped, has no gate here): the top-k of the
    ranking are the router's experts in its order, the scores its unscaled, unnormalised scores; experts
    of the groups left out rank last."""
    if style == "glm4moe":
        info = write_tiny_glm4moe_gguf(tmp_path / f"{style}.gguf", expert_dtype="q4_0", seed=1)
    else:
        info = write_tiny_deepseek2_gguf(tmp_path / f"{style}.gguf", style=style, expert_dtype="q4_0", seed=1)
    model, weights = MoEModel.load(info.path), GateWeights.load(info.path)
    function = model.hparams.routing_function
    assert weights.routing == function and (function.groups, function.score) == {
        "v2-lite": (1, "softmax"), "v3": (4, "sigmoid"), "glm4moe": (1, "sigmoid")}[style]
    assert weights.num_layers == 2
    cache = model.new_kv_cache(6)
    hidden = model.embed([5, 60, 7, 200, 9, 31])
    positions = next_positions(cache, 0, 6)
    k = model.hparams.top_k
    for block in range(model.hparams.num_blocks):
        hidden = model.attention_block(block, hidden, cache, positions)
        normed = model.ffn_input(block, hidden)
        if not model.is_moe_block(block):
            hidden = hidden + model.dense_ffn(block, normed)
            continue
        routing = model.route(block, normed)
        for row, residual in enumerate(hidden):
            ranking = weights.ranking(model.moe_layers[block], residual)
            assert [expert for expert, _ in ranking[:k]] == routing.experts[row].tolist()
            top = np.array([score for _, score in ranking[:k]], dtype=np.float32)
            expected = top / top.sum() * np.float32(2.5) if style != "v2-lite" else top * np.float32(1.5)
            np.testing.assert_allclose(expected, routing.weights[row], rtol=1e-6)
            if style == "v3":  # the last 8 are the two groups left out
                kept = {expert // 4 for expert, _ in ranking[:8]}
                assert len(kept) == 2 and {expert // 4 for expert, _ in ranking[8:]}.isdisjoint(kept)
        hidden = hidden + model.shared_expert(block, normed)


def test_moe_layers_are_numbered_without_the_dense_blocks(tmp_path):
    info = write_tiny_moe_gguf(tmp_path / "dense-first.gguf", n_layers=3, n_experts=4, dense_first_layer=True,
                               dtypes=("q8_0",) * 3)
    model, weights = MoEModel.load(info.path), GateWeights.load(info.path)
    assert model.moe_layers == {1: 0, 2: 1} and [layer.block for layer in weights.layers] == [1, 2]
    hidden = residuals(model, 3)
    for block, moe_layer in model.moe_layers.items():
        routing = model.route(block, model.ffn_input(block, hidden))
        for row, residual in enumerate(hidden):
            assert [e for e, _ in weights.ranking(moe_layer, residual)[:2]] == routing.experts[row].tolist()
    with pytest.raises(ShapeError, match="hidden state of 63 values, the model's d_model is 64"):
        weights.ranking(0, np.zeros(63, np.float32))


def global_id(layer: int, expert: int) -> int:
    return layer * EXPERTS_PER_LAYER + expert


def test_hints_are_the_top_fanout_of_the_next_layers_as_global_ids(tiny):
    model, weights = tiny
    hidden = residuals(model)[0]
    gate = GatePredictor(weights, global_id)
    gate.observe_hidden(5, 1, hidden)
    gate.observe(1, [global_id(1, 0), global_id(1, 1)])
    hints = gate.predict(3, 2)
    expected = [(global_id(layer, e), p) for layer in (2, 3) for e, p in weights.ranking(layer, hidden)[:3]]
    assert hints == expected  # the nearer layer first, each best first; score = probability
    assert all(0.0 < score <= 1.0 for _, score in hints)
    assert gate.targets == [GateTarget(5, 2, 1, tuple(e for e, _ in expected[:3])),
                            GateTarget(5, 3, 2, tuple(e for e, _ in expected[3:]))]
    assert gate.predict(3, 2) == [] and gate.targets == []  # one prediction per residual


def test_nothing_is_predicted_past_the_last_layer_or_without_the_decisions_residual(tiny):
    model, weights = tiny
    hidden = residuals(model)[1]
    gate = GatePredictor(weights, global_id)
    last = MOE_LAYERS - 1
    gate.observe_hidden(9, last - 1, hidden)
    gate.observe(last - 1, [global_id(last - 1, 0), global_id(last - 1, 1)])
    assert [expert // EXPERTS_PER_LAYER for expert, _ in gate.predict(2, 2)] == [last, last]  # depth cut at the last
    gate.observe_hidden(9, last, hidden)
    gate.observe(last, [global_id(last, 0), global_id(last, 1)])
    assert gate.predict(2, 1) == [] and gate.targets == []  # the last MoE layer: nothing to predict
    gate.observe(0, [0, 1])  # a decision without its residual
    assert gate.predict(2, 1) == []
    gate.observe_hidden(10, 0, hidden)
    gate.observe(1, [8, 9])  # the residual of another layer
    assert gate.predict(2, 1) == []


def test_the_probability_floor_keeps_only_likely_experts(tiny):
    model, weights = tiny
    hidden = residuals(model)[2]
    ranking = weights.ranking(1, hidden)
    floor = (ranking[1][1] + ranking[2][1]) / 2  # between the 2nd and the 3rd most probable
    gate = GatePredictor(weights, global_id, min_probability=floor)
    gate.observe_hidden(0, 0, hidden)
    gate.observe(0, [0, 1])
    assert gate.predict(4, 1) == [(global_id(1, e), p) for e, p in ranking[:2]]
    gate = GatePredictor(weights, global_id, min_probability=1.01)
    gate.observe_hidden(0, 0, hidden)
    gate.observe(0, [0, 1])
    assert gate.predict(4, 1) == [] and gate.targets == [GateTarget(0, 1, 1, ())]  # predicted, nothing hinted


def test_per_layer_accuracy_scores_each_hint_list_against_its_own_decision():
    accuracy = LayerAccuracy()
    accuracy.hinted(7, 1, 1, [8, 9, 10])  # token 7: layer 1 from layer 0
    accuracy.hinted(7, 2, 2, [16, 17])  # token 7: layer 2 from layer 0
    accuracy.hinted(8, 1, 1, [])  # token 8: nothing likely enough to hint
    assert accuracy.observe(7, 0, [0, 1]) is False  # no hints were made for this decision
    assert accuracy.observe(7, 1, [9, 10]) is True  # top-1 miss, 1 of 2 among the best 2, 2 of 2 among all
    accuracy.hinted(7, 2, 1, [17, 18])
    assert accuracy.observe(7, 2, [17, 20]) is True  # scored twice: from 2 layers back and from 1
    assert accuracy.observe(8, 1, [11, 12]) is True  # an empty hint list finds nothing
    report = accuracy.report(GATE)
    assert [layer.to_summary_dict() for layer in report.per_layer] == [
        {"layer": 1, "ahead": 1, "predictions": 2, "top1_hits": 0, "topk_found": 1, "topk_observed": 4,
         "top1_accuracy_pct": 0.0, "topk_accuracy_pct": 25.0, "hinted_found": 2, "hinted_recall_pct": 50.0},
        {"layer": 2, "ahead": 1, "predictions": 1, "top1_hits": 1, "topk_found": 1, "topk_observed": 2,
         "top1_accuracy_pct": 100.0, "topk_accuracy_pct": 50.0, "hinted_found": 1, "hinted_recall_pct": 50.0},
        {"layer": 2, "ahead": 2, "predictions": 1, "top1_hits": 0, "topk_found": 1, "topk_observed": 2,
         "top1_accuracy_pct": 0.0, "topk_accuracy_pct": 50.0, "hinted_found": 1, "hinted_recall_pct": 50.0},
    ]
    # the totals count the next-layer hints only
    assert (report.predictions, report.top1_hits, report.topk_found, report.topk_observed) == (3, 1, 2, 6)
    assert report.source == GATE
    assert accuracy.weight() == (2 + 1) / (6 + 2)


def test_gate_is_a_predictor_name_that_needs_a_model(tiny):
    assert PipelineConfig(predictors="gate").predictors == (GATE,)
    assert PipelineConfig(predictors="gate,markov").predictors == ("markov", GATE)
    with pytest.raises(ConfigError, match=r"predictors = 'markov,gate'.*benchmark job has no model"):
        check_model_for_predictors(("markov", GATE), None, "benchmark")
    check_model_for_predictors(("markov",), None, "benchmark")
    check_model_for_predictors((GATE,), "model.gguf", "generate")
    with pytest.raises(ConfigError, match="'gate' needs the model's gates"):
        make_predictors((GATE,), 32, 2)
    with pytest.raises(ConfigError, match="this run has no model"):
        load_gate_predictor(None, manifest=None)
    gate = GatePredictor(tiny[1], global_id)
    markov, active_gate = make_predictors(("markov", GATE), 32, 2, gate=gate)
    assert active_gate.name == GATE and active_gate.model is gate and active_gate.observe_hidden is not None
    assert markov.observe_hidden is None
    # fused with markov: each hint ranked by score x its predictor's accuracy, the best expert's source kept
    fused = fuse({"markov": [(9, 0.5), (12, 0.25)], GATE: [(9, 0.75), (10, 0.5)]}, 3, {"markov": 0.5, GATE: 0.5})
    assert fused == [(9, 0.75, GATE), (10, 0.5, GATE), (12, 0.25, "markov")]


def test_a_replay_needs_only_the_models_routing_geometry_in_the_store():
    from types import SimpleNamespace

    from mer.store.manifest import Geometry

    def store(layers: int, experts: int, d_model: int):
        geometry = Geometry("llama", layers, layers, experts, 2, d_model, 512)
        return SimpleNamespace(geometry=geometry, expert_id=lambda layer, expert: layer * experts + expert)

    gate = load_gate_predictor(str(tiny_model_path()), store(MOE_LAYERS, 8, 4096), 1.5, replay=True)  # Mixtral-sized
    assert gate.global_id(3, 5) == 29 and gate.min_probability == 1.5 / 8
    with pytest.raises(ConfigError, match=rf"{MOE_LAYERS} MoE layers x 8 experts, the store has 2 x 8: the replayed"):
        load_gate_predictor(str(tiny_model_path()), store(2, 8, 128), replay=True)


def test_the_gpt_oss_ranking_routes_exactly_as_its_router(tmp_path):
    """gpt-oss: post_attention_norm, router logits plus bias, top-k of the logits, softmax over the k."""
    from tests.support.gpt_oss_models import write_tiny_gpt_oss_gguf

    info = write_tiny_gpt_oss_gguf(tmp_path / "gpt-oss.gguf", expert_dtype="f32", dense_dtype="f32", n_layers=2)
    model, weights = MoEModel.load(info.path), GateWeights.load(info.path)
    k = model.hparams.top_k
    assert all(layer.router_bias is not None for layer in weights.layers)
    for block, moe_layer in model.moe_layers.items():
        hidden = residuals(model)
        routing = model.route(block, model.ffn_input(block, hidden))
        for row, residual in enumerate(hidden):
            ranking = weights.ranking(moe_layer, residual)
            assert [expert for expert, _ in ranking[:k]] == routing.experts[row].tolist()
            top = np.array([probability for _, probability in ranking[:k]], dtype=np.float32)
            np.testing.assert_allclose(top / top.sum(), routing.weights[row], rtol=1e-5)  # softmax over the k
