"""The configuration of a pipeline run: one schema, validated once, shipped to children.

`PipelineConfig` is a msgspec `Struct`: each field declares its type, its range (`Meta(ge, le)`), its
documentation with its unit, and which job reads it (`Meta.extra`); `__post_init__` converts and
checks every field and then the rules between fields, so a configuration that exists is valid.
The command-line flags of every command are generated from these declarations
(`mer.cli.pipeline_flags`). Precedence (defaults, then a TOML file, then flags), relative paths,
error messages and the choice of msgspec are described in docs/configuration.md. `load_config` also
resolves `compute_workers = "auto"` for this machine; children rebuild the resolved configuration
with `PipelineConfig.from_dict(config.to_dict())`.
"""

from __future__ import annotations

import difflib
import os
import tomllib
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args, get_origin

import msgspec
from msgspec import Meta

from mer.errors import ConfigError

if TYPE_CHECKING:
    from mer.store.manifest import Geometry

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
AUTO = "auto"
BENCHMARK, GENERATION = "benchmark", "generation"  # the jobs a setting can be specific to
PredictorName = Literal["markov", "locality", "affinity", "gate"]
PREDICTOR_NAMES: tuple[str, ...] = get_args(PredictorName)  # the canonical order of `predictors`
READ_DEADLINE_S = 15.0  # the default of `read_deadline_s`, also the readers' (docs/configuration.md says why)


def spec(doc: str, *, ge: float | None = None, le: float | None = None, unit: str = "", metavar: str = "",
         job: str = "") -> Meta:
    """A field's declaration: `doc` (one sentence or more, ending with a period), inclusive bounds, the
    unit of its value, the flag's metavar, and the job that reads it ("": every job)."""
    return Meta(ge=ge, le=le, description=doc, extra={"unit": unit, "metavar": metavar, "job": job})


OptionalPath = Path | None


class PipelineConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Everything `mer-pipeline run` / `up` / `generate` need to start the graph and run a job."""

    store: Annotated[OptionalPath, spec(
        "Expert store directory; `up` fills in its demo store when unset.", metavar="DIR", job=BENCHMARK)] = None
    tokens: Annotated[int, spec(
        "Iterations (tokens, as the seed counts them) to run; `up --model`: tokens to generate.",
        ge=1, le=10**9, unit="iterations", metavar="N", job=BENCHMARK)] = 100
    cache_slots: Annotated[int, spec(
        "Slots in the expert cache (each holds one expert; at least top_k).",
        ge=1, le=1_000_000, unit="slots", metavar="C")] = 16
    top_k: Annotated[int, spec(
        "Experts routed per token (per layer with layered); a model routes its own k.",
        ge=1, le=256, unit="experts", metavar="K", job=BENCHMARK)] = 2
    workload: Annotated[Literal["markov", "uniform", "skewed", "replay"], spec(
        "How synthetic routing is drawn.", metavar="NAME", job=BENCHMARK)] = "markov"
    zipf_s: Annotated[float, spec(
        "Zipf exponent of the skewed workload.", ge=0.0, le=10.0, unit="exponent", metavar="S", job=BENCHMARK)] = 1.1
    workload_correlation: Annotated[float, spec(
        "Probability that a skewed token repeats the previous token's experts.",
        ge=0.0, le=1.0, unit="probability 0..1", metavar="P", job=BENCHMARK)] = 0.0
    trace: Annotated[OptionalPath, spec(
        "Routing trace (JSONL) to replay; required iff workload is replay.", metavar="FILE", job=BENCHMARK)] = None
    seed: Annotated[int, spec(
        "Seed of the workload and the synthetic hidden states.", ge=0, le=2**63 - 1, metavar="S",
        job=BENCHMARK)] = 0
    layered: Annotated[bool, spec(
        "Route every token through every layer instead of the flat pool.", job=BENCHMARK)] = False
    predict_fanout: Annotated[int, spec(
        "Experts hinted per predicted decision (and prefetch slots reserved for them).",
        ge=1, le=256, unit="experts", metavar="F")] = 2
    pipeline_depth: Annotated[int, spec(
        "Routing decisions the predictors look ahead (a decision: one token at one MoE layer; one iteration "
        "on the flat pool).", ge=1, le=64, unit="decisions", metavar="D")] = 1
    prefetch: Annotated[bool, spec("Whether predicted experts are read ahead (on by default; --no-prefetch turns "
                                   "it off).")] = True
    predictors: Annotated[tuple[PredictorName, ...], spec(
        "Predictors switched on, comma-separated, their hints fused: markov, locality, affinity, gate (the next "
        "MoE layers' router gates applied to the current hidden state: needs a model, so generation, or a "
        "benchmark replay with gate_model).", metavar="NAME[,NAME...]")] = ("markov",)
    gate_min_ratio: Annotated[float, spec(
        "Gate predictor: hint only experts whose gate probability is at least this multiple of uniform "
        "(1 / experts per layer), so unlikely experts do not evict cached ones; 0 hints the top predict_fanout.",
        ge=0.0, le=1_000_000.0, unit="x uniform probability", metavar="R")] = 1.5
    gate_model: Annotated[OptionalPath, spec(
        "The GGUF whose router gates the gate predictor applies in a benchmark replay (layered) of a trace "
        "recorded with record_hidden; generation uses its own model.", metavar="MODEL.gguf", job=BENCHMARK)] = None
    governor_threshold: Annotated[float, spec(
        "Prefetch governor: admit a hint when its score x its predictor's recent accuracy >= this x (1 + reads "
        "pending); 0 turns the governor off.", ge=0.0, le=1.0, unit="usefulness per pending read",
        metavar="G")] = 0.0
    max_pinned: Annotated[int, spec(
        "Experts the locality predictor may pin in the cache (0: no pins; at most cache_slots - top_k).",
        ge=0, le=1_000_000, unit="experts", metavar="P")] = 0
    cache_policy: Annotated[Literal["lru", "layer"], spec(
        "Eviction policy: lru, or layer (evict the expert whose MoE layer comes back last; for layered routing "
        "and models, LRU on the flat pool).", metavar="NAME")] = "lru"
    compute_workers: Annotated[Annotated[int, Meta(ge=1, le=1024)] | Literal["auto"], spec(
        "Compute worker processes: a count, or auto (available cores / kernel_threads).",
        unit="processes", metavar="N|auto")] = AUTO
    kernel_threads: Annotated[int, spec(
        "Kernel threads per compute worker; workers x threads must fit the available cores.",
        ge=1, le=256, unit="threads per worker", metavar="T")] = 1
    expert_slices: Annotated[int, spec(
        "d_ff slices each expert's work is cut into (at least 256 rows each): at most this many compute workers "
        "share one expert; each slice more costs a pass over part of the down matrix (2: measured best on 2 "
        "cores). Outputs are bit-identical for any worker count at the same value.",
        ge=1, le=64, unit="slices per expert", metavar="S")] = 2
    io_backend: Annotated[Literal["auto", "uring", "preadv"], spec(
        "Expert read backend: io_uring, thread-pool preadv, or auto.", metavar="NAME")] = "auto"
    io_queue_depth: Annotated[int, spec(
        "Reads in flight at once in the I/O worker.", ge=1, le=4096, unit="reads in flight", metavar="Q")] = 4
    verify_reads: Annotated[bool, spec(
        "Check every expert read against the store's crc32, not only each expert's first read in the I/O "
        "worker's lifetime (the default).")] = False
    read_deadline_s: Annotated[float, spec(
        "Time an expert read may stay in flight (from the moment it is handed to the kernel or a thread) before "
        "it is called hung: the request needing the expert fails naming expert, file and offset, the read is "
        "not retried, and its slot is kept out of service until the kernel ends the read. Raise it for a very "
        "slow disk with a large io_queue_depth.", ge=0.05, le=3600.0, unit="s", metavar="SECONDS")] = READ_DEADLINE_S
    log_file: Annotated[OptionalPath, spec(
        "Append every process's structlog JSON events to this file (the merged log) instead of warnings to "
        "stderr.", metavar="FILE")] = None
    record_trace: Annotated[OptionalPath, spec(
        "Record every routing decision to this JSONL trace.", metavar="FILE")] = None
    record_hidden: Annotated[bool, spec(
        "With record_trace, also record each decision's residual stream (base64 float32), so a replay can run "
        "the gate predictor.", job=GENERATION)] = False
    prefill_chunk: Annotated[int, spec(
        "Prompt tokens per forward pass: a longer prompt is prefilled in chunks of this many (the same chunks "
        "in generate and serve, so their outputs are identical; serving also caps each step's prompt tokens "
        "at it, so a long prompt does not stall the decoding sequences).",
        ge=1, le=1_000_000, unit="tokens", metavar="TOKENS", job=GENERATION)] = 512
    handshake_timeout_s: Annotated[float, spec(
        "Time a child has to answer Hello and Ready at start-up; extended while the children still "
        "starting keep using CPU (a slow start on a busy machine), up to 10 times it (at least 600 s).", ge=0.1, le=3600.0, unit="s",
        metavar="SECONDS")] = 30.0
    stall_timeout_s: Annotated[float, spec(
        "Time a ready child may go without any sign of progress (a heartbeat, CPU time or I/O) before the "
        "watchdog names it stalled (stopped, deadlocked) and kills it; it is then restarted or the run "
        "ends, as after a death. A stall is seen within it plus a second at most.", ge=0.5, le=3600.0,
        unit="s", metavar="SECONDS")] = 8.0
    job_deadline_s: Annotated[float, spec(
        "Time a compute worker with a job in hand, or the I/O worker with an Acquire unanswered, may go "
        "without reporting progress (a compute worker does so between a job's items, the I/O worker's event "
        "loop while it reads or waits, at least every min(1 s, this / 5)) before the router names it stuck "
        "(a busy loop, a deadlock that still uses CPU) and the supervisor kills it; it is then restarted and "
        "its work sent again, or the run ends, as after a death. Counts from work sent to an idle worker, "
        "never during a compute worker's start-up (its kernels are compiled before it is ready).", ge=0.5,
        le=3600.0, unit="s", metavar="SECONDS")] = 8.0
    max_restarts: Annotated[int, spec(
        "Restarts of compute workers, the predictor and the I/O worker after a death (kill -9, the OOM "
        "killer, a stall) in one run; one more death ends the run. 0: every death ends the run.", ge=0, le=1_000_000,
        unit="restarts", metavar="N")] = 10
    shutdown_grace_s: Annotated[float, spec(
        "Time children have to exit after Shutdown before they are killed.", ge=0.0, le=600.0, unit="s",
        metavar="SECONDS")] = 5.0
    dump_outputs: Annotated[OptionalPath, spec(
        "Save every combined MoE output (tokens x decisions, d_model float32) to this .npy file.",
        metavar="FILE", job=BENCHMARK)] = None

    def __post_init__(self) -> None:
        for name in SETTINGS:
            msgspec.structs.force_setattr(self, name, check_value(name, getattr(self, name), "configuration"))
        self._check_rules()

    def _check_rules(self) -> None:
        """The rules between fields (the store and the machine are checked by the functions below)."""
        if self.workload == "replay" and self.trace is None:
            raise ConfigError("workload 'replay' needs a trace file: set trace (--trace FILE)")
        if self.workload != "replay" and self.trace is not None:
            raise ConfigError(f"trace {self.trace} is set but workload is {self.workload!r}; a trace is only read "
                              "with workload 'replay' (to write one, use record_trace)")
        if self.record_hidden and self.record_trace is None:
            raise ConfigError("record_hidden records residuals into the routing trace, but no trace is written: "
                              "set record_trace (--record-trace FILE)")
        if self.gate_model is not None and "gate" not in self.predictors:
            raise ConfigError(f"gate_model {self.gate_model} is set but predictors "
                              f"{','.join(self.predictors)!r} has no gate")
        if self.gate_model is not None and (self.workload != "replay" or not self.layered):
            raise ConfigError(f"gate_model {self.gate_model}: the gate predictor replays a layered trace recorded "
                              f"with its residuals (generate --record-trace FILE --record-hidden); use --workload "
                              f"replay --trace FILE --layered, not workload {self.workload!r}"
                              f"{'' if self.layered else ' without --layered'}")
        if 0 < self.max_pinned and self.max_pinned > self.cache_slots - self.top_k:
            raise ConfigError(f"max_pinned {self.max_pinned} leaves fewer than top_k {self.top_k} unpinned slots of "
                              f"cache_slots {self.cache_slots}: use at most {max(self.cache_slots - self.top_k, 0)}")

    @property
    def num_compute_workers(self) -> int:
        """The worker count; only valid once `resolve_for_machine` has replaced "auto"."""
        if not isinstance(self.compute_workers, int):
            raise ConfigError("compute_workers is still 'auto': resolve it with resolve_for_machine first")
        return self.compute_workers

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON- and msgpack-ready values (paths as strings), to log at start-up and to ship to children."""
        return msgspec.to_builtins(self, enc_hook=str)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "configuration") -> PipelineConfig:
        """The configuration `to_dict` wrote; unknown keys and bad values are a `ConfigError`."""
        return cls(**_checked_values(data, source))


