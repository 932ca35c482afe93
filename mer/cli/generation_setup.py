"""Everything before and around a generation through the process graph (`mer-pipeline generate`).

`prepare_generation` checks the model and the prompt BEFORE any process is started, so bad input
leaves nothing behind (docs/architecture.md, step 1), converts the experts into the cached store on
first use and sizes the configuration: routing k from the model, the cache from `--cache-slots`,
`--ram-budget` (`mer.runtime.ram_budget`) or, when neither is given (nor `cache_slots` in a config
file), from the memory the machine can give (`mer.runtime.host_memory.default_ram_budget`): a model
that fits is held whole; predictors and cache policy default to `MODEL_DEFAULTS`; with `fit_workers` (`up`'s
demos) and no worker count given, the compute workers are fitted to the model (`mer.cli.worker_choice`). `run_generation` then runs the graph with the job's
`StartGeneration` message and hands every generated token to a callback as it arrives.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from mer.cli.worker_choice import WorkerChoice, choose_compute_workers
from mer.config import PipelineConfig, load_config, read_config_file, validate_against_geometry
from mer.store.demo import converted_store
from mer.errors import ConfigError, ContextLengthError, TokenizerError
from mer.model.chat_template import chat_prompt_tokens
from mer.model.hparams import HParams, moe_layers_of, read_hparams
from mer.model.sampling import Sampler
from mer.model.tokenizer import Tokenizer, load_tokenizer
from mer.predict.fusion import GATE
from mer.protocol import StartGeneration, StartServing
from mer.runtime.host_memory import default_ram_budget
from mer.runtime.ram_budget import (RamPlan, dense_nbytes, kv_cache_nbytes, metadata_nbytes, plan_cache_slots,
                            prefetch_reserve_slots)
from mer.store.gguf_source import GGUFSource, read_gguf_source
from mer.store.reader import ExpertStore
from mer.metrics.summary import GenerationSummary
from mer.runtime.supervisor import Supervisor

# What a model runs with unless a flag or the config file says otherwise: the settings measured best
# beyond RAM (docs/performance.md, "Beyond RAM"): the next-layer gate prefetch and the layer-cycle
# eviction policy. The benchmark (`run`) keeps the configuration's own defaults.
MODEL_DEFAULTS: dict[str, Any] = {"predictors": (GATE,), "cache_policy": "layer"}

# One BLAS thread per process: the router's dense thread is one thread of the core budget, and a BLAS
# pool next to numba's would oversubscribe the cores (see MEASUREMENTS.md). Inherited by the children.
SINGLE_THREAD_BLAS = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass(frozen=True)
class PromptSpec:
    """The prompt: text (with `chat`: one user message in the model's chat template) or token ids."""

    text: str | None = None
    token_ids: tuple[int, ...] | None = None
    chat: bool = False


@dataclass(frozen=True)
class SamplerSettings:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class PreparedGeneration:
    """A checked generation, ready to run: configuration, store, start message, tokenizer, RAM plan."""

    config: PipelineConfig
    store: ExpertStore
    start: StartGeneration
    tokenizer: Tokenizer
    ram_plan: RamPlan | None
    worker_choice: WorkerChoice | None = None  # with `fit_workers` and no worker count given


def prompt_token_ids(tokenizer: Tokenizer, vocab_size: int, prompt: PromptSpec) -> list[int]:
    """The prompt's ids: `token_ids` exactly as given (no BOS), or the text tokenized (BOS as the
    vocabulary's add_bos_token says; with `chat`, the rendered chat template, specials parsed)."""
    if prompt.token_ids is not None:
        if prompt.chat:
            raise ConfigError("--chat renders a text prompt: it cannot be used with --prompt-tokens")
        ids = list(prompt.token_ids)
    elif prompt.text is None:
        raise ConfigError("a prompt is needed: --prompt TEXT or --prompt-tokens 1,2,3")
    elif prompt.chat:
        ids = chat_prompt_tokens(tokenizer, prompt.text)
    else:
        ids = tokenizer.encode(prompt.text, add_special=True, parse_special=False)
    bad = [token for token in ids if not 0 <= token < vocab_size]
    if bad:
        raise TokenizerError(f"prompt token id {bad[0]} is outside the vocabulary of {vocab_size} tokens")
    if not ids:
        raise ContextLengthError("the prompt is empty: generation needs at least one token")
    return ids


def prepare_generation(model_path: str | os.PathLike, prompt: PromptSpec, *, max_tokens: int,
                       sampler: SamplerSettings = SamplerSettings(), ignore_eos: bool = False,
                       dump_logits: str | os.PathLike | None = None, config_path: Path | None = None,
                       overrides: Mapping[str, Any] | None = None, ram_budget: int | None = None,
                       start_phase=None, command: str = "generate", fit_workers: bool = False) -> PreparedGeneration:
    """Check everything and size the run (see the module docstring); no process is started. `command`
    names the caller in the messages on stderr."""
    Sampler(sampler.temperature, sampler.top_k, sampler.top_p, sampler.seed)  # checks the settings
    if dump_logits and not Path(dump_logits).resolve().parent.is_dir():
        raise ConfigError(f"--dump-logits {dump_logits}: the directory {Path(dump_logits).resolve().parent} "
                          f"does not exist")
    source, hparams, tokenizer = open_model(model_path)
    ids = prompt_token_ids(tokenizer, tokenizer.vocab_size, prompt)
    context = hparams.context_length
    if len(ids) > context:
        raise ContextLengthError(f"the prompt has {len(ids)} tokens, more than the model's context of {context}")
    config, store, plan, choice = prepare_model_run(
        model_path, source, hparams, positions=min(context, len(ids) + max_tokens), config_path=config_path,
        overrides=overrides, ram_budget=ram_budget, start_phase=start_phase, command=command,
        fit_workers=fit_workers)
    start = StartGeneration(
        model=str(Path(model_path).resolve()), prompt_tokens=list(ids), max_tokens=max_tokens,
        temperature=sampler.temperature, top_k=sampler.top_k, top_p=sampler.top_p, seed=sampler.seed,
        ignore_eos=ignore_eos, end_ids=sorted(tokenizer.end_of_generation_ids),
        dump_logits=str(Path(dump_logits).resolve()) if dump_logits else None)
    return PreparedGeneration(config, store, start, tokenizer, plan, choice)


def open_model(model_path: str | os.PathLike) -> tuple[GGUFSource, HParams, Tokenizer]:
    """The GGUF's parts, hyper-parameters and tokenizer; its expert tensors checked to be where the metadata says."""
    source = read_gguf_source(model_path)
    hparams = read_hparams(source.parts[0])
    moe_layers_of(source, hparams)
    return source, hparams, load_tokenizer(source.parts[0])


def prepare_model_run(model_path: str | os.PathLike, source: GGUFSource, hparams: HParams, *,
                      positions: int, config_path: Path | None,
                      overrides: Mapping[str, Any] | None, ram_budget: int | None, start_phase, command: str,
                      fit_workers: bool = False
                      ) -> tuple[PipelineConfig, ExpertStore, RamPlan | None, WorkerChoice | None]:
    """The configuration (model defaults, the cache sized by `--cache-slots`, `--ram-budget` or the
    machine), the converted store, the RAM plan of a run of the model whose KV cache holds
    `positions` positions, and with `fit_workers` the compute workers chosen for the model (None when
    a flag or the config file gives the count)."""
    overrides = dict(overrides or {})
    if ram_budget is not None and overrides.get("cache_slots") is not None:
        raise ConfigError("--ram-budget sizes the cache itself: give --ram-budget or --cache-slots, not both")
    overrides.update(top_k=hparams.top_k, layered=True)
    in_file = read_config_file(config_path) if config_path is not None else {}
    overrides.update({key: value for key, value in MODEL_DEFAULTS.items()
                      if overrides.get(key) is None and key not in in_file})
    config = load_config(config_path, overrides)
    choice = None
    if fit_workers and overrides.get("compute_workers") is None and "compute_workers" not in in_file:
        formats = [source.expert_format(layer.moe_layer) for layer in source.layers]
        choice = choose_compute_workers(config.num_compute_workers, formats, config.expert_slices)
        config = msgspec.structs.replace(config, compute_workers=choice.chosen)
    plan = None
    if ram_budget is not None:  # checked before the (possibly long) conversion
        plan = _ram_plan(ram_budget, source, hparams, config, positions)
    elif overrides.get("cache_slots") is None and "cache_slots" not in in_file:
        budget, available = default_ram_budget()
        origin = f"default: {available.describe()} less headroom"
        try:
            plan = _ram_plan(budget, source, hparams, config, positions, origin)
        except ConfigError as error:
            raise ConfigError(f"{error}; this machine has {available.describe()}: free memory, or give "
                              f"--cache-slots or --ram-budget") from None
    if plan is not None:
        config = msgspec.structs.replace(config, cache_slots=plan.cache_slots)
    else:  # --cache-slots or the config file's, within k..all experts
        cache = min(max(config.cache_slots, hparams.top_k), source.geometry.num_experts)
        config = msgspec.structs.replace(config, cache_slots=cache)
    store_dir = converted_store(Path(model_path), command=command, start_phase=start_phase, parts=source.parts)
    store = ExpertStore.open(store_dir)
    config = msgspec.structs.replace(config, store=store_dir)
    validate_against_geometry(config, store.manifest.geometry)
    return config, store, plan, choice


def _ram_plan(budget: int, source: GGUFSource, hparams: HParams, config: PipelineConfig, positions: int,
              origin: str = "") -> RamPlan:
    slot_nbytes = max(source.expert_format(layer.moe_layer).read_nbytes for layer in source.layers)
    reserve = prefetch_reserve_slots(config)
    gate = GATE in config.predictors  # the predictor loads the gates: a heavy process
    return plan_cache_slots(
        budget, dense=dense_nbytes(source), kv_cache=kv_cache_nbytes(hparams, positions),
        num_compute_workers=config.num_compute_workers, slot_nbytes=slot_nbytes, top_k=hparams.top_k,
        reserve_slots=reserve, num_experts=source.geometry.num_experts, metadata=metadata_nbytes(source, gate),
        gate_predictor=gate, origin=origin)


async def run_generation(prepared: PreparedGeneration, on_token: Callable[[int, int], None] | None = None,
                         supervise=None) -> GenerationSummary:
    """Run the graph with the generation job; `on_token(index, token)` as each token arrives.
    `supervise(supervisor)` (default: `supervisor.run()`) lets the CLI add its signal handling."""
    for name, value in SINGLE_THREAD_BLAS.items():
        os.environ.setdefault(name, value)
    forward = None if on_token is None else (lambda message: on_token(message.index, message.token))
    supervisor = Supervisor(prepared.config, prepared.store, job=prepared.start, on_token=forward)
    return await (supervisor.run() if supervise is None else supervise(supervisor))


# The serving job's KV pool takes at most this share of the RAM budget (docs/serving.md, "KV pool").
KV_POOL_BUDGET_SHARE = 0.25


@dataclass(frozen=True)
class PreparedServing:
    """A checked serving run: configuration, store, the job's start message, tokenizer, RAM plan, context."""

    config: PipelineConfig
    store: ExpertStore
    start: StartServing
    tokenizer: Tokenizer
    ram_plan: RamPlan | None
    context_length: int


def serving_kv_positions(hparams: HParams, max_sequences: int, budget: int) -> int:
    """The KV pool: a whole context per sequence, at most `KV_POOL_BUDGET_SHARE` of the budget (and at least
    one position per sequence)."""
    per_position = kv_cache_nbytes(hparams, 1)
    share = int(budget * KV_POOL_BUDGET_SHARE) // per_position
    return max(max_sequences, min(max_sequences * hparams.context_length, share))


def prepare_serving(model_path: str | os.PathLike, *, max_sequences: int, config_path: Path | None = None,
                    overrides: Mapping[str, Any] | None = None, ram_budget: int | None = None,
                    kv_positions: int | None = None, start_phase=None) -> PreparedServing:
    """Check the model and size the serving run (the KV pool, `kv_positions` or `serving_kv_positions`,
    counted in the RAM plan); no process is started."""
    source, hparams, tokenizer = open_model(model_path)
    if kv_positions is None:
        kv_positions = serving_kv_positions(hparams, max_sequences,
                                            ram_budget if ram_budget is not None else default_ram_budget()[0])
    config, store, plan, _ = prepare_model_run(
        model_path, source, hparams, positions=kv_positions, config_path=config_path, overrides=overrides,
        ram_budget=ram_budget, start_phase=start_phase, command="serve")
    start = StartServing(model=str(Path(model_path).resolve()), max_sequences=max_sequences,
                         kv_positions=kv_positions, end_ids=sorted(tokenizer.end_of_generation_ids))
    return PreparedServing(config, store, start, tokenizer, plan, hparams.context_length)
