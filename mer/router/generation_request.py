"""What a generation job asks for, shipped from the CLI to the router in `StartJob.job`.

The job dict is JSON (`kind: "generate"` plus the fields below); the router rebuilds the request
with `GenerationRequest.from_job`, which checks every field and raises `ConfigError` naming it. A
`StartJob` without a `kind` (or with `kind: "benchmark"`) runs the benchmark job, as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from mer.errors import ConfigError

GENERATE_KIND = "generate"
BENCHMARK_KIND = "benchmark"


def job_kind(job: Mapping[str, Any]) -> str:
    """`generate` or `benchmark` (the default of a job dict without a kind)."""
    kind = job.get("kind", BENCHMARK_KIND)
    if kind not in (GENERATE_KIND, BENCHMARK_KIND):
        raise ConfigError(f"StartJob.job kind {kind!r} is not one of {GENERATE_KIND}, {BENCHMARK_KIND}")
    return kind


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: the model, the prompt's token ids (used exactly as given) and the sampler."""

    model: str  # the GGUF whose dense weights the router maps (its experts are in the run's store)
    prompt_tokens: tuple[int, ...]
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # the sampler's top-k (0: no cut); the routing k comes from the model
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    end_ids: tuple[int, ...] = ()  # ids that end generation (EOS and other end-of-turn tokens)
    dump_logits: str | None = None  # .npy file for the logits each generated token was chosen from

    def __post_init__(self) -> None:
        if not self.prompt_tokens:
            raise ConfigError("the prompt is empty: generation needs at least one token")
        for name in ("prompt_tokens", "end_ids"):
            values = getattr(self, name)
            if any(isinstance(value, bool) or not isinstance(value, int) or value < 0 for value in values):
                raise ConfigError(f"{name} must be token ids (integers >= 0), got {list(values)[:8]}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise ConfigError(f"max_tokens must be an integer >= 0, got {self.max_tokens!r}")

    def to_job(self) -> dict[str, Any]:
        """The JSON-ready `StartJob.job` dict."""
        data = asdict(self)
        data["prompt_tokens"], data["end_ids"] = list(self.prompt_tokens), list(self.end_ids)
        return {"kind": GENERATE_KIND, **data}

    @classmethod
    def from_job(cls, job: Mapping[str, Any]) -> "GenerationRequest":
        """The request of a job dict written by `to_job`; unknown or missing keys are a `ConfigError`."""
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(job) - known - {"kind"})
        if unknown:
            raise ConfigError(f"generation job: unknown keys {unknown}")
        missing = sorted({"model", "prompt_tokens", "max_tokens"} - set(job))
        if missing:
            raise ConfigError(f"generation job: missing keys {missing}")
        values = {key: value for key, value in job.items() if key in known}
        values["prompt_tokens"] = tuple(values["prompt_tokens"])
        values["end_ids"] = tuple(values.get("end_ids", ()))
        return cls(**values)
