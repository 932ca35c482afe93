"""A plain-numpy float64 forward pass of a tiny MoE GGUF, independent of mer's code.

Reads the file with `gguf.GGUFReader`, dequantizes every tensor with `gguf.quants.dequantize`
and runs the whole model in float64 without any activation rounding: RMS norms, RoPE (exact
angles `position * base^(-2i/d)`; pairs (2i, 2i+1) for llama, (i, i + d/2) for qwen3moe and
olmoe), q/k norms (qwen3moe per head, olmoe over the whole projection), causal GQA attention,
softmax gating with top-k (renormalised for llama and qwen3moe, not for olmoe and qwen2moe) and
SwiGLU experts; for qwen2moe also the q/k/v biases and the shared expert scaled by
`1 / (1 + exp(-ffn_gate_inp_shexp · x))`. Only for tiny models with merged expert tensors: everything is dequantized up front.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

NEOX_ARCHITECTURES = ("qwen3moe", "olmoe", "qwen2moe")
RENORMALIZING_ARCHITECTURES = ("llama", "qwen3moe")


class ReferenceModel:
    """All tensors of a GGUF as float64 arrays (numpy shape: GGML shape reversed) plus its keys."""

    def __init__(self, path: str | Path):
        reader = GGUFReader(path)
        self.keys = {name: field.contents() for name, field in reader.fields.items()}
        self.arch = self.keys["general.architecture"]
        self.tensors = {
            tensor.name: dequantize(tensor.data, tensor.tensor_type).astype(np.float64).reshape(
                tuple(reversed([int(n) for n in tensor.shape])))
            for tensor in reader.tensors
        }

    def key(self, name: str, default=None):  # type: ignore[no-untyped-def]
        return self.keys.get(f"{self.arch}.{name}", default)

    def logits(self, token_ids: list[int]) -> np.ndarray:
        """float64 logits `[tokens, vocab]` of a sequence (positions 0..T-1)."""
        hidden = self.tensors["token_embd.weight"][np.asarray(token_ids)]
        for block in range(self.key("block_count")):
            hidden = hidden + self.attention(block, hidden)
            hidden = hidden + self.moe(block, rms_norm(hidden, self.tensors[f"blk.{block}.ffn_norm.weight"], self.eps))
        head = self.tensors.get("output.weight", self.tensors["token_embd.weight"])
        return rms_norm(hidden, self.tensors["output_norm.weight"], self.eps) @ head.T

    @property
    def eps(self) -> float:
        return float(self.key("attention.layer_norm_rms_epsilon"))

    def attention(self, block: int, hidden: np.ndarray) -> np.ndarray:
        t = lambda name: self.tensors[f"blk.{block}.{name}.weight"]  # noqa: E731
        num_heads = self.key("attention.head_count")
        num_kv_heads = self.key("attention.head_count_kv", num_heads)
        head_dim = self.key("attention.key_length", hidden.shape[1] // num_heads)
        x = rms_norm(hidden, t("attn_norm"), self.eps)
        q, k, v = x @ t("attn_q").T, x @ t("attn_k").T, x @ t("attn_v").T
        if self.arch == "qwen2moe":
            bias = lambda name: self.tensors[f"blk.{block}.{name}.bias"]  # noqa: E731
            q, k, v = q + bias("attn_q"), k + bias("attn_k"), v + bias("attn_v")
        if self.arch == "olmoe":
            q, k = rms_norm(q, t("attn_q_norm"), self.eps), rms_norm(k, t("attn_k_norm"), self.eps)
        q = q.reshape(len(hidden), num_heads, head_dim)
        k = k.reshape(len(hidden), num_kv_heads, head_dim)
        v = v.reshape(len(hidden), num_kv_heads, head_dim)
        if self.arch == "qwen3moe":
            q, k = rms_norm(q, t("attn_q_norm"), self.eps), rms_norm(k, t("attn_k_norm"), self.eps)
        base = float(self.key("rope.freq_base", 10000.0))
        q, k = rope(q, base, self.arch in NEOX_ARCHITECTURES), rope(k, base, self.arch in NEOX_ARCHITECTURES)
        out = np.empty_like(q)
        mask = np.triu(np.full((len(hidden), len(hidden)), -np.inf), 1)
        for head in range(num_heads):
            kv_head = head // (num_heads // num_kv_heads)
            scores = q[:, head] @ k[:, kv_head].T / np.sqrt(head_dim) + mask
            weights = np.exp(scores - scores.max(axis=1, keepdims=True))
            out[:, head] = (weights / weights.sum(axis=1, keepdims=True)) @ v[:, kv_head]
        return out.reshape(len(hidden), -1) @ t("attn_output").T

    def moe(self, block: int, x: np.ndarray) -> np.ndarray:
        logits = x @ self.tensors[f"blk.{block}.ffn_gate_inp.weight"].T
        probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        top_k = self.key("expert_used_count")
        out = np.zeros_like(x)
        for token in range(len(x)):
            chosen = np.argsort(-probabilities[token])[:top_k]
            weights = probabilities[token, chosen]
            if self.arch in RENORMALIZING_ARCHITECTURES:
                weights = weights / weights.sum()
            for expert, weight in zip(chosen, weights):
                out[token] += weight * self.expert(block, int(expert), x[token])
        if self.arch == "qwen2moe":
            out += self.shared_expert(block, x)
        return out

    def shared_expert(self, block: int, x: np.ndarray) -> np.ndarray:
        t = lambda name: self.tensors[f"blk.{block}.{name}.weight"]  # noqa: E731
        gate, up = x @ t("ffn_gate_shexp").T, x @ t("ffn_up_shexp").T
        out = (gate / (1 + np.exp(-gate)) * up) @ t("ffn_down_shexp").T
        return out / (1 + np.exp(-(x @ t("ffn_gate_inp_shexp"))))[:, None]

    def expert(self, block: int, expert: int, x: np.ndarray) -> np.ndarray:
        matrices = [self.tensors[f"blk.{block}.ffn_{name}_exps.weight"][expert] for name in ("gate", "up", "down")]
        gate, up = matrices[0] @ x, matrices[1] @ x
        return matrices[2] @ (gate / (1 + np.exp(-gate)) * up)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope(x: np.ndarray, base: float, neox: bool) -> np.ndarray:
    """Rotate `[tokens, heads, d]` at positions 0..T-1."""
    tokens, _, dims = x.shape
    angles = np.arange(tokens)[:, None] * base ** (-2.0 * np.arange(dims // 2) / dims)
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    out = np.empty_like(x)
    if neox:
        first, second = x[..., : dims // 2], x[..., dims // 2 :]
        out[..., : dims // 2], out[..., dims // 2 :] = first * cos - second * sin, first * sin + second * cos
    else:
        even, odd = x[..., 0::2], x[..., 1::2]
        out[..., 0::2], out[..., 1::2] = even * cos - odd * sin, even * sin + odd * cos
    return out
