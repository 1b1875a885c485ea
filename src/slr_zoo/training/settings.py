"""The typed settings training receives: the recipe's ``optim`` and ``trainer`` groups.

The recipe schema uses these dataclasses for validation, and ``recipe/`` builds them from a
validated recipe, so training code reads attributes, never raw recipe dictionaries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: Optional[float] = 1.0


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    batch_size: int = 32
    eval_batch_size: Optional[int] = None
    precision: Literal["32-true", "32", "bf16-mixed", "bf16-true", "16-mixed"] = "32-true"
    accelerator: str = "auto"
    strategy: Literal["auto", "ddp", "ddp_spawn", "ddp_fork", "fsdp", "single"] = "auto"
    devices: Union[int, str] = 1
    num_nodes: int = 1
    val_every: Optional[int] = None
    log_every: int = 25
    num_workers: int = 0
    threads: Optional[int] = None
    parallel_cells: int = 1  # grid cells trained at once, each in its own process (CPU grids of small models)
    progress_bar: bool = True
    on_nonfinite: Literal["stop", "skip"] = "stop"
    activation_checkpointing: bool = False  # recompute each core pass in backward instead of storing it
    compile: bool = False  # torch.compile the shared core (inductor), once for every depth and batch shape
    checkpoint_every: Optional[int] = None  # steps between checkpoints (default: val_every, else max_steps // 4)


@dataclass
class CurriculumConfig:
    """``training.curriculum``: Coconut's stages (``training/curriculum.py``)."""

    thoughts_per_step: int = 1   # c: thoughts (slots, loop iterations) per replaced step
    max_latent_stage: int = 0    # K: the last stage, and the one validation and generation use
    epochs_per_stage: float = 0  # 0: stage K from the first step (no curriculum); 0.25: a quarter epoch
    reset_optimizer: bool = True  # a fresh AdamW state at every stage, as in Coconut
    uniform_prob: float = 0.0    # chance that a batch is drawn at a random stage
