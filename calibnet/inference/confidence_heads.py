"""Confidence heads at prediction time: the heads trained on a run, the penultimate-decoder features of the
prediction they score, and their per-case scores for ``confidence.json``.

The features come from the segmentation's own forward passes, so a head costs only its own small forward:
nnU-Net's sliding window calls the network once per tile without mirroring and then once per mirrored copy;
:class:`FeatureCapture` keeps the unmirrored call of each tile and places the tiles' features on a grid
covering the whole (padded) case at the feature resolution, averaging where tiles overlap. When the case
fits one patch, as the heads' training patches did, this is exactly that patch's features.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from calibnet.errors import CalibnetError
from calibnet.networks.confidence_head import HEAD_FOLDERS, ConfidenceHead, feature_stage

HEAD_CHECKPOINT = "checkpoint_final.pth"


@dataclass
class LoadedHead:
    prefix: str  # score prefix in confidence.json: adversarial_head or plain_head
    head: ConfidenceHead
    outputs: list  # "dice:NAME" ..., "nsd:NAME" ...
    checkpoint: Path

    def scores(self, features: torch.Tensor) -> dict:
        """Predicted Dice and NSD of one case (means over foreground labels/regions; per label when several)."""
        with torch.no_grad():
            values = self.head(features.float()).squeeze(0).cpu().numpy().astype(float)
        by_kind = {"dice": {}, "nsd": {}}
        for name, value in zip(self.outputs, values):
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
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            head = ConfidenceHead(**checkpoint["head_config"])
            head.load_state_dict(checkpoint["head_weights"])
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
        """(1, C, *grid) features of the last prediction, the tiles placed at the feature resolution."""
        if not self.tiles or len(self.tiles) != len(self.slicers):
            raise CalibnetError("no features were recorded during the prediction; confidence heads need nnU-Net's "
                                "sliding-window predictor.")
        tile = self.tiles[0]
        if tile.shape[1] != self.expected_channels:
            raise CalibnetError(f"the network gives {tile.shape[1]}-channel features but the head expects "
                                f"{self.expected_channels}; the head was trained on another base network.")
        spatial = list(self.slicers[0][1:])
        if len(spatial) != tile.ndim - 2 or not all(isinstance(s, slice) for s in spatial):
            raise CalibnetError("confidence heads score 3-D sliding-window predictions only (3d_fullres).")
        patch = [s.stop - s.start for s in spatial]
        stride = [p / f for p, f in zip(patch, tile.shape[2:])]
        grid = [int(np.ceil(n / s)) for n, s in zip(self.shape, stride)]
        canvas = torch.zeros((tile.shape[1], *grid), device=tile.device)
        counts = torch.zeros(grid, device=tile.device)
        for features, slicer in zip(self.tiles, self.slicers):
            starts = [min(int(round(s.start / st)), g - f) for s, st, g, f in
                      zip(slicer[1:], stride, grid, features.shape[2:])]
            where = tuple(slice(a, a + f) for a, f in zip(starts, features.shape[2:]))
            canvas[(slice(None), *where)] += features[0]
            counts[where] += 1
        return (canvas / counts.clamp_min(1))[None]
