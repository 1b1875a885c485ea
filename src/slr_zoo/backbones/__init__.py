from slr_zoo.backbones.hf import BACKBONES, Backbone, LayerStack, SequenceContext

__all__ = ["BACKBONES", "Backbone", "LayerStack", "SequenceContext"]
