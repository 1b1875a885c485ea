"""Hugging Face causal LMs split into prelude / core / coda.

The adapter takes the HF model apart once, at build time: the decoder layers go into three
``LayerStack`` modules and the embeddings, final norm and LM head stay as they are, so state-dict
keys stay readable and the looped core is a single module (one FSDP unit). The HF ``forward`` is
never called; ``context`` reproduces what it computes once per batch (causal mask, positions,
rotary tables), so the layers see exactly the inputs the original model would give them.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch import nn

from slr_zoo.backbones.cache import CacheView, LoopKVCache
from slr_zoo.backbones.pretrained import (DTYPES, fingerprint, is_gguf, load_causal_lm, load_tokenizer,
                                         model_type, pretrained_config)
from slr_zoo.linears import find_targets
from slr_zoo.registry import ArgumentError, Registry, closest


@dataclass
class SequenceContext:
    """Per-batch inputs shared by every layer call: positions, attention mask, rotary tables, and
    the key/value cache view when the batch continues cached positions (generation).

    ``offset`` is the first position this forward pass covers: 0 for a full sequence or a prefill,
    the cached length for a decoding step. ``cache`` routes each layer's keys to the slot of the
    iteration the context is :meth:`at_step` (0 for the prelude and coda)."""

    position_ids: torch.Tensor
    attention_mask: Any = None
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    cache: CacheView | None = None
    offset: int = 0

    def at_step(self, t: int) -> "SequenceContext":
        """The context of loop iteration t: the core's layers read and write iteration t's slots."""
        return self if self.cache is None else replace(self, cache=self.cache.at_iteration(t))

    def select(self, rows: torch.Tensor) -> "SequenceContext":
        """The context of a subset of the batch (for batch compaction)."""

        def take(x: Any) -> Any:
            if isinstance(x, torch.Tensor) and x.dim() > 0 and x.size(0) > 1:
                return x.index_select(0, rows)
            return x

        pe = self.position_embeddings
        return replace(
            self,
            position_ids=take(self.position_ids),
            attention_mask=take(self.attention_mask),
            position_embeddings=None if pe is None else (take(pe[0]), take(pe[1])),
            cache=None if self.cache is None else self.cache.select(rows),
        )


class LayerStack(nn.Module):
    """A run of decoder layers called with one shared SequenceContext."""

    def __init__(self, layers: list[nn.Module], call: "LayerCall"):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self._call = call

    def forward(self, h: torch.Tensor, ctx: SequenceContext) -> torch.Tensor:
        for layer in self.layers:
            h = self._call(layer, h, ctx)
        return h

    def __len__(self) -> int:
        return len(self.layers)


@functools.cache
def _cache_keyword(layer_class: type) -> str:
    """The name under which this transformers release's decoder layers take a cache
    (``cache`` from 5.x, ``past_key_values`` before)."""
    return "cache" if "cache" in inspect.signature(layer_class.forward).parameters else "past_key_values"


class LayerCall:
    """How one family's decoder layer is called (the only per-family difference in the loop)."""

    def __call__(self, layer: nn.Module, h: torch.Tensor, ctx: SequenceContext) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def cache_argument(layer: nn.Module, ctx: SequenceContext) -> dict[str, Any]:
        return {} if ctx.cache is None else {_cache_keyword(type(layer)): ctx.cache}


class _LlamaCall(LayerCall):
    def __call__(self, layer, h, ctx):
        return layer(
            h,
            attention_mask=ctx.attention_mask,
            position_ids=ctx.position_ids,
            position_embeddings=ctx.position_embeddings,
            **self.cache_argument(layer, ctx),
        )


class _GPT2Call(LayerCall):
    def __call__(self, layer, h, ctx):
        return layer(h, attention_mask=ctx.attention_mask, position_ids=ctx.position_ids,
                     **self.cache_argument(layer, ctx))


LORA_KEYS = {"rank": int, "alpha": (int, float), "dropout": (int, float), "targets": list}


