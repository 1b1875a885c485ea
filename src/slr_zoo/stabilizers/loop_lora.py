"""Loop-wise LoRA: a different low-rank adapter on the shared core at each iteration.

The adapters are forward hooks on chosen linears of the core: the hook adds
``scale * dropout(x) @ A_t^T @ B_t^T`` to the linear's output, with ``t`` the loop step set by
:meth:`LoopLoRA.at_step`. Nothing in the backbone is replaced, so its state-dict keys stay those
of the plain model, and every step's ``A_t, B_t`` is an ordinary parameter in the graph (peft's
``set_adapter`` would freeze the inactive adapters and silently train only one).

Outside ``at_step`` (step 0) the hooks add nothing: the core is then the plain shared core.
Steps past the trained count reuse the last adapter. The hooks read the step as a one-element
index tensor, never as a Python int, so a compiled core (``trainer.compile``) neither specialises
on the step nor needs integer module attributes made symbolic: one graph serves every iteration.
Targets may be ``nn.Linear`` or GPT-2's ``Conv1D``; all weights are handled in the [out, in]
convention.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from slr_zoo.linears import InputMoments, find_targets, linear_shape, low_rank_factors, weight_matrix
from slr_zoo.registry import ArgumentError, Registry


class LoopLoRA(nn.Module):
    """Adapters on the core's linears, selected by the loop step.

    The loop enters ``at_step(t)`` around each core call; the adapter reads the step from there, so
    a recomputation under activation checkpointing (which re-enters the same closure) sees the
    right step too.
    """

    def __init__(self):
        super().__init__()
        self.step = 0

    @contextlib.contextmanager
    def at_step(self, t: int) -> Iterator[None]:
        previous, self.step = self.step, t
        self._entered()
        try:
            yield
        finally:
            self.step = previous
            self._entered()

    def _entered(self) -> None:
        """Called whenever the active step changes (subclasses cache what their hooks read)."""


LOOP_LORAS = Registry("loop_lora", LoopLoRA, context=("core", "max_steps", "hidden_size", "replaced_layers", "roles"))


@LOOP_LORAS.register("none")
class NoLoopLoRA(LoopLoRA):
    pass


def _key(name: str) -> str:
    return name.replace(".", "-")


class _Hook:
    """A forward hook that adds one target's adapter output (a picklable, copyable callable)."""

    def __init__(self, lora: "_HookedLoRA", key: str):
        self.lora, self.key = lora, key

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        row = self.lora.row
        if row is None:
            return None
        return output + self.lora.delta(self.key, args[0], row).to(output.dtype)


