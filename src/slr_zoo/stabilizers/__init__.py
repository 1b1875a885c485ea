from slr_zoo.stabilizers.combine import COMBINES, Combine
from slr_zoo.stabilizers.injection import INJECTIONS, Injection
from slr_zoo.stabilizers.loop_lora import LOOP_LORAS, LoopLoRA
from slr_zoo.stabilizers.step_embedding import STEP_EMBEDDINGS, StepEmbedding

__all__ = [
    "COMBINES", "Combine", "INJECTIONS", "Injection", "LOOP_LORAS", "LoopLoRA",
    "STEP_EMBEDDINGS", "StepEmbedding",
]
