from slr_zoo.halting.base import HALTING, Decision, HaltingPolicy, HaltingUnit, LearnedHalting, fp32
from slr_zoo.halting import act, exit_gate, fixed, kl, ponder, threshold  # noqa: F401  (registers members)

__all__ = ["HALTING", "Decision", "HaltingPolicy", "HaltingUnit", "LearnedHalting", "fp32"]
