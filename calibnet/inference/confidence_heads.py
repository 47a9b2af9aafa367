"""Confidence heads at prediction time: the heads trained on a run, the penultimate-decoder features of the
prediction they score, and their per-case scores for ``confidence.json``.

The features come from the segmentation's own forward passes, so a head costs only its own small forward:
nnU-Net's sliding window calls the network once per tile without mirroring and then once per mirrored copy;
:class:`FeatureCapture` keeps the unmirrored call of each tile and places the tiles' features on a grid
covering the whole (padded) case at the feature resolution, averaging where tiles overlap. When the case
fits one patch, as the heads' training patches did, this is exactly that patch's features.

2d configurations: nnU-Net predicts a 3-D case slice by slice (its slicers name the slice by index), so the
grid is (slices, in-plane feature grid) and a head trained on 2-D slice patches scores every slice. The case's
score per label/region is the mean of its slices' scores weighted by the slice's predicted foreground of that
label/region in the segmentation being scored: volumetric Dice is the (|P_s| + |T_s|)-weighted mean of the
slice Dice values, and |P_s| stands in for the unknown |T_s| (the same weights are used for NSD). Where the
label is predicted in no slice, the plain mean over slices is used. A 2-D dataset (one slice per case) gets
its slice's score, the paper's own setting.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from calibnet.checkpoints import UnsafeCheckpointError, load_checkpoint
from calibnet.errors import CalibnetError
from calibnet.networks.confidence_head import HEAD_FOLDERS, ConfidenceHead, feature_stage
from calibnet.runs import label_targets

HEAD_CHECKPOINT = "checkpoint_final.pth"
SLICES_PER_FORWARD = 64  # 2-D heads score a case's slices in chunks of this many


def slice_foreground(logits: torch.Tensor, dataset_json: dict) -> dict:
    """{label/region name: (slices,) predicted foreground pixels per slice} of a prediction's logits
    ((C, slices, *in-plane), the preprocessed grid), thresholded as the head's training targets were: argmax in
    the label's values, or logit > 0 for regions."""
    targets = label_targets(dataset_json, {})
    logits = logits.detach().float().cpu()
    argmax = None if targets.regions else logits.argmax(0)
    counts = {}
    for index, (name, values) in enumerate(targets.masks.items()):
        mask = logits[index] > 0 if targets.regions else torch.isin(argmax, torch.tensor(values))
        counts[name] = mask.reshape(mask.shape[0], -1).sum(1).double()
    return counts


def weighted_slice_mean(values: torch.Tensor, weights: torch.Tensor | None) -> float:
    """The mean of per-slice ``values`` weighted by ``weights`` (predicted foreground per slice); the plain
    mean when there are no weights or they are all zero."""
    values = values.double()
    if weights is None or float(weights.sum()) <= 0:
        return float(values.mean())
    weights = weights.to(values)
    return float((values * weights).sum() / weights.sum())


@dataclass
class LoadedHead:
    prefix: str  # score prefix in confidence.json: adversarial_head or plain_head
    head: ConfidenceHead
    outputs: list  # "dice:NAME" ..., "nsd:NAME" ...
    checkpoint: Path

    def scores(self, features: torch.Tensor, slice_weights: dict | None = None) -> dict:
        """Predicted Dice and NSD of one case (means over foreground labels/regions; per label when several).

        ``features``: (1, C, *grid) from :meth:`FeatureCapture.case_features`. A 2-D head given the grid of a
        3-D case ((1, C, slices, y, x)) scores each slice and averages them, weighted per label/region by
        ``slice_weights`` ({name: (slices,) predicted foreground}, see :func:`slice_foreground`)."""
        if self.head.dims == 2 and features.ndim == 5:
            return self._by_kind(self._slice_scores(features[0].transpose(0, 1), slice_weights or {}))
        with torch.no_grad():
            values = self.head(features.float()).squeeze(0).cpu().numpy().astype(float)
        return self._by_kind(dict(zip(self.outputs, (float(value) for value in values))))

    def _slice_scores(self, slices: torch.Tensor, slice_weights: dict) -> dict:
        """{output name: case value} from (slices, C, y, x) features of a 2-D head."""
        with torch.no_grad():
            values = torch.cat([self.head(chunk.float()) for chunk in torch.split(slices, SLICES_PER_FORWARD)])
        values = values.cpu()
        return {name: weighted_slice_mean(values[:, column], slice_weights.get(name.split(":", 1)[1]))
                for column, name in enumerate(self.outputs)}

    def _by_kind(self, values: dict) -> dict:
        by_kind = {"dice": {}, "nsd": {}}
        for name, value in values.items():
            kind, label = name.split(":", 1)
            by_kind[kind][label] = float(value)
        scores = {f"{self.prefix}_predicted_{kind}": float(np.mean(list(v.values()))) for kind, v in by_kind.items()}
        if len(by_kind["dice"]) > 1:
            scores[f"{self.prefix}_predicted_per_label"] = by_kind
        return scores


