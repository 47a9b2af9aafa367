"""MedSAM-U's network (MedSAM-U paper, §III, Algorithm 1): the slice-wise SAM with MPA adapters in the image
encoder's blocks (``calibnet.networks.sam_adapters``) and a trainable prompt encoder, whose prediction runs
UGMP and UGPA on every prompted slice (``calibnet.uncertainty_prompting``).

- Prediction: UGMP (N boxes jittered around the initial box, mean probability ȳ, entropy Ū) then UGPA
  (uncertainty box re-jittered into K boxes plus the K most uncertain points; y* kept only when its
  uncertainty is lower), per slice. The initial box is the slice's ground-truth box, or the boxes of a
  prompt-quality setting (two or more boxes are UGMP's multiple prompts as they are).
- Jitter seeding: each slice's boxes come from ``jitter_rng(seed, case key, slice, setting)``. The caller
  names the case and the prompt setting for the span of its prediction with ``network.predicting(prompt_sets,
  case_id, setting)`` (declared on :class:`calibnet.networks.sam_backbone.SamSliceSegmenter`, which says
  why a context rather than arguments of ``forward``); a network called outside such a block gets a key
  derived from the case's image channels (see :meth:`MedSAMUSegmenter.case_key_for`).

Training (``calibnet.trainers.nnUNetTrainerMedSAMU``) decodes slices directly; ``forward`` is the
prediction path.
"""
from __future__ import annotations

import zlib

import numpy as np
import torch

from calibnet.errors import CalibnetError
from calibnet.metrics.entropy import binary_entropy
from calibnet.networks.sam_adapters import (DEFAULT_BOTTLENECK_RATIO, adaptable_blocks, adapter_parameters,
                                            insert_adapters, parse_adapter_blocks)
from calibnet.networks.sam_backbone import EMPTY_LOGIT, SamSliceSegmenter
from calibnet.uncertainty_prompting import (DEFAULT_EDGE_THRESHOLD, DEFAULT_N_BOXES, DEFAULT_POINT_SPACING,
                                            DEFAULT_SIGMA, DEFAULT_TOP_K, UGMPResult, adapt,
                                            default_min_distance, jitter_rng, jittered_boxes, run_ugmp)

OWN_PROMPTS = "own"  # the prompt-setting name of the jitter when the slices' own (ground-truth box) prompts are used


