"""Data: toy 2-D sets, the embedded digits, standard archives, scalers and dequantisation."""

from .transforms import from_model_scale, random_hflip, scale_affine, to_model_scale, uniform_dequantize

__all__ = ["from_model_scale", "random_hflip", "scale_affine", "to_model_scale", "uniform_dequantize"]
