"""The embedded default benchmark (DESIGN §9): a multi-center, multi-vendor brain-lesion dataset
built from the MNI152 template, with acquisition differences that shift the image domain.

Every case is reproducible from ``(seed, center, case number)`` alone, so the dataset is identical
whatever the number of worker processes.
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from calibnet.dataset_conversion import lesions, scanner_profiles
from calibnet.dataset_conversion.mni_anatomy import (BenchmarkGrid, benchmark_grid, deformed_tissue_maps,
                                                     load_mni_tissue_template)
from calibnet.dataset_conversion.raw_dataset import (ImageGeometry, dataset_folder_name, make_dataset_json,
                                                     target_dataset_folder, write_case)
from calibnet.domains import DOMAINS_FILENAME, write_domains
from calibnet.errors import CalibnetError
from calibnet.files import atomic_output_dir, atomic_write_json, atomic_write_text

# RAS voxel axes written in LPS physical space: x and y flip sign.
_RAS_TO_LPS = np.array([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class SyntheticConfig:
    """Everything that determines the synthetic dataset's content."""
    dataset_id: int = 501
    name: str = "SynthBrain"
    seed: int = 42
    n_centers: int = 4
    cases_per_center: int = 8
    shape: tuple = (64, 64, 64)
    channels: tuple = ("T1", "FLAIR")
    label_mode: str = "lesion"

    def validate(self) -> None:
        if self.n_centers < 1 or self.cases_per_center < 1:
            raise CalibnetError("--centers and --cases-per-center must be at least 1.")
        if len(self.shape) != 3 or min(self.shape) < 16:
            raise CalibnetError(f"--shape {self.shape} is too small: each axis needs at least 16 voxels.")
        unknown = [c for c in self.channels if c not in scanner_profiles.CHANNELS]
        if unknown or not self.channels:
            raise CalibnetError(f"unknown channel {unknown[0] if unknown else '(none)'}; "
                                f"choose from {', '.join(scanner_profiles.CHANNELS)}.")
        if len(set(self.channels)) != len(self.channels):
            raise CalibnetError(f"--channels {','.join(self.channels)} names a channel twice.")
        if self.label_mode not in lesions.LABEL_MODES:
            raise CalibnetError(f"unknown label mode {self.label_mode!r}; choose {' or '.join(lesions.LABEL_MODES)}.")


@dataclass(frozen=True)
class CaseSpec:
    case_id: str
    center_index: int
    number_in_center: int


def case_specs(config: SyntheticConfig) -> list[CaseSpec]:
    names = scanner_profiles.center_names(config.n_centers)
    return [CaseSpec(f"{names[c]}_{k:03d}", c, k)
            for c in range(config.n_centers) for k in range(config.cases_per_center)]


def grid_geometry(grid: BenchmarkGrid) -> ImageGeometry:
    """The SimpleITK geometry of a grid whose voxel axes run along RAS x, y, z."""
    direction = tuple(np.diag(_RAS_TO_LPS).ravel().tolist())
    return ImageGeometry(spacing_mm=(grid.spacing_mm,) * 3,
                         origin_mm=tuple((grid.origin_ras_mm * _RAS_TO_LPS).tolist()), direction=direction)


def generate_case(config: SyntheticConfig, spec: CaseSpec, center: scanner_profiles.CenterProfile,
                  grid: BenchmarkGrid) -> tuple[list, np.ndarray]:
    """Channel images and label map of one case, arrays in (x, y, z) order."""
    rng = np.random.default_rng([config.seed, spec.center_index, spec.number_in_center])
    tissue = deformed_tissue_maps(load_mni_tissue_template(), grid, rng)
    label = lesions.make_lesion_labels(config.label_mode, tissue, grid, rng)
    label_tissues = lesions.LABEL_TISSUES[config.label_mode]
    clean = [scanner_profiles.synthesize_contrast(channel, tissue, label, label_tissues, center, rng)
             for channel in config.channels]
    images = scanner_profiles.simulate_acquisition(clean, tissue["brain"], grid, center, rng)
    return images, label


def _write_one(args) -> dict:
    config, spec, center, grid, folder = args
    images, label = generate_case(config, spec, center, grid)
    write_case(folder, spec.case_id, [im.transpose(2, 1, 0) for im in images], label.transpose(2, 1, 0),
               grid_geometry(grid))
    vendor = center.vendor
    return {"case_id": spec.case_id, "center": center.center, "vendor": vendor.vendor,
            "scanner": vendor.scanner, "field_strength": vendor.field_strength,
            "slice_thickness_mm": round(grid.spacing_mm * vendor.slice_thickness_factor, 2),
            "lesion_volume_ml": round(float((label > 0).sum()) * grid.spacing_mm ** 3 / 1000, 3)}


