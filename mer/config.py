"""The configuration of a pipeline run: one frozen dataclass, validated once, shipped to children.

Precedence, lowest first: the field defaults below, a TOML file (`configs/*.toml`, flat keys that
mirror the `mer-pipeline run` flags: `cache_slots = 64` is `--cache-slots 64`), then command-line
flags. Unknown keys and wrong types are a `ConfigError` naming the key and file; out-of-range values
name the key, the value and the allowed range. Relative paths in a file are relative to the file's
directory; relative paths in flags are relative to the working directory. `load_config` (in the
supervisor) also resolves `compute_workers = "auto"` for this machine; children rebuild the
resolved configuration with `PipelineConfig.from_dict(config.to_dict())`.
"""

import dataclasses
import difflib
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mer.errors import ConfigError
from mer.store.manifest import Geometry

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
WORKLOADS = ("markov", "uniform", "skewed", "replay")
IO_BACKENDS = ("auto", "uring", "preadv")
CACHE_POLICIES = ("lru", "layer")  # live eviction policies (mer.cache.policy)
AUTO = "auto"
OptionalPath = Path | None
WorkerCount = int | str


@dataclass(frozen=True)
class Setting:
    """What a configuration field means and which values it accepts (inclusive bounds)."""

    doc: str
    minimum: int | float | None = None
    maximum: int | float | None = None
    choices: tuple[str, ...] = ()

    def allowed(self) -> str:
        if self.choices:
            return ", ".join(self.choices)
        return f"{self.minimum}..{self.maximum}"


def setting(default: Any, doc: str, *, minimum=None, maximum=None, choices: tuple[str, ...] = ()) -> Any:
    """A dataclass field carrying its documentation and bounds."""
    return field(default=default, metadata={"setting": Setting(doc, minimum, maximum, choices)})


