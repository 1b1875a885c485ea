from slr_zoo.training.objectives.base import OBJECTIVES, Objective
from slr_zoo.training.objectives import answer, distill, language_model, reach, step_supervision  # noqa: F401  (registers members)

__all__ = ["OBJECTIVES", "Objective"]
