from slr_zoo.halting.base import HALTING, Decision, HaltingPolicy
from slr_zoo.halting import fixed  # noqa: F401  (registers members)

__all__ = ["HALTING", "Decision", "HaltingPolicy"]
