"""Text generation through the real process graph (`mer-pipeline generate`), against independent references.

Tiny random models of each architecture (written in tmp with `tests/support/gguf_models.py`: 2 blocks, 8
experts top-2, d_model 64, vocab 384; llama q4_0, qwen3moe q8_0, olmoe f16, the f16 one checking
that the compute workers round f16 inputs as llama.cpp does; qwen2moe a Q4_K_M-like mix at d_model
256, whose compute workers round K-quant inputs to q8_K and whose shared expert runs in the router)
run through the graph: router (dense part in its thread), I/O worker (experts converted implicitly
into a store on disk, read with io_uring or preadv into /dev/shm slots), predictor and compute
workers. Checked:

- greedy tokens equal the single-process `mer.model.generate` (experts computed on the GGUF's own
  bytes) and llama.cpp's (marked `llama`) for 32 steps (qwen2moe: 64) with 4 cache slots for 16
  experts; logits equal the single-process ones within the float32 rounding of slicing (see LOGIT_RELATIVE_TOLERANCE) and, bit for bit, those of the
  single-process model computing its experts in the graph's d_ff slices;
- streaming never changes the answer: 1 or 2 compute workers, a cache of every expert or of only k
  (a long prompt then needs more experts per layer than the cache holds: leased in chunks), prefetch
  on or off, io_uring or preadv give the same tokens and bit-identical logits (a model with a dense
  first block, so the graph's dense FFN path runs too);
- sampled decoding with a seed is reproducible (and equals the single-process sampler's tokens);
- every routing decision reaches the predictor and the trace, and every MoE block logs its costs.

Each graph run is a subprocess with a timeout; the leak guard checks that nothing is left behind.
"""

from __future__ import annotations

import numpy as np
import pytest

from mer.compute.batches import expert_outputs, item_partials, pack_batches
from mer.model.experts import GGUFExperts
from mer.model.generate import generate
from mer.model.model import MoEModel
from mer.model.sampling import Sampler
from mer.model.tokenizer import load_tokenizer
from mer.compute.slicing import plan_slices
from mer.routing.trace import read_trace
from tests.support.host import AUTO_BACKEND, URING_PROBLEM
from tests.support.generate_runs import GenerateRun, run_generate
from tests.support.gguf_models import TinyMoEInfo, write_tiny_moe_gguf

pytestmark = pytest.mark.slow  # starts the process graph

STEPS = 32
GREEDY_STEPS = {"qwen2moe": 64}  # arch -> steps of its greedy run, where not STEPS (the issue asks 64 for qwen2moe)
PROMPT = "the router picks two experts for every token in every layer of the model"
MODELS = {"llama": ("spm", "q4_0"), "qwen3moe": ("bpe", "q8_0"), "olmoe": ("spm", "f16"),
          "qwen2moe": ("bpe", "q4_k_m")}  # arch -> vocab, dtype
# Q4_K_M-like: q4_K / q6_K experts (and qwen2moe's shared experts), q4_K dense matrices; K-quants need d_model 256
Q4_K_M = dict(layer_dtypes=[("q4_k", "q4_k", "q6_k"), ("q4_k", "q4_k", "q4_k")], dense_dtype="q4_k", d_model=256,
              d_ff=256)
# The graph sums each expert's d_ff slices (mer.compute.slicing) where the single-process model runs the whole
# d_ff in one kernel call: the same up to float32 summation order. Measured: identical logits for q4_0
# and q8_0; for f16 identical except now and then one step (2.2e-4 relative), where an ulp of difference
# moves an input across an f16 rounding boundary (llama.cpp's rounding of f16 matmul inputs). Against
# the single-process model run with the same slices the graph is bit-identical (asserted).
LOGIT_RELATIVE_TOLERANCE = {"q4_0": 1e-6, "q8_0": 1e-6, "f16": 5e-3, "q4_k_m": 1e-6}
_GREEDY_RUNS: dict[str, GenerateRun] = {}  # one graph run per architecture, shared by the tests below


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("generate-graph")


@pytest.fixture(scope="module")
def models(workdir) -> dict[str, TinyMoEInfo]:
    return {arch: write_tiny_moe_gguf(
        workdir / f"{arch}-{dtype}.gguf", arch=arch, n_layers=2, n_experts=8, top_k=2, n_heads=4,
        n_kv_heads=4 if arch == "olmoe" else 2, vocab_size=384, tokenizer=vocabulary, seed=3,
        **(Q4_K_M if dtype == "q4_k_m" else dict(dtypes=(dtype,) * 3, dense_dtype=dtype, d_model=64, d_ff=128)))
        for arch, (vocabulary, dtype) in MODELS.items()}


