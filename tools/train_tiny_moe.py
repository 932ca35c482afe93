"""Train the tiny Mixtral-architecture MoE model that mer ships (`mer/models/tiny-moe-q8_0.gguf`).

    /work/venv/bin/pip install -e '.[train]'        # torch==2.13.0 (CPU), a development-only extra
    python tools/train_tiny_moe.py --out build/tiny-moe.pt      # the defaults are the shipped model's
    python tools/export_tiny_moe.py build/tiny-moe.pt mer/models/tiny-moe-q8_0.gguf

The model is what llama.cpp builds for arch `llama` with `expert_count`: RMSNorm (weighted, eps
1e-5), grouped-query attention with RoPE on (2i, 2i+1) pairs (llama's "normal" rope type, theta
10000), every block's FFN a mixture of SwiGLU experts (softmax over all experts, top-k,
renormalised), final RMSNorm and an untied output head. Vocabulary and data: `tools/tiny_moe_data.py`
(4,096 SentencePiece tokens: bytes, U+2581 and 3,836 learned pieces; the standard library's `.py` files, ~5% of them held out by path).

Training: AdamW, linear warm-up then cosine decay, gradient clipping at 1, random windows of
`--context` tokens, cross-entropy plus a Switch-style load-balancing loss
(`--balance` x n_experts x sum_i fraction_i x mean_probability_i) that keeps the routing spread without
making it uniform. Everything is seeded (`--seed`) and runs on `--threads` CPU threads, so a run is
reproducible on the same machine and torch build. Progress and the held-out loss in bits per byte
(the predicted tokens' bits over the bytes of text they stand for, `tiny_moe_data.token_byte_counts`)
are printed as it goes; the checkpoint
(weights, config, history, and the optimizer's and data order's state) is written every
`--eval-every` steps and at the end, so `--resume` continues an interrupted run where its last
checkpoint left it, with the same data order and losses as an uninterrupted run.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as functional
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_moe_data  # noqa: E402
from tiny_moe_data import corpus_ids, split_files, token_byte_counts  # noqa: E402


@dataclass(frozen=True)
class TinyMoEConfig:
    """The architecture (what the export writes into the GGUF)."""

    vocab_size: int = 0  # the vocabulary's size (tools/tiny_moe_vocab.json) unless given
    d_model: int = 192
    n_layers: int = 6
    n_heads: int = 8
    n_kv_heads: int = 2
    n_experts: int = 8
    top_k: int = 2
    d_ff: int = 512
    context: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if not self.vocab_size:
            object.__setattr__(self, "vocab_size", tiny_moe_data.VOCAB_SIZE)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def rope_tables(config: TinyMoEConfig, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [length, head_dim / 2] of RoPE on (2i, 2i+1) pairs."""
    half = config.head_dim // 2
    inverse = config.rope_theta ** (-torch.arange(half, dtype=torch.float64) * 2 / config.head_dim)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inverse[None, :]
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` [batch, heads, T, head_dim] on adjacent pairs (llama.cpp's normal rope type)."""
    even, odd = x[..., 0::2], x[..., 1::2]
    rotated_even, rotated_odd = even * cos - odd * sin, even * sin + odd * cos
    return torch.stack((rotated_even, rotated_odd), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, config: TinyMoEConfig):
        super().__init__()
        self.config = config
        kv_width = config.n_kv_heads * config.head_dim
        self.q = nn.Linear(config.d_model, config.d_model, bias=False)
        self.k = nn.Linear(config.d_model, kv_width, bias=False)
        self.v = nn.Linear(config.d_model, kv_width, bias=False)
        self.o = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        c = self.config
        q = self.q(x).view(batch, length, c.n_heads, c.head_dim).transpose(1, 2)
        k = self.k(x).view(batch, length, c.n_kv_heads, c.head_dim).transpose(1, 2)
        v = self.v(x).view(batch, length, c.n_kv_heads, c.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o(out.transpose(1, 2).reshape(batch, length, c.d_model))


class MixtureOfExperts(nn.Module):
    """Router + SwiGLU experts; experts run only on the tokens routed to them."""

    def __init__(self, config: TinyMoEConfig):
        super().__init__()
        self.config = config
        e, d, f = config.n_experts, config.d_model, config.d_ff
        self.router = nn.Linear(d, e, bias=False)
        self.gate = nn.Parameter(torch.randn(e, f, d) / math.sqrt(d))
        self.up = nn.Parameter(torch.randn(e, f, d) / math.sqrt(d))
        self.down = nn.Parameter(torch.randn(e, d, f) / math.sqrt(f) / math.sqrt(2 * config.n_layers))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(output, balance loss, expert counts) for `x` [batch, T, d_model]."""
        flat = x.reshape(-1, x.shape[-1])
        probabilities = self.router(flat).softmax(dim=-1)
        weights, experts = probabilities.topk(self.config.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(flat)
        counts = torch.bincount(experts.flatten(), minlength=self.config.n_experts)
        for expert in range(self.config.n_experts):
            rows, slot = (experts == expert).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            tokens = flat[rows]
            hidden = functional.silu(tokens @ self.gate[expert].T) * (tokens @ self.up[expert].T)
            out.index_add_(0, rows, (hidden @ self.down[expert].T) * weights[rows, slot, None])
        fraction = counts.float() / experts.numel()
        balance = self.config.n_experts * (fraction * probabilities.mean(dim=0)).sum()
        return out.view_as(x), balance, counts


class Block(nn.Module):
    def __init__(self, config: TinyMoEConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.moe = MixtureOfExperts(config)

    def forward(self, x, cos, sin):  # type: ignore[no-untyped-def]
        x = x + self.attention(self.attn_norm(x), cos, sin)
        moe_out, balance, counts = self.moe(self.ffn_norm(x))
        return x + moe_out, balance, counts


class TinyMoE(nn.Module):
    def __init__(self, config: TinyMoEConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.output_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.output = nn.Linear(config.d_model, config.vocab_size, bias=False)
        for name, parameter in self.named_parameters():
            if parameter.dim() == 2 and "router" not in name:
                nn.init.normal_(parameter, std=0.02)
        for block in self.blocks:
            nn.init.normal_(block.attention.o.weight, std=0.02 / math.sqrt(2 * config.n_layers))
        cos, sin = rope_tables(config, config.context)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(logits [batch, T, vocab], mean balance loss, per-layer expert counts)."""
        length = ids.shape[1]
        cos, sin = self.cos[:length], self.sin[:length]
        x = self.embedding(ids)
        balances, counts = [], []
        for block in self.blocks:
            x, balance, count = block(x, cos, sin)
            balances.append(balance)
            counts.append(count)
        return self.output(self.output_norm(x)), torch.stack(balances).mean(), counts


BYTE_COUNTS = token_byte_counts()  # bytes of text per id: bits per byte = bits / these


def random_windows(data: np.ndarray, rng: np.random.Generator, batch: int, length: int) -> torch.Tensor:
    starts = rng.integers(0, len(data) - length - 1, size=batch)
    return torch.from_numpy(np.stack([data[s : s + length + 1] for s in starts]).astype(np.int64))


@torch.no_grad()
def held_out_bits_per_byte(model: TinyMoE, data: np.ndarray, windows: int, length: int) -> float:
    """Next-token cross-entropy in bits per byte of text over `windows` evenly spaced held-out windows."""
    model.eval()
    starts = np.linspace(0, len(data) - length - 2, windows).astype(np.int64)
    batch = torch.from_numpy(np.stack([data[s : s + length + 1] for s in starts]).astype(np.int64))
    total = 0.0
    for chunk in batch.split(16):
        logits, _, _ = model(chunk[:, :-1])
        total += functional.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
    model.train()
    return total / math.log(2) / int(BYTE_COUNTS[batch[:, 1:].numpy()].sum())


def unigram_bits_per_byte(train: np.ndarray, held_out: np.ndarray) -> float:
    """Cross-entropy in bits per byte of a unigram model (add-one smoothed training counts) on held-out ids."""
    counts = np.bincount(train, minlength=len(BYTE_COUNTS)).astype(np.float64) + 1.0
    log_probabilities = np.log2(counts / counts.sum())
    return float(-log_probabilities[held_out[1:]].sum() / BYTE_COUNTS[held_out[1:]].sum())


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def save_checkpoint(path: Path, model: TinyMoE, args: argparse.Namespace, history: list[dict],
                    optimizer: torch.optim.Optimizer, rng: np.random.Generator, step: int) -> None:
    """Write the checkpoint atomically: the model (what the export reads) and what `--resume` needs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    torch.save({"config": asdict(model.config), "state": model.state_dict(), "args": vars(args),
                "history": history, "step": step, "optimizer": optimizer.state_dict(),
                "data_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state()}, temporary)
    temporary.replace(path)


RESUME_MUST_MATCH = ("steps", "batch", "context", "d_model", "d_ff", "layers", "heads", "kv_heads", "experts",
                     "lr", "warmup", "weight_decay", "balance", "seed")


def resume_state(path: Path, args: argparse.Namespace) -> dict:
    """The checkpoint at `path` to continue from; its run's settings must be this run's."""
    if not path.exists():
        raise SystemExit(f"--resume: no checkpoint at {path}")
    checkpoint = torch.load(path, weights_only=False)
    if "optimizer" not in checkpoint:
        raise SystemExit(f"--resume: {path} has no optimizer state (written before --resume existed)")
    saved = checkpoint["args"]
    different = [f"--{key.replace('_', '-')} {saved.get(key)} (checkpoint) vs {getattr(args, key)} (now)"
                 for key in RESUME_MUST_MATCH if saved.get(key) != getattr(args, key)]
    if different:
        raise SystemExit(f"--resume: {path} was trained with other settings: " + "; ".join(different))
    return checkpoint


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("build/tiny-moe.pt"))
    parser.add_argument("--steps", type=int, default=3600)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--d-model", type=int, default=192)
    parser.add_argument("--d-ff", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--balance", type=float, default=0.01)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--resume", action="store_true",
                        help="continue the run whose checkpoint is --out (same settings) from its last step")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    train_files, held_out_files = split_files()
    train, held_out = corpus_ids(train_files), corpus_ids(held_out_files)
    unigram = unigram_bits_per_byte(train, held_out)
    print(f"data: {len(train_files)} training files ({len(train):,} tokens), {len(held_out_files)} held out "
          f"({len(held_out):,} tokens); unigram held-out {unigram:.3f} bits/byte", flush=True)
    config = TinyMoEConfig(d_model=args.d_model, d_ff=args.d_ff, n_layers=args.layers, context=args.context,
                           n_heads=args.heads, n_kv_heads=args.kv_heads, n_experts=args.experts)
    model = TinyMoE(config)
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, {config}", flush=True)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    history: list[dict] = [{"step": 0, "unigram_bits_per_byte": unigram}]
    first_step, seconds_before = 0, 0.0
    if args.resume:
        checkpoint = resume_state(args.out, args)
        model.load_state_dict(checkpoint["state"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        rng.bit_generator.state = checkpoint["data_rng"]
        torch.set_rng_state(checkpoint["torch_rng"])
        history, first_step = checkpoint["history"], checkpoint["step"]
        seconds_before = max((entry.get("seconds", 0.0) for entry in history), default=0.0)
        print(f"resumed from {args.out} at step {first_step} ({seconds_before:.0f} s of training before)", flush=True)
    started, window_loss = time.perf_counter() - seconds_before, []
    for step in range(first_step, args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        batch = random_windows(train, rng, args.batch, args.context)
        logits, balance, counts = model(batch[:, :-1])
        loss = functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        (loss + args.balance * balance).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        window_loss.append(loss.item() / math.log(2) * batch[:, 1:].numel() / int(BYTE_COUNTS[batch[:, 1:].numpy()].sum()))
        if (step + 1) % 25 == 0:
            usage = " ".join(f"{(c.max().item() / c.sum().item()):.2f}" for c in counts)
            print(f"step {step + 1}/{args.steps} train {np.mean(window_loss):.3f} bits/byte, balance "
                  f"{balance.item():.3f}, busiest expert share {usage}, {time.perf_counter() - started:.0f} s",
                  flush=True)
            window_loss = []
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            bits = held_out_bits_per_byte(model, held_out, args.eval_windows, args.context)
            history.append({"step": step + 1, "held_out_bits_per_byte": bits,
                            "seconds": time.perf_counter() - started})
            print(f"eval step {step + 1}: held-out {bits:.3f} bits/byte (unigram {unigram:.3f})", flush=True)
            save_checkpoint(args.out, model, args, history, optimizer, rng, step + 1)


if __name__ == "__main__":
    main()
