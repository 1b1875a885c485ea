"""Finding a model's linear layers by name or by role: one matcher for peft's LoRA on a pretrained
backbone (``backbone.lora.targets``) and for the loop-wise LoRA on the core (``loop.loop_lora.targets``),
so a target means the same in both and a name that matches nothing is refused in both.
"""

from __future__ import annotations

import torch
from torch import nn

from slr_zoo.registry import ArgumentError


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features)."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    return module.weight.shape[1], module.weight.shape[0]  # Conv1D stores [in, out]


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight in the [out, in] convention (a view for Conv1D)."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


def core_linears(core: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """name -> (module path, linear) of the core's linears. Under peft's LoRA a target such as
    ``q_proj`` is a wrapper around ``q_proj.base_layer``: that linear is found under the wrapper's
    name, and peft's own matrices (``lora_A``, ``lora_B``) are not targets."""
    found = {}
    for path, module in core.named_modules():
        parts = path.split(".")
        if not is_linear(module) or any(part.startswith("lora_") for part in parts):
            continue
        name = ".".join(parts[:-1]) if parts[-1] == "base_layer" else path
        found[name] = (path, module)
    return found


def find_targets(core: nn.Module, targets: list[str], roles: dict[str, tuple[str, ...]] | None = None,
                 where: str = "the core") -> dict[str, tuple[str, nn.Module]]:
    """The linears of ``core`` (``where`` names it in errors) whose name equals or ends with
    ``.<target>``, as name -> (module path, linear). A role of the backbone (``query``, ``value``,
    ``attention``, ``mlp``, ...; ``roles``) stands for its linears, so one recipe ports across
    families; ``all-linear`` takes every one. Every target must match: a misspelt one beside a
    good one would otherwise leave its layers silently unadapted."""
    linears = core_linears(core)
    roles = roles or {}
    if not targets:
        raise ArgumentError("targets", "needs at least one role or linear name")
    chosen: dict[str, tuple[str, nn.Module]] = {}
    for target in targets:
        if target == "all-linear":
            chosen.update(linears)
            continue
        hits = {n: m for suffix in roles.get(target, (target,)) for n, m in linears.items()
                if n == suffix or n.endswith("." + suffix)}
        if not hits:
            short = sorted({n.split(".", 2)[-1] for n in linears} | {n.rsplit(".", 1)[-1] for n in linears})
            full = f"; full names: {', '.join(sorted(linears))}" if len(linears) <= 24 else ""
            raise ArgumentError(
                "targets",
                f"{target!r} matches no linear layer of {where}; roles: {', '.join(sorted(roles)) or 'none'}; "
                f"linears: {', '.join(short) if len(short) <= 24 else ', '.join(short[:24]) + ', ...'} "
                f"(or 'all-linear'){full}",
            )
        chosen.update(hits)
    return dict(sorted(chosen.items()))