# --- what the schema declares, by key (for checks, flags and help) -------------------------------------


@dataclass(frozen=True)
class Setting:
    """One field of the schema as its annotation declares it."""

    name: str
    kind: Any  # the annotated type msgspec converts a value to
    default: Any
    doc: str
    unit: str
    metavar: str
    job: str
    bounds: tuple[Any, Any] | None  # inclusive (ge, le)
    choices: tuple[str, ...]  # the names a Literal (or a tuple of Literals) allows
    wanted: str  # what a value must be, in words
    accepts: Any  # value -> whether it has a type this field converts
    is_path: bool


_WANTED = {int: "an integer", float: "a number", bool: "a boolean", str: "a string", Path: "a path"}
_ACCEPTS = {int: lambda v: type(v) is int, float: lambda v: type(v) in (int, float), bool: lambda v: type(v) is bool,
            Path: lambda v: isinstance(v, (str, os.PathLike)), type(None): lambda v: v is None}


def _leaves(kind: Any, metas: list[Meta]) -> list[Any]:
    """The member types of `kind` without their Annotated layers, whose Meta go to `metas`."""
    if get_origin(kind) is Annotated:
        base, *extras = get_args(kind)
        metas.extend(extra for extra in extras if isinstance(extra, Meta))
        return _leaves(base, metas)
    if get_origin(kind) in (Union, types.UnionType):
        return [leaf for member in get_args(kind) for leaf in _leaves(member, metas)]
    return [kind]