class _HookedLoRA(LoopLoRA):
    """Shared plumbing: target lookup, scale, dropout, hooks; subclasses say what delta(x, t) is."""

    def active_step(self) -> int:
        """The adapter the hooks apply: 0 outside the loop, else the step, past the table the last."""
        return min(self.step, self.steps) if self.step > 0 else 0

    def _entered(self) -> None:
        # [1] long: the row of the active step's adapter in each [steps, ...] table, or None
        # outside the loop. Cloned so that every step hands a compiled core the same layout: a view
        # into step_rows has a storage offset per step, and dynamo recompiled for it.
        active = self.active_step()
        self.row = None if active == 0 else self.step_rows[active - 1:active].clone()

    def __init__(self, core: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float, steps: int,
                 roles: dict[str, tuple[str, ...]] | None = None):
        super().__init__()
        if rank < 1:
            raise ArgumentError("rank", f"must be >= 1, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ArgumentError("dropout", f"must be in [0, 1), got {dropout}")
        if core is None:
            raise ValueError("loop_lora needs the backbone's core (supplied by build_model)")
        self.rank, self.scale, self.steps = rank, alpha / rank, max(1, steps)
        self.register_buffer("step_rows", torch.arange(self.steps), persistent=False)
        self.row: torch.Tensor | None = None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        found = find_targets(core, targets, roles)
        self.target_paths = {n: path for n, (path, _) in found.items()}
        self.target_modules = {n: m for n, (_, m) in found.items()}  # plain dict: not registered as children
        self.shapes = {_key(n): linear_shape(m) for n, m in self.target_modules.items()}
        self._handles = [m.register_forward_hook(_Hook(self, _key(n))) for n, m in self.target_modules.items()]

    def remove(self) -> None:
        """Detach the hooks from the core (the core is then the plain shared core again)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def delta(self, key: str, x: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        """The adapter's output for input x at the step whose table row is ``row`` ([1] long)."""
        raise NotImplementedError

    def weight_delta(self, key: str, t: int) -> torch.Tensor:
        """The [out, in] matrix the adapter adds to the target's weight at step t."""
        raise NotImplementedError

    def effective_weight(self, name: str, t: int) -> torch.Tensor:
        """The target's weight as the core sees it at step t (base weight + adapter)."""
        module = self.target_modules[name]
        return weight_matrix(module) + self.weight_delta(_key(name), min(max(t, 1), self.steps)).to(module.weight.dtype)


def _low_rank_update(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    return (x @ A.to(x.dtype).t()) @ B.to(x.dtype).t()


def _at(table: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """``table[row]`` for a [1] index tensor: one step's slice of a per-step table."""
    return table.index_select(0, row).squeeze(0)


def _fro_norm(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """||B A||_F from r x r products: trace((B^T B)(A A^T))."""
    return ((B.t() @ B) * (A @ A.t())).sum().clamp_min(0).sqrt()


class _Stack(nn.Module):
    """A[T, r, in] and B[T, out, r] of one target."""

    def __init__(self, steps: int, rank: int, out_features: int, in_features: int):
        super().__init__()
        self.A = nn.Parameter(torch.empty(steps, rank, in_features))
        self.B = nn.Parameter(torch.zeros(steps, out_features, rank))
        for a in self.A.data:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear(in, r); B = 0 keeps it neutral


def core_norms(core: nn.Module) -> dict[str, nn.Module]:
    """The core's normalisation layers with a per-channel gain (RMSNorm, LayerNorm)."""
    return {path: m for path, m in core.named_modules()
            if (isinstance(m, nn.LayerNorm) or "RMSNorm" in type(m).__name__)
            and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 1}


def normalised(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What ``norm`` multiplies by its gain: x / rms(x) (RMSNorm) or the standardised x (LayerNorm)."""
    if isinstance(norm, nn.LayerNorm):
        return F.layer_norm(x, norm.normalized_shape, None, None, norm.eps)
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None) or torch.finfo(torch.float32).eps
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class _NormHook:
    """Adds step t's gain (and bias) change of one norm: (dw_t * normalised(x) + db_t)."""

    def __init__(self, lora: "PerStepLoRA", key: str):
        self.lora, self.key = lora, key

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        lora, row = self.lora, self.lora.row
        if row is None:
            return None
        out = output + _at(lora.norm_gains[self.key], row).to(output.dtype) * normalised(module, args[0])
        if self.key in lora.norm_biases:
            out = out + _at(lora.norm_biases[self.key], row).to(output.dtype)
        return out


@LOOP_LORAS.register("per_step")
class PerStepLoRA(_HookedLoRA):
    """One adapter (A_t, B_t) per loop step on each target linear (Bae et al. 2025, Relaxed
    Recursive Transformers, arXiv 2410.20672).

    ``init: zero`` has B = 0, so a fresh adapter is exactly neutral. ``init: svd`` needs
    ``backbone.share: average``: step t's adapter starts from the rank-r truncated SVD of
    (original layer t's weight - the averaged core weight), so at full rank every step sees the
    original layer's weight again. Steps past ``backbone.loops`` start from zero.

    ``norms: true`` gives every step its own change of each norm's gain (and bias): d numbers per
    norm and step. Pretrained layers differ most in their norm gains, which no low-rank change of
    the linears can restore; with ``init: svd`` each step starts from its original layer's norms
    exactly.

    ``calibration: N`` (with ``init: svd``) makes each truncation best on the inputs the original
    layer sees rather than in the Frobenius norm: before training starts, N training examples
    (spread over the training set) run through the original layers (:meth:`calibrate`). On
    SmolLM2-135M looped as 2 + 2 x 13 + 2 at rank 64 this takes the next-token loss on held-out
    questions from 5.6x the original's to 1.04x when calibrated on questions of the same kind
    (3.0x on unrelated prose; docs/pretrained.md)."""

    def __init__(
        self,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        targets: list[str] = ["query", "value"],  # noqa: B006  (never mutated)
        init: Literal["zero", "svd"] = "zero",
        core: Optional[nn.Module] = None,
        max_steps: int = 1,
        replaced_layers: Optional[list] = None,
        roles: Optional[dict] = None,
        norms: bool = False,
        calibration: int = 0,
    ):
        super().__init__(core, targets, rank, alpha, dropout, max_steps, roles)
        if calibration < 0:
            raise ArgumentError("calibration", f"must be >= 0 (training examples), got {calibration}")
        if calibration and init != "svd":
            raise ArgumentError("calibration", "whitens the svd initialisation by the inputs of the replaced layers; "
                                "it needs init: svd")
        self.calibration = calibration
        self.adapters = nn.ModuleDict(
            {key: _Stack(self.steps, rank, out_f, in_f) for key, (out_f, in_f) in self.shapes.items()}
        )
        self.norm_modules = core_norms(core) if norms else {}  # plain dict: not registered as children
        self.norm_gains = nn.ParameterDict({_key(n): nn.Parameter(torch.zeros(self.steps, m.weight.numel()))
                                            for n, m in self.norm_modules.items()})
        self.norm_biases = nn.ParameterDict({_key(n): nn.Parameter(torch.zeros(self.steps, m.bias.numel()))
                                             for n, m in self.norm_modules.items()
                                             if isinstance(getattr(m, "bias", None), torch.Tensor)})
        self._handles += [m.register_forward_hook(_NormHook(self, _key(n))) for n, m in self.norm_modules.items()]
        self.replaced: list = []  # plain list: the originals are not parameters of the adapter
        if init == "svd":
            self._init_svd(core, replaced_layers or [])
        elif init != "zero":
            raise ArgumentError("init", f"must be 'zero' or 'svd', got {init!r}")

    def delta(self, key, x, row):
        stack = self.adapters[key]
        return self.scale * _low_rank_update(self.dropout(x), _at(stack.A, row), _at(stack.B, row))

    def weight_delta(self, key, t):
        stack = self.adapters[key]
        return self.scale * stack.B[t - 1] @ stack.A[t - 1]

    @torch.no_grad()
    def _init_svd(self, core: nn.Module, replaced: list) -> None:
        if not replaced:
            raise ArgumentError(
                "init",
                "svd initialises each step from the pretrained layer it replaces, and this backbone "
                "replaces none (the backbone needs share: average and loops: N)",
            )
        self.replaced = replaced
        self.per_loop = len(core.layers)
        self.init_from_replaced()

    def _original(self, t: int, path: str) -> nn.Module:
        """The module at ``path`` of the core ("layers.<j>.<path inside the layer>") in the
        pretrained layer that core layer j stands for at step t."""
        _, index, rest = path.split(".", 2)
        return self.replaced[(t - 1) * self.per_loop + int(index)].get_submodule(rest)

    def _replaced_steps(self) -> range:
        return range(1, min(len(self.replaced) // self.per_loop, self.steps) + 1)

    def replaced_linears(self) -> dict[tuple[int, str], nn.Module]:
        """(step t, target name) -> the pretrained linear that the target stands for at step t."""
        return {(t, name): self._original(t, path) for name, path in self.target_paths.items()
                for t in self._replaced_steps()}

    def _replaced_index(self, t: int, name: str) -> int:
        """Which of the replaced layers (in order) holds step t's original of target ``name``."""
        return (t - 1) * self.per_loop + int(self.target_paths[name].split(".", 2)[1])

    @torch.no_grad()
    def calibrate(self, run_originals: Callable[[Callable[[int], Any]], Any]) -> None:
        """Initialise every stand-in again, each best on the inputs its original receives while
        ``run_originals(watch)`` runs the replaced layers over some text (e.g.
        ``Backbone.run_replaced``): it must run them one at a time in order, entering the
        context ``watch(i)`` while replaced layer i runs. Each layer's input moments are turned
        into its stand-ins when its ``watch`` exits, so only one layer's moments are held at a
        time (a [in, in] float64 matrix per replaced linear: 35 MB per SmolLM2 layer, 1.8 GB per
        7B Llama layer, against the whole model's worth at once). See :meth:`init_from_replaced`."""
        by_layer: dict[int, dict] = {}
        for (t, name), original in self.replaced_linears().items():
            by_layer.setdefault(self._replaced_index(t, name), {})[(t, name)] = original
        done: set = set()

        @contextlib.contextmanager
        def watch(index: int):
            linears = by_layer.get(index, {})
            with InputMoments(linears) as moments:
                yield
            collected = moments.result()
            missing = [f"step {t} {name}" for (t, name) in linears if (t, name) not in collected]
            if missing:
                raise ValueError(f"calibration: the originals of {', '.join(missing[:4])}"
                                 f"{' ...' if len(missing) > 4 else ''} received no input")
            for (t, name), moment in collected.items():
                self._init_step(t, name, moment)
            done.add(index)

        before = {key: value.clone() for key, value in self.adapters.state_dict().items()}
        try:
            run_originals(watch)
            skipped = sorted(set(by_layer) - done)
            if skipped:
                raise ValueError(f"calibration: replaced layer(s) {skipped[:4]} were not run under watch(i); "
                                 "run_originals must run every replaced layer")
        except BaseException:
            self.adapters.load_state_dict(before)  # all layers calibrated, or none
            raise
        self._init_norms()

    @torch.no_grad()
    def init_from_replaced(self, input_moments: Optional[dict] = None) -> None:
        """Set step t's adapter to the rank-r stand-in for (original layer t's weight - the shared
        weight), and its norm gains to the original's. ``input_moments`` ((t, target name) ->
        E[x xᵀ] of that original linear's inputs on some text; :meth:`calibrate` collects them)
        makes the stand-in best on those inputs rather than in the Frobenius norm: at a rank far
        below the width, which directions are kept decides how close the converted model stays
        to the original."""
        if not self.replaced:
            raise ValueError("init_from_replaced needs an adapter built with init: svd over a backbone with share: average")
        for t, name in self.replaced_linears():
            self._init_step(t, name, (input_moments or {}).get((t, name)))
        self._init_norms()

    def _init_step(self, t: int, name: str, moment: Optional[torch.Tensor]) -> None:
        stack = self.adapters[_key(name)]
        shared = weight_matrix(self.target_modules[name]).double()
        original = weight_matrix(self._original(t, self.target_paths[name])).double().to(shared.device)
        try:
            B, A = low_rank_factors(original - shared, self.rank, moment)
        except ValueError as error:
            raise ValueError(f"calibration of step {t}'s {name}: {error}") from None
        root_scale = math.sqrt(self.scale)
        k = A.size(0)
        stack.B[t - 1].zero_()
        stack.A[t - 1].zero_()
        stack.B[t - 1, :, :k].copy_(B / root_scale)
        stack.A[t - 1, :k].copy_(A / root_scale)

    def _init_norms(self) -> None:
        for name, norm in self.norm_modules.items():
            for t in self._replaced_steps():
                original = self._original(t, name)
                self.norm_gains[_key(name)][t - 1].copy_(original.weight.to(norm.weight.device) - norm.weight)
                if _key(name) in self.norm_biases:
                    self.norm_biases[_key(name)][t - 1].copy_(original.bias.to(norm.bias.device) - norm.bias)

    @torch.no_grad()
    def monitors(self) -> dict[str, float]:
        """Mean ||scale * B_t A_t||_F over targets, per step: how far each step has moved from the shared core."""
        out = {}
        for t in range(1, self.steps + 1):
            norms = [_fro_norm(s.A[t - 1].float(), s.B[t - 1].float()) for s in self.adapters.values()]
            out[f"delta_norm_t{t}"] = self.scale * torch.stack(norms).mean().item()
        return out


@LOOP_LORAS.register("shared_scaled")
class SharedScaledLoRA(_HookedLoRA):
    """One adapter (A, B) per target shared by every step, scaled by a learned per-step factor
    s_t (initialised to 1): the core at step t is W + s_t * scale * B A. Far fewer parameters than
    ``per_step``; B = 0 at init keeps it neutral."""

    def __init__(
        self,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        targets: list[str] = ["query", "value"],  # noqa: B006
        core: Optional[nn.Module] = None,
        max_steps: int = 1,
        roles: Optional[dict] = None,
    ):
        super().__init__(core, targets, rank, alpha, dropout, max_steps, roles)
        self.adapters = nn.ModuleDict(
            {key: _Stack(1, rank, out_f, in_f) for key, (out_f, in_f) in self.shapes.items()}
        )
        self.step_scale = nn.Parameter(torch.ones(self.steps))

    def delta(self, key, x, row):
        stack = self.adapters[key]
        s = _at(self.step_scale, row).to(x.dtype) * self.scale
        return s * _low_rank_update(self.dropout(x), stack.A[0], stack.B[0])

    def weight_delta(self, key, t):
        stack = self.adapters[key]
        return self.step_scale[t - 1] * self.scale * stack.B[0] @ stack.A[0]

    @torch.no_grad()
    def monitors(self) -> dict[str, float]:
        return {f"scale_t{t}": v for t, v in enumerate(self.step_scale.tolist(), start=1)}
