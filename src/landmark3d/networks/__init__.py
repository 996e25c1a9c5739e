"""Neural networks (torch + MONAI). Networks take explicit arguments and never read files."""

from landmark3d.networks.coarse import CoarseRegressor
from landmark3d.networks.patch_unet import PatchUNet, build_fine_models, fine_model_routes

__all__ = ["CoarseRegressor", "PatchUNet", "build_fine_models", "fine_model_routes"]
