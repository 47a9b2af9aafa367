"""How each simulated vendor and center acquires an image: contrast, bias field, noise, slice
thickness and intensity scale. These are the sources of domain shift in the synthetic benchmark.

A vendor sets the character of its images (tissue contrast curve, typical bias-field strength, noise
level, slice thickness of its protocol, stored intensity range); each center jitters its vendor's
settings a little (site protocol, coil, calibration). Artefacts use TorchIO transforms with explicit,
seeded parameters (``BiasField``, ``Resample`` onto the vendor's thick-slice grid and back); Rician
noise is the magnitude of complex Gaussian noise, which TorchIO does not provide.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torchio as tio
from scipy import ndimage
from calibnet.dataset_conversion.mni_anatomy import TISSUES, BenchmarkGrid, smooth_random_field

CHANNELS = ("T1", "T1c", "T2", "FLAIR")

# Relative signal of each tissue per channel (WM of T1 ≈ 1), before vendor and center effects.
BASE_CONTRAST = {
    "T1": {"csf": 0.30, "gm": 0.62, "wm": 0.90, "lesion": 0.45, "edema": 0.52, "necrosis": 0.25, "enhancing": 0.60},
    "T1c": {"csf": 0.30, "gm": 0.62, "wm": 0.90, "lesion": 0.50, "edema": 0.55, "necrosis": 0.25, "enhancing": 1.25},
    "T2": {"csf": 1.00, "gm": 0.58, "wm": 0.42, "lesion": 0.85, "edema": 0.88, "necrosis": 0.95, "enhancing": 0.65},
    "FLAIR": {"csf": 0.12, "gm": 0.62, "wm": 0.46, "lesion": 0.95, "edema": 0.98, "necrosis": 0.45, "enhancing": 0.75},
}
BIAS_FIELD_ORDER = 3
_N_BIAS_COEFFICIENTS = (BIAS_FIELD_ORDER + 1) * (BIAS_FIELD_ORDER + 2) * (BIAS_FIELD_ORDER + 3) // 6


@dataclass(frozen=True)
class VendorProfile:
    """The acquisition character shared by every center using this vendor's scanners."""
    vendor: str
    scanner: str
    field_strength: float
    gamma: float  # contrast curve: signal ** gamma
    tissue_gain: dict = field(default_factory=dict)  # tissue -> multiplier on BASE_CONTRAST
    bias_strength: float = 0.2  # max |coefficient| of the log bias-field polynomial
    noise_sigma: float = 0.02  # Rician noise sigma, relative to WM signal
    slice_thickness_factor: float = 1.0  # thick slices simulated along `slice_axis`, then resampled
    slice_axis: int = 2  # (x, y, z) axis; 2 = axial slices
    intensity_scale: float = 1000.0  # stored value of signal 1.0


VENDOR_PROFILES = {
    "Siemens": VendorProfile("Siemens", "MAGNETOM Prisma (simulated)", 3.0, gamma=1.0,
                             bias_strength=0.15, noise_sigma=0.02, slice_thickness_factor=1.0,
                             intensity_scale=1000.0),
    "GE": VendorProfile("GE", "Discovery MR750 (simulated)", 3.0, gamma=0.7,
                        tissue_gain={"wm": 0.93, "gm": 1.05, "lesion": 0.9, "edema": 0.92, "enhancing": 0.9},
                        bias_strength=0.4, noise_sigma=0.05, slice_thickness_factor=2.5, slice_axis=2,
                        intensity_scale=2500.0),
    "Philips": VendorProfile("Philips", "Ingenia 1.5T (simulated)", 1.5, gamma=1.4,
                             tissue_gain={"csf": 1.35, "lesion": 1.05, "necrosis": 1.2},
                             bias_strength=0.3, noise_sigma=0.035, slice_thickness_factor=2.0, slice_axis=0,
                             intensity_scale=600.0),
}
VENDOR_ORDER = ("Siemens", "GE", "Philips")


@dataclass(frozen=True)
class CenterProfile:
    """One acquiring site: its vendor plus the site's own deviations from the vendor's settings."""
    center: str
    vendor: VendorProfile
    scale_factor: float  # on the vendor's intensity scale
    offset_fraction: float  # constant added inside the brain, as a fraction of the scale
    noise_factor: float
    bias_factor: float
    tissue_jitter: dict  # tissue -> multiplier

    def describe(self) -> dict:
        v = self.vendor
        return {
            "center": self.center,
            "vendor": v.vendor,
            "scanner": v.scanner,
            "field_strength_T": v.field_strength,
            "contrast_gamma": v.gamma,
            "bias_field_max_coefficient": round(v.bias_strength * self.bias_factor, 3),
            "rician_noise_sigma": round(v.noise_sigma * self.noise_factor, 4),
            "slice_thickness_factor": v.slice_thickness_factor,
            "slice_axis": "xyz"[v.slice_axis],
            "intensity_scale": round(v.intensity_scale * self.scale_factor, 1),
            "intensity_offset": round(v.intensity_scale * self.scale_factor * self.offset_fraction, 1),
        }


