"""Everything before and around a perplexity run through the process graph (`mer-pipeline perplexity`).

`prepare_perplexity` reads and tokenizes the text and checks it against the model and the context
(`mer.model.perplexity.plan_perplexity`: llama-perplexity's rules) BEFORE any process is started, so
bad input leaves nothing behind, then converts the experts and sizes the run as generation does
(`mer.cli.generation_setup.prepare_model_run`, with a KV cache of one chunk). `run_perplexity` runs
the graph with the job's `StartPerplexity` and hands each scored chunk to a callback as it arrives.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mer.cli.generation_setup import SINGLE_THREAD_BLAS, open_model, prepare_model_run
from mer.config import PipelineConfig
from mer.errors import ConfigError, TokenizerError
from mer.metrics.summary import PerplexitySummary
from mer.model.perplexity import PerplexityPlan, plan_perplexity
from mer.protocol import PerplexityChunk, StartPerplexity
from mer.runtime.ram_budget import RamPlan
from mer.runtime.supervisor import Supervisor
from mer.store.reader import ExpertStore

DEFAULT_CONTEXT = 512  # llama-perplexity's default --ctx-size


@dataclass(frozen=True)
class PreparedPerplexity:
    """A checked perplexity run, ready to start: configuration, store, start message, plan, RAM plan."""

    config: PipelineConfig
    store: ExpertStore
    start: StartPerplexity
    plan: PerplexityPlan
    ram_plan: RamPlan | None
    context_note: str  # why the context is what it is, when it was not given


def read_text_file(path: Path) -> str:
    """The text of `path` (UTF-8), or a clear error naming the file: missing, not a file, not UTF-8, empty."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"--file {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"--file {path}: is a directory, not a text file") from None
    except OSError as error:
        raise ConfigError(f"--file {path}: cannot be read ({error.strerror or error})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"--file {path}: not UTF-8 text (byte {error.start}: {error.reason})") from None
    if not text:
        raise ConfigError(f"--file {path}: the file is empty")
    return text


def prepare_perplexity(model_path: str | os.PathLike, text_path: Path, *, context: int | None,
                       max_chunks: int | None, config_path: Path | None = None,
                       overrides: Mapping[str, Any] | None = None, ram_budget: int | None = None,
                       start_phase=None) -> PreparedPerplexity:
    """Check everything and size the run (see the module docstring); no process is started. Without
    `context`, llama-perplexity's 512, or the model's context where that is smaller."""
    text = read_text_file(text_path)
    source, hparams, tokenizer = open_model(model_path)
    if tokenizer.add_eos:
        raise TokenizerError(f"{model_path}: tokenizer.ggml.add_eos_token is true: llama-perplexity refuses a "
                             f"vocabulary that appends EOS to the text, and so does mer")
    note = ""
    if context is None:
        context = min(DEFAULT_CONTEXT, hparams.context_length)
        if context < DEFAULT_CONTEXT:
            note = f"--ctx {context} (the model's context; llama-perplexity's default {DEFAULT_CONTEXT} does not fit)"
    tokens = tokenizer.encode(text, add_special=True, parse_special=False)
    plan = plan_perplexity(tokens, context, max_chunks=max_chunks, bos_id=tokenizer.bos_id if tokenizer.add_bos else None,
                           model_context=hparams.context_length, source=f"--file {text_path}")
    config, store, ram_plan, _ = prepare_model_run(
        model_path, source, hparams, positions=context, config_path=config_path, overrides=overrides,
        ram_budget=ram_budget, start_phase=start_phase, command="perplexity")
    start = StartPerplexity(model=str(Path(model_path).resolve()), tokens=list(tokens), context=context,
                            num_chunks=plan.num_chunks, bos_id=plan.bos_id)
    return PreparedPerplexity(config, store, start, plan, ram_plan, note)


async def run_perplexity(prepared: PreparedPerplexity, on_chunk: Callable[[PerplexityChunk], None] | None = None,
                         supervise=None) -> PerplexitySummary:
    """Run the graph with the perplexity job; `on_chunk(message)` as each chunk's score arrives.
    `supervise(supervisor)` (default: `supervisor.run()`) lets the CLI add its signal handling."""
    for name, value in SINGLE_THREAD_BLAS.items():
        os.environ.setdefault(name, value)
    supervisor = Supervisor(prepared.config, prepared.store, job=prepared.start, on_chunk=on_chunk)
    summary = await (supervisor.run() if supervise is None else supervise(supervisor))
    assert isinstance(summary, PerplexitySummary)
    return summary
