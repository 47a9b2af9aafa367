"""Per-case confidence scores of a prediction beyond those of its probabilities
(``calibnet.metrics.confidence_scores.case_confidence``): from
MC-dropout samples (score agreement and mean entropy for each N of ``--mc-samples``) and from the confidence
heads trained on the model. The entropies are ``calibnet.metrics.entropy``'s.
"""
from __future__ import annotations

import numpy as np
import torch

from calibnet.errors import CalibnetError
from calibnet.inference.confidence_heads import slice_foreground
from calibnet.inference.model_loading import LoadedModel
from calibnet.metrics.entropy import binary_entropy, normalised_entropy
from calibnet.metrics.segmentation import case_metrics, overlap_metrics
from calibnet.networks.mc_dropout import set_mc_sampling


def mc_sample_counts(sample_counts) -> tuple:
    """The sorted, distinct N of ``--mc-samples`` (each at least 2; empty = no MC-dropout scores)."""
    counts = sorted({int(n) for n in ([sample_counts] if isinstance(sample_counts, int) else sample_counts or ())})
    if counts and counts[0] < 2:
        raise CalibnetError(f"--mc-samples {counts[0]}: score agreement compares samples pairwise; give N >= 2 "
                            f"(the paper uses 15 and 2).")
    return tuple(counts)


def mc_agreement_scores(masks, label_names: list, sample_counts, spacing) -> dict:
    """Score agreement (Roy et al. 2018) of MC-dropout samples, for each N of ``sample_counts``.

    ``masks``: (S, L, *spatial) boolean — sample s's mask of label (or region) l, S ≥ max(N). For each N, the
    first N samples are compared pairwise (N(N−1)/2 pairs, both empty = 1): ``mc_dice_agreement_n{N}`` is the
    mean over labels of the mean pairwise Dice, ``mc_nsd_agreement_n{N}`` the same with NSD@1mm (``spacing`` in
    mm, array axis order); ``..._per_label`` entries hold {label name: value}. Each pair is computed once, so
    several N cost the pairs of max(N) only.
    """
    masks = np.asarray(masks, bool)
    counts = mc_sample_counts(sample_counts)
    if masks.shape[0] < counts[-1] or masks.shape[1] != len(label_names):
        raise ValueError(f"masks of shape {masks.shape} for N up to {counts[-1]} and labels {label_names}")
    n = counts[-1]
    dice = np.full((len(label_names), n, n), np.nan)
    nsd = np.full((len(label_names), n, n), np.nan)
    for label in range(len(label_names)):
        for i in range(n):
            for j in range(i + 1, n):
                a, b = masks[i, label], masks[j, label]
                dice[label, i, j] = overlap_metrics(a, b)["DSC"]
                nsd[label, i, j] = 1.0 if dice[label, i, j] == 1.0 else case_metrics(a, b, spacing)["NSD@1mm"]
    scores = {}
    for count in counts:
        pairs = np.triu_indices(count, 1)
        for name, matrix in (("dice", dice), ("nsd", nsd)):
            per_label = {label_name: float(matrix[label][pairs].mean()) for label, label_name in enumerate(label_names)}
            scores[f"mc_{name}_agreement_n{count}"] = float(np.mean(list(per_label.values())))
            scores[f"mc_{name}_agreement_n{count}_per_label"] = per_label
    return scores


def _mc_targets(model: LoadedModel) -> tuple:
    """(names, output channels, regions) of the network's foreground outputs, in nnU-Net's order: the softmax
    channel of each foreground label, or the sigmoid channel of each region (dataset.json order)."""
    label_manager = model.plans_manager.get_label_manager(model.export_dataset_json)
    named = [(k, tuple(v) if isinstance(v, list) else v) for k, v in model.export_dataset_json["labels"].items()
             if k != "ignore"]
    if label_manager.has_regions:
        names = [k for k, v in named if v in label_manager.foreground_regions]
        return names, list(range(len(names))), True
    names = [k for k, v in sorted(named, key=lambda item: item[1]) if v != 0]
    values = sorted(v for _, v in named if v != 0)
    return names, [label_manager.all_labels.index(v) for v in values], False


