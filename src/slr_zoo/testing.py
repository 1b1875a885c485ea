"""Tiny stand-ins for pretrained checkpoints, written to disk the way users bring theirs: a Hugging
Face directory (``save_pretrained``, with a byte-level BPE tokenizer learnt from task text) or a
GGUF file in llama.cpp's layout (written with the ``gguf`` package). The tests use them, and so can
anyone who wants to try the fine-tuning path in a minute on a CPU; nothing is downloaded.

    python -m slr_zoo.testing DIRECTORY [--family llama|qwen2|mistral|gpt2] [--layers 4] [--gguf]

The weights are random: these are shapes to run, not models to learn from.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

FAMILIES = ("llama", "qwen2", "mistral", "gpt2")


def bpe_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer learnt from the default task's text: numbers split into pieces
    the way a pretrained model's tokenizer splits words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from slr_zoo.tasks.iterate import IterateTask
    from slr_zoo.tasks.prosqa import ProsQATask

    texts = []
    for task in (IterateTask(n_train=200, n_val=1), ProsQATask(n_train=20, n_val=1)):
        for record in task.records("train"):
            texts += [record["question"], record["answer"], *record["steps"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_config(family: str, vocab_size: int, layers: int, dropout: float = 0.0, tie: bool = True):
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    if family == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=32, n_head=2, n_layer=layers, n_positions=1024,
                          resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, tie_word_embeddings=tie)
    config = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[family]
    return config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                  attention_dropout=dropout, tie_word_embeddings=tie)


def save_tiny_pretrained(directory: Path, family: str = "llama", layers: int = 4, dropout: float = 0.0,
                         tie: bool = True, seed: int = 0):
    """A random tiny causal LM and its BPE tokenizer, saved with ``save_pretrained``; the model
    is returned in eval mode."""
    from transformers import AutoModelForCausalLM

    tokenizer = bpe_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer), layers, dropout, tie))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model.eval(), tokenizer


def _permute(w, heads: int):
    """llama.cpp's reordering of the query and key rows (transformers undoes it when reading)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, tokenizer, path: Path) -> Path:
    """A Llama model and its byte-level BPE tokenizer as an F32 GGUF file, in llama.cpp's layout."""
    from gguf import GGUFWriter

    c = model.config
    theta = getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"]
    w = GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    tokens = sorted(spec["model"]["vocab"], key=spec["model"]["vocab"].get)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in tokenizer.all_special_tokens else 1 for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]])
    w.add_bos_token_id(tokenizer.eos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_pad_token_id(tokenizer.pad_token_id)
    w.add_add_bos_token(False)
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def main(argv=None) -> int:
    import argparse

    from slr_zoo.arguments import positive_int

    parser = argparse.ArgumentParser(prog="python -m slr_zoo.testing", description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="the Hugging Face directory to write; with --gguf, a path "
                        "ending in .gguf names the GGUF file instead, and the directory is that path without it")
    parser.add_argument("--family", default="llama", choices=FAMILIES)
    parser.add_argument("--layers", type=positive_int, default=4)
    parser.add_argument("--gguf", action="store_true", help="also write DIRECTORY.gguf (llama only)")
    args = parser.parse_args(argv)
    directory, gguf = args.directory, args.directory.with_suffix(".gguf")
    if args.directory.suffix == ".gguf":  # the GGUF file is what was named: the directory goes beside it
        if not args.gguf:
            parser.error(f"{args.directory} ends in .gguf: add --gguf to write a GGUF file there")
        directory = args.directory.with_suffix("")
    if args.gguf and args.family != "llama":
        parser.error(f"--gguf writes llama.cpp's llama layout only; use --family llama (got {args.family})")
    if directory.exists() and not directory.is_dir():
        parser.error(f"{directory} is a file; give a directory to write the Hugging Face files to")
    if args.gguf and gguf.is_dir():
        parser.error(f"{gguf} is a directory; the GGUF file cannot be written there")
    model, tokenizer = save_tiny_pretrained(directory, args.family, args.layers)
    print(f"wrote a tiny random {args.family} ({args.layers} layers) and its tokenizer to {directory}")
    if args.gguf:
        print(f"wrote {write_gguf(model, tokenizer, gguf)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
