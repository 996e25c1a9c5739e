"""landmark3d: anatomical landmark localization in 3D medical images."""

__version__ = "0.1.0"
