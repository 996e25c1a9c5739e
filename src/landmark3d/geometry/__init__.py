"""Physical-space geometry: the only place where voxel indices exist."""

from landmark3d.geometry.space import Geometry, Volume

__all__ = ["Geometry", "Volume"]
