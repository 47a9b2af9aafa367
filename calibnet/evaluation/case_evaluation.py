"""Metrics of one predicted case against its raw ground truth, on the raw image's geometry.

Calibration is computed in two views (DESIGN §7): ``ROI`` = the voxels where any input channel is non-zero
(the whole image where none is), and ``boundary`` = the voxels within 5 mm of the union of ground truth and
prediction, where a segmentation can be wrong and easy background cannot drown the differences. Region
datasets (nnU-Net regions, sigmoid outputs) are calibrated on every region as a binary problem and
averaged over regions; softmax datasets on the predicted class confidence max_c p_c.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
import math
import multiprocessing
import zipfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from calibnet.errors import CalibnetError
from calibnet.metrics.calibration import calibration_summary, pool_bins, top_label
from calibnet.metrics.confidence_scores import case_confidence
from calibnet.metrics.segmentation import case_metrics
from calibnet.runs import LabelTargets

BOUNDARY_MARGIN_MM = 5.0
CALIBRATION_VIEWS = {"ROI": "", "boundary": "_boundary"}  # view -> suffix of its metric columns
SEGMENTATION_METRICS = ("DSC", "IoU", "HD95", "NSD@1mm")
CALIBRATION_METRICS = ("ECE", "ACE", "Brier")
PROBABILITY_TOLERANCE = 1e-3  # float16 rounding and renormalisation leave values a hair outside [0, 1]


@dataclass
class CaseResult:
    metrics: dict
    bins: dict  # view -> equal-width CalibrationBins of the case's voxels (merged over regions), for pooling
    sample_probabilities: np.ndarray | None  # (C, n) subsampled ROI voxels, for post-hoc calibration
    sample_labels: np.ndarray | None  # both None without probabilities
    confidence: dict = field(default_factory=dict)  # scores of the probabilities (with_scores=True)


def read_image(path: Path) -> tuple[np.ndarray, tuple]:
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), tuple(reversed(image.GetSpacing()))


def load_probabilities(path: Path) -> np.ndarray:
    """The ``probabilities`` of a prediction's .npz (nnU-Net's ``--save_probabilities`` layout, which calibnet
    writes too) as float32 (float16 files of older runs are widened), read without unpickling anything; a file
    that is unreadable, lacks the key or holds values outside [0, 1] (NaN, logits) is refused naming it."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "probabilities" not in npz.files:
                raise CalibnetError(f"{path}: no 'probabilities' array (it holds {', '.join(npz.files) or 'nothing'}); "
                                    f"write the probabilities as nnU-Net's --save_probabilities does.")
            probabilities = npz["probabilities"].astype(np.float32, copy=False)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise CalibnetError(f"{path}: not a readable .npz of probabilities ({error}).") from None
    if not probabilities.size:
        return probabilities
    low, high = probabilities.min(), probabilities.max()  # NaN propagates: one pass each finds it
    if not (np.isfinite(low) and np.isfinite(high)):
        raise CalibnetError(f"{path}: the probabilities hold NaN or infinite values; predict this case again.")
    if low < -PROBABILITY_TOLERANCE or high > 1 + PROBABILITY_TOLERANCE:
        raise CalibnetError(f"{path}: values outside [0, 1] ({low:.3g} to {high:.3g}) "
                            f"are not probabilities (logits?); save the softmax/sigmoid outputs.")
    return probabilities


def probability_channels(targets: LabelTargets) -> int:
    """Channels a probability map of these targets has: one per region (sigmoids), else one per label with the
    background (softmax; 2 for a binary target)."""
    return len(targets.masks) if targets.regions else len(targets.masks) + 1


def checked_probabilities(path: Path, shape: tuple, targets: LabelTargets) -> np.ndarray:
    """:func:`load_probabilities`, refused (naming the file) unless shaped (channels, *shape) of the label image."""
    probabilities = load_probabilities(path)
    channels = probability_channels(targets)
    if probabilities.ndim != len(shape) + 1 or probabilities.shape[0] != channels:
        raise CalibnetError(f"{path}: probabilities of shape {probabilities.shape} have {probabilities.shape[0]} "
                            f"channels, the labels need {channels} ({', '.join(targets.masks)}"
                            f"{'' if targets.regions else ' and background'}).")
    if tuple(probabilities.shape[1:]) != tuple(shape):
        raise CalibnetError(f"{path}: probabilities of shape {probabilities.shape[1:]} do not match the raw label "
                            f"image {tuple(shape)} (z, y, x); save them in the raw image's geometry.")
    return probabilities


