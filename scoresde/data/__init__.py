"""Data: toy 2-D sets, the embedded digits, standard archives, the user's own array file, scalers and dequantisation."""

from .archives import default_root, load_cifar10, load_mnist, read_idx
from .datasets import DATASET_NAMES, SPLITS, TENSOR_FILE_OPTIONS, TOY_SPLIT_SIZES, DataSet, load_dataset
from .tensor_file import load_tensor_file, to_value_range
from .digits import DIGITS_LEVELS, load_digits_split
from .toy import checkerboard, default_gmm, eight_gaussians, eight_gaussians_gmm, swiss_roll, two_moons
from .transforms import from_model_scale, noise_mixture, random_hflip, scale_affine, to_model_scale, uniform_dequantize

__all__ = [
    "DataSet",
    "load_dataset",
    "DATASET_NAMES",
    "SPLITS",
    "TOY_SPLIT_SIZES",
    "TENSOR_FILE_OPTIONS",
    "load_tensor_file",
    "to_value_range",
    "swiss_roll",
    "two_moons",
    "eight_gaussians",
    "eight_gaussians_gmm",
    "checkerboard",
    "default_gmm",
    "DIGITS_LEVELS",
    "load_digits_split",
    "load_cifar10",
    "load_mnist",
    "read_idx",
    "default_root",
    "from_model_scale",
    "noise_mixture",
    "random_hflip",
    "scale_affine",
    "to_model_scale",
    "uniform_dequantize",
]
