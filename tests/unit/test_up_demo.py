"""What `mer-pipeline up`'s demos decide and print before and after the graph runs: the compute workers
fitted to the model's expert slices, the demo's expert cache, the prompt-and-completion block and the
summary line."""

from __future__ import annotations

import io

import pytest

from mer.cli.demo_output import BlockStream, summary_line
from mer.cli.up_command import demo_cache_slots
from mer.cli.worker_choice import WorkerChoice, choose_compute_workers, compute_workers_for_model
from mer.compute.expert_format import ExpertFormat
from mer.compute.slicing import workers_with_work
from mer.model.model import MoEModel
from mer.model.tokenizer import load_tokenizer
from mer.models import tiny_model_path

TINY = ExpertFormat.build(128, 256, ("q8_0",) * 3)  # the first embedded model's experts: d_ff 256
WIDER = ExpertFormat.build(192, 512, ("q8_0",) * 3)  # today's embedded model's experts: d_ff 512
MIXTRAL = ExpertFormat.build(4096, 14336, ("q4_0",) * 3)


def test_a_model_gives_work_to_as_many_workers_as_its_experts_have_slices():
    assert workers_with_work([TINY]) == 1  # 256 rows: one slice of at least 256 rows
    assert workers_with_work([WIDER]) == 2 and workers_with_work([WIDER], 1) == 1  # 2 x 256 rows
    # slices are at least 256 rows but the last may be shorter: d_ff 257 gives a second worker one row
    assert workers_with_work([ExpertFormat.build(256, 257, ("f32",) * 3)]) == 2
    assert workers_with_work([MIXTRAL], 16) == 16
    assert workers_with_work([TINY, WIDER]) == 2  # the widest layer decides
    with pytest.raises(ValueError, match="without expert layers"):
        workers_with_work([])


def test_the_workers_started_are_the_cores_but_no_more_than_the_model_gives_work():
    assert compute_workers_for_model(2, [TINY], 2) == 1
    assert compute_workers_for_model(2, [WIDER], 2) == 2
    assert compute_workers_for_model(1, [WIDER], 2) == 1
    assert compute_workers_for_model(16, [MIXTRAL], 4) == 4
    assert compute_workers_for_model(3, [MIXTRAL], 16) == 3
    with pytest.raises(ValueError, match="at least 1, got 0"):
        compute_workers_for_model(0, [TINY], 2)


def test_the_choice_says_why_it_starts_fewer_workers_than_the_cores_allow():
    choice = choose_compute_workers(2, [TINY], 2)
    assert choice == WorkerChoice(available=2, with_work=1, chosen=1, d_ff=256, expert_slices=2)
    assert choice.describe() == ("1 compute worker (the cores allow 2, but the experts' d_ff 256 makes 1 slice "
                                 "of >= 256 rows, one per worker)")
    assert choose_compute_workers(2, [WIDER], 2).describe() == "2 compute workers"
    assert choose_compute_workers(1, [TINY], 2).describe() == "1 compute worker"


def test_the_demo_cache_holds_half_the_experts_and_at_least_one_layers_k():
    assert demo_cache_slots(32, 2) == 16
    assert demo_cache_slots(48, 2) == 24  # the embedded model: 6 layers x 8 experts
    assert demo_cache_slots(3, 2) == 2
    with pytest.raises(ValueError):
        demo_cache_slots(0, 2)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(MoEModel.load(tiny_model_path()).source.parts[0])


def stream_text(tokenizer, prompt: str, completion: str) -> tuple[str, list[str]]:
    """The block printed for `completion` after `prompt`, and what was printed after each token."""
    out = io.StringIO()
    stream = BlockStream(tokenizer, prompt, out)
    seen = [out.getvalue()]
    for index, token in enumerate(tokenizer.encode(completion, add_special=False, parse_special=False)):
        stream.add(index, token)
        seen.append(out.getvalue())
    stream.finish()
    return out.getvalue(), seen


def test_the_block_is_the_prompt_and_completion_with_its_trailing_whitespace_dropped(tokenizer):
    completion = "main():\n    return 0\n  \n\n\t \n"
    text, seen = stream_text(tokenizer, "def ", completion)
    assert text == "def main():\n    return 0\n"
    assert seen[0] == "def"  # the prompt shows at once; its space waits for what follows it
    first = tokenizer.decode(tokenizer.encode(completion, add_special=False)[:1])
    assert first and seen[1] == "def " + first  # the space shows with the first token
    assert "def main():\n    return 0" in seen and seen[-1] == "def main():\n    return 0"


def test_whitespace_inside_the_block_is_kept(tokenizer):
    text, _ = stream_text(tokenizer, "class ", "A:\n\n\n    x = 1  # two spaces before\n\n")
    assert text == "class A:\n\n\n    x = 1  # two spaces before\n"


def test_a_completion_of_whitespace_only_leaves_the_prompt_on_one_line(tokenizer):
    text, _ = stream_text(tokenizer, "def ", "\n\n   \n")
    assert text == "def\n"


def test_the_summary_line_gives_speed_hit_rate_bytes_and_the_cache():
    summary = {"tokens": list(range(32)), "decode_tps": 51.04, "decode_hit_rate_pct": 80.62,
               "mib_read_per_token": 0.044, "hit_rate_pct": 70.0, "prefill_tps": 10.0}
    assert summary_line(summary, cache_slots=16, num_experts=32) == (
        "32 tokens: decode 51.0 tok/s, hit rate 80.6%, 0.04 MiB read per token, cache 16 of 32 experts")