def predicted_mask(prediction: np.ndarray, values: list, targets: LabelTargets) -> np.ndarray:
    return prediction == 1 if targets.binary else np.isin(prediction, values)


def calibration_tasks(probabilities: np.ndarray, truth: np.ndarray, targets: LabelTargets) -> dict:
    """name -> ((C, *shape) class probabilities, (*shape) integer labels) of each calibration problem: one
    softmax problem, one binary problem for a SAM run, or one binary problem per region."""
    if targets.binary:
        return {"all": (probabilities, np.isin(truth, next(iter(targets.masks.values()))).astype(np.int64))}
    if targets.regions:
        return {name: (np.stack([1 - probabilities[i], probabilities[i]]), np.isin(truth, values).astype(np.int64))
                for i, (name, values) in enumerate(targets.masks.items())}
    return {"all": (probabilities, truth.astype(np.int64))}


def foreground_box(mask: np.ndarray, margin_voxels) -> tuple | None:
    """Slices of the bounding box of ``mask`` grown by ``margin_voxels`` (per axis) within the image; None
    when the mask is empty. Scans the whole mask once, then only the planes that hold foreground."""
    planes = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(1))
    if not planes.size:
        return None
    low, high = [planes[0]], [planes[-1] + 1]
    inner = mask[planes[0]:planes[-1] + 1]
    for axis in range(1, mask.ndim):
        used = np.flatnonzero(inner.any(tuple(a for a in range(mask.ndim) if a != axis)))
        low.append(used[0])
        high.append(used[-1] + 1)
    margin = np.broadcast_to(np.asarray(margin_voxels, int), (mask.ndim,))
    return tuple(slice(max(0, int(lo - m)), min(size, int(hi + m)))
                 for lo, hi, m, size in zip(low, high, margin, mask.shape))


def calibration_rois(truth: np.ndarray, prediction: np.ndarray, image_paths: list, targets: LabelTargets,
                     spacing, margin_mm: float = BOUNDARY_MARGIN_MM) -> dict:
    """view -> boolean mask: ``ROI`` (any input channel non-zero; everything when none is) and ``boundary``
    (within ``margin_mm`` of ground truth ∪ prediction, any foreground; empty when both are empty)."""
    roi = np.zeros(truth.shape, bool)
    for path in image_paths:
        roi |= read_image(path)[0] != 0
    if not roi.any():
        roi[:] = True
    return {"ROI": roi, "boundary": boundary_band(truth, prediction, targets, spacing, margin_mm)}


def boundary_band(truth: np.ndarray, prediction: np.ndarray, targets: LabelTargets, spacing,
                  margin_mm: float = BOUNDARY_MARGIN_MM) -> np.ndarray:
    """The voxels within ``margin_mm`` of ground truth ∪ prediction (any foreground). The distance transform
    runs on the union's bounding box grown by more than ``margin_mm``: every union voxel lies inside it, so the
    distances there are the whole image's, and every voxel outside it is farther than ``margin_mm``."""
    band = np.zeros(truth.shape, bool)
    box = foreground_box((truth != 0) | (prediction != 0), [math.ceil(margin_mm / s) + 1 for s in spacing])
    if box is None:
        return band
    values = sorted({v for vs in targets.masks.values() for v in vs})
    union = np.isin(truth[box], values) | predicted_mask(prediction[box], values, targets)
    if union.any():
        band[box] = ndimage.distance_transform_edt(~union, sampling=spacing) <= margin_mm
    return band


def restrict(tasks: dict, rois: dict) -> tuple[dict, dict]:
    """Tasks and ROIs reduced to the voxels of any view (flattened), so that nothing else is read twice."""
    used = np.logical_or.reduce(list(rois.values()))
    return ({name: (p[:, used], y[used]) for name, (p, y) in tasks.items()},
            {view: roi[used] for view, roi in rois.items()})