@dataclass(frozen=True)
class PipelineConfig:
    """Everything `mer-pipeline up` / `run` needs to start the graph and run a benchmark job."""

    store: OptionalPath = setting(None, "Expert store directory; `up` fills in its demo store when unset.")
    tokens: int = setting(100, "Iterations (tokens, as the seed counts them) to run.", minimum=1, maximum=10**9)
    cache_slots: int = setting(16, "Slots in the expert cache (each holds one expert).", minimum=1, maximum=1_000_000)
    top_k: int = setting(2, "Experts routed per token (per layer with layered).", minimum=1, maximum=256)
    workload: str = setting("markov", "How synthetic routing is drawn.", choices=WORKLOADS)
    zipf_s: float = setting(1.1, "Zipf exponent of the skewed workload.", minimum=0.0, maximum=10.0)
    workload_correlation: float = setting(
        0.0, "Probability that a skewed token repeats the previous token's experts.", minimum=0.0, maximum=1.0
    )
    trace: OptionalPath = setting(None, "Routing trace (JSONL) to replay; required iff workload is replay.")
    seed: int = setting(0, "Seed of the workload and the synthetic hidden states.", minimum=0, maximum=2**63 - 1)
    predict_fanout: int = setting(
        2, "Prefetch hints per prediction (and slots reserved for them).", minimum=1, maximum=256
    )
    pipeline_depth: int = setting(1, "Iterations the predictor looks ahead when hinting.", minimum=1, maximum=64)
    prefetch: bool = setting(True, "Whether predicted experts are read ahead (--no-prefetch turns it off).")
    predictors: str = setting(
        "markov", "Predictors switched on, comma-separated: markov, locality, affinity, gate (hints are fused; "
        "gate, the next-layer router gate, needs a model: generation only)."
    )
    gate_min_ratio: float = setting(
        1.5, "Gate predictor: hint only experts whose gate probability is at least this multiple of uniform "
        "(1 / experts per layer), so unlikely experts do not evict cached ones; 0 hints the top predict_fanout.",
        minimum=0.0, maximum=1_000_000.0,
    )
    governor_threshold: float = setting(
        0.0, "Prefetch governor: admit a hint when score x recent accuracy >= this x (1 + reads pending); "
        "0 turns the governor off.", minimum=0.0, maximum=1.0,
    )
    max_pinned: int = setting(
        0, "Experts the locality predictor may pin in the cache (0: no pins; at most cache_slots - top_k).",
        minimum=0, maximum=1_000_000,
    )
    compute_workers: WorkerCount = setting(
        AUTO, "Compute worker processes: a count, or auto (available cores / kernel_threads).", minimum=1, maximum=1024
    )
    kernel_threads: int = setting(1, "Kernel threads per compute worker.", minimum=1, maximum=256)
    io_backend: str = setting("auto", "Read backend: io_uring, thread-pool preadv, or auto.", choices=IO_BACKENDS)
    cache_policy: str = setting(
        "lru", "Eviction policy: lru, or layer (evict the expert whose MoE layer comes back last; for layered "
        "routing and models, LRU on the flat pool).", choices=CACHE_POLICIES,
    )
    io_queue_depth: int = setting(4, "Reads in flight at once in the I/O worker.", minimum=1, maximum=4096)
    layered: bool = setting(False, "Route every token through every layer instead of the flat pool.")
    log_file: OptionalPath = setting(None, "Write structlog JSON events here instead of stderr.")
    record_trace: OptionalPath = setting(None, "Record every routing decision to this JSONL trace.")
    record_hidden: bool = setting(
        False, "With record_trace, generation also records each decision's residual stream (base64 float32), "
        "so a replay can run the gate predictor.",
    )
    gate_model: OptionalPath = setting(
        None, "The GGUF whose router gates the gate predictor applies in a benchmark replay of a trace recorded "
        "with record_hidden (generation uses its own model).",
    )
    handshake_timeout_s: float = setting(
        30.0, "Seconds a child has to answer Hello and Ready at start-up.", minimum=0.1, maximum=3600.0
    )
    shutdown_grace_s: float = setting(
        5.0, "Seconds children have to exit after Shutdown before they are killed.", minimum=0.0, maximum=600.0
    )
    dump_outputs: OptionalPath = setting(
        None, "Save every combined MoE output (tokens x decisions, d_model float32) to this .npy file."
    )

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            value = _coerce(item, getattr(self, item.name), "configuration", Path.cwd())
            object.__setattr__(self, item.name, value)
        _check_trace(self)
        _check_record_hidden(self)
        _check_predictors(self)

    @property
    def num_compute_workers(self) -> int:
        """The worker count; only valid once `resolve_for_machine` has replaced "auto"."""
        if not isinstance(self.compute_workers, int):
            raise ConfigError("compute_workers is still 'auto': resolve it with resolve_for_machine first")
        return self.compute_workers

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (paths as strings), to log at start-up and to ship to children."""
        return {name: str(value) if isinstance(value, Path) else value for name, value in self._items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "configuration") -> "PipelineConfig":
        """The configuration `to_dict` wrote; unknown keys and bad values are a `ConfigError`."""
        return cls(**_checked_values(data, source, Path.cwd()))

    def _items(self):
        return ((item.name, getattr(self, item.name)) for item in dataclasses.fields(self))


FIELDS: dict[str, dataclasses.Field] = {item.name: item for item in dataclasses.fields(PipelineConfig)}


def settings() -> dict[str, Setting]:
    """Each field's documentation and bounds, by key (for `--help` texts)."""
    return {name: item.metadata["setting"] for name, item in FIELDS.items()}


def flag_name(key: str) -> str:
    """The command-line flag of a key: `cache_slots` -> `--cache-slots`, `prefetch` -> `--no-prefetch`."""
    item = FIELDS[key]
    negated = item.type is bool and item.default is True
    return ("--no-" if negated else "--") + key.replace("_", "-")


# --- checking values ---------------------------------------------------------------------------------


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _coerce(item: dataclasses.Field, value: Any, where: str, base_dir: Path) -> Any:
    """`value` converted to the field's type and checked against its bounds, or a `ConfigError`."""
    name, kind, rule = item.name, item.type, item.metadata["setting"]
    if kind is OptionalPath:
        return _coerce_path(name, value, where, base_dir)
    if kind is WorkerCount and value == AUTO:
        return AUTO
    if kind is WorkerCount and isinstance(value, str) and value.strip().isdigit():
        value = int(value)  # "--compute-workers 4" arrives as a string
    expected = {
        bool: (bool,),
        int: (int,),
        WorkerCount: (int,),
        float: (int, float),
        str: (str,),
    }[kind]
    if type(value) not in expected:
        names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
        wanted = "an integer or 'auto'" if kind is WorkerCount else names[kind]
        raise ConfigError(f"{where}: {name} must be {wanted}, got {_describe(value)}")
    if kind is float:
        value = float(value)
    _check_bounds(name, value, rule, where)
    return value