def center_names(n_centers: int) -> list[str]:
    """C1, C2, … zero-padded so that the names sort in numeric order."""
    width = len(str(n_centers))
    return [f"C{i + 1:0{width}d}" for i in range(n_centers)]


def make_center_profiles(n_centers: int, seed: int) -> list[CenterProfile]:
    """Centers C1..Cn; vendors assigned in turn Siemens, GE, Philips, Siemens, …; jitter from ``seed``."""
    profiles = []
    for index, name in enumerate(center_names(n_centers)):
        rng = np.random.default_rng([seed, 7919, index])
        vendor = VENDOR_PROFILES[VENDOR_ORDER[index % len(VENDOR_ORDER)]]
        profiles.append(CenterProfile(
            center=name, vendor=vendor,
            scale_factor=float(rng.uniform(0.8, 1.25)),
            offset_fraction=float(rng.uniform(0.0, 0.05)),
            noise_factor=float(rng.uniform(0.8, 1.25)),
            bias_factor=float(rng.uniform(0.8, 1.25)),
            tissue_jitter={t: float(rng.uniform(0.95, 1.05)) for t in BASE_CONTRAST["T1"]},
        ))
    return profiles


def tissue_signal(channel: str, tissue: str, center: CenterProfile) -> float:
    """Relative signal of ``tissue`` in ``channel`` at ``center`` (before the contrast curve)."""
    return (BASE_CONTRAST[channel][tissue] * center.vendor.tissue_gain.get(tissue, 1.0)
            * center.tissue_jitter[tissue])


def synthesize_contrast(channel: str, tissue: dict, label: np.ndarray, label_tissues: dict,
                        center: CenterProfile, rng: np.random.Generator) -> np.ndarray:
    """Noise-free image of one channel: tissue mixture with partial volume, lesions blended in with
    soft edges, a faint smooth texture, then the vendor's contrast curve."""
    image = np.zeros(label.shape, dtype=np.float32)
    for name in TISSUES:
        image += tissue[name] * tissue_signal(channel, name, center)
    for value, name in label_tissues.items():
        weight = ndimage.gaussian_filter((label == value).astype(np.float32), sigma=0.6)
        image = image * (1 - weight) + weight * tissue_signal(channel, name, center) * tissue["brain"]
    image *= 1 + 0.03 * smooth_random_field(label.shape, rng, control_points=8)
    return np.power(np.clip(image, 0, None), center.vendor.gamma, dtype=np.float32)


def _rician(data: torch.Tensor, sigma: float, rng: np.random.Generator) -> torch.Tensor:
    """Magnitude of the signal plus complex Gaussian noise of std ``sigma`` per component."""
    real = data.numpy() + sigma * rng.standard_normal(data.shape)
    imaginary = sigma * rng.standard_normal(data.shape)
    return torch.from_numpy(np.sqrt(real ** 2 + imaginary ** 2).astype(np.float32))


def simulate_acquisition(images: list, brain: np.ndarray, grid: BenchmarkGrid, center: CenterProfile,
                         rng: np.random.Generator) -> list:
    """Apply the center's scanner to noise-free channel images (x, y, z).

    Bias field (TorchIO ``BiasField``); acquisition on the vendor's slice grid (TorchIO ``Resample`` with
    anti-aliasing, i.e. thick slices with a smooth slice profile); Rician noise added at that acquisition
    resolution; reconstruction back onto the benchmark grid (``Resample`` to the grid); intensity scale
    and offset; skull stripping.
    """
    vendor = center.vendor
    coefficients = rng.uniform(-1, 1, _N_BIAS_COEFFICIENTS) * vendor.bias_strength * center.bias_factor
    bias_field = tio.BiasField(coefficients=coefficients.tolist(), order=BIAS_FIELD_ORDER)
    affine = np.diag([grid.spacing_mm] * 3 + [1.0])
    thick = vendor.slice_thickness_factor > 1
    if thick:
        acquisition_spacing = [grid.spacing_mm] * 3
        acquisition_spacing[vendor.slice_axis] *= vendor.slice_thickness_factor
        to_slices = tio.Resample(tuple(acquisition_spacing), image_interpolation="linear", antialias=True)
        to_grid = tio.Resample("grid", image_interpolation="linear")
        grid_image = tio.ScalarImage(tensor=torch.zeros((1, *grid.shape)), affine=affine)
    sigma = vendor.noise_sigma * center.noise_factor
    scale = vendor.intensity_scale * center.scale_factor
    acquired = []
    for image in images:
        subject = bias_field(tio.Subject(image=tio.ScalarImage(tensor=torch.from_numpy(image[None].copy()),
                                                               affine=affine)))
        if thick:
            subject = to_slices(subject)
        subject["image"].set_data(_rician(subject["image"].data, sigma, rng))
        if thick:
            subject = to_grid(tio.Subject(image=subject["image"], grid=grid_image))
        data = subject["image"].data[0].numpy()
        stored = (data * scale + center.offset_fraction * scale) * brain
        acquired.append(stored.astype(np.float32))
    return acquired
