"""slr_zoo: a component zoo for Stable Latent Reasoning (looped language models)."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``slr_zoo.generate(model, tokenizer, prompts)``: the module, which is also the function, loads
    # on first use, so that ``python -m slr_zoo.generate`` does not find it imported already
    if name == "generate":
        import importlib

        return importlib.import_module("slr_zoo.generate")
    raise AttributeError(f"module 'slr_zoo' has no attribute {name!r}")