def _check_bounds(name: str, value: Any, rule: Setting, where: str) -> None:
    if rule.choices and value not in rule.choices:
        raise ConfigError(f"{where}: {name} = {value!r} is not one of: {rule.allowed()}")
    if rule.minimum is not None and not isinstance(value, (bool, str)):
        if not rule.minimum <= value <= rule.maximum:
            raise ConfigError(f"{where}: {name} = {value!r} is out of range; allowed {rule.allowed()}")


def _coerce_path(name: str, value: Any, where: str, base_dir: Path) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise ConfigError(f"{where}: {name} must be a path, got {_describe(value)}")
    path = Path(value).expanduser()
    return path if path.is_absolute() else base_dir / path


def _check_trace(config: PipelineConfig) -> None:
    if config.workload == "replay" and config.trace is None:
        raise ConfigError("workload 'replay' needs a trace file: set trace (--trace FILE)")
    if config.workload != "replay" and config.trace is not None:
        raise ConfigError(
            f"trace {config.trace} is set but workload is {config.workload!r}; a trace is only read with "
            "workload 'replay' (to write one, use record_trace)"
        )


def _check_record_hidden(config: PipelineConfig) -> None:
    if config.record_hidden and config.record_trace is None:
        raise ConfigError("record_hidden records residuals into the routing trace, but no trace is written: "
                          "set record_trace (--record-trace FILE)")


def _check_predictors(config: PipelineConfig) -> None:
    from mer.predict.fusion import parse_predictor_names

    names = parse_predictor_names(config.predictors)
    if config.gate_model is not None and "gate" not in names:
        raise ConfigError(f"gate_model {config.gate_model} is set but predictors {config.predictors!r} has no gate")
    if config.max_pinned > 0 and config.max_pinned > config.cache_slots - config.top_k:
        raise ConfigError(
            f"max_pinned {config.max_pinned} leaves fewer than top_k {config.top_k} unpinned slots of cache_slots "
            f"{config.cache_slots}: use at most {max(config.cache_slots - config.top_k, 0)}"
        )


def _unknown_key_error(key: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(key, FIELDS, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(FIELDS)}"
    return ConfigError(f"{source}: unknown key {key!r} ({hint})")


def _checked_values(data: Mapping[str, Any], source: str, base_dir: Path) -> dict[str, Any]:
    values = {}
    for key, value in data.items():
        if key not in FIELDS:
            raise _unknown_key_error(str(key), source)
        values[key] = _coerce(FIELDS[key], value, source, base_dir)
    return values


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
    return _checked_values(data, str(path), path.resolve().parent)


def config_overrides(arguments: Any) -> dict[str, Any]:
    """The configuration keys set on the command line: parsed arguments (or a mapping) whose dest is
    a configuration key and whose value is not None. Declare flags with `default=None` (and
    `--no-prefetch` as `dest="prefetch", action="store_false", default=None`)."""
    values = arguments if isinstance(arguments, Mapping) else vars(arguments)
    return {key: value for key, value in values.items() if key in FIELDS and value is not None}


def _override_values(overrides: Mapping[str, Any]) -> dict[str, Any]:
    values = {}
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in FIELDS:
            raise _unknown_key_error(str(key), "command line")
        values[key] = _coerce(FIELDS[key], value, f"command-line flag {flag_name(key)}", Path.cwd())
    return values


def load_config(
    path: Path | str | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    available_cores: int | None = None,
) -> PipelineConfig:
    """Defaults, then the file at `path`, then the non-None `overrides`; checked and resolved for this
    machine (see `resolve_for_machine`). This is the one place a run's configuration is validated."""
    values = read_config_file(path) if path is not None else {}
    values.update(_override_values(overrides or {}))
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
    return dataclasses.replace(config, compute_workers=workers)


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
