"""Brain anatomy for the synthetic benchmark: the MNI152 2009a template shipped inside nilearn.

The template (197×233×189 at 1 mm, skull-stripped T1 plus grey/white-matter probability maps) is read
from the installed nilearn package, never downloaded. Each synthetic case samples the tissue maps
through its own smooth random deformation, so every case has a different brain.

Arrays here are indexed like the template, (x, y, z) in RAS order.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from calibnet.errors import CalibnetError

TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
TISSUES = ("csf", "gm", "wm")


@dataclass(frozen=True)
class TissueTemplate:
    """Tissue fractions (0–1, float32) and brain mask of the 1 mm MNI template, with its affine."""
    maps: dict  # tissue name -> fraction map; "brain" -> 0/1 mask
    affine: np.ndarray  # voxel index -> RAS mm

    def brain_box_mm(self, margin_mm: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
        """RAS corners (low, high) of the brain's bounding box, widened by ``margin_mm``."""
        idx = np.argwhere(self.maps["brain"] > 0)
        corners = np.stack([idx.min(0), idx.max(0)])
        mm = nib.affines.apply_affine(self.affine, corners)
        return mm.min(0) - margin_mm, mm.max(0) + margin_mm


def _template_dir() -> Path:
    try:
        import nilearn
    except ImportError:  # pragma: no cover - nilearn is a dependency
        raise CalibnetError("nilearn is not installed; it ships the MNI template the synthetic benchmark needs.") \
            from None
    return Path(nilearn.__file__).parent / "datasets" / "data"


@functools.lru_cache(maxsize=1)
def load_mni_tissue_template() -> TissueTemplate:
    """Load the template's T1, GM and WM maps; CSF = brain mask − GM − WM (clipped to [0, 1])."""
    folder = _template_dir()
    images = {}
    for key, filename in TEMPLATE_FILES.items():
        path = folder / filename
        if not path.is_file():
            raise CalibnetError(
                f"{path} is missing from the installed nilearn; reinstall nilearn (>=0.10), which ships it.")
        images[key] = nib.load(path)
    brain = (np.asarray(images["t1"].dataobj) > 0).astype(np.float32)
    gm = np.asarray(images["gm"].dataobj, dtype=np.float32) / 255.0 * brain
    wm = np.asarray(images["wm"].dataobj, dtype=np.float32) / 255.0 * brain
    total = gm + wm
    over = total > 1
    gm[over] /= total[over]
    wm[over] /= total[over]
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    return TissueTemplate(maps={"csf": csf, "gm": gm, "wm": wm, "brain": brain}, affine=images["t1"].affine)


@dataclass(frozen=True)
class BenchmarkGrid:
    """The voxel grid every synthetic case is written on: isotropic, covering the template's brain."""
    shape: tuple  # (x, y, z) voxels
    spacing_mm: float
    origin_ras_mm: np.ndarray  # RAS position of voxel (0, 0, 0)

    @property
    def center_ras_mm(self) -> np.ndarray:
        return self.origin_ras_mm + (np.array(self.shape) - 1) / 2 * self.spacing_mm

    def voxel_coordinates_mm(self) -> np.ndarray:
        """RAS coordinates of every voxel, shape (3, x, y, z)."""
        axes = [self.origin_ras_mm[i] + np.arange(n) * self.spacing_mm for i, n in enumerate(self.shape)]
        return np.stack(np.meshgrid(*axes, indexing="ij")).astype(np.float32)


def benchmark_grid(shape: tuple, template: TissueTemplate) -> BenchmarkGrid:
    """The isotropic grid of ``shape`` voxels whose field of view just holds the template's brain."""
    low, high = template.brain_box_mm()
    spacing = float(np.max((high - low) / np.array(shape)))
    center = (low + high) / 2
    origin = center - (np.array(shape) - 1) / 2 * spacing
    return BenchmarkGrid(shape=tuple(int(s) for s in shape), spacing_mm=round(spacing, 4), origin_ras_mm=origin)


def _rotation_matrix(angles_rad: np.ndarray) -> np.ndarray:
    ax, ay, az = angles_rad
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def smooth_random_field(shape: tuple, rng: np.random.Generator, control_points: int = 5) -> np.ndarray:
    """A smooth random field of unit-ish amplitude: Gaussian noise on a coarse lattice, cubic-upsampled."""
    coarse = rng.standard_normal((control_points,) * len(shape))
    zoom = [s / control_points for s in shape]
    return ndimage.zoom(coarse, zoom, order=3, mode="nearest")[tuple(slice(0, s) for s in shape)].astype(np.float32)


def deformed_tissue_maps(template: TissueTemplate, grid: BenchmarkGrid, rng: np.random.Generator,
                         max_rotation_deg: float = 6.0, max_scaling: float = 0.06, max_shift_mm: float = 4.0,
                         warp_mm: float = 3.0) -> dict:
    """Sample the template's tissue maps on ``grid`` through a random affine plus smooth elastic warp.

    Returns float32 maps ``csf``, ``gm``, ``wm`` (fractions) and ``brain`` (0/1), shape ``grid.shape``.
    """
    points = grid.voxel_coordinates_mm()
    center = grid.center_ras_mm.astype(np.float32)
    rotation = _rotation_matrix(np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg, 3)))
    scaling = np.diag(1 + rng.uniform(-max_scaling, max_scaling, 3))
    matrix = (rotation @ scaling).astype(np.float32)
    shift = rng.uniform(-max_shift_mm, max_shift_mm, 3).astype(np.float32)
    relative = points.reshape(3, -1) - center[:, None]
    source_mm = (matrix @ relative + center[:, None] + shift[:, None]).reshape(points.shape)
    for axis in range(3):
        source_mm[axis] += warp_mm * smooth_random_field(grid.shape, rng)
    to_voxel = np.linalg.inv(template.affine)
    source_vox = (to_voxel[:3, :3] @ source_mm.reshape(3, -1) + to_voxel[:3, 3:]).reshape(points.shape)
    maps = {}
    for name in (*TISSUES, "brain"):
        maps[name] = ndimage.map_coordinates(template.maps[name], source_vox, order=1, mode="constant",
                                             cval=0.0).astype(np.float32)
    maps["brain"] = (maps["brain"] >= 0.5).astype(np.float32)
    for name in TISSUES:
        maps[name] *= maps["brain"]
    return maps