def _setting(name: str, kind: Any, default: Any) -> Setting:
    metas: list[Meta] = []
    leaves = _leaves(kind, metas)
    doc = next(meta for meta in metas if meta.description)
    bounds = next(((meta.ge, meta.le) for meta in metas if meta.ge is not None), None)
    wanted, accepts, choices = [], [], ()
    for leaf in leaves:
        if get_origin(leaf) is Literal and len(leaves) > 1:  # "auto" beside a count
            choices = get_args(leaf)
            wanted.append(" or ".join(repr(choice) for choice in choices))
            accepts.append(lambda v, allowed=choices: v in allowed)
        elif get_origin(leaf) is Literal:
            choices = get_args(leaf)
            wanted.append("a string")
            accepts.append(lambda v: type(v) is str)
        elif get_origin(leaf) is tuple:  # names: "a,b" in a file or a flag, a list in to_dict's output
            choices = get_args(get_args(leaf)[0])
            wanted.append("a comma-separated string or a list of names")
            accepts.append(lambda v: isinstance(v, (str, list, tuple)))
        else:
            wanted.extend([_WANTED[leaf]] if leaf in _WANTED else [])  # None: allowed, not asked for
            accepts.append(_ACCEPTS[leaf])
    return Setting(name, kind, default, doc.description, doc.extra["unit"], doc.extra["metavar"], doc.extra["job"],
                   bounds, choices, " or ".join(wanted), lambda v: any(accept(v) for accept in accepts), Path in leaves)


SETTINGS: dict[str, Setting] = {
    field.name: _setting(field.name, field.type, field.default) for field in msgspec.structs.fields(PipelineConfig)
}


def flag_name(key: str) -> str:
    """The command-line flag of a key: `cache_slots` -> `--cache-slots`, `prefetch` -> `--no-prefetch`."""
    return ("--no-" if SETTINGS[key].default is True else "--") + key.replace("_", "-")


# --- checking values ---------------------------------------------------------------------------------


def _absolute_path(kind: type, value: Any) -> Path:
    """msgspec's hook for `Path` fields: a non-empty string or path, relative ones joined to the working directory."""
    if kind is Path and isinstance(value, (str, os.PathLike)) and str(value):
        path = Path(value).expanduser()
        return path if path.is_absolute() else Path.cwd() / path
    raise TypeError(f"not a path: {value!r}")


def _names(setting: Setting, value: Any, where: str) -> tuple[str, ...]:
    """A comma-separated string or a list of names as the known names they are, in their canonical order."""
    names = [name.strip() for name in value.split(",")] if isinstance(value, str) else list(value)
    unknown = [name for name in names if name not in setting.choices]
    if not names or unknown:
        raise ConfigError(f"{where}: {setting.name} = {value!r}: unknown predictor "
                          f"{unknown[0] if unknown else ''!r} (known: {', '.join(setting.choices)})")
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: {setting.name} = {value!r} names a predictor twice")
    return tuple(name for name in setting.choices if name in names)


def check_value(name: str, value: Any, where: str) -> Any:
    """`value` converted to field `name`'s type and checked against its range or choices, or a `ConfigError`
    naming `where`, the key, the value and what is allowed."""
    setting = SETTINGS[name]
    if not setting.accepts(value):
        raise ConfigError(f"{where}: {name} must be {setting.wanted}, got {type(value).__name__} {value!r}")
    if name == "predictors":
        value = _names(setting, value, where)
    try:
        return msgspec.convert(value, setting.kind, dec_hook=_absolute_path)
    except msgspec.ValidationError:
        pass
    if isinstance(value, str) and setting.choices:
        raise ConfigError(f"{where}: {name} = {value!r} is not one of: {', '.join(setting.choices)}")
    low, high = setting.bounds
    shown = float(value) if isinstance(low, float) else value
    raise ConfigError(f"{where}: {name} = {shown!r} is out of range; allowed {low}..{high}")


