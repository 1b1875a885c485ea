from slr_zoo.training.objectives.base import OBJECTIVES, Objective, at_logits, logit_positions
from slr_zoo.training.objectives import (  # noqa: F401  (registers members)
    answer,
    distill,
    language_model,
    reach,
    step_supervision,
    thought_reach,
)

__all__ = ["OBJECTIVES", "Objective", "at_logits", "logit_positions"]