def restricted_tasks(probabilities: np.ndarray, truth: np.ndarray, targets: LabelTargets,
                     rois: dict) -> tuple[dict, dict]:
    """:func:`restrict` of :func:`calibration_tasks`, built on the used voxels only (the same values, without
    whole-image copies of every problem)."""
    used = np.flatnonzero(np.logical_or.reduce(list(rois.values())).ravel())
    flat = probabilities.reshape(probabilities.shape[0], -1)
    return (calibration_tasks(flat[:, used], truth.ravel()[used], targets),
            {view: roi.ravel()[used] for view, roi in rois.items()})


def case_calibration(tasks: dict, rois: dict) -> tuple[dict, dict]:
    """(metrics, view -> bins): ECE/ACE/Brier per view (``ECE``, ``ECE_boundary``, …), averaged over the
    calibration problems, with per-region columns (``ECE_<region>``) where there are several."""
    metrics, bins = {}, {}
    tops = {name: top_label(probabilities, labels) for name, (probabilities, labels) in tasks.items()}
    for view, suffix in CALIBRATION_VIEWS.items():
        roi = rois[view]
        per_task, task_bins = {}, []
        for name, (probabilities, labels) in tasks.items():
            confidence, correct = tops[name]
            per_task[name], b = calibration_summary(probabilities[:, roi], labels[roi],
                                                    top=(confidence[roi], correct[roi]))
            task_bins.append(b)
        for metric in CALIBRATION_METRICS:
            metrics[f"{metric}{suffix}"] = float(np.mean([m[metric] for m in per_task.values()]))
            if len(tasks) > 1:
                metrics.update({f"{metric}{suffix}_{name}": m[metric] for name, m in per_task.items()})
        bins[view] = pool_bins(task_bins)
    return metrics, bins


def segmentation_metrics(prediction: np.ndarray, truth: np.ndarray, spacing, targets: LabelTargets) -> dict:
    """DSC, IoU, HD95 and NSD@1mm per target (``DSC_<name>``) and their mean over targets (``DSC``) when there
    are several; the plain names for one target."""
    shape = truth.shape
    box = foreground_box((truth != 0) | (prediction != 0), 1)  # every target's voxels lie inside it
    if box is not None:
        prediction, truth = prediction[box], truth[box]
    per_target = {name: case_metrics(predicted_mask(prediction, values, targets), np.isin(truth, values), spacing,
                                     image_shape=shape)
                  for name, values in targets.masks.items()}
    if len(per_target) == 1:
        return next(iter(per_target.values()))
    metrics = {f"{metric}_{name}": value for name, m in per_target.items() for metric, value in m.items()}
    metrics.update({metric: float(np.mean([m[metric] for m in per_target.values()]))
                    for metric in SEGMENTATION_METRICS})
    return metrics


def evaluate_case(prediction_path: Path, probabilities_path: Path | None, label_path: Path, image_paths: list,
                  targets: LabelTargets, rng: np.random.Generator, max_samples: int = 20000,
                  with_scores: bool = False) -> CaseResult:
    """DSC, IoU, HD95, NSD@1mm per target, and ECE, ACE, Brier in the ROI and boundary views (NaN without
    ``probabilities_path``); ``with_scores``: also the confidence scores of the probabilities."""
    job = CaseJob(prediction_path, probabilities_path, label_path, image_paths, targets, with_scores)
    return subsampled(score_case(job), rng, max_samples)


@dataclass(frozen=True)
class CaseJob:
    """The files and targets of one case to score (picklable: sent to worker processes)."""
    prediction_path: Path
    probabilities_path: Path | None
    label_path: Path
    image_paths: list
    targets: LabelTargets
    with_scores: bool = False


