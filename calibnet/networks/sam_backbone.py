"""SAM backbones from the ``segment-anything`` package, applied slice by slice to 3-D volumes.

``build_sam`` makes ViT-B/L/H from the package's registry (weights from a user-given checkpoint, loaded
with ``weights_only=True``) or a small randomly initialised ``tiny`` SAM for CPU tests and the demo.
:class:`SamSliceSegmenter` runs the frozen image encoder on every axial slice (first array axis), the
frozen prompt encoder on each slice's prompts, and the mask decoder once per slice with that slice's own
prompt set (the stock decoder repeats one image embedding per prompt, so slices are decoded one by one).
Slices without a prompt get an empty prediction. Nothing in the installed package is modified.

What a prediction is told besides its input. nnU-Net's predictor calls only ``network(x)`` (once per
sliding window, and per mirrored copy), so what a SAM network needs to know about the case — the prompts
of a prompt-quality setting, the case id that seeds MedSAM-U's jitter, the setting's name — cannot travel
as arguments of ``forward``. It travels in a :class:`PredictionContext` that the network owns for the span
of one prediction: ``with network.predicting(prompt_sets, case_id, setting): predictor.predict...(x)``.
``forward`` reads ``network.prediction_context``; outside a ``predicting`` block that context is empty (the
prompts come from the prompt channels, the case is unnamed), so nothing set for one case leaks into the
next. The network protocol inference relies on is declared on :class:`SamSliceSegmenter`: ``predicting``,
``prediction_summary``, ``prediction_settings`` and ``writes_uncertainty_map``; subclasses override them.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from calibnet.errors import CalibnetError
from calibnet.prompt_quality import PromptSetting

SAM_MODELS = ("vit_b", "vit_l", "vit_h", "tiny")
NOT_PRETRAINED = "tiny SAM, not pretrained"
_EMBED_DIMS = {1280: "vit_h", 1024: "vit_l", 768: "vit_b"}
EMPTY_LOGIT = -20.0  # logit of slices without a prompt: p(foreground) ≈ 2e-9


@dataclass(frozen=True)
class SamConfig:
    model: str = "tiny"
    checkpoint: str | None = None

    @property
    def pretrained(self) -> bool:
        return self.checkpoint is not None

    def describe(self) -> str:
        return NOT_PRETRAINED if not self.pretrained else f"SAM {self.model} from {self.checkpoint}"


def resolve_sam_config(model: str | None, checkpoint: str | None) -> tuple[SamConfig, str | None]:
    """DESIGN §8 defaults: the checkpoint of --sam-checkpoint or CALIBNET_SAM_CHECKPOINT (architecture read
    from it), else tiny. Returns the config and a warning to print, if any."""
    checkpoint = checkpoint or os.environ.get("CALIBNET_SAM_CHECKPOINT") or None
    if model is not None and model not in SAM_MODELS:
        raise CalibnetError(f"unknown --sam-model {model!r}; choose from {', '.join(SAM_MODELS)}.")
    if checkpoint is None:
        if model not in (None, "tiny"):
            raise CalibnetError(f"--sam-model {model} needs weights: pass --sam-checkpoint PATH (SAM or MedSAM "
                                f"{model} .pth) or set CALIBNET_SAM_CHECKPOINT; use --sam-model tiny to test without.")
        warning = None if model == "tiny" else "no SAM checkpoint given: using a tiny SAM, not pretrained"
        return SamConfig("tiny", None), warning
    if model == "tiny":
        raise CalibnetError("--sam-model tiny is randomly initialised and takes no --sam-checkpoint.")
    detected = detect_sam_architecture(load_sam_state_dict(checkpoint), checkpoint)
    if model is not None and model != detected:
        raise CalibnetError(f"{checkpoint} holds a SAM {detected} checkpoint, not {model}; pass --sam-model {detected}.")
    return SamConfig(detected, str(checkpoint)), None


def read_state_dict(path: os.PathLike, family: str, required_key: str, releases: str, elsewhere: str = "") -> dict:
    """The state dict of a ``family`` checkpoint ({"model": ...} or bare, read with ``weights_only=True``), with
    one clear message for every way it can be wrong; ``required_key`` identifies the family."""
    path = Path(path)
    if not path.is_file():
        raise CalibnetError(f"{family} checkpoint {path} does not exist; download it ({releases}) and pass its path.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle with code, not a torch file at all
        raise CalibnetError(f"{path} cannot be read as a {family} checkpoint ({type(e).__name__}); is the download "
                            f"complete?") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or required_key not in state:
        raise CalibnetError(f"{path} is not a {family} checkpoint (no {required_key.rsplit('.', 2)[0]} weights)"
                            f"{elsewhere}.")
    return state


def load_sam_state_dict(path: os.PathLike) -> dict:
    """The state dict in a SAM/MedSAM checkpoint."""
    return read_state_dict(path, "SAM", "image_encoder.patch_embed.proj.weight",
                           "SAM: sam_vit_b_01ec64.pth etc., MedSAM: medsam_vit_b.pth")


def detect_sam_architecture(state: dict, path="checkpoint") -> str:
    width = state["image_encoder.patch_embed.proj.weight"].shape[0]
    if width not in _EMBED_DIMS:
        raise CalibnetError(f"{path}: image encoder width {width} matches no SAM architecture (768, 1024, 1280).")
    return _EMBED_DIMS[width]


def _tiny_sam() -> Sam:
    """A SAM with the package's modules at toy sizes: 128² input, 8×8 embeddings of width 64."""
    image_size, patch, width = 128, 16, 64
    grid = image_size // patch
    return Sam(
        image_encoder=ImageEncoderViT(img_size=image_size, patch_size=patch, embed_dim=width, depth=2, num_heads=2,
                                      out_chans=width, use_rel_pos=True, window_size=4, global_attn_indexes=(1,)),
        prompt_encoder=PromptEncoder(embed_dim=width, image_embedding_size=(grid, grid),
                                     input_image_size=(image_size, image_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=width,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=width, mlp_dim=256, num_heads=2),
                                 iou_head_depth=3, iou_head_hidden_dim=64))