def _preprocessed_spacing(model: LoadedModel, data: torch.Tensor, properties: dict | None) -> list:
    """Voxel spacing (mm) of the preprocessed grid in array axis order; 2d configurations keep the original
    spacing between slices, as nnU-Net's preprocessing does."""
    spacing = [float(s) for s in model.configuration_manager.spacing]
    if len(spacing) < data.ndim - 1:
        original = [float(properties["spacing"][i]) for i in model.plans_manager.transpose_forward] \
            if properties is not None else [1.0] * (data.ndim - 1)
        spacing = [original[0], *spacing]
    return spacing


def check_mc_sampling(model: LoadedModel) -> None:
    """Refuse MC-dropout sampling of a model without dropout layers (before anything is predicted or removed)."""
    network = model.predictor.network
    if set_mc_sampling(network, True) == 0:
        raise CalibnetError(f"--mc-samples needs a model trained with dropout (method nnunet_dropout); "
                            f"{model.trainer_class.__name__} has none.")
    set_mc_sampling(network, False)


def mc_dropout_scores(model: LoadedModel, data: torch.Tensor, sample_counts, n_image_channels: int,
                      properties: dict | None = None) -> dict:
    """MC-dropout baselines of the confidence-prediction paper (score agreement, Roy et al. 2018) for one
    preprocessed case, for each N of ``sample_counts``.

    A sample is one stochastic prediction: dropout on, test-time mirroring off (the predictor's mirroring is
    switched off for the passes and restored), so one network forward per sliding window (one forward in all
    when a window covers the case). max(N) samples are drawn once and each N uses the first N of them —
    statistically the same as separate runs of N samples, at the cost of max(N) passes. Per N:
    ``mc_dice_agreement_n{N}`` / ``mc_nsd_agreement_n{N}`` (see :func:`mc_agreement_scores`, on the
    preprocessed grid) and ``mc_mean_entropy_n{N}``, the mean normalised entropy of the N samples' mean
    probabilities over the non-zero region (softmax entropy / log C; region datasets: the mean over regions
    of the binary entropy).
    """
    counts = mc_sample_counts(sample_counts)
    if not counts:
        return {}
    label_names, channels, regions = _mc_targets(model)
    predictor = model.predictor
    check_mc_sampling(model)
    set_mc_sampling(predictor.network, True)
    roi = (data[:n_image_channels] != 0).any(0)
    roi = roi if roi.any() else torch.ones_like(roi)
    mirroring = predictor.use_mirroring
    masks, total, entropies = [], None, {}
    try:
        predictor.use_mirroring = False  # a sample is one dropout forward, not an average of mirrored passes
        for index in range(1, counts[-1] + 1):
            logits = predictor.predict_logits_from_preprocessed_data(data).float().cpu()
            if regions:
                p = torch.sigmoid(logits)
                masks.append((p[channels] > 0.5).numpy())
            else:
                p = torch.softmax(logits, 0)
                argmax = p.argmax(0)
                masks.append(np.stack([(argmax == channel).numpy() for channel in channels]))
            total = p if total is None else total + p
            if index in counts:
                mean = total / index
                entropy = binary_entropy(mean).mean(0) if regions else normalised_entropy(mean)
                entropies[index] = float(entropy[roi].mean())
    finally:
        predictor.use_mirroring = mirroring
        set_mc_sampling(predictor.network, False)
    spacing = _preprocessed_spacing(model, data, properties)
    agreement = mc_agreement_scores(np.stack(masks), label_names, counts, spacing)
    scores = {}
    for count in counts:  # grouped by N
        scores.update({k: v for k, v in agreement.items() if k.split("_")[3] == f"n{count}"})
        scores[f"mc_mean_entropy_n{count}"] = entropies[count]
    return scores


def head_scores(model: LoadedModel, logits: torch.Tensor | None = None) -> dict:
    """The confidence heads' scores of the model's last prediction (empty for a model without heads).
    ``logits``: that prediction's logits (preprocessed grid); 2-D heads (2d configurations) weight their slices'
    scores by the predicted foreground per slice (``calibnet.inference.confidence_heads``), or take the plain
    mean over slices without them."""
    if not model.heads:
        return {}
    features = model.feature_capture.case_features()
    by_slice = logits is not None and features.ndim == 5 and any(head.head.dims == 2 for head in model.heads)
    weights = slice_foreground(logits, model.dataset_json) if by_slice else None
    return {k: v for head in model.heads for k, v in head.scores(features, weights).items()}