def _init_worker() -> None:
    import torch
    torch.set_num_threads(1)


def convert_synthetic(config: SyntheticConfig, raw_root: os.PathLike, overwrite: bool = False,
                      num_processes: int = 1, progress: bool = True) -> Path:
    """Write the synthetic dataset under ``raw_root`` and return its folder.

    The folder appears only once every case, ``dataset.json``, ``domains.csv`` and ``README.md`` are
    written.
    """
    config.validate()
    final = target_dataset_folder(Path(raw_root), config.dataset_id, config.name, overwrite)
    template = load_mni_tissue_template()  # loaded before forking so workers share it
    grid = benchmark_grid(config.shape, template)
    centers = scanner_profiles.make_center_profiles(config.n_centers, config.seed)
    specs = case_specs(config)
    with atomic_output_dir(final, overwrite=overwrite) as folder:
        jobs = [(config, s, centers[s.center_index], grid, folder) for s in specs]
        bar = dict(total=len(jobs), desc="generating cases", unit="case", disable=not progress)
        if num_processes > 1:
            with ProcessPoolExecutor(num_processes, initializer=_init_worker) as pool:
                rows = list(tqdm(pool.map(_write_one, jobs), **bar))
        else:
            rows = [_write_one(job) for job in tqdm(jobs, **bar)]
        domains = pd.DataFrame(rows)
        write_domains(domains, folder / DOMAINS_FILENAME)
        atomic_write_json(folder / "dataset.json", make_dataset_json(
            list(config.channels), lesions.LABELS[config.label_mode], len(specs),
            description="calibnet synthetic multi-center brain-lesion benchmark (MNI152 2009a anatomy)",
            regions_class_order=lesions.REGIONS_CLASS_ORDER.get(config.label_mode),
            calibnet={"generator": "synthetic", **{k: list(v) if isinstance(v, tuple) else v
                                                   for k, v in asdict(config).items()},
                      "spacing_mm": grid.spacing_mm}))
        atomic_write_text(folder / "README.md", dataset_readme(config, grid, centers, domains))
    return final


def dataset_readme(config: SyntheticConfig, grid: BenchmarkGrid, centers: list, domains: pd.DataFrame) -> str:
    """The Markdown description written next to the dataset: how each center was simulated."""
    profiles = pd.DataFrame([c.describe() for c in centers])
    counts = domains.groupby("center").size().rename("cases")
    profiles = profiles.join(counts, on="center")
    contrast = pd.DataFrame(scanner_profiles.BASE_CONTRAST).loc[:, list(config.channels)]
    labels = ", ".join(f"{k} = {v}" for k, v in lesions.LABELS[config.label_mode].items())
    return f"""# {dataset_folder_name(config.dataset_id, config.name)}: calibnet synthetic multi-center benchmark

Generated by `calib_convert synthetic` (seed {config.seed}). {len(domains)} cases from {config.n_centers} centers,
channels {', '.join(config.channels)}, {grid.shape[0]}×{grid.shape[1]}×{grid.shape[2]} voxels at
{grid.spacing_mm} mm isotropic. Labels: {labels}.

## Anatomy
The MNI152 2009a symmetric template shipped with nilearn (skull-stripped T1, grey- and white-matter
probability maps; CSF = brain mask − GM − WM). Each case samples the tissue maps through its own random
affine (rotation ≤ 6°, scaling ≤ 6 %, shift ≤ 4 mm) and a smooth elastic warp (≈ 3 mm), so every brain differs.
Lesion mode `{config.label_mode}`: {"1–4 irregular white-matter lesions of 3–14 mm radius" if config.label_mode == "lesion"
else "one glioma-like tumour: edema (1) ⊃ core, the core split into necrosis (2) and an enhancing rim (3)"}.

## Tissue signal per channel before vendor effects (WM of T1 ≈ 0.9)
{contrast.to_markdown(floatfmt=".2f")}

## Acquisition per center
Each vendor has its own contrast curve (signal ** gamma) and tissue gains, bias-field strength (TorchIO
`BiasField`, order {scanner_profiles.BIAS_FIELD_ORDER}, coefficients uniform in ± the value below), Rician noise,
slice thickness (TorchIO `Resample` with anti-aliasing onto the vendor's thick-slice grid, where the
noise is added, then `Resample` back to the benchmark grid) and stored intensity range; each center jitters these (scale, offset, noise,
bias ×0.8–1.25, tissue signal ±5 %). Images are skull-stripped (zero outside the brain).

{profiles.to_markdown(index=False)}
"""