class SlicedGGUFExperts(GGUFExperts):
    """Experts computed as the graph computes them: the d_ff slices of `mer.compute.slicing`, summed in order."""

    def __call__(self, moe_layer: int, batches):
        outputs = {}
        for expert, x in batches.items():
            payload = self.payload(moe_layer, expert)
            partials = item_partials(payload, x, plan_slices(payload.format))
            outputs.update(expert_outputs(pack_batches({expert: x}), partials))
        return outputs


def single_process(path, prompt: list[int], steps: int, sampler: Sampler | None = None, sliced: bool = False):
    model = MoEModel.load(path)
    experts = (SlicedGGUFExperts if sliced else GGUFExperts)(model.source)
    return generate(model, prompt, steps, sampler or Sampler(), experts, ignore_eos=True, keep_logits=True)


def relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float((np.abs(ours - theirs).max(axis=1) / np.abs(theirs).max(axis=1)).max())


def greedy_run(arch: str, models, leak_guard, workdir) -> GenerateRun:
    """The graph's greedy run of `arch` (started by the first test that needs it, under its leak guard)."""
    if arch not in _GREEDY_RUNS:
        flags = ["--prompt", PROMPT, "-n", GREEDY_STEPS.get(arch, STEPS), "--ignore-eos", "--compute-workers", 1,
                 "--cache-slots", 4,
                 "--dump-logits", workdir / f"{arch}-logits.npy", "--record-trace", workdir / f"{arch}-trace.jsonl"]
        _GREEDY_RUNS[arch] = run_generate(leak_guard, models[arch].path, *flags, workdir=workdir,
                                          cache_dir=workdir / "cache")
    return _GREEDY_RUNS[arch]


@pytest.mark.parametrize("arch", MODELS)
def test_greedy_generation_matches_the_single_process_model(arch, models, leak_guard, workdir):
    run, steps = greedy_run(arch, models, leak_guard, workdir), GREEDY_STEPS.get(arch, STEPS)
    result = run.result
    tokenizer = load_tokenizer(MoEModel.load(models[arch].path).source.parts[0])
    assert result["prompt_tokens"] == tokenizer.encode(PROMPT)
    reference = single_process(models[arch].path, result["prompt_tokens"], steps)
    assert result["tokens"] == reference.tokens
    assert len(set(result["tokens"])) >= 8, "a degenerate continuation is a weak comparison"
    logits = np.load(workdir / f"{arch}-logits.npy")
    assert logits.shape == (steps, models[arch].vocab_size)
    assert relative_error(logits, np.stack(reference.step_logits)) <= LOGIT_RELATIVE_TOLERANCE[MODELS[arch][1]]
    sliced = single_process(models[arch].path, result["prompt_tokens"], steps, sliced=True)
    assert np.array_equal(logits, np.stack(sliced.step_logits)), "the graph must compute exactly the sliced model"
    assert result["text"] == tokenizer.decode(result["tokens"])
    assert result["stop_reason"] == "max_tokens" and result["decode_steps"] == steps - 1
    assert result["misses"] > 0 and result["hits"] > 0  # 4 slots for 16 experts


@pytest.mark.llama
@pytest.mark.parametrize("arch", MODELS)
def test_greedy_generation_matches_llama_cpp(arch, models, leak_guard, workdir):
    pytest.importorskip("llama_cpp")
    from tests.support.llama_reference import llama_greedy, open_llama

    result = greedy_run(arch, models, leak_guard, workdir).result
    theirs, _ = llama_greedy(open_llama(models[arch].path), result["prompt_tokens"], GREEDY_STEPS.get(arch, STEPS))
    differing = [step for step, (a, b) in enumerate(zip(result["tokens"], theirs)) if a != b]
    assert not differing, f"greedy tokens differ from llama.cpp first at step {differing[0]}"


def test_routing_reaches_the_predictor_and_the_trace(models, leak_guard, workdir):
    run = greedy_run("llama", models, leak_guard, workdir)
    result = run.result
    reference = single_process(models["llama"].path, result["prompt_tokens"], STEPS)
    header, decisions = read_trace(workdir / "llama-trace.jsonl")
    decisions = list(decisions)
    assert (header.layers, header.experts_per_layer, header.top_k) == (2, 8, 2)
    forwarded = len(result["prompt_tokens"]) + result["decode_steps"]
    assert [d.token for d in decisions] == [token for token in range(forwarded) for _ in range(2)]
    expected = [tuple(int(expert) for expert in routing[block].experts[row])
                for routing in reference.routings for row in range(routing[0].num_tokens) for block in (0, 1)]
    assert [d.experts for d in decisions] == expected
    assert result["predictor_observations"] == forwarded * 2
    blocks = run.events_named("moe_block_done")
    assert len(blocks) == 2 * (1 + result["decode_steps"])
    assert all(event["dense_us"] > 0 and event["expert_us"] > 0 for event in blocks)
    assert blocks[0]["tokens"] == len(result["prompt_tokens"]) and blocks[-1]["tokens"] == 1


