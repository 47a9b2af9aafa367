"""Comparing the voxel grids of images (size, spacing, origin, direction), shared by every stage that
checks that an image and its label can be overlaid."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

GEOMETRY_TOLERANCE = 1e-3


def geometry_of(image: sitk.Image) -> tuple:
    """(size, spacing, origin, direction) of a SimpleITK image."""
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def first_geometry_difference(geometry: tuple, reference: tuple):
    """(name, value, reference value) of the first property that differs, or None when the grids match."""
    if tuple(geometry[0]) != tuple(reference[0]):
        return "size", tuple(geometry[0]), tuple(reference[0])
    for name, a, b in zip(("spacing", "origin", "direction"), geometry[1:4], reference[1:4]):
        if not np.allclose(a, b, atol=GEOMETRY_TOLERANCE, rtol=1e-4):
            return name, tuple(round(x, 4) for x in a), tuple(round(x, 4) for x in b)
    return None
