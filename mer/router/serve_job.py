"""The serving job, run by the router: continuous batching of requests over THE forward pass.

The third job kind (next to `BenchJob` and `GenerateJob`; docs/serving.md). The router loads the
model once, then steps the running sequences together until Shutdown:

1. between steps, sequences cancelled by the supervisor (client gone, stop string matched) leave and
   waiting ones are admitted (`mer.router.serve_batch.ServingBatch`: `max_sequences`, the KV pool);
2. one pass (`ForwardPass.step`) runs every decoding sequence's last token and the next prompt chunks
   of newcomers (`prefill_chunk` tokens each, the chunks `generate` runs, at most `prefill_chunk` prompt
   tokens per step: a long prompt does not stall the others). Attention is per sequence; at each MoE block the rows of all of them are
   grouped by expert, so each chosen expert is acquired once and computed on one slot as one batch
   (the dispatcher of the other jobs, with the step's number as its token);
3. each sequence samples its next token with its own sampler; `SequenceToken` goes to the supervisor
   at once, `SequenceDone` when a stop rule ends it (its KV positions go back to the pool);
4. `ServeStep` reports the step, the cumulative counters (expert lookups, the I/O worker's reads, each
   compute worker's kernel time) and a snapshot of the cache (experts resident per MoE layer, pinned
   slots, the I/O queue).

Every kernel computes a row with the same bits whatever its batch, so a greedy sequence gets exactly
the tokens `mer-pipeline generate` gives it alone (tests/unit/test_batch_invariance.py,
tests/e2e/test_serve.py). With nothing to run the job waits for a request.

A step whose expert could not be read or used (a read that keeps failing or hangs, a payload whose
checksum does not match, too few slots left in service, an output with NaN or inf: `STEP_FAILURES`)
ends the sequences of that step with an error naming the expert, the file and the offset
(`serve_step_failed`; their rows were batched together, so which of them needed the expert is not
known); the server goes on with the others.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np

from mer.errors import RemoteError, expert_unusable_types
from mer.metrics.summary import JobSummary
from mer.model.forward import ForwardPass, Segment
from mer.model.sampling import Sampler
from mer.protocol import CancelSequence, SequenceDone, SequenceToken, ServeStep, StartServing, SubmitSequence
from mer.router.graph_forward import DenseThread, GraphExperts
from mer.router.job import sends_hidden
from mer.router.model_job import ModelJob
from mer.router.remote_dispatcher import RemoteDispatcher
from mer.router.serve_batch import STOP_CANCELLED, KVPool, ServedSequence, ServingBatch

STEP_FAILURES = expert_unusable_types()  # end a step, not the server (mer.errors.ExpertUnusableError)


@dataclass(frozen=True)
class TokenChoice:
    """A sampled token, with its log probability and the most likely alternatives when asked for."""

    token: int
    logprob: float | None = None
    top_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()


def choose_token(sequence: ServedSequence, logits: np.ndarray) -> TokenChoice:
    """The sequence's next token from its logits (its own sampler); logprobs from the raw logits' log-softmax."""
    token = sequence.sampler.sample(logits)
    if not sequence.logprobs:
        return TokenChoice(token)
    values = np.asarray(logits, dtype=np.float64)
    shifted = values - values.max()
    logprobs = shifted - np.log(np.exp(shifted).sum())
    top = np.argsort(-logprobs, kind="stable")[: sequence.logprobs]
    return TokenChoice(token, float(logprobs[token]), tuple(int(i) for i in top), tuple(float(logprobs[i]) for i in top))


class ServeJob(ModelJob):
    """Serves requests with continuous batching until Shutdown (see the module docstring)."""

    start: StartServing

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.wake = asyncio.Event()
        self.batch: ServingBatch | None = None
        self.early: list[SubmitSequence | CancelSequence] = []  # requests before the model was loaded
        self.context_length = 0
        self.step = 0
        self.reported_busy = False  # the last ServeStep had sequences running or waiting

    async def on_request(self, message: SubmitSequence | CancelSequence) -> None:
        """A request or a cancellation from the supervisor; taken between steps."""
        if self.batch is None:
            self.early.append(message)
            return
        if isinstance(message, CancelSequence):
            waiting = self.batch.cancel(message.request_id, message.reason)
            if waiting is not None:
                await self._done(waiting, STOP_CANCELLED)
        else:
            try:
                self.batch.submit(self._sequence(message))
            except Exception as error:  # a request the router cannot take ends with an error, never silently
                await self.send_control(SequenceDone(message.request_id, "error", len(message.prompt_tokens), 0,
                                                     str(error)))
                return
        self.wake.set()

    def _sequence(self, message: SubmitSequence) -> ServedSequence:
        capacity = min(len(message.prompt_tokens) + message.max_tokens, self.context_length,
                       self.start.kv_positions)
        if len(message.prompt_tokens) > capacity:
            raise ValueError(f"the prompt has {len(message.prompt_tokens)} tokens: more than {capacity} KV positions")
        sampler = Sampler(message.temperature, message.top_k, message.top_p, message.seed)
        return ServedSequence(message.request_id, list(message.prompt_tokens), message.max_tokens, sampler,
                              frozenset(self.start.end_ids), message.ignore_eos, message.logprobs, capacity)

    async def run(self) -> JobSummary:
        dense = DenseThread()
        try:
            model, warm_up_s = await self.load_model(dense)
            self.context_length = model.hparams.context_length
            experts = GraphExperts(self.dispatcher, self.observe, self.log, num_moe_layers=len(model.moe_layers),
                                   prompt_length=0, send_hidden=sends_hidden(self.config),
                                   log_blocks=bool(self.config.log_file))
            forward_pass = ForwardPass(model, experts, dense, experts)
            self.batch = ServingBatch(self.start.max_sequences, KVPool(self.start.kv_positions), model.new_kv_cache)
            self.log.info("serving_started", model=self.start.model, max_sequences=self.start.max_sequences,
                          kv_positions=self.start.kv_positions, cache_slots=self.config.cache_slots,
                          dense_warm_up_s=round(warm_up_s, 3))
            await self._report(experts, 0, 0, 0, 0.0)
            for message in self.early:
                await self.on_request(message)
            self.early.clear()
            while True:
                await self._next_step(forward_pass, experts, dense)
        finally:
            dense.close()

    def _shard_links(self) -> list:
        """The remote shard groups' counters (`serve --cluster`), else none."""
        return self.dispatcher.shard_link_counts() if isinstance(self.dispatcher, RemoteDispatcher) else []

    async def _next_step(self, forward_pass: ForwardPass, experts: GraphExperts, dense: DenseThread) -> None:
        """Let the cancelled leave and the waiting in, then run one step of every running sequence."""
        batch = self.batch
        assert batch is not None
        for sequence in batch.cancelled():
            await self._done(sequence, STOP_CANCELLED)
        for sequence in batch.admit():
            self.log.info("sequence_started", request_id=sequence.request_id, prompt_tokens=len(sequence.prompt),
                          max_tokens=sequence.max_tokens, kv_positions=sequence.capacity, step=self.step)
        if not batch.running:
            if self.reported_busy:  # cancellations emptied the batch: say so before waiting
                await self._report(experts, 0, 0, 0, 0.0)
            self.wake.clear()
            await self.wake.wait()
            return
        planned = batch.plan_step(self.config.prefill_chunk)
        prefill_tokens = sum(len(tokens) for sequence, tokens in planned if sequence.is_prefill)
        num_tokens = sum(len(tokens) for _, tokens in planned)
        self.step += 1
        started = time.perf_counter()
        try:
            result = await forward_pass.step([Segment(tokens, sequence.kv_cache) for sequence, tokens in planned],
                                             clock=self.step)
        except RemoteError as error:
            if error.error_type not in STEP_FAILURES:
                raise
            await self._fail_step([sequence for sequence, _ in planned], error)
            return
        sampling = [(sequence, row) for (sequence, tokens), row in zip(planned, result.logits) if sequence.ran(len(tokens))]
        choices = await dense(lambda: [choose_token(sequence, row) for sequence, row in sampling])
        for (sequence, _), choice in zip(sampling, choices):
            stop = sequence.accept(choice.token)
            await self.send_control(SequenceToken(sequence.request_id, len(sequence.tokens) - 1, choice.token,
                                                  choice.logprob, list(choice.top_ids), list(choice.top_logprobs)))
            if stop is not None:
                await self._done(sequence, stop)
        step_us = (time.perf_counter() - started) * 1e6
        await self._report(experts, len(planned), num_tokens, prefill_tokens, step_us)

    async def _fail_step(self, sequences: list[ServedSequence], error: RemoteError) -> None:
        """End the sequences of a step an expert read failed with the error; their KV positions go back."""
        self.log.error("serve_step_failed", step=self.step, request_ids=[sequence.request_id for sequence in sequences],
                       error_type=error.error_type, error=error.remote_message)
        for sequence in sequences:
            await self._done(sequence, "error", error.remote_message)

    async def _done(self, sequence: ServedSequence, stop_reason: str, error: str = "") -> None:
        assert self.batch is not None
        self.batch.finish(sequence)
        self.log.info("sequence_done", request_id=sequence.request_id, stop_reason=stop_reason,
                      prompt_tokens=len(sequence.prompt), tokens=len(sequence.tokens),
                      reason=sequence.cancel_reason or None)
        await self.send_control(SequenceDone(sequence.request_id, stop_reason, len(sequence.prompt),
                                             len(sequence.tokens), error))

    async def _report(self, experts: GraphExperts, sequences: int, tokens: int, prefill_tokens: int,
                      step_us: float) -> None:
        """`ServeStep` with this step's batch and the cumulative counters (the I/O worker's asked for now)."""
        batch = self.batch
        assert batch is not None
        io = await self.io.stats()
        lookups = experts.decode  # every served token counts as a decode token (prompt_length 0)
        resident = [0] * self.manifest.geometry.num_moe_layers
        for expert_id in io.slot_experts:
            if expert_id >= 0:
                resident[self.manifest.expert(expert_id).moe_layer] += 1
        step = ServeStep(self.step, sequences, tokens, prefill_tokens, round(step_us, 1), len(batch.running),
                         batch.num_waiting, batch.pool.num_used, lookups.hits, lookups.misses,
                         round(lookups.io_wait_us, 1), round(lookups.compute_us, 1), io.reads.reads, io.reads.nbytes,
                         io.prefetch.issued, io.prefetch.used, io.prefetch.wasted,
                         [round(busy, 1) for busy in self.compute.busy_us], resident, sum(resident), io.pinned_slots,
                         io.queue_depth, self._shard_links())
        self.reported_busy = bool(batch.running or batch.waiting)
        if self.config.log_file and sequences:
            self.log.info("serve_step", step=self.step, sequences=sequences, tokens=tokens,
                          prefill_tokens=prefill_tokens, step_us=round(step_us, 1))
        await self.send_control(step)
