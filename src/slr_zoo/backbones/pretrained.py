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
        except (KeyError, ValueError, OSError) as err:
            raise ArgumentError("pretrained", f"{path} is not a readable GGUF file ({err})") from None
        architecture = str(field.contents())
        return GGUF_MODEL_TYPES.get(architecture, architecture)
    config = path / "config.json"
    if not config.is_file():
        raise ArgumentError("pretrained", f"{str(path)!r} is not a local model directory (no config.json) or .gguf "
                            "file; save one with save_pretrained(), nothing is downloaded")
    try:
        return str(json.loads(config.read_text()).get("model_type", ""))
    except (OSError, ValueError) as err:
        raise ArgumentError("pretrained", f"{config} is not readable JSON ({err})") from None


def pretrained_config(path: str | Path):
    """The model configuration of a checkpoint, without its weights."""
    from transformers import AutoConfig

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(path).expanduser()
    where, extra = (path.parent, {"gguf_file": path.name}) if is_gguf(path) else (path, {})
    return AutoConfig.from_pretrained(where, local_files_only=True, **extra)


def load_causal_lm(path: str | Path, dtype: str = "fp32", attn_implementation: str = "sdpa"):
    """(model, tokenizer) of a local directory or GGUF file, in train mode: from_pretrained
    returns a model in eval mode, which would silently turn dropout off for fine-tuning."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(path).expanduser()
    where, extra = (path.parent, {"gguf_file": path.name}) if is_gguf(path) else (path, {})
    model = AutoModelForCausalLM.from_pretrained(where, local_files_only=True, dtype=DTYPES[dtype],
                                                 attn_implementation=attn_implementation, **extra)
    tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True, **extra)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
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