def build_sam(config: SamConfig, load_weights: bool = True) -> Sam:
    """The SAM of ``config``; ``load_weights=False`` builds the architecture only (weights come from a run)."""
    if config.model == "tiny":
        torch.manual_seed(0)  # the random tiny SAM is the same in every run
        return _tiny_sam()
    from segment_anything import sam_model_registry
    sam = sam_model_registry[config.model](checkpoint=None)
    if load_weights:
        try:
            sam.load_state_dict(load_sam_state_dict(config.checkpoint))
        except RuntimeError as e:
            raise CalibnetError(f"{config.checkpoint} does not fit SAM {config.model} "
                                f"({str(e).splitlines()[0]}).") from None
    return sam


def to_three_channels(volume: torch.Tensor) -> torch.Tensor:
    """(C, Z, Y, X) -> (3, Z, Y, X): one channel repeated, two as (c0, c1, c0), more: the first three."""
    if volume.shape[0] == 1:
        return volume.repeat(3, 1, 1, 1)
    if volume.shape[0] == 2:
        return torch.stack([volume[0], volume[1], volume[0]])
    return volume[:3]


@dataclass(frozen=True)
class PredictionContext:
    """What one prediction of a slice-wise SAM network knows besides its input (see :meth:`SamSliceSegmenter.
    predicting`); the default is the empty context of a network called outside a ``predicting`` block."""
    prompt_sets: tuple | None = None  # per slice of the case: SlicePrompts (or None) of a prompt-quality
    #                                   setting; None: the prompts of the input's prompt channels
    case_id: str | None = None  # the case predicted; None: unnamed (MedSAM-U then keys its jitter on the input)
    setting: str | None = None  # the prompt setting's name; None: the slices' own prompts