def load_heads(run_folder: Path, device: torch.device) -> list:
    """Every trained confidence head in ``run_folder`` (adversarial first)."""
    heads = []
    for folder_name, prefix in HEAD_FOLDERS.items():
        path = Path(run_folder) / folder_name / HEAD_CHECKPOINT
        if not path.is_file():
            continue
        try:
            checkpoint = load_checkpoint(path)
            head = ConfidenceHead(**checkpoint["head_config"])
            head.load_state_dict(checkpoint["head_weights"])
        except UnsafeCheckpointError:
            raise
        except Exception as e:  # a foreign or truncated file: torch raises many types
            raise CalibnetError(f"{path} is not a calibnet confidence-head checkpoint ({type(e).__name__}); train "
                                f"the head again with calib_train ... confidence_head --base METHOD.") from None
        heads.append(LoadedHead(prefix, head.to(device).eval(), list(checkpoint["outputs"]), path))
    return heads


class FeatureCapture:
    """Records the penultimate-decoder features of each sliding-window prediction of ``predictor``."""

    def __init__(self, predictor, expected_channels: int):
        for name in ("_internal_predict_sliding_window_return_logits", "_internal_maybe_mirror_and_predict"):
            if not hasattr(predictor, name):
                raise CalibnetError(f"this nnU-Net version has no nnUNetPredictor.{name}; confidence heads need "
                                    f"nnunetv2 2.8 (pip install 'nnunetv2>=2.8.1,<2.9').")
        self.expected_channels = expected_channels
        self.tiles, self.slicers, self.shape, self._armed = [], [], None, False
        feature_stage(predictor.network).register_forward_hook(self._keep)
        window, mirror_and_predict = (predictor._internal_predict_sliding_window_return_logits,
                                      predictor._internal_maybe_mirror_and_predict)

        def capturing_window(data, slicers, *args, **kwargs):
            self.tiles, self.slicers, self.shape = [], list(slicers), tuple(data.shape[1:])
            return window(data, slicers, *args, **kwargs)

        def capturing_mirror_and_predict(x):
            self._armed = True  # the first network call of a tile is the unmirrored one
            try:
                return mirror_and_predict(x)
            finally:
                self._armed = False

        predictor._internal_predict_sliding_window_return_logits = capturing_window
        predictor._internal_maybe_mirror_and_predict = capturing_mirror_and_predict

    def _keep(self, _module, _inputs, output):
        if self._armed:
            self.tiles.append(output.detach().float().clone())
            self._armed = False

    def case_features(self) -> torch.Tensor:
        """(1, C, *grid) features of the last prediction, the tiles placed at the feature resolution; for 2-D
        tiles of a 3-D case (2d configurations) the grid is (slices, *in-plane feature grid)."""
        if not self.tiles or len(self.tiles) != len(self.slicers):
            raise CalibnetError("no features were recorded during the prediction; confidence heads need nnU-Net's "
                                "sliding-window predictor.")
        tile = self.tiles[0]
        if tile.shape[1] != self.expected_channels:
            raise CalibnetError(f"the network gives {tile.shape[1]}-channel features but the head expects "
                                f"{self.expected_channels}; the head was trained on another base network.")
        dims = tile.ndim - 2
        spatial = list(self.slicers[0][1:])
        by_slice = int(len(spatial) == dims + 1 and isinstance(spatial[0], (int, np.integer)))  # 2-D tiles, 3-D case
        if len(spatial) != dims + by_slice or not all(isinstance(s, slice) for s in spatial[by_slice:]):
            raise CalibnetError("confidence heads score nnU-Net sliding-window predictions (3d_fullres, or 2d slice "
                                "by slice) only.")
        patch = [s.stop - s.start for s in spatial[by_slice:]]
        stride = [p / f for p, f in zip(patch, tile.shape[2:])]
        grid = [int(np.ceil(n / s)) for n, s in zip(self.shape[by_slice:], stride)]
        slices = list(self.shape[:1]) if by_slice else []
        canvas = torch.zeros((tile.shape[1], *slices, *grid), device=tile.device)
        counts = torch.zeros((*slices, *grid), device=tile.device)
        for features, slicer in zip(self.tiles, self.slicers):
            starts = [min(int(round(s.start / st)), g - f) for s, st, g, f in
                      zip(slicer[1 + by_slice:], stride, grid, features.shape[2:])]
            where = ((slicer[1],) if by_slice else ()) + tuple(slice(a, a + f)
                                                               for a, f in zip(starts, features.shape[2:]))
            canvas[(slice(None), *where)] += features[0]
            counts[where] += 1
        return (canvas / counts.clamp_min(1))[None]