def score_case(job: CaseJob) -> CaseResult:
    """:func:`evaluate_case` before subsampling: the samples are every ROI voxel of every calibration problem."""
    truth, spacing = read_image(job.label_path)
    prediction, _ = read_image(job.prediction_path)
    metrics = segmentation_metrics(prediction, truth, spacing, job.targets)
    if job.probabilities_path is None:
        metrics.update({f"{m}{suffix}": np.nan for suffix in CALIBRATION_VIEWS.values() for m in CALIBRATION_METRICS})
        return CaseResult(metrics, {}, None, None)
    probabilities = checked_probabilities(job.probabilities_path, truth.shape, job.targets)
    confidence = case_confidence(probabilities, job.targets.regions) if job.with_scores else {}
    rois = calibration_rois(truth, prediction, job.image_paths, job.targets, spacing)
    tasks, rois = restricted_tasks(probabilities, truth, job.targets, rois)
    del probabilities, truth, prediction
    calibration, bins = case_calibration(tasks, rois)
    metrics.update(calibration)
    roi = rois["ROI"]
    voxel_probabilities = np.concatenate([p[:, roi] for p, _ in tasks.values()], 1)
    voxel_labels = np.concatenate([y[roi] for _, y in tasks.values()])
    return CaseResult(metrics, bins, voxel_probabilities, voxel_labels, confidence)


def subsampled(result: CaseResult, rng: np.random.Generator, max_samples: int = 20000) -> CaseResult:
    """The result with at most ``max_samples`` of its sample voxels, drawn with ``rng`` (in case order, so that
    the draws are the same however many processes scored the cases)."""
    if result.sample_labels is None:
        return result
    size = result.sample_labels.size
    chosen = rng.choice(size, size=min(max_samples, size), replace=False)
    return CaseResult(result.metrics, result.bins, result.sample_probabilities[:, chosen],
                      result.sample_labels[chosen], result.confidence)


def _worker_initializer() -> None:
    import torch

    torch.set_num_threads(1)  # one case per process: threads would only compete for the same cores


def _score_case_in_worker(job: CaseJob) -> CaseResult:
    """:func:`score_case` in a worker: labels sent back in the smallest integer type that holds them (far
    smaller than int64; widened again on arrival)."""
    result = score_case(job)
    labels = result.sample_labels
    if labels is not None and labels.size and labels.min() >= 0:
        result.sample_labels = labels.astype(np.min_scalar_type(int(labels.max())))
    return result


@contextlib.contextmanager
def case_pool(num_processes: int):
    """``num_processes`` worker processes for :func:`evaluate_cases` (None, this process, for one)."""
    if num_processes <= 1:
        yield None
        return
    # spawn, not fork: the parent may hold torch/OpenMP threads (calib_experiment trains first)
    with multiprocessing.get_context("spawn").Pool(num_processes, initializer=_worker_initializer) as pool:
        yield pool


def evaluate_cases(jobs: list, rng: np.random.Generator, pool=None, max_samples: int = 20000):
    """:func:`evaluate_case` of every job, yielded in order: scored in the worker processes of ``pool``
    (:func:`case_pool`) when given, the samples drawn here in case order, so the results are identical."""
    if pool is None:
        for job in jobs:
            yield subsampled(score_case(job), rng, max_samples)
        return
    for result in pool.imap(_score_case_in_worker, jobs):
        if result.sample_labels is not None:
            result.sample_labels = result.sample_labels.astype(np.int64)
        yield subsampled(result, rng, max_samples)


def recalibrated_case_metrics(prediction_path: Path, probabilities_path: Path, label_path: Path, image_paths: list,
                              targets: LabelTargets, calibrate) -> dict:
    """The calibration metrics of a case after ``calibrate`` ((C, N) -> (C, N) probabilities, a post-hoc map)
    is applied to every calibration problem; views as in :func:`evaluate_case` (the run's own segmentation
    defines the boundary view)."""
    truth, spacing = read_image(label_path)
    prediction, _ = read_image(prediction_path)
    rois = calibration_rois(truth, prediction, image_paths, targets, spacing)
    tasks, rois = restricted_tasks(load_probabilities(probabilities_path), truth, targets, rois)
    calibrated = {name: (calibrate(p), y) for name, (p, y) in tasks.items()}
    return case_calibration(calibrated, rois)[0]
