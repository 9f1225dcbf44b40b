"""A llama GGUF file written from a small Hugging Face llama (the loader's GGUF path, tested
without the real SmolLM2 file)."""

import json
from pathlib import Path

import gguf

from editfast.models.load import BUNDLED_TOKENIZER


def write_llama_gguf(model, path: Path) -> None:
    """A llama GGUF as llama.cpp lays it out (blk.N.* names, q/k rows permuted for its rope),
    fp32, with a small self-consistent BPE tokenizer cut from the bundled one (parsing the full
    49k-token vocabulary from GGUF takes seconds)."""
    cfg, sd = model.config, model.state_dict()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    tj = json.loads((BUNDLED_TOKENIZER / "tokenizer.json").read_text())
    vocab, merges = tj["model"]["vocab"], tj["model"]["merges"][:100]
    tokens = sorted(vocab, key=vocab.get)[:273] + ["".join(m) for m in merges]  # 17 special, 256 bytes
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if i < 17 else 1 for i in range(len(tokens))])
    w.add_token_merges([" ".join(m) for m in merges])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def permute(t, n_heads):
        n, d = t.shape
        return t.reshape(n_heads, 2, n // n_heads // 2, d).swapaxes(1, 2).reshape(n, d)

    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].numpy())  # tied: no output.weight
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            t = permute(t, cfg.num_attention_heads) if gg == "attn_q" else t
            t = permute(t, cfg.num_key_value_heads) if gg == "attn_k" else t
            w.add_tensor(f"blk.{i}.{gg}.weight", t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
