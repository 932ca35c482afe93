"""The jobs' messages on `control.sock` (docs/pipeline.md, "Jobs"): the typed start message of the
benchmark, generation and perplexity jobs, what the router reports while one runs, and `JobDone`.
The serving job's messages: `mer.protocol.serving_messages`.
"""

from dataclasses import field as dataclass_field

from mer.errors import ConfigError
from mer.protocol.kinds import MessageKind
from mer.protocol.schema import JsonMap, message
from mer.protocol.shard_messages import RemoteShardsSpec


# --- control.sock: the benchmark and generation jobs ----------------------------------------------


@message(MessageKind.JOB_DONE)
class JobDone:
    """The router finished its job; `summary` is the job's typed summary as JSON (`mer.metrics.summary`)."""

    summary: JsonMap


@message(MessageKind.START_BENCHMARK, 2)
class StartBenchmark:
    """Every child is ready: run the expert-streaming benchmark of the run's configuration (its experts on
    `remote_shards` when given: `run --cluster`)."""

    remote_shards: RemoteShardsSpec | None = None

    def __post_init__(self) -> None:
        if self.remote_shards is not None:
            self.remote_shards.check()


@message(MessageKind.START_GENERATION, 2)
class StartGeneration:
    """Every child is ready: generate from `model` after the prompt's token ids (used exactly as given).

    Checked when built (in the CLI, before any process starts) and when decoded: a bad field is a
    `ConfigError` naming it."""

    model: str  # the GGUF whose dense weights the router maps (its experts are in the run's store)
    prompt_tokens: list[int]
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # the sampler's top-k (0: no cut); the routing k comes from the model
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    end_ids: list[int] = dataclass_field(default_factory=list)  # ids that end generation (EOS, end of turn)
    dump_logits: str | None = None  # .npy file for the logits each generated token was chosen from
    remote_shards: RemoteShardsSpec | None = None  # the experts on remote shard groups (`--cluster`)

    def __post_init__(self) -> None:
        if self.remote_shards is not None:
            self.remote_shards.check()
        if not self.prompt_tokens:
            raise ConfigError("the prompt is empty: generation needs at least one token")
        for name in ("prompt_tokens", "end_ids"):
            values = getattr(self, name)
            if any(isinstance(value, bool) or not isinstance(value, int) or value < 0 for value in values):
                raise ConfigError(f"{name} must be token ids (integers >= 0), got {list(values)[:8]}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise ConfigError(f"max_tokens must be an integer >= 0, got {self.max_tokens!r}")


@message(MessageKind.TOKEN_GENERATED)
class TokenGenerated:
    """The router chose the `index`-th generated token (a generation job), sent as soon as it is known."""

    index: int
    token: int


# --- control.sock: the perplexity job (`mer-pipeline perplexity`) ---------------------------------


@message(MessageKind.START_PERPLEXITY)
class StartPerplexity:
    """Every child is ready: compute the perplexity of `tokens` (the text's ids, BOS first when the
    vocabulary adds one) with `model`, in `num_chunks` chunks of `context` tokens, each chunk's first
    token replaced by `bos_id` when it is not None (`mer.model.perplexity`). Checked when built (in the
    CLI, before any process starts) and when decoded."""

    model: str  # the GGUF whose dense weights the router maps (its experts are in the run's store)
    tokens: list[int]
    context: int
    num_chunks: int
    bos_id: int | None = None

    def __post_init__(self) -> None:
        if any(isinstance(value, bool) or not isinstance(value, int) or value < 0 for value in self.tokens):
            raise ConfigError(f"tokens must be token ids (integers >= 0), got {list(self.tokens)[:8]}")
        if self.context < 4 or self.num_chunks < 1 or self.num_chunks * self.context > len(self.tokens):
            raise ConfigError(f"StartPerplexity: {self.num_chunks} chunks of {self.context} tokens do not fit "
                              f"{len(self.tokens)} tokens (context >= 4, chunks >= 1)")


@message(MessageKind.PERPLEXITY_CHUNK)
class PerplexityChunk:
    """A chunk is scored (router -> supervisor): `chunk` (0-based) of `num_chunks`, its `count` scored
    tokens with the sums of their negative log-likelihoods `nll` and of their squares `nll2`, the
    perplexity over every chunk so far (`running_ppl`) and the chunk's seconds."""

    chunk: int
    num_chunks: int
    count: int
    nll: float
    nll2: float
    running_ppl: float
    seconds: float