def _unknown_key_error(key: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(key, SETTINGS, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(SETTINGS)}"
    return ConfigError(f"{source}: unknown key {key!r} ({hint})")


def _checked_values(data: Mapping[str, Any], source: str, where: Callable[[str], str] | None = None) -> dict[str, Any]:
    """`data` checked by `check_value`; errors name `source`, or `where(key)` when given."""
    for key in data:
        if key not in SETTINGS:
            raise _unknown_key_error(str(key), source)
    return {key: check_value(key, value, where(key) if where else source) for key, value in data.items()}


# --- loading -----------------------------------------------------------------------------------------


def read_config_file(path: Path | str) -> dict[str, Any]:
    """The checked values a TOML file sets (only those it sets); errors name the file and key."""
    path = Path(path)
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    base = path.resolve().parent  # relative paths in a file are relative to the file
    for key, value in data.items():
        if isinstance(value, str) and value and key in SETTINGS and SETTINGS[key].is_path:
            data[key] = base / Path(value).expanduser()
    return _checked_values(data, str(path))


def config_overrides(arguments: Any) -> dict[str, Any]:
    """The configuration keys set on the command line: parsed arguments (or a mapping) whose dest is a
    configuration key and whose value is not None (`mer.cli.pipeline_flags` declares them so)."""
    values = arguments if isinstance(arguments, Mapping) else vars(arguments)
    return {key: value for key, value in values.items() if key in SETTINGS and value is not None}


def load_config(path: Path | str | None = None, overrides: Mapping[str, Any] | None = None, *,
                available_cores: int | None = None) -> PipelineConfig:
    """Defaults, then the file at `path`, then the non-None `overrides`; checked and resolved for this
    machine (see `resolve_for_machine`). This is the one place a run's configuration is loaded."""
    values = read_config_file(path) if path is not None else {}
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    values.update(_checked_values(given, "command line", lambda key: f"command-line flag {flag_name(key)}"))
    return resolve_for_machine(PipelineConfig(**values), available_cores)


def shipped_config_path(name: str) -> Path:
    """The path of a preset in `configs/` by name (`default`, `tiny`, `mixtral-8x7b-bench`)."""
    path = CONFIG_DIR / f"{name}.toml"
    if not path.is_file():
        presets = sorted(candidate.stem for candidate in CONFIG_DIR.glob("*.toml"))
        raise ConfigError(f"no shipped config {name!r} in {CONFIG_DIR}; presets: {', '.join(presets)}")
    return path


# --- checks that need the machine or the store ------------------------------------------------------


def available_core_count() -> int:
    """Cores this process may run on (its affinity mask, not the machine's core count)."""
    return len(os.sched_getaffinity(0))


def resolve_for_machine(config: PipelineConfig, available_cores: int | None = None) -> PipelineConfig:
    """Replace compute_workers 'auto' by available cores // kernel_threads (at least 1), and check
    that compute_workers x kernel_threads fits the available cores."""
    cores = available_core_count() if available_cores is None else available_cores
    workers = config.compute_workers
    if workers == AUTO:
        workers = max(1, cores // config.kernel_threads)
    if workers * config.kernel_threads > cores and config.compute_workers != AUTO:
        raise ConfigError(
            f"compute_workers {workers} x kernel_threads {config.kernel_threads} = "
            f"{workers * config.kernel_threads} threads, more than the {cores} available cores "
            "(os.sched_getaffinity); lower --compute-workers or --kernel-threads"
        )
    if config.kernel_threads > cores:
        raise ConfigError(f"kernel_threads {config.kernel_threads} is more than the {cores} available cores")
    return msgspec.structs.replace(config, compute_workers=workers)


def validate_against_geometry(config: PipelineConfig, geometry: Geometry) -> None:
    """Check the settings that depend on the store: k slots must fit, k experts must exist."""
    if config.cache_slots < config.top_k:
        raise ConfigError(
            f"cache_slots {config.cache_slots} is below top_k {config.top_k}: a token holds {config.top_k} "
            f"slots at once; use --cache-slots {config.top_k} or more"
        )
    if config.layered:
        pool, where = geometry.experts_per_layer, "experts per layer"
    else:
        pool, where = geometry.num_experts, "experts in the flat pool"
    if config.top_k > pool:
        raise ConfigError(f"top_k {config.top_k} is more than the store's {pool} {where}")
