"""Reading a pretrained causal LM from disk: a local Hugging Face directory or a ``.gguf`` file.

Nothing is downloaded: every read is ``local_files_only`` with the hub offline. The model type is
read before the weights (``config.json``'s ``model_type``, or a GGUF file's
``general.architecture``), so that a directory of another kind of model is refused at once, with
the families this package splits. transformers reads a GGUF file through ``gguf_file=`` and
dequantises its tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from slr_zoo.registry import ArgumentError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# GGUF architecture names of the model types transformers reads from GGUF
GGUF_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "mistral": "mistral", "gpt2": "gpt2"}


def is_gguf(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".gguf"


def model_type(path: str | Path) -> str:
    """The model type of a checkpoint, read without loading its weights."""
    path = Path(path).expanduser()
    if is_gguf(path):
        if not path.is_file():
            raise ArgumentError("pretrained", f"{str(path)!r} is not a file")
        from gguf import GGUFReader

        try:
            field = GGUFReader(str(path)).fields["general.architecture"]
        except Exception as err:  # a truncated file fails deep inside the reader, with any error type
            raise ArgumentError("pretrained", f"{path} is not a readable GGUF file "
                                f"({type(err).__name__}: {err})") from None
        architecture = str(field.contents())
        return GGUF_MODEL_TYPES.get(architecture, architecture)
    config = path / "config.json"
    if not config.is_file():
        raise ArgumentError("pretrained", f"{str(path)!r} is not a local model directory (no config.json) or .gguf "
                            "file; save one with save_pretrained(), nothing is downloaded")
    try:
        kind = json.loads(config.read_text()).get("model_type", "")
    except (OSError, ValueError, AttributeError) as err:
        raise ArgumentError("pretrained", f"{config} is not a readable JSON object ({err})") from None
    _check_weights(path)
    return str(kind)


WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _check_weights(directory: Path) -> None:
    """A directory's weights exist, and a single safetensors file's header reads: a bad file
    is named here, before a grid trains, rather than by transformers inside a cell."""
    found = [directory / name for name in WEIGHTS if (directory / name).is_file()]
    if not found:
        raise ArgumentError("pretrained", f"{str(directory)!r} has a config.json but no weights ({', '.join(WEIGHTS)}); "
                            "save the model with save_pretrained()")
    if found[0].name == "model.safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(found[0]), framework="pt"):
                pass
        except Exception as err:  # the header is read at once; a truncated file fails here
            raise ArgumentError("pretrained", f"{found[0]} cannot be read ({type(err).__name__}: {err})") from None


def _offline_location(path: Path) -> tuple[Path, dict]:
    """(what from_pretrained reads, its extra keywords) for a directory or a GGUF file, with the
    hub offline: nothing is ever downloaded."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return (path.parent, {"gguf_file": path.name}) if is_gguf(path) else (path, {})


def pretrained_config(path: str | Path):
    """The model configuration of a checkpoint, without its weights."""
    from transformers import AutoConfig

    path = Path(path).expanduser()
    where, extra = _offline_location(path)
    try:
        return AutoConfig.from_pretrained(where, local_files_only=True, **extra)
    except Exception as err:  # transformers validates fields with its own error types
        raise ArgumentError("pretrained", f"the configuration of {path} cannot be read "
                            f"({type(err).__name__}: {err})") from None


def load_tokenizer(path: str | Path):
    """The tokenizer saved beside a checkpoint; a missing or unreadable one is named with its path
    (transformers' own message suggests installing sentencepiece whatever the cause)."""
    from transformers import AutoTokenizer

    path = Path(path).expanduser()
    where, extra = _offline_location(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True, **extra)
    except Exception as err:
        raise ArgumentError("pretrained", f"no tokenizer can be read from {path} ({type(err).__name__}: {err}); "
                            "save it beside the model with tokenizer.save_pretrained()") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str | Path, dtype: str = "fp32", attn_implementation: str = "sdpa"):
    """(model, tokenizer) of a local directory or GGUF file, in train mode: from_pretrained
    returns a model in eval mode, which would silently turn dropout off for fine-tuning."""
    from transformers import AutoModelForCausalLM

    path = Path(path).expanduser()
    where, extra = _offline_location(path)
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(where, local_files_only=True, dtype=DTYPES[dtype],
                                                 attn_implementation=attn_implementation, **extra)
    return model.train(), tokenizer


def fingerprint(path: str | Path) -> str:
    """A short hash that tells checkpoints apart without reading every byte of a large model:
    each file's name and size, its first and last MiB, and the whole of every small file."""
    path = Path(path).expanduser()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    chunk = 1 << 20
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with file.open("rb") as f:
            digest.update(f.read(chunk))
            if size > 2 * chunk:
                f.seek(-chunk, os.SEEK_END)
                digest.update(f.read(chunk))
    return digest.hexdigest()[:16]
