"""Export a `tools/train_tiny_moe.py` checkpoint to GGUF in llama.cpp's naming (arch `llama`, MoE).

    python tools/export_tiny_moe.py build/tiny-moe.pt mer/models/tiny-moe-q8_0.gguf

Metadata: `llama.*` hyper-parameters with `expert_count` / `expert_used_count`, and the
SentencePiece vocabulary of `tools/tiny_moe_data.py` (bytes, U+2581 and the learned pieces, scored -rank) (`add_space_prefix = false`, BOS added, no EOS).
Tensors: `token_embd`, per block `attn_{norm,q,k,v,output}`, `ffn_norm`, the router `ffn_gate_inp`
and the merged experts `ffn_{gate,up,down}_exps` ([experts, rows, columns]), `output_norm`, `output`.
Every matrix is q8_0 (quantized by `gguf.quants`; `--type f32` keeps float32) except the router;
norms and router are f32, as llama.cpp's own quantizer leaves them. Same checkpoint, same bytes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType
from gguf.quants import quantize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_moe_data import BASE_TOKENS, BOS_ID, EOS_ID, UNK_ID, token_scores, token_strings  # noqa: E402

ARCH = "llama"
MATRIX_TYPES = {"q8_0": LlamaFileType.MOSTLY_Q8_0, "f32": LlamaFileType.ALL_F32}


def _add_metadata(writer: GGUFWriter, config: dict, args: dict, history: list[dict], file_type: LlamaFileType) -> None:
    head_dim = config["d_model"] // config["n_heads"]
    writer.add_name("mer tiny MoE (Python stdlib)")
    writer.add_description(
        f"Mixtral-style MoE trained by mer's tools/train_tiny_moe.py for {args['steps']} steps (seed {args['seed']}) "
        f"on the .py files of the Python standard library; held-out "
        f"{history[-1].get('held_out_bits_per_byte', float('nan')):.3f} bits/byte")
    writer.add_license("PSF-2.0 (training data: the Python standard library)")
    writer.add_context_length(config["context"])
    writer.add_embedding_length(config["d_model"])
    writer.add_block_count(config["n_layers"])
    writer.add_feed_forward_length(config["d_ff"])
    writer.add_head_count(config["n_heads"])
    writer.add_head_count_kv(config["n_kv_heads"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["norm_eps"])
    writer.add_expert_count(config["n_experts"])
    writer.add_expert_used_count(config["top_k"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(file_type)
    _add_vocabulary(writer)


def _add_vocabulary(writer: GGUFWriter) -> None:
    tokens = token_strings()
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(list(token_scores()))
    writer.add_token_types([TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
                           + [TokenType.NORMAL] * (len(tokens) - len(BASE_TOKENS) + 1))
    writer.add_unk_token_id(UNK_ID)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)


def _array(state: dict, name: str) -> np.ndarray:
    return state[name].detach().to(torch.float32).numpy().copy()


def model_tensors(state: dict, n_layers: int) -> list[tuple[str, np.ndarray, bool]]:
    """(GGUF name, float32 array, quantize?) in file order."""
    tensors = [("token_embd.weight", _array(state, "embedding.weight"), True)]
    for block in range(n_layers):
        source, target = f"blocks.{block}", f"blk.{block}"
        tensors += [
            (f"{target}.attn_norm.weight", _array(state, f"{source}.attn_norm.weight"), False),
            (f"{target}.attn_q.weight", _array(state, f"{source}.attention.q.weight"), True),
            (f"{target}.attn_k.weight", _array(state, f"{source}.attention.k.weight"), True),
            (f"{target}.attn_v.weight", _array(state, f"{source}.attention.v.weight"), True),
            (f"{target}.attn_output.weight", _array(state, f"{source}.attention.o.weight"), True),
            (f"{target}.ffn_norm.weight", _array(state, f"{source}.ffn_norm.weight"), False),
            (f"{target}.ffn_gate_inp.weight", _array(state, f"{source}.moe.router.weight"), False),
            (f"{target}.ffn_gate_exps.weight", _array(state, f"{source}.moe.gate"), True),
            (f"{target}.ffn_up_exps.weight", _array(state, f"{source}.moe.up"), True),
            (f"{target}.ffn_down_exps.weight", _array(state, f"{source}.moe.down"), True),
        ]
    tensors += [("output_norm.weight", _array(state, "output_norm.weight"), False),
                ("output.weight", _array(state, "output.weight"), True)]
    return tensors


def export(checkpoint_path: Path, gguf_path: Path, matrix_type: str = "q8_0") -> None:
    """Write the GGUF of the checkpoint at `checkpoint_path` to `gguf_path`, its matrices in
    `matrix_type` ("q8_0" as shipped, or "f32" to check the export exactly)."""
    if matrix_type not in MATRIX_TYPES:
        raise ValueError(f"matrix_type must be one of {sorted(MATRIX_TYPES)}, got {matrix_type!r}")
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    config = checkpoint["config"]
    if config["vocab_size"] != len(token_strings()):
        raise SystemExit(f"{checkpoint_path}: trained with a vocabulary of {config['vocab_size']} tokens, but "
                         f"tools/tiny_moe_vocab.json gives {len(token_strings())}: export with the vocabulary it was trained on")
    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(gguf_path, ARCH)
    _add_metadata(writer, config, checkpoint["args"], checkpoint["history"], MATRIX_TYPES[matrix_type])
    for name, array, quantized in model_tensors(checkpoint["state"], config["n_layers"]):
        if quantized and matrix_type == "q8_0":
            writer.add_tensor(name, quantize(array, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"wrote {gguf_path} ({gguf_path.stat().st_size / 1e6:.1f} MB)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("gguf", type=Path)
    parser.add_argument("--type", choices=sorted(MATRIX_TYPES), default="q8_0", help="Type of the matrices (q8_0).")
    args = parser.parse_args(argv)
    export(args.checkpoint, args.gguf, args.type)


if __name__ == "__main__":
    main()