class MedSAMUSegmenter(SamSliceSegmenter):
    """SAM with MPA adapters whose prediction runs UGMP and UGPA on each prompted slice."""

    writes_uncertainty_map = True  # Ū = H(ȳ) of the output, written next to each prediction

    def __init__(self, sam, adapter_blocks: str = "all", adapter_ratio: float = DEFAULT_BOTTLENECK_RATIO,
                 n_boxes: int = DEFAULT_N_BOXES, sigma: float = DEFAULT_SIGMA, top_k: int = DEFAULT_TOP_K,
                 edge_threshold: float = DEFAULT_EDGE_THRESHOLD, compare_on: str = "slice", ugpa: bool = True,
                 seed: int = 0, point_spacing: float = DEFAULT_POINT_SPACING, unit_intensities: bool = False,
                 image_channel: int | None = None):
        super().__init__(sam, use_box=True, unit_intensities=unit_intensities, image_channel=image_channel)
        try:
            blocks = parse_adapter_blocks(str(adapter_blocks), len(adaptable_blocks(sam.image_encoder)))
        except ValueError as e:
            raise CalibnetError(f"--{e}") from None
        self.adapters = insert_adapters(sam.image_encoder, blocks, adapter_ratio)
        sam.prompt_encoder.requires_grad_(True)
        self.train_prompt_encoder = True
        self.options = dict(n_boxes=n_boxes, sigma=sigma, top_k=top_k, edge_threshold=edge_threshold,
                            compare_on=compare_on, ugpa=ugpa, seed=seed, point_spacing=point_spacing)
        self.last_ugpa = []  # per slice of the last prediction: True/False (UGPA accepted), None (no prompt)
        self.last_uncertainty = []  # per prompted slice: mean entropy (bits) of the kept prediction

    def trainable_parameters(self) -> list:
        return adapter_parameters(self) + list(self.sam.prompt_encoder.parameters())

    def case_key_for(self, volume: torch.Tensor, index: int = 0) -> str:
        """The case key of batch item ``index``: the case id of the prediction context (:meth:`predicting`,
        with ``#index`` after it for items past the first), else ``input-<crc32>`` of the item's image
        channels as float32 — stable for the same case and different between cases, for callers that do not
        name the case."""
        case_id = self.prediction_context.case_id
        if case_id is not None:
            return case_id if index == 0 else f"{case_id}#{index}"
        data = volume.detach().float().cpu().contiguous().numpy()
        return f"input-{zlib.crc32(data.tobytes()):08x}"

    def embed(self, slices: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(self.training and torch.is_grad_enabled()):
            return self.sam.image_encoder(self.slices_to_sam_input(slices))

    def _probability(self, embedding: torch.Tensor, slice_shape: tuple):
        def predict(box, points, labels):
            prompt = {"points": [list(p) for p in points], "labels": list(labels)} if points else {}
            if box is not None:
                prompt["box"] = box
            with torch.no_grad():
                logits = self.decode(embedding[None], [prompt], slice_shape)[0]
            return torch.sigmoid(logits.float()).cpu().numpy()
        return predict

    def uncertainty_guided(self, embedding: torch.Tensor, boxes: list, points: list, labels: list,
                           slice_shape: tuple, rng: np.random.Generator):
        """(probability, accepted) of one slice: UGMP over ``boxes`` (N jittered copies of a single box),
        then UGPA unless switched off."""
        o = self.options
        predict = self._probability(embedding, slice_shape)
        if len(boxes) == 1:
            boxes = jittered_boxes(boxes[0], o["n_boxes"], o["sigma"], slice_shape, rng)
        initial: UGMPResult = run_ugmp(predict, boxes, points, labels)
        if not o["ugpa"]:
            return initial.probability, False
        result = adapt(predict, initial, points, labels, slice_shape, rng, o["sigma"], o["top_k"],
                       o["edge_threshold"], o["compare_on"], default_min_distance(slice_shape, o["point_spacing"]))
        return result.probability, result.accepted

    def prediction_summary(self) -> dict:
        """confidence.json entries of the last prediction: mean uncertainty over the prompted slices and
        UGPA's decision per slice (null for slices without a prompt)."""
        decided = [a for a in self.last_ugpa if a is not None]
        return {"ugmp_mean_uncertainty": float(np.mean(self.last_uncertainty)) if self.last_uncertainty else 0.0,
                "ugpa_accepted_fraction": float(np.mean(decided)) if decided else 0.0,
                "ugpa_accepted": list(self.last_ugpa)}

    def prediction_settings(self) -> dict:
        """prompts.json records whether UGPA ran (``ugpa``: False for UGMP only)."""
        return {"ugpa": self.options["ugpa"]}

    def decode_uncertainty_guided(self, embeddings, prompt_sets: list, slice_shape: tuple,
                                  case_key: str | None = None):
        """Foreground logits (Z, Y, X) of one case, UGMP + UGPA per prompted slice; slice z's jitter comes from
        ``jitter_rng(seed, case_key, z, prompt setting)``; ``case_key`` and the setting default to those of the
        prediction context (:meth:`predicting`; no setting: the slices' own prompts, named ``own``)."""
        case_key = self.prediction_context.case_id if case_key is None else case_key
        if case_key is None:
            raise ValueError("decode_uncertainty_guided needs a case key: predict inside network.predicting(case_id="
                             "...) or pass case_key")
        setting = OWN_PROMPTS if self.prediction_context.setting is None else self.prediction_context.setting
        logits, self.last_ugpa, self.last_uncertainty = [], [], []
        for z, (embedding, prompts) in enumerate(zip(embeddings, prompt_sets)):
            if prompts is None:
                logits.append(torch.full(slice_shape, EMPTY_LOGIT, device=self.sam.pixel_mean.device))
                self.last_ugpa.append(None)
                continue
            rng = jitter_rng(self.options["seed"], case_key, z, setting)
            probability, accepted = self.uncertainty_guided(embedding, prompts["boxes"], prompts["points"],
                                                            prompts["labels"], slice_shape, rng)
            logits.append(torch.logit(torch.from_numpy(probability).to(embedding.device), eps=1e-7))
            self.last_ugpa.append(accepted)
            self.last_uncertainty.append(float(binary_entropy(probability).mean()))
        return torch.stack(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise RuntimeError("MedSAMUSegmenter.forward is the prediction path; training decodes slices directly")
        images, prompt_channels = x[:, :-3], x[:, -3:]
        prompt_sets = self.context_prompt_sets(x)
        logits = []
        for index, (volume, maps) in enumerate(zip(images, prompt_channels)):
            slices = self.slice_images(volume)
            shape = tuple(volume.shape[-2:])
            if prompt_sets is not None:
                sets = [None if p is None else {"boxes": list(p.boxes), "points": list(p.points),
                                                "labels": list(p.labels)} for p in prompt_sets]
            else:
                sets = [None if p is None else {"boxes": [p["box"]], "points": [], "labels": []}
                        for p in self.prompts_from_channels(maps)]
            foreground = self.decode_uncertainty_guided(self.embed_prompted(slices, sets), sets, shape,
                                                        self.case_key_for(volume, index))
            logits.append(torch.stack([torch.zeros_like(foreground), foreground]))
        return torch.stack(logits)
