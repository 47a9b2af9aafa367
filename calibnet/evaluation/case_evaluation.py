"""Metrics of one predicted case against its raw ground truth, on the raw image's geometry."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from calibnet.evaluation.calibration import CalibrationBins, calibration_bins, calibration_metrics
from calibnet.evaluation.metrics import case_metrics


@dataclass
class CaseResult:
    metrics: dict
    bins: CalibrationBins  # equal-width bins of the case's ROI voxels (for pooled ECE and reliability diagrams)
    sample_probabilities: np.ndarray  # (C, n) subsampled ROI voxels, for post-hoc calibration
    sample_labels: np.ndarray


@dataclass(frozen=True)
class LabelTargets:
    """What is evaluated: named binary masks of the label map, and how probabilities map to classes."""
    masks: dict  # output name -> list of label values forming it
    regions: bool  # probabilities are per-region sigmoids (nnU-Net regions) rather than a softmax
    binary: bool = False  # SAM runs: the prediction is one binary target


def label_targets(dataset_json: dict, record: dict) -> LabelTargets:
    labels = {k: v for k, v in dataset_json["labels"].items() if k != "background"}
    if record.get("backbone") is not None:
        target = record.get("target_label")
        values = sorted({x for v in labels.values() for x in (v if isinstance(v, list) else [v])})
        name = "foreground" if target is None else next((k for k, v in labels.items() if v == target), f"label_{target}")
        return LabelTargets({name: values if target is None else [target]}, False, binary=True)
    regions = any(isinstance(v, list) for v in labels.values())
    return LabelTargets({k: (v if isinstance(v, list) else [v]) for k, v in labels.items()}, regions)


def read_image(path: Path) -> tuple[np.ndarray, tuple]:
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), tuple(reversed(image.GetSpacing()))


def roi_voxels(probabilities: np.ndarray, truth: np.ndarray, image_paths: list, targets: LabelTargets):
    """(C, N) class probabilities and (N,) class labels of the ROI voxels (any input channel non-zero; the
    whole image when none is). Region datasets: the first region's sigmoid as two classes."""
    roi = np.zeros(truth.shape, bool)
    for path in image_paths:
        roi |= read_image(path)[0] != 0
    if not roi.any():
        roi[:] = True
    if targets.binary:
        labels = np.isin(truth, next(iter(targets.masks.values()))).astype(np.int64)
    elif targets.regions:
        probabilities = np.stack([1 - probabilities[0], probabilities[0]])
        labels = np.isin(truth, next(iter(targets.masks.values()))).astype(np.int64)
    else:
        labels = truth.astype(np.int64)
    return probabilities[:, roi], labels[roi]


def evaluate_case(prediction_path: Path, probabilities_path: Path, label_path: Path, image_paths: list,
                  targets: LabelTargets, rng: np.random.Generator, max_samples: int = 20000) -> CaseResult:
    """DSC, IoU, HD95, NSD@1mm per target, and ECE, ACE, Brier on the ROI (non-zero input voxels)."""
    truth, spacing = read_image(label_path)
    prediction, _ = read_image(prediction_path)
    probabilities = np.load(probabilities_path)["probabilities"].astype(np.float32)
    metrics = {}
    several = len(targets.masks) > 1
    for name, values in targets.masks.items():
        truth_mask = np.isin(truth, values)
        predicted_mask = prediction == 1 if targets.binary else np.isin(prediction, values)
        for metric, value in case_metrics(predicted_mask, truth_mask, spacing).items():
            metrics[f"{metric}_{name}" if several else metric] = value
    voxel_probabilities, voxel_labels = roi_voxels(probabilities, truth, image_paths, targets)
    metrics.update(calibration_metrics(voxel_probabilities, voxel_labels))
    bins = calibration_bins(voxel_probabilities.max(0), voxel_probabilities.argmax(0) == voxel_labels)
    chosen = rng.choice(voxel_labels.size, size=min(max_samples, voxel_labels.size), replace=False)
    return CaseResult(metrics, bins, voxel_probabilities[:, chosen], voxel_labels[chosen])
