"""SAM 2 backbones from the ``sam2`` package, applied slice by slice to 3-D volumes (as the SAM module).

``build_sam2_model`` makes a SAM 2.1 (or 2.0) Hiera-T/S/B+/L with ``sam2.build_sam.build_sam2`` at the chosen
input size — random weights unless a SAM 2 / MedSAM 2 checkpoint is given (read with ``weights_only=True``),
labelled "not pretrained" wherever results are reported — and drops the video modules (memory attention
and memory encoder) that slice-wise segmentation never runs. :class:`Sam2SliceSegmenter` follows SAM 2's
image predictor: the frozen image encoder (Hiera + FPN neck, with the mask decoder's ``conv_s0``/``conv_s1``
projections of the high-resolution levels, which SAM 2 applies when it encodes an image), ``no_mem_embed``
added to the lowest-resolution level, boxes given to the prompt encoder as two corner points (labels 2, 3),
and the mask decoder called directly. The encoder's outputs of a slice are packed into one flat tensor so
that the SAM module's embedding cache and decoding loop serve both backbones.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from calibnet.errors import CalibnetError
from calibnet.networks.sam_backbone import SamSliceSegmenter, read_state_dict

SAM2_MODELS = ("hiera_t", "hiera_s", "hiera_b+", "hiera_l")
DEFAULT_SAM2_IMAGE_SIZE = 1024  # SAM 2's own input size; MedSAM 2 checkpoints are trained at 512
# (patch-embedding width, number of Hiera blocks) of each architecture, to recognise a checkpoint
_ARCHITECTURES = {(96, 12): "hiera_t", (96, 16): "hiera_s", (112, 24): "hiera_b+", (144, 48): "hiera_l"}
_PIXEL_MEAN, _PIXEL_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # SAM 2's ImageNet normalisation


@dataclass(frozen=True)
class Sam2Config:
    model: str = "hiera_t"
    checkpoint: str | None = None
    image_size: int = DEFAULT_SAM2_IMAGE_SIZE
    version: str = "2.1"  # which of the package's config families the checkpoint belongs to

    @property
    def pretrained(self) -> bool:
        return self.checkpoint is not None

    def describe(self) -> str:
        if not self.pretrained:
            return f"SAM {self.version} {self.model} at {self.image_size}², not pretrained"
        return f"SAM {self.version} {self.model} at {self.image_size}² from {self.checkpoint}"

    @property
    def config_file(self) -> str:
        folder, prefix = ("sam2.1", "sam2.1_") if self.version == "2.1" else ("sam2", "sam2_")
        return f"configs/{folder}/{prefix}{self.model}.yaml"


def resolve_sam2_config(model: str | None, checkpoint: str | None, image_size: int | None) -> tuple[Sam2Config, str | None]:
    """The backbone of --sam2-model/--sam2-checkpoint (or CALIBNET_SAM2_CHECKPOINT)/--sam2-image-size; with no
    checkpoint, a randomly initialised model (hiera_t unless named) and a warning to print."""
    checkpoint = checkpoint or os.environ.get("CALIBNET_SAM2_CHECKPOINT") or None
    if model is not None and model not in SAM2_MODELS:
        raise CalibnetError(f"unknown --sam2-model {model!r}; choose from {', '.join(SAM2_MODELS)}.")
    size = DEFAULT_SAM2_IMAGE_SIZE if image_size is None else int(image_size)
    if size % 32 or not 64 <= size <= 2048:
        raise CalibnetError(f"--sam2-image-size {size}: give a multiple of 32 between 64 and 2048 (SAM 2: 1024, "
                            f"MedSAM 2: 512).")
    if checkpoint is None:
        config = Sam2Config(model or "hiera_t", None, size)
        return config, f"no SAM 2 checkpoint given: using {config.describe()}"
    state = load_sam2_state_dict(checkpoint)
    detected = detect_sam2_architecture(state, checkpoint)
    if model is not None and model != detected:
        raise CalibnetError(f"{checkpoint} holds a SAM 2 {detected} checkpoint, not {model}; pass --sam2-model "
                            f"{detected}.")
    version = "2.1" if "no_obj_embed_spatial" in state else "2"
    return Sam2Config(detected, str(checkpoint), size, version), None


def load_sam2_state_dict(path: os.PathLike) -> dict:
    """The state dict of a SAM 2 / MedSAM 2 checkpoint."""
    return read_state_dict(path, "SAM 2", "image_encoder.trunk.patch_embed.proj.weight",
                           "SAM 2.1: sam2.1_hiera_tiny.pt etc., MedSAM 2: MedSAM2_latest.pt",
                           "; SAM 1 checkpoints go to --sam-checkpoint")


def detect_sam2_architecture(state: dict, path="checkpoint") -> str:
    width = state["image_encoder.trunk.patch_embed.proj.weight"].shape[0]
    blocks = len({k.split(".")[3] for k in state if k.startswith("image_encoder.trunk.blocks.")})
    if (width, blocks) not in _ARCHITECTURES:
        raise CalibnetError(f"{path}: a Hiera of width {width} with {blocks} blocks matches no SAM 2 architecture.")
    return _ARCHITECTURES[(width, blocks)]


def build_sam2_model(config: Sam2Config, load_weights: bool = True) -> torch.nn.Module:
    """SAM 2 of ``config`` without its video modules; ``load_weights=False`` builds the architecture only
    (random weights, seeded, so an untrained model is the same in every run)."""
    from sam2.build_sam import build_sam2

    grid = config.image_size // 16
    overrides = [f"++model.image_size={config.image_size}"] + [
        f"++model.memory_attention.layer.{a}.feat_sizes=[{grid},{grid}]" for a in ("self_attention", "cross_attention")]
    torch.manual_seed(0)
    model = build_sam2(config.config_file, None, device="cpu", mode="eval", hydra_overrides_extra=overrides)
    if load_weights and config.pretrained:
        try:
            model.load_state_dict(load_sam2_state_dict(config.checkpoint))
        except RuntimeError as e:
            raise CalibnetError(f"{config.checkpoint} does not fit SAM {config.version} {config.model} "
                                f"({str(e).splitlines()[0]}).") from None
    model.memory_attention = model.memory_encoder = None  # video only; not part of a slice-wise model
    return model


class Sam2SliceSegmenter(SamSliceSegmenter):
    """Slice-wise SAM 2 with the SAM module's interface: two-class logits from image + prompt channels.

    An "embedding" here is the flat concatenation of the encoder's outputs for one slice: the image
    embedding (with ``no_mem_embed``), the two high-resolution levels, and — when a decoder plug-in asks
    for it (``needs_intermediate``) — the output of the Hiera block in the middle of the encoder.
    """

    needs_intermediate = False

    def __init__(self, sam2: torch.nn.Module, use_box: bool = False):
        super().__init__(sam2, use_box)
        trunk = self.image_encoder.trunk
        middle = len(trunk.blocks) // 2 - 1  # the m/2-th of m blocks (SafeClick §2)
        self._middle_block = trunk.blocks[middle]
        stage = next(i for i, end in enumerate(trunk.stage_ends) if end >= middle)
        side = self.image_size // 2 ** (stage + 2)  # Hiera stage k works at stride 4·2^k
        self.middle_shape = (self._middle_block.dim_out, side, side)
        self.register_buffer("pixel_mean", torch.tensor(_PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(_PIXEL_STD).view(1, 3, 1, 1), persistent=False)
        for module in (self.mask_decoder.conv_s0, self.mask_decoder.conv_s1):
            module.requires_grad_(False)  # applied at encoding time, so part of the frozen, cached encoder
        self.sam.no_mem_embed.requires_grad_(False)

    @property
    def prompt_encoder(self) -> torch.nn.Module:
        return self.sam.sam_prompt_encoder

    @property
    def mask_decoder(self) -> torch.nn.Module:
        return self.sam.sam_mask_decoder

    @property
    def image_size(self) -> int:
        return self.sam.image_size

    def decoder_parameters(self) -> list:
        frozen = {id(p) for m in (self.mask_decoder.conv_s0, self.mask_decoder.conv_s1) for p in m.parameters()}
        return [p for p in self.mask_decoder.parameters() if id(p) not in frozen]

    def feature_shapes(self) -> list:
        """(C, H, W) of each packed feature: image embedding, high-res level 1/8, 1/4, [middle block]."""
        s = self.image_size
        decoder = self.mask_decoder
        shapes = [(decoder.transformer_dim, s // 16, s // 16), (decoder.conv_s1.out_channels, s // 8, s // 8),
                  (decoder.conv_s0.out_channels, s // 4, s // 4)]
        return shapes + [self.middle_shape] if self.needs_intermediate else shapes

    def unpack(self, embedding: torch.Tensor) -> list:
        """Flat embeddings (N, D) -> [(N, C, H, W), ...] in the order of :meth:`feature_shapes`."""
        features, start = [], 0
        for c, h, w in self.feature_shapes():
            features.append(embedding[:, start:start + c * h * w].reshape(-1, c, h, w))
            start += c * h * w
        return features

    def resized_shape(self, slice_shape: tuple) -> tuple:
        """SAM 2's transforms resize every image to S×S (no aspect ratio kept, nothing padded)."""
        return self.image_size, self.image_size

    def slices_to_sam_input(self, slices: torch.Tensor) -> torch.Tensor:
        """SAM 2's (N, 3, S, S) input: :meth:`unit_range_slices` resized to S×S, normalised with ImageNet
        mean/std (SAM2Transforms)."""
        resized = F.interpolate(self.unit_range_slices(slices), size=(self.image_size, self.image_size),
                                mode="bilinear", align_corners=False)
        return (resized - self.pixel_mean) / self.pixel_std

    def to_slice_shape(self, low_res: torch.Tensor, slice_shape: tuple) -> torch.Tensor:
        """Low-resolution logits straight to the slice's shape (nothing padded to crop)."""
        return F.interpolate(low_res, size=slice_shape, mode="bilinear", align_corners=False)

    def frozen_encoding(self) -> list:
        return [self.image_encoder, self.mask_decoder.conv_s0, self.mask_decoder.conv_s1, self.sam.no_mem_embed]

    @property
    def embedding_layout(self) -> str:
        return "sam2+middle" if self.needs_intermediate else "sam2"

    def encode(self, inputs: torch.Tensor) -> torch.Tensor:
        """Frozen-encoder features of prepared (N, 3, S, S) inputs, packed flat (N, D)."""
        captured = []
        hook = self._middle_block.register_forward_hook(lambda _m, _i, out: captured.append(out)) \
            if self.needs_intermediate else None
        try:
            out = self.sam.forward_image(inputs)
        finally:
            if hook is not None:
                hook.remove()
        level_s0, level_s1, final = out["backbone_fpn"]  # conv_s0/conv_s1 already applied by forward_image
        final = final + self.sam.no_mem_embed.view(1, -1, 1, 1)
        features = [final, level_s1, level_s0]
        if self.needs_intermediate:
            features.append(captured[0].permute(0, 3, 1, 2))  # Hiera blocks are channel-last
        return torch.cat([f.flatten(1) for f in features], dim=1)

    def decode_low_res(self, embedding: torch.Tensor, points, boxes) -> torch.Tensor:
        """SAM 2's (B, 1, h, w) low-resolution logits of B packed slice embeddings, one prompt each (see the SAM
        module; SAM 2's decoder takes one image per prompt with ``repeat_image=False``)."""
        image, level_s1, level_s0, *_ = self.unpack(embedding)
        if boxes is not None:  # SAM 2's image predictor gives a box as two corner points, labels 2 and 3
            corners = boxes.reshape(-1, 2, 2)
            corner_labels = torch.tensor([[2, 3]], dtype=torch.int64, device=boxes.device).expand(len(corners), 2)
            points = (corners, corner_labels) if points is None else \
                (torch.cat([corners, points[0]], 1), torch.cat([corner_labels, points[1]], 1))
        with torch.set_grad_enabled(self.train_prompt_encoder and torch.is_grad_enabled()):
            sparse, dense = self.prompt_encoder(points=points, boxes=None, masks=None)
        with self.decoder_context(embedding):
            low_res, *_ = self.mask_decoder(image_embeddings=image, image_pe=self.prompt_encoder.get_dense_pe(),
                                            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                            multimask_output=False, repeat_image=False,
                                            high_res_features=[level_s0, level_s1])
        return low_res

    def decoder_context(self, embedding: torch.Tensor):
        """What a decoder plug-in needs to know about the slice being decoded (nothing for plain SAM 2)."""
        return nullcontext()
