from slr_zoo.decoders.base import DECODERS, Decoder

__all__ = ["DECODERS", "Decoder"]
