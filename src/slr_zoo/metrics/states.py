"""What the loop's intermediate states say (RQ2, RQ3): stability per iteration, linear probes,
and the reach probe's table. Plain functions of states and labels, so that ``evaluate`` and tests
call the same code.

Stability of a state sequence h_0, h_1, ..., h_T (each [B, S, d], read at the real positions):

- ``delta_t`` = mean over samples of ||h_t - h_{t-1}|| / ||h_{t-1}|| (norms over positions and
  channels of a sample), and ``norm_t`` = mean over samples of ||h_t|| / sqrt(positions);
- a sample *diverges* at t when h_t is non-finite or its norm exceeds ``bound`` times its norm at
  h_0; ``diverged_fraction`` counts samples that diverge at any t;
- a sample *converges* at the first t whose change falls under ``tolerance``;
  ``converged_fraction`` and ``converged_at`` (the mean first such t over converged samples).
"""

from __future__ import annotations

import math

import torch


def stability(states: list[torch.Tensor], real: torch.Tensor, tolerance: float = 1e-3,
              bound: float = 100.0) -> dict:
    """``states``: [h_0, h_1, ..., h_T]; ``real`` [B, S] bool: the positions to read."""
    mask = real[..., None].to(states[0].dtype)
    positions = real.sum(dim=1).clamp_min(1).to(states[0].dtype)

    def sample_norm(h: torch.Tensor) -> torch.Tensor:
        return (h.nan_to_num(posinf=float("inf"), neginf=float("inf")) * mask).pow(2).sum(dim=(1, 2)).sqrt()

    start = sample_norm(states[0])
    diverged = torch.zeros(real.size(0), dtype=torch.bool, device=real.device)
    converged_at = torch.zeros(real.size(0), dtype=torch.long, device=real.device)
    deltas, norms = [], []
    for t in range(1, len(states)):
        h, prev = states[t], states[t - 1]
        norm = sample_norm(h)
        change = sample_norm(h - prev) / sample_norm(prev).clamp_min(1e-12)
        bad = ~torch.isfinite(h).flatten(1).all(dim=1) | (norm > bound * start)
        diverged |= bad
        fine = ~diverged
        deltas.append(float(change[fine].mean()) if fine.any() else math.nan)
        norms.append(float((norm / positions.sqrt())[fine].mean()) if fine.any() else math.nan)
        newly = (change < tolerance) & (converged_at == 0) & fine
        converged_at = torch.where(newly, t, converged_at)
    done = converged_at > 0
    return {
        "delta": [round(d, 6) for d in deltas],
        "norm": [round(n, 6) for n in norms],
        "diverged_fraction": round(float(diverged.float().mean()), 4),
        "converged_fraction": round(float(done.float().mean()), 4),
        "converged_at": round(float(converged_at[done].float().mean()), 3) if done.any() else None,
        "tolerance": tolerance,
        "bound": bound,
    }


def linear_probe(features: torch.Tensor, labels: torch.Tensor, train_fraction: float = 0.5,
                 epochs: int = 150, seed: int = 0) -> dict:
    """A linear classifier (softmax regression, weight decay 1e-3) trained on the first
    ``train_fraction`` of ``features`` [N, d] and scored on the rest: what a state encodes
    linearly. Returns held-out accuracy, the majority-class rate of the held-out labels (chance)
    and the number of classes."""
    features = features.float()
    classes, y = torch.unique(labels, return_inverse=True)
    n_train = max(1, int(len(y) * train_fraction))
    mean, std = features[:n_train].mean(0), features[:n_train].std(0).clamp_min(1e-6)
    x = (features - mean) / std
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(x.size(1), len(classes), generator=generator) * 0.01).requires_grad_()
    bias = torch.zeros(len(classes), requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.05, weight_decay=1e-3)
    with torch.enable_grad():
        for _ in range(epochs):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(x[:n_train] @ weight + bias, y[:n_train])
            loss.backward()
            optimizer.step()
    held = y[n_train:]
    if len(held) == 0:
        return {"accuracy": None, "chance": None, "classes": len(classes)}
    with torch.no_grad():
        predicted = (x[n_train:] @ weight + bias).argmax(-1)
    chance = float(torch.bincount(held, minlength=len(classes)).max()) / len(held)
    return {"accuracy": round(float((predicted == held).float().mean()), 4), "chance": round(chance, 4),
            "classes": len(classes)}


def reach_table(probe_logits: list[torch.Tensor], reach: torch.Tensor, unreached: int) -> list[dict]:
    """Per state h_t, t = 0 (the prelude's output), 1, 2, ..., the fraction of labelled question
    tokens the reach probe marks reached (logit > 0), by kind: reached within t hops, reachable
    later, never reachable."""
    labelled = reach >= 0
    rows = []
    for t, logits in enumerate(probe_logits):
        marked = logits > 0
        row = {"t": t}
        for kind, where in (("reached", reach <= t), ("unreached", (reach > t) & (reach < unreached)),
                            ("never", reach >= unreached)):
            pick = labelled & where
            row[kind] = round(float(marked[pick].float().mean()), 4) if pick.any() else None
        rows.append(row)
    return rows
