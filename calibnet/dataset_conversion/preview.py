"""A PNG mosaic of one axial slice per center, so a person can see the domain shift at a glance."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from calibnet.domains import DOMAINS_FILENAME, read_domains
from calibnet.files import atomic_path

PREVIEW_FILENAME = "preview.png"


def _axial_slice_index(label: np.ndarray) -> int:
    """The axial slice (first array axis, SimpleITK order) with the most foreground, else the middle."""
    area = (label > 0).reshape(label.shape[0], -1).sum(1)
    return int(area.argmax()) if area.max() > 0 else label.shape[0] // 2


def save_domain_mosaic(dataset_folder: Path, out_png: Path | None = None, cases_per_center: int = 1) -> Path:
    """Draw, for the first case(s) of every center, each channel's axial slice with the most lesion.

    Rows are cases (titled center · vendor), columns are channels, each windowed to its own 1–99th
    percentile inside the brain, plus the label outlined on the first channel. Returns the PNG path.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dataset_folder = Path(dataset_folder)
    dataset_json = json.loads((dataset_folder / "dataset.json").read_text())
    channels = [dataset_json["channel_names"][k] for k in sorted(dataset_json["channel_names"], key=int)]
    ending = dataset_json.get("file_ending", ".nii.gz")
    domains = read_domains(dataset_folder / DOMAINS_FILENAME)
    rows = domains.sort_values(["center", "case_id"]).groupby("center").head(cases_per_center)

    n_cols = len(channels) + 1
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(2.2 * n_cols, 2.3 * len(rows)), squeeze=False)
    for r, (_, row) in enumerate(rows.iterrows()):
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset_folder / "labelsTr" / f"{row.case_id}{ending}")))
        z = _axial_slice_index(label)
        first = None
        for c, channel in enumerate(channels):
            image = sitk.GetArrayFromImage(
                sitk.ReadImage(str(dataset_folder / "imagesTr" / f"{row.case_id}_{c:04d}{ending}")))[z]
            inside = image[image != 0]
            low, high = np.percentile(inside, [1, 99]) if inside.size else (0, 1)
            axes[r, c].imshow(image[::-1], cmap="gray", vmin=low, vmax=high)
            axes[r, c].set_title(f"{channel}  [{low:.0f}, {high:.0f}]", fontsize=7)
            first = (image, low, high) if first is None else first
        image, low, high = first
        axes[r, -1].imshow(image[::-1], cmap="gray", vmin=low, vmax=high)
        if label[z].any():
            axes[r, -1].contour((label[z] > 0)[::-1], levels=[0.5], colors="red", linewidths=0.8)
        axes[r, -1].set_title("label", fontsize=7)
        axes[r, 0].set_ylabel(f"{row.center} · {row.vendor}\n{row.case_id}", fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"{dataset_folder.name}: one axial slice per center (window = 1–99th percentile)", fontsize=9)
    fig.tight_layout()
    out_png = Path(out_png) if out_png is not None else dataset_folder / PREVIEW_FILENAME
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out_png