class Backbone(nn.Module):
    """A causal LM split into ``prelude``, looped ``core`` and ``coda`` layer stacks.

    Subclasses say how to make the HF config, where the parts live in the HF model, how a layer is
    called, and which linears play which role (``roles``: the names recipes use for LoRA targets,
    so that one recipe ports across families). ``hf_config`` stays available for the decoders.

    A pretrained model (``pretrained``: a local Hugging Face directory or a ``.gguf`` file) is read
    in ``dtype`` with ``attn_implementation``; ``lora`` ({rank, alpha, dropout, targets}) injects
    peft LoRA into its own weights before the split, so loop-wise LoRA later wraps the same linears
    under peft's wrappers. ``truncate``: keep only the prelude, core and coda layers (the first
    prelude + core layers and the last coda layers), dropping those in between.
    """

    path_args = ("pretrained",)
    layer_call: LayerCall
    core: LayerStack
    model_types: frozenset[str] = frozenset()
    roles: dict[str, tuple[str, ...]] = {}
    lora_fan_in_fan_out = False  # GPT-2's Conv1D stores its weight as [in, out]

    def __init__(
        self,
        hidden_size: int = 128,
        heads: int = 4,
        kv_heads: int | None = None,
        intermediate_size: int | None = None,
        prelude_layers: int = 1,
        core_layers: int = 1,
        coda_layers: int = 1,
        max_positions: int = 512,
        dropout: float = 0.0,
        init_std: float | None = None,
        init: Literal["normal", "torch"] = "normal",
        tie_embeddings: bool = True,
        pretrained: str | None = None,
        dtype: Literal["fp32", "bf16", "fp16"] = "fp32",
        attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa",
        lora: dict | None = None,
        truncate: bool = False,
        share: Literal["none", "average"] = "none",
        loops: int | None = None,
        attention: Literal["causal", "prefix"] = "causal",
        vocab_size: int = 0,
        structure_only: bool = False,
    ):
        """``structure_only`` (set by the recipe check, never a recipe key): a pretrained model is
        built from its configuration alone, for a build on the meta device that checks a cell's
        shapes before anything loads or trains."""
        super().__init__()
        if attention not in ("causal", "prefix"):
            raise ArgumentError("attention", f"must be 'causal' or 'prefix', got {attention!r}")
        self.attention = attention
        self.pretrained = pretrained
        self.tokenizer = None
        self.base_fingerprint: str | None = None
        self.added_tokens: list[str] = []
        counts = (prelude_layers, core_layers, coda_layers)
        if min(counts) < 0 or core_layers < 1:
            raise ArgumentError("core_layers", f"layer counts must be >= 0 with core_layers >= 1, got "
                                f"prelude/core/coda = {counts}")
        if share == "average" and not loops:
            raise ArgumentError("loops", "share=average needs loops: how many pretrained blocks the loop replaces")
        # share=average stands for a deeper model: core_layers * loops layers between prelude and coda
        n_shared = core_layers * (loops if share == "average" else 1)
        if init not in ("normal", "torch"):
            raise ArgumentError("init", f"must be 'normal' or 'torch', got {init!r}")
        if dtype not in DTYPES:
            raise ArgumentError("dtype", f"must be one of {sorted(DTYPES)}, got {dtype!r}")
        lora = self._check_lora(lora)
        if attn_implementation == "flash_attention_2":
            from transformers.utils import is_flash_attn_2_available

            if not is_flash_attn_2_available():
                raise ArgumentError("attn_implementation", "flash_attention_2 needs the flash-attn package and a "
                                    "CUDA GPU, which this machine does not have; use sdpa")
        if pretrained is not None:
            given = {"hidden_size": hidden_size, "heads": heads, "kv_heads": kv_heads,
                     "intermediate_size": intermediate_size, "max_positions": max_positions, "dropout": dropout,
                     "init_std": init_std, "init": init, "tie_embeddings": tie_embeddings}
            defaults = inspect.signature(Backbone.__init__).parameters
            for key, value in given.items():  # a shape set beside a checkpoint would be silently ignored
                if value != defaults[key].default:
                    raise ArgumentError(key, f"applies to a model built from scratch; a pretrained model's "
                                        f"{key} comes from its checkpoint ({pretrained}), remove it")
            self.check_pretrained(pretrained)
            if structure_only:  # the configuration, and the tokenizer of a directory (a GGUF's takes seconds)
                hf = self.model_class()(pretrained_config(pretrained))
                if not is_gguf(pretrained):
                    self.tokenizer = load_tokenizer(pretrained)
            else:
                hf, self.tokenizer = load_causal_lm(pretrained, dtype, attn_implementation)
            rows = hf.get_input_embeddings().num_embeddings
            if self.tokenizer is not None and len(self.tokenizer) > rows:
                raise ArgumentError("pretrained", f"the tokenizer has {len(self.tokenizer)} tokens but the model's "
                                    f"embedding only {rows} rows: they do not belong together")
            self.base_fingerprint = None if structure_only else fingerprint(pretrained)
        else:
            if hidden_size < 1 or heads < 1 or hidden_size % heads:
                raise ArgumentError("heads", f"hidden_size must be a positive multiple of heads, "
                                    f"got hidden_size={hidden_size}, heads={heads}")
            if kv_heads is not None and (kv_heads < 1 or heads % kv_heads):
                raise ArgumentError("kv_heads", f"must divide heads, got kv_heads={kv_heads}, heads={heads}")
            if vocab_size <= 0:
                raise ValueError("a backbone built from scratch needs the tokenizer's vocab_size")
            config = self.make_config(
                vocab_size=vocab_size,
                hidden_size=hidden_size,
                heads=heads,
                kv_heads=kv_heads or heads,
                intermediate_size=intermediate_size or 4 * hidden_size,
                num_layers=prelude_layers + n_shared + coda_layers,
                max_positions=max_positions,
                dropout=dropout,
                init_std=init_std if init_std is not None else hidden_size**-0.5,
            )
            config._attn_implementation = attn_implementation
            config.tie_word_embeddings = tie_embeddings
            hf = self.model_class()(config)
            if init == "torch":
                _torch_init(hf)
            hf = hf.to(DTYPES[dtype])
        self.hf_config = hf.config
        if lora is not None:
            self._inject_lora(hf, lora)
        layers = list(self.layers_of(hf))
        used = prelude_layers + n_shared + coda_layers
        if used > len(layers) or (used < len(layers) and not truncate):
            need = "prelude + core*loops + coda" if share == "average" else "prelude + core + coda"
            raise ArgumentError(
                "core_layers", f"the model has {len(layers)} layers but {need} = "
                f"{prelude_layers} + {n_shared} + {coda_layers} = {used}; adjust prelude_layers, core_layers, "
                "coda_layers" + ("" if used > len(layers) else ", or set truncate: true to drop the layers between")
            )
        # which of the checkpoint's layers are kept, in order (a per-layer config list follows them)
        self.source_layers = list(range(len(layers)))
        if used < len(layers):  # truncate: the first prelude + core layers, the last coda layers
            keep = lambda xs: xs[:prelude_layers + n_shared] + (xs[-coda_layers:] if coda_layers else [])  # noqa: E731
            layers, self.source_layers = keep(layers), keep(self.source_layers)
        p, c = prelude_layers, prelude_layers + n_shared
        self.replaced_layers = layers[p:c] if share == "average" else []
        core = layers[p : p + core_layers]
        if share == "average":
            core = [copy.deepcopy(layer) for layer in core]
            _average_into(core, self.replaced_layers, core_layers)
        self.adopt_embeddings(hf)
        self.prelude = LayerStack(layers[:p], self.layer_call)
        self.core = LayerStack(core, self.layer_call)
        self.coda = LayerStack(layers[c:], self.layer_call)
        self.train()  # a pretrained model arrives in eval mode; fine-tuning must see its dropout

    @classmethod
    def check_pretrained(cls, path: str) -> None:
        """Refuse a checkpoint this family cannot split, reading only its model type."""
        kind = model_type(path)
        if kind not in cls.model_types:
            family = _family_for(kind)
            hint = (f"set name: {family}" if family else
                    f"the supported causal LM model types are {', '.join(_supported_types())}")
            raise ArgumentError("pretrained", f"{path} holds a {kind or 'unknown'!r} model, which backbone "
                                f"{_family_for(next(iter(cls.model_types)))!r} cannot split; {hint}")

    # ------------------------------------------------------------------ LoRA targets by role
    def target_names(self, targets: list[str]) -> list[str]:
        """Module names for ``targets``: a role (``query``, ``key``, ``value``, ``attention``,
        ``attention_output``, ``mlp``) becomes this family's linears; other names pass through."""
        names: list[str] = []
        for target in targets:
            for name in self.roles.get(target, (target,)):
                if name not in names:
                    names.append(name)
        return names

    @staticmethod
    def _check_lora(lora: dict | None) -> dict | None:
        if lora is None:
            return None
        settings = {"rank": 8, "alpha": 16, "dropout": 0.0, "targets": ["query", "value"], **lora}
        for key, value in settings.items():
            if key not in LORA_KEYS:
                raise ArgumentError(f"lora.{key}", f"unknown key{closest(key, LORA_KEYS)}")
            if not isinstance(value, LORA_KEYS[key]) or isinstance(value, bool):
                raise ArgumentError(f"lora.{key}", f"expected {LORA_KEYS[key]}, got {value!r}")
        if settings["rank"] < 1:
            raise ArgumentError("lora.rank", f"must be >= 1, got {settings['rank']}")
        if not 0 <= settings["dropout"] < 1:
            raise ArgumentError("lora.dropout", f"must be in [0, 1), got {settings['dropout']}")
        if not settings["targets"]:
            raise ArgumentError("lora.targets", "needs at least one role or linear name")
        for target in settings["targets"]:
            if not isinstance(target, str) or not target:
                raise ArgumentError("lora.targets", f"each target is a role or a linear's name, got {target!r}")
        return settings

    def _inject_lora(self, hf: nn.Module, lora: dict) -> None:
        """peft LoRA on the model's own linears, in place (module paths stay those of the model)."""
        from peft import LoraConfig, inject_adapter_in_model

        try:  # every target must match, where peft is satisfied when any one does
            find_targets(hf, lora["targets"], self.roles, where="the model")
        except ArgumentError as err:
            raise ArgumentError("lora.targets", err.message) from None
        # peft reads "all-linear" as every linear but the output head, and only as the whole value
        names = "all-linear" if "all-linear" in lora["targets"] else self.target_names(lora["targets"])
        config = LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                            target_modules=names, fan_in_fan_out=self.lora_fan_in_fan_out)
        try:
            inject_adapter_in_model(config, hf)
        except ValueError as err:
            raise ArgumentError("lora.targets", f"{lora['targets']} match no linear layer of the model: {err}; "
                                f"roles: {', '.join(sorted(self.roles))}") from None

    # ------------------------------------------------------------------ fine-tuning
    def freeze_base(self) -> None:
        """Freeze the pretrained weights; peft's LoRA matrices and added-token rows stay trainable."""
        for name, param in self.named_parameters():
            param.requires_grad = "lora_" in name or name.endswith(".added") or name.endswith(".rows")

    def add_tokens(self, tokens: dict[str, str]) -> list[int]:
        """Add special tokens to a pretrained model's tokenizer (``{"sep_token": "[SEP]"}``, or
        ``additional_special_tokens`` entries as ``{"<bot>": "<bot>"}``), with trainable rows of their
        own in the embedding and the head (``backbones/vocab.py``). Returns their ids."""
        from slr_zoo.backbones.vocab import AddedEmbedding, AddedHead

        if self.tokenizer is None:
            raise ValueError("add_tokens is for a pretrained model's tokenizer; a word-level tokenizer "
                             "built from the data holds its special tokens already")
        first = len(self.tokenizer)
        roles = {k: v for k, v in tokens.items() if k.endswith("_token")}
        extra = [v for k, v in tokens.items() if not k.endswith("_token")]
        self.tokenizer.add_special_tokens({**roles, **({"additional_special_tokens": extra} if extra else {})})
        count = len(self.tokenizer) - first
        if count:
            tied = self.lm_head.weight is self.embed_tokens.weight
            self.embed_tokens = AddedEmbedding(self.embed_tokens, first, count)
            if tied:
                rows = self.embed_tokens.added
            else:
                with torch.no_grad():
                    mean = self.lm_head.weight.float().mean(dim=0).to(self.lm_head.weight.dtype)
                rows = nn.Parameter(mean.expand(count, -1).clone())
            self.lm_head = AddedHead(self.lm_head, rows, first)
            self.added_tokens += list(tokens.values())
        return [self.tokenizer.convert_tokens_to_ids(t) for t in tokens.values()]

    # ------------------------------------------------------------------ export
    def save_pretrained(self, directory: str | Path, tokenizer=None) -> None:
        """These weights as a Hugging Face checkpoint of the family (``save_pretrained``): the
        prelude, the core once and the coda as its layers, in order, and the embeddings and head
        with any added-token rows merged in. transformers loads it as a plain model, the loop run
        once. A recipe that names it in ``backbone.pretrained`` with the same split (and the same
        ``attention``) starts from exactly these weights: how one run continues from another's
        (a depth loop turned into continuous thoughts, say). The loop's own components (step
        embedding, loop LoRA, combine, halting) live outside the backbone and are not part of it.

        Refused: a core averaged from the layers it replaces (``share: average``), which has no
        plain model to be, and layers under peft's LoRA (merge them first)."""
        import transformers

        if self.replaced_layers:
            raise ValueError("a core averaged from the layers it replaces (share: average) is not a plain model; "
                             "it cannot be saved as one")
        layers = [*self.prelude.layers, *self.core.layers, *self.coda.layers]
        config = copy.deepcopy(self.hf_config)
        before = config.num_hidden_layers
        for key, value in list(vars(config).items()):  # per-layer settings (Qwen2's layer_types) follow the kept layers
            if isinstance(value, list) and len(value) == before and before != len(layers):
                setattr(config, key, [value[i] for i in self.source_layers])
        config.num_hidden_layers = len(layers)
        config.vocab_size = max(self.vocab_size, len(tokenizer) if tokenizer is not None else 0)
        fresh = getattr(transformers, self.hf_model_class)(config).to(self.embed_tokens.weight.dtype)
        expected = fresh.state_dict()
        state = {f"{self.layer_prefix}{i}.{key}": value for i, layer in enumerate(layers)
                 for key, value in layer.state_dict().items()}
        state.update(self.exported_tensors(config.vocab_size))
        unknown = [key for key in state if key not in expected]
        if unknown:
            hint = " (peft's LoRA: merge it into the weights first)" if any("lora_" in k for k in unknown) else ""
            raise ValueError(f"these weights have no place in a plain {self.hf_model_class}{hint}: {', '.join(unknown[:4])}")
        fresh.load_state_dict(state, strict=False)
        missing = [key for key in expected if key not in state and not (config.tie_word_embeddings and key == "lm_head.weight")]
        if missing:
            raise ValueError(f"no weights of this backbone for {', '.join(missing[:4])} of the {self.hf_model_class}")
        if config.tie_word_embeddings:
            fresh.tie_weights()
        fresh.save_pretrained(str(directory))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(directory))

    def _rows(self, module: nn.Module, vocab: int) -> torch.Tensor:
        """[vocab, d]: an embedding's or head's rows, the added tokens' own rows in their place."""
        from slr_zoo.backbones.vocab import AddedEmbedding, AddedHead

        base = module.base.weight if isinstance(module, (AddedEmbedding, AddedHead)) else module.weight
        rows = base.detach().new_zeros(vocab, base.size(1))
        rows[: base.size(0)] = base.detach()[:vocab]
        if isinstance(module, AddedEmbedding):
            rows[module.first: module.first + module.count] = module.added.detach()
        elif isinstance(module, AddedHead):
            rows[module.first: module.first + module.rows.size(0)] = module.rows.detach()
        return rows

    # ------------------------------------------------------------------ per-family hooks
    def make_config(self, **dims: Any):
        raise NotImplementedError

    # the family's transformers classes, by name, so that transformers is imported only when a model is built
    hf_model_class: str = ""
    hf_config_class: str = ""
    layer_prefix: str = ""  # where the family's checkpoint keeps its layers ("model.layers.")

    def exported_tensors(self, vocab: int) -> dict[str, torch.Tensor]:
        """The checkpoint's tensors besides its layers (embeddings, final norm, head), by key."""
        raise NotImplementedError

    def model_class(self) -> type:
        import transformers

        return getattr(transformers, self.hf_model_class)

    def config_class(self) -> type:
        import transformers

        return getattr(transformers, self.hf_config_class)

    def layers_of(self, hf: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def adopt_embeddings(self, hf: nn.Module) -> None:
        """Keep embeddings, final norm, rotary tables and LM head; drop the HF shell."""
        raise NotImplementedError

    def embed(self, input_ids: torch.Tensor, ctx: SequenceContext,
              replace: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The input embeddings; ``replace`` = (vectors [B, S, d], where [B, S] bool) puts the
        vectors in place of the token embeddings where marked (continuous thoughts), before any
        position embedding is added."""
        raise NotImplementedError

    def token_embeddings(self, input_ids: torch.Tensor, replace=None) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if replace is not None:
            vectors, where = replace
            x = torch.where(where[..., None], vectors.to(x.dtype), x)
        return x

    def position_embeddings(self, probe: torch.Tensor, position_ids: torch.Tensor):
        """What each layer needs from the positions besides the mask (Llama: rotary tables)."""
        return None

    def context(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                prefix: torch.Tensor | None = None, cache: LoopKVCache | None = None) -> SequenceContext:
        """The per-batch context of ``input_ids`` [B, S] (only its shape and device are read).

        ``attention_mask`` [B, offset + S] marks real (1) and padded (0) positions, including the
        cached ones, as in Hugging Face; left padding counts each row's positions from its first
        real token. ``prefix`` [B, S] bool marks each row's question (up to its separator); with
        ``attention: prefix`` the question attends to itself in both directions. ``cache``: the
        pass continues a generation at position ``cache.length`` and writes its keys there."""
        offset = cache.length if cache is not None else 0
        position_ids = _positions(input_ids, attention_mask, offset)
        probe = self.embed_tokens.weight.new_empty(input_ids.shape[:2] + (1,))
        if offset:
            mask = _continuation_mask(attention_mask, input_ids.size(1), offset)
        else:
            mask = self.mask(probe, attention_mask, position_ids, prefix)
        return SequenceContext(position_ids, mask, self.position_embeddings(probe, position_ids),
                               cache=None if cache is None else cache.view(0, offset), offset=offset)

    def mask(self, embeds: torch.Tensor, attention_mask, position_ids, prefix) -> Any:
        """The attention mask every layer gets: HF's causal mask, or a prefix-LM mask.

        Why prefix: a causal model reading facts in random order cannot let an early mention of a
        concept learn from a later fact about it, so a search over the question's graph can only
        happen at the last positions. With the question visible both ways every mention can be
        updated in place, iteration by iteration. The answer stays causal, so teacher-forced
        scoring still equals greedy decoding."""
        if self.attention == "causal":
            return _causal_mask(self.hf_config, embeds, attention_mask, position_ids)
        if prefix is None:
            raise ValueError("attention='prefix' needs the question's extent (query_mask) in every forward call")
        return _prefix_mask(prefix.bool().expand(embeds.shape[:2]), attention_mask)

    @torch.no_grad()
    def run_replaced(self, input_ids: list[torch.Tensor], prefixes: list[torch.Tensor | None] | None = None,
                     watch: Callable[[int], contextlib.AbstractContextManager] | None = None) -> list[torch.Tensor]:
        """The pretrained model's own forward (in eval mode: no dropout) of each [B, S] tensor of
        ``input_ids`` (``prefixes``: each one's question, with ``attention: prefix``) through the
        prelude and the layers the loop stands for (``share: average``): the hidden states after
        the last of them. How the originals see real text, which is what calibrating the loop's
        stand-ins needs.

        Layer by layer: original layer i runs over every input before layer i + 1 does, inside
        ``watch(i)`` when given, so a caller can observe one layer at a time (and hold one layer's
        statistics at a time, not the whole model's). The originals are not parameters, so
        ``.to()`` does not reach them: each runs on the embeddings' device and dtype and goes back
        where it was, so an accelerator never holds more than one of them."""
        if not self.replaced_layers:
            raise ValueError("run_replaced needs a backbone with share: average (it replaces no layers)")
        weight = self.embed_tokens.weight
        prefixes = prefixes if prefixes is not None else [None] * len(input_ids)
        training = self.training
        self.eval()
        try:
            contexts = [self.context(ids, None, prefix) for ids, prefix in zip(input_ids, prefixes)]
            states = [self.prelude(self.embed(ids, ctx), ctx) for ids, ctx in zip(input_ids, contexts)]
            for index, layer in enumerate(self.replaced_layers):
                # the parameters' own tensors, put back afterwards: a round trip through another
                # dtype would round them, and an error must not leave one on the accelerator
                kept = [(parameter, parameter.data) for parameter in layer.parameters()]
                home = kept[0][1]
                layer.to(device=weight.device, dtype=weight.dtype).eval()
                try:
                    with watch(index) if watch is not None else contextlib.nullcontext():
                        for k, ctx in enumerate(contexts):  # in place: one set of states alive
                            states[k] = self.layer_call(layer, states[k], ctx)
                finally:
                    for parameter, data in kept:
                        parameter.data = data
                    layer.to(device=home.device, dtype=home.dtype)  # buffers, if any
        finally:
            self.train(training)
        return states

    # ------------------------------------------------------------------ shared
    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head."""
        return self.lm_head(self.final_norm(h))

    @property
    def hidden_size(self) -> int:
        return self.hf_config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.lm_head.out_features

    @property
    def max_positions(self) -> int:
        """The longest sequence the model's positions cover."""
        config = self.hf_config
        return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions"))


def _family_for(model_type: str) -> str | None:
    """The registered backbone that splits a model type, if any."""
    for name in BACKBONES.names():
        if model_type in BACKBONES.get(name).model_types:
            return name
    return None


def _supported_types() -> list[str]:
    return sorted({t for name in BACKBONES.names() for t in BACKBONES.get(name).model_types})


@torch.no_grad()
def _average_into(core: list[nn.Module], replaced: list[nn.Module], core_layers: int) -> None:
    """Relaxed Recursive Transformers' init: core layer j = mean of the layers it stands for."""
    for j, shared in enumerate(core):
        group = replaced[j::core_layers]
        for name, param in shared.named_parameters():
            stacked = torch.stack([dict(layer.named_parameters())[name] for layer in group])
            param.copy_(stacked.mean(0))


BACKBONES = Registry("backbone", Backbone, context=("vocab_size", "structure_only"))


def _prefix_mask(prefix: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """[B, 1, S, S] bool, True = may attend: causal, plus every question position to every other
    one; padded keys never. Every query keeps itself, so no row is empty (softmax of nothing)."""
    S = prefix.size(1)
    causal = torch.ones(S, S, dtype=torch.bool, device=prefix.device).tril()
    allowed = causal[None] | (prefix[:, :, None] & prefix[:, None, :])
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, :]
    allowed = allowed | torch.eye(S, dtype=torch.bool, device=prefix.device)[None]
    return allowed[:, None]


def _positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, offset: int = 0) -> torch.Tensor:
    if attention_mask is None:
        return torch.arange(offset, offset + input_ids.size(1), device=input_ids.device).unsqueeze(0)
    # left padding: real tokens count from 0
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, offset:]


def _continuation_mask(attention_mask: torch.Tensor | None, length: int, offset: int) -> torch.Tensor | None:
    """[B, 1, S, offset + S] bool for S new positions after ``offset`` cached ones: causal, padded
    keys never; None when nothing needs masking (one new position, no padding)."""
    if length == 1:
        if attention_mask is None or bool(attention_mask.all()):
            return None
        return attention_mask.bool()[:, None, None, :]
    keys = torch.arange(offset + length, device=attention_mask.device if attention_mask is not None else None)
    allowed = keys[None, :] <= keys[offset:, None]
    allowed = allowed[None] if attention_mask is None else allowed[None] & attention_mask.bool()[:, None, :]
    return allowed[:, None]


def _torch_init(model: nn.Module) -> None:
    """The init a hand-written PyTorch transformer gets from its modules' defaults, instead of
    Hugging Face's one N(0, init_std) for everything: linear weights and biases U(+-1/sqrt(fan_in)),
    embeddings N(0, 1), and attention as ``nn.MultiheadAttention`` sets it (Xavier-uniform over the
    stacked q/k/v, zero attention biases). Token and position identity then stays large in the
    residual stream every iteration adds to. A small looped model given these exact weights trains
    like the hand-written one and composes hops; under Hugging Face's scheme it learns only the first
    (docs/results.md)."""
    from transformers.pytorch_utils import Conv1D

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()
            elif isinstance(module, Conv1D):  # GPT-2's transposed Linear: weight [in, out]
                bound = module.weight.size(0) ** -0.5
                module.weight.uniform_(-bound, bound)
                module.bias.uniform_(-bound, bound)
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, 1.0)
        for module in model.modules():
            if isinstance(getattr(module, "c_attn", None), Conv1D):  # GPT-2: q/k/v in one [in, 3*out]
                inputs, output = [module.c_attn], module.c_proj
                fan_in, fan_out = module.c_attn.weight.shape
            elif all(hasattr(module, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")):
                inputs, output = [module.q_proj, module.k_proj, module.v_proj], module.o_proj
                fan_in, fan_out = module.q_proj.in_features, sum(p.out_features for p in inputs)
            else:
                continue
            bound = (6.0 / (fan_in + fan_out)) ** 0.5
            for projection in inputs:
                projection.weight.uniform_(-bound, bound)
                if projection.bias is not None:
                    projection.bias.zero_()
            if output.bias is not None:
                output.bias.zero_()
    if model.config.tie_word_embeddings:
        model.tie_weights()


@functools.cache
def _mask_parameters() -> frozenset[str]:
    from transformers.masking_utils import create_causal_mask

    return frozenset(inspect.signature(create_causal_mask).parameters)


def _causal_mask(config, embeds: torch.Tensor, attention_mask, position_ids):
    from transformers.masking_utils import create_causal_mask

    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    # the keyword names moved between transformers releases (input_embeds -> inputs_embeds,
    # past_key_values -> cache); pass each under the name this release uses
    params = _mask_parameters()
    kwargs = {"config": config, "attention_mask": attention_mask, "position_ids": position_ids}
    kwargs["inputs_embeds" if "inputs_embeds" in params else "input_embeds"] = embeds
    kwargs["cache" if "cache" in params else "past_key_values"] = None
    if "cache_position" in params:
        kwargs["cache_position"] = torch.arange(embeds.size(1), device=embeds.device)
    return create_causal_mask(**kwargs)


@BACKBONES.register("llama")
class LlamaBackbone(Backbone):
    """Llama-family decoders (Llama, Qwen2, Mistral, SmolLM): rotary positions, RMSNorm."""

    layer_call = _LlamaCall()
    model_types = frozenset({"llama"})
    roles = {
        "query": ("self_attn.q_proj",), "key": ("self_attn.k_proj",), "value": ("self_attn.v_proj",),
        "attention_output": ("self_attn.o_proj",),
        "attention": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
        "mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    }

    hf_model_class = "LlamaForCausalLM"
    hf_config_class = "LlamaConfig"

    def make_config(self, *, vocab_size, hidden_size, heads, kv_heads, intermediate_size, num_layers, max_positions, dropout, init_std):
        return self.config_class()(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=max_positions,
            attention_dropout=dropout,
            initializer_range=init_std,
            tie_word_embeddings=True,
            pad_token_id=0,
            bos_token_id=None,
            eos_token_id=None,
        )

    def layers_of(self, hf):
        return hf.model.layers

    def adopt_embeddings(self, hf):
        self.embed_tokens = hf.model.embed_tokens
        self.rotary = hf.model.rotary_emb
        self.final_norm = hf.model.norm
        self.lm_head = hf.lm_head

    layer_prefix = "model.layers."

    def exported_tensors(self, vocab: int) -> dict[str, torch.Tensor]:
        return {"model.embed_tokens.weight": self._rows(self.embed_tokens, vocab),
                "model.norm.weight": self.final_norm.weight.detach(),
                "lm_head.weight": self._rows(self.lm_head, vocab)}

    def embed(self, input_ids, ctx, replace=None):
        return self.token_embeddings(input_ids, replace)

    def position_embeddings(self, probe, position_ids):
        return self.rotary(probe, position_ids)


@BACKBONES.register("qwen2")
class Qwen2Backbone(LlamaBackbone):
    model_types = frozenset({"qwen2"})

    hf_model_class = "Qwen2ForCausalLM"
    hf_config_class = "Qwen2Config"


@BACKBONES.register("mistral")
class MistralBackbone(LlamaBackbone):
    model_types = frozenset({"mistral"})

    hf_model_class = "MistralForCausalLM"
    hf_config_class = "MistralConfig"


@BACKBONES.register("gpt2")
class GPT2Backbone(Backbone):
    """GPT-2: learned absolute positions, LayerNorm, tied head."""

    layer_call = _GPT2Call()
    model_types = frozenset({"gpt2"})
    # one fused projection makes the queries, keys and values
    roles = {
        "query": ("attn.c_attn",), "key": ("attn.c_attn",), "value": ("attn.c_attn",),
        "attention_output": ("attn.c_proj",), "attention": ("attn.c_attn", "attn.c_proj"),
        "mlp": ("mlp.c_fc", "mlp.c_proj"),
    }
    lora_fan_in_fan_out = True

    hf_model_class = "GPT2LMHeadModel"
    hf_config_class = "GPT2Config"

    def make_config(self, *, vocab_size, hidden_size, heads, kv_heads, intermediate_size, num_layers, max_positions, dropout, init_std):
        return self.config_class()(
            vocab_size=vocab_size,
            n_embd=hidden_size,
            n_head=heads,
            n_inner=intermediate_size,
            n_layer=num_layers,
            n_positions=max_positions,
            # GPT-2's own tanh approximation of GELU as one fused kernel: the same function to
            # float rounding (2e-7), a third of the time of "gelu_new"'s chain of element-wise ops,
            # which took a quarter of a training step of the main job's model
            activation_function="gelu_pytorch_tanh",
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
            initializer_range=init_std,
            tie_word_embeddings=True,
            bos_token_id=None,
            eos_token_id=None,
        )

    def layers_of(self, hf):
        return hf.transformer.h

    def adopt_embeddings(self, hf):
        self.embed_tokens = hf.transformer.wte
        self.pos_embed = hf.transformer.wpe
        self.embed_dropout = hf.transformer.drop
        self.final_norm = hf.transformer.ln_f
        self.lm_head = hf.lm_head

    layer_prefix = "transformer.h."

    def exported_tensors(self, vocab: int) -> dict[str, torch.Tensor]:
        return {"transformer.wte.weight": self._rows(self.embed_tokens, vocab),
                "transformer.wpe.weight": self.pos_embed.weight.detach(),
                "transformer.ln_f.weight": self.final_norm.weight.detach(),
                "transformer.ln_f.bias": self.final_norm.bias.detach(),
                "lm_head.weight": self._rows(self.lm_head, vocab)}

    def embed(self, input_ids, ctx, replace=None):
        return self.embed_dropout(self.token_embeddings(input_ids, replace) + self.pos_embed(ctx.position_ids))
