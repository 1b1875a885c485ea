"""The pair every speed benchmark compares: a looped Llama (prelude 1 + core k x T + coda 1, every
stabiliser ``none``, fixed depth) and a plain Hugging Face Llama of the same dims with 2 + k*T
layers, i.e. the same FLOPs per token."""

from __future__ import annotations

import torch


def looped_and_plain(hidden: int, heads: int, core: int, steps: int, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    from slr_zoo.recipe import build_backbone, build_model, validate
    from slr_zoo.recipe.schema import defaults

    recipe = defaults()
    recipe["backbone"] = {"name": "llama", "hidden_size": hidden, "heads": heads,
                          "prelude_layers": 1, "core_layers": core, "coda_layers": 1}
    recipe["loop"]["max_steps"] = steps
    validate(recipe)
    torch.manual_seed(0)
    looped = build_model(recipe, build_backbone(recipe, vocab_size=vocab))
    cfg = looped.backbone.hf_config.to_dict()
    cfg["num_hidden_layers"] = 2 + core * steps
    plain = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k != "layer_types"}))
    plain.config._attn_implementation = "sdpa"
    return looped, plain