class SamSliceSegmenter(torch.nn.Module):
    """Slice-wise SAM returning nnU-Net-style two-class logits (background 0, foreground = SAM's logit).

    ``forward`` takes (B, C + 3, Z, Y, X): the image channels followed by three prompt channels — a
    foreground-point map, a background-point map and a box mask — whose non-zero voxels give each slice's
    prompts (points for the CalSAM protocol, the box for vanilla SAM).
    """

    train_prompt_encoder = False  # MedSAM-U's MPA trains it; every other method keeps it frozen
    writes_uncertainty_map = False  # inference writes CASE_uncertainty.npz (the output's entropy): MedSAM-U
    prediction_context = PredictionContext()  # the prediction under way (set by predicting only)

    def __init__(self, sam: Sam, use_box: bool = False):
        super().__init__()
        self.sam = sam
        self.use_box = use_box
        self.decoder = self.mask_decoder  # nnU-Net toggles .decoder.deep_supervision; SAM has none
        for module in (self.image_encoder, self.prompt_encoder):
            module.requires_grad_(False)

    @contextmanager
    def predicting(self, prompt_sets: list | None = None, case_id: str | None = None,
                   setting: PromptSetting | str | None = None):
        """The context of the predictions made inside the block: ``prompt_sets`` (per slice of the one case
        predicted: :class:`calibnet.prompt_quality.SlicePrompts` or None) replace the prompt channels;
        ``case_id`` and ``setting`` (a :class:`calibnet.prompt_quality.PromptSetting`, its name, or None for
        the slices' own prompts) name what is predicted — networks whose prediction draws random numbers
        (MedSAM-U's UGMP jitter) seed them from it. The previous context comes back when the block ends."""
        name = setting.name if isinstance(setting, PromptSetting) else setting
        previous = self.prediction_context
        self.prediction_context = PredictionContext(None if prompt_sets is None else tuple(prompt_sets),
                                                    None if case_id is None else str(case_id),
                                                    None if name is None else str(name))
        try:
            yield self
        finally:
            self.prediction_context = previous

    def prediction_summary(self) -> dict:
        """confidence.json entries of the last prediction besides the probabilities' own scores (none here;
        MedSAM-U: UGMP's uncertainty and UGPA's decisions)."""
        return {}

    def prediction_settings(self) -> dict:
        """What prompts.json records about how this network predicts, besides the prompt setting and seed
        (nothing here; MedSAM-U: whether UGPA runs)."""
        return {}

    @property
    def image_encoder(self) -> torch.nn.Module:
        return self.sam.image_encoder

    @property
    def prompt_encoder(self) -> torch.nn.Module:
        return self.sam.prompt_encoder

    @property
    def mask_decoder(self) -> torch.nn.Module:
        return self.sam.mask_decoder

    def decoder_parameters(self) -> list:
        """What fine-tuning the decoder trains (SAM-FT and the methods built on it)."""
        return list(self.mask_decoder.parameters())

    @property
    def image_size(self) -> int:
        return self.sam.image_encoder.img_size

    def unit_range_slices(self, slices: torch.Tensor) -> torch.Tensor:
        """(N, 3, Y, X) normalised intensities -> (N, 3, S, S) in [0, 1]: each slice rescaled by its 0.5–99.5th
        percentiles and resized to the encoder's input size."""
        flat = slices.reshape(slices.shape[0], -1).float()
        low = torch.quantile(flat, 0.005, dim=1)[:, None, None, None]
        high = torch.quantile(flat, 0.995, dim=1)[:, None, None, None]
        scaled = ((slices - low) / (high - low).clamp_min(1e-6)).clamp(0, 1)
        return F.interpolate(scaled, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)

    def slices_to_sam_input(self, slices: torch.Tensor) -> torch.Tensor:
        """SAM's (N, 3, S, S) input: :meth:`unit_range_slices` on 0–255, normalised with SAM's pixel mean/std."""
        return (self.unit_range_slices(slices) * 255 - self.sam.pixel_mean) / self.sam.pixel_std

    @torch.no_grad()
    def embed(self, slices: torch.Tensor) -> torch.Tensor:
        """Frozen image-encoder embeddings of (N, 3, Y, X) slices."""
        return self.sam.image_encoder(self.slices_to_sam_input(slices))

    def decode(self, embeddings: torch.Tensor, prompts: list, slice_shape: tuple) -> torch.Tensor:
        """Foreground logits (N, Y, X) for N slice embeddings, one prompt dict (or None) per slice."""
        dtype = embeddings.dtype
        scale = torch.tensor([self.image_size / slice_shape[1], self.image_size / slice_shape[0]],
                             device=embeddings.device, dtype=dtype)
        outputs = []
        for embedding, prompt in zip(embeddings, prompts):
            if prompt is None:
                outputs.append(torch.full(slice_shape, EMPTY_LOGIT, device=embeddings.device, dtype=dtype))
                continue
            points = boxes = None
            if "points" in prompt:
                coords = torch.as_tensor(prompt["points"], dtype=dtype, device=embeddings.device)
                coords = (coords[:, [1, 0]] + 0.5) * scale  # (row, col) -> SAM's (x, y) at encoder size
                labels = torch.as_tensor(prompt["labels"], dtype=torch.int64, device=embeddings.device)
                points = (coords[None], labels[None])
            if "box" in prompt:
                r0, c0, r1, c1 = prompt["box"]
                boxes = torch.tensor([[c0, r0, c1 + 1, r1 + 1]], dtype=dtype, device=embeddings.device)
                boxes = boxes * scale.repeat(2)
            low_res = self.decode_low_res(embedding[None], points, boxes)
            outputs.append(F.interpolate(low_res, size=slice_shape, mode="bilinear", align_corners=False)[0, 0])
        return torch.stack(outputs)

    def decode_low_res(self, embedding: torch.Tensor, points, boxes) -> torch.Tensor:
        """SAM's (1, 1, h, w) low-resolution logits of one slice embedding; ``points`` = (coords (1, P, 2),
        labels (1, P)) and ``boxes`` (1, 4), both as (x, y) at the encoder's input size, or None."""
        with torch.set_grad_enabled(self.train_prompt_encoder and torch.is_grad_enabled()):
            sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=None)
        low_res, _ = self.mask_decoder(image_embeddings=embedding, image_pe=self.prompt_encoder.get_dense_pe(),
                                       sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                       multimask_output=False)
        return low_res

    def prompts_from_channels(self, prompt_channels: torch.Tensor) -> list:
        """Per slice of (3, Z, Y, X) prompt maps: {"points", "labels"} and/or {"box"}, or None."""
        prompts = []
        for fg, bg, box in prompt_channels.transpose(0, 1):
            if self.use_box:
                where = torch.nonzero(box > 0.5)
                if len(where) == 0:
                    prompts.append(None)
                    continue
                low, high = where.min(0).values.tolist(), where.max(0).values.tolist()
                prompts.append({"box": (low[0], low[1], high[0], high[1])})
                continue
            if fg.max() <= 0.5:
                prompts.append(None)
                continue
            points = [np.unravel_index(int(fg.argmax()), fg.shape)]
            labels = [1]
            if bg.max() > 0.5:
                points.append(np.unravel_index(int(bg.argmax()), bg.shape))
                labels.append(0)
            prompts.append({"points": [list(map(int, p)) for p in points], "labels": labels})
        return prompts

    def decode_prompt_sets(self, embeddings: torch.Tensor, prompt_sets: list, slice_shape: tuple) -> torch.Tensor:
        """Foreground logits (N, Y, X) for slices prompted with a prompt-quality setting: one
        :class:`calibnet.prompt_quality.SlicePrompts` (or None) per slice. A slice with several boxes is
        decoded once per box, each with all the slice's points, and the probabilities are averaged."""
        outputs = []
        for embedding, prompts in zip(embeddings, prompt_sets):
            if prompts is None:
                outputs.append(self.decode(embedding[None], [None], slice_shape)[0])
                continue
            points = {"points": [list(p) for p in prompts.points], "labels": list(prompts.labels)} \
                if prompts.points else {}
            variants = [{**points, "box": box} for box in prompts.boxes] or [points]
            logits = self.decode(embedding[None].expand(len(variants), *embedding.shape), variants, slice_shape)
            outputs.append(torch.logit(torch.sigmoid(logits).mean(0), eps=1e-7))
        return torch.stack(outputs)

    def context_prompt_sets(self, x: torch.Tensor) -> tuple | None:
        """The prompt sets of the prediction context, None when the prompts come from the prompt channels;
        they belong to one case, so ``x`` must hold one."""
        prompt_sets = self.prediction_context.prompt_sets
        if prompt_sets is not None and x.shape[0] != 1:
            raise ValueError(f"the prompt sets of predicting() are those of one case; the input holds {x.shape[0]}")
        return prompt_sets

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Two-class logits (B, 2, Z, Y, X); the prompts come from the prompt channels, or from the prompt sets
        of the prediction context (see :meth:`predicting`) when it has them."""
        images, prompt_channels = x[:, :-3], x[:, -3:]
        prompt_sets = self.context_prompt_sets(x)
        logits = []
        for volume, maps in zip(images, prompt_channels):
            slices = to_three_channels(volume).transpose(0, 1)  # (Z, 3, Y, X)
            shape = tuple(volume.shape[-2:])
            if prompt_sets is not None:
                foreground = self.decode_prompt_sets(self.embed(slices), prompt_sets, shape)
            else:
                foreground = self.decode(self.embed(slices), self.prompts_from_channels(maps), shape)
            logits.append(torch.stack([torch.zeros_like(foreground), foreground]))
        return torch.stack(logits)