def test_decode_bytes_are_the_reads_for_generated_positions(models, leak_guard, workdir):
    """`decode_bytes_read` (counted by the I/O worker from the prompt length on, `SplitReads`) equals the
    bytes of the logged reads whose token is a generated position; `bytes_read` those of every read."""
    result_run = run_generate(leak_guard, models["llama"].path, "--prompt", PROMPT, "-n", STEPS, "--ignore-eos",
                              "--cache-slots", 3, "--compute-workers", 1, workdir=workdir,
                              cache_dir=workdir / "cache")
    result = result_run.result
    reads = [event for event in result_run.events_named("expert_read") if event["read_index"] < result["reads"]]
    assert len(reads) == result["reads"] > 0  # a read finishing after the final statistics is not counted
    prompt_length = len(result["prompt_tokens"])
    decode_bytes = sum(event["nbytes"] for event in reads if event["token"] >= prompt_length)
    assert 0 < decode_bytes < result["bytes_read"] == sum(event["nbytes"] for event in reads)
    assert result["decode_bytes_read"] == decode_bytes
    assert result["mib_read_per_token"] == decode_bytes / 2**20 / result["decode_steps"]


# io_uring forced where this host runs it; elsewhere `auto`, which must then pick preadv (tests/support/host.py)
URING = "auto" if URING_PROBLEM else "uring"
CONFIGURATIONS = {
    "1 worker, every expert cached, prefetch, io_uring": ["--compute-workers", 1, "--cache-slots", 16,
                                                          "--io-backend", URING],
    "2 workers, k slots, no prefetch, preadv": ["--compute-workers", 2, "--cache-slots", 2, "--no-prefetch",
                                                "--io-backend", "preadv"],
    "2 workers, 3 slots, prefetch, io_uring": ["--compute-workers", 2, "--cache-slots", 3, "--io-backend", URING],
}


def test_streaming_never_changes_the_answer(leak_guard, workdir):
    info = write_tiny_moe_gguf(workdir / "dense-first.gguf", arch="qwen3moe", dtypes=("q4_0",) * 3, n_layers=3,
                               dense_first_layer=True, n_experts=8, top_k=2, tokenizer="bpe", vocab_size=384, seed=5)
    prompt = PROMPT + " and then the compute workers run their feed forward networks on the quantized weights"
    runs = {name: run_generate(leak_guard, info.path, "--prompt", prompt, "-n", 12, "--ignore-eos",
                               "--dump-logits", workdir / f"logits-{index}.npy", *flags,
                               workdir=workdir, cache_dir=workdir / "cache")
            for index, (name, flags) in enumerate(CONFIGURATIONS.items())}
    results = {name: run.result for name, run in runs.items()}
    logits = [np.load(workdir / f"logits-{index}.npy") for index in range(len(runs))]
    first = next(iter(results.values()))
    for name, result in results.items():
        assert result["tokens"] == first["tokens"], name
    for index, name in enumerate(results):
        assert np.array_equal(logits[index], logits[0]), name
    assert first["tokens"] == single_process(info.path, first["prompt_tokens"], 12).tokens
    smallest = results["2 workers, k slots, no prefetch, preadv"]
    assert smallest["io_backend"] == "preadv" and smallest["prefetches_issued"] == 0
    assert smallest["reads"] > 16, "with k slots the experts must be read again and again"
    prefill_blocks = [event for event in runs["2 workers, k slots, no prefetch, preadv"].events_named("moe_block_done")
                      if event["tokens"] > 1]
    assert len(prefill_blocks) == 2 and all(event["chunks"] >= 3 for event in prefill_blocks)
    assert results["1 worker, every expert cached, prefetch, io_uring"]["io_backend"] == AUTO_BACKEND


def test_sampled_generation_is_reproducible_with_a_seed(models, leak_guard, workdir):
    path = models["qwen3moe"].path
    sampling = ["--prompt", PROMPT, "-n", 24, "--ignore-eos", "--temperature", 0.9, "--top-k", 40, "--top-p", 0.95]
    first = run_generate(leak_guard, path, *sampling, "--seed", 11, "--compute-workers", 1, workdir=workdir,
                         cache_dir=workdir / "cache").result
    again = run_generate(leak_guard, path, *sampling, "--seed", 11, "--compute-workers", 2, "--cache-slots", 2,
                         workdir=workdir, cache_dir=workdir / "cache").result
    assert again["tokens"] == first["tokens"]
    reference = single_process(path, first["prompt_tokens"], 24, Sampler(0.9, 40, 0.95, 11))
    assert first["tokens"] == reference.tokens
    other_seed = single_process(path, first["prompt_tokens"], 24, Sampler(0.9, 40, 0.95, 12))
    assert other_seed.tokens != first["tokens"], "the seed must matter, or this comparison is weak"
    assert first["tokens"] != single_process(path, first["prompt_tokens"], 24).tokens, "sampled, not greedy"
