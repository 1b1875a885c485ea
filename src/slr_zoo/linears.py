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


def low_rank_factors(delta: torch.Tensor, rank: int,
                     input_moment: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B [out, k], A [k, in]), k = min(rank, min(out, in)), with B A the best rank-k stand-in for
    the [out, in] matrix ``delta``.

    Without ``input_moment`` "best" is in the Frobenius norm (the truncated SVD). With it, the
    second moment E[x xᵀ] [in, in] of the inputs the matrix will see, "best" is on those inputs,
    ‖(delta − B A) x‖ over the data: the truncation then spends its rank on the directions the
    inputs occupy, not on weight directions no input excites (SVD-LLM's whitening, Wang et al.
    2024, arXiv 2403.07378). Each of the k components is split so that its column of B and its
    row of A have the same norm, as the plain SVD's are: an optimiser then moves both factors at
    comparable rates."""
    delta = delta.double()
    k = min(rank, *delta.shape)
    if input_moment is None:
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        return U[:, :k] * S[:k].sqrt(), S[:k].sqrt()[:, None] * Vh[:k]
    moment = input_moment.double().to(delta.device)
    if not torch.isfinite(moment).all():
        raise ValueError("the input moment has non-finite entries (an overflow in the calibration forward?)")
    L = _cholesky(moment)
    U, S, Vh = torch.linalg.svd(delta @ L, full_matrices=False)
    # B A L = U_k S_k Vh_k, so B A = U_k (S_k Vh_k L⁻¹); then balance each component's two halves
    B, A = U[:, :k], S[:k, None] * torch.linalg.solve_triangular(L.mT, Vh[:k].mT, upper=True).mT
    balance = (A.norm(dim=1) / B.norm(dim=0).clamp_min(1e-30)).sqrt()
    return B * balance, A / balance[:, None].clamp_min(1e-30)


def _cholesky(moment: torch.Tensor) -> torch.Tensor:
    """L with L Lᵀ = moment + a small ridge: the ridge keeps L invertible when some input
    direction is never excited, and grows until the factorisation succeeds."""
    eye = torch.eye(moment.size(0), dtype=moment.dtype, device=moment.device)
    ridge = 1e-6 * moment.diagonal().mean().clamp_min(1e-12)
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(moment + ridge * eye)
        if int(info) == 0:
            return L
        ridge = ridge * 100
    raise ValueError("the input moment is not positive semi-definite, even with a ridge")


class InputMoments:
    """E[x xᵀ] of the inputs reaching chosen linears while it is entered: for initialising a
    low-rank stand-in on the inputs a layer really sees (:func:`low_rank_factors`).

    ``modules`` maps any key to a linear. Padding is the caller's business: every row of the
    input counts. Linears called one after another on the same tensor (q, k and v of an
    attention; gate and up of an MLP) share one product, the costly part; products are taken in
    float32 (or wider) and summed in float64."""

    def __init__(self, modules: dict):
        self.modules = modules
        self._sums: dict = {}
        self._counts: dict = {}
        self._last: tuple | None = None  # (input tensor, its x^T x): reused by the next linear on it
        self._handles: list = []

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        if self._last is not None and self._last[0] is x:
            return self._last[1]
        flat = x.detach().reshape(-1, x.size(-1))
        flat = flat.float() if flat.element_size() < 4 else flat
        product = (flat.mT @ flat).double()
        self._last = (x, product)
        return product

    def _hook(self, key):
        def accumulate(module, args, output):
            x = args[0]
            product = self._product(x)
            self._sums[key] = self._sums.get(key, 0) + product
            self._counts[key] = self._counts.get(key, 0) + x.numel() // x.size(-1)
        return accumulate

    def __enter__(self) -> "InputMoments":
        self._handles = [m.register_forward_hook(self._hook(key)) for key, m in self.modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._last = None

    def result(self) -> dict:
        """key -> [in, in] second moment; a linear that saw no input is left out. Divides the
        sums in place (a moment per linear can be most of the memory), so call it once."""
        return {key: self._sums[key].div_(self._counts[key]) for key in self._sums}
