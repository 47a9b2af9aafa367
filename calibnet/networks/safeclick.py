"""The SafeClick decoder (SafeClick paper, §2, Eqs. 1–9) as a plug-in around SAM 2's own mask decoder.

SAM 2's mask decoder is left as it is except for one thing: its two-way transformer (the paper's expert
E3, which mixes the prompt tokens with the image embedding) is wrapped by :class:`SafeClickTransformer`.
The wrapper runs E3 unchanged, and adds to its image-side output x_3 the consensus of two prompt-free
experts before SAM 2's upsampling and mask head:

- E1 (Eqs. 1–3): the output of the middle Hiera block x_i, brought to the final resolution and width by
  convolution + LayerNorm + GELU, attends to the final image embedding x_f (multi-head cross-attention
  with pre-norm and residual), then an MLP with residual;
- E2 (Eqs. 4–5): multi-head self-attention on x_f, then an MLP with residual;
- CRL (Eqs. 6–8): channel-by-channel cross-reference matrices Φ1Φ2ᵀ and Φ2Φ2ᵀ turned into the contrastive
  form max(ΦΦᵀ)·K − ΦΦᵀ, softmax over the last axis, mixed as (σ(A_self) + α·σ(A_cross)) / (1 + α),
  applied to Φ2 with a Φ2 residual;
- fusion (Eq. 9): LayerNorm and leaky ReLU on the consensus, then a zero-initialised 1×1 convolution,
  added to x_3.

Choices the paper leaves open (documented in docs/safeclick.md): width C = SAM 2's transformer width
(256), 8 heads, MLP hidden width 4·C with GELU, no positional encodings in E1/E2; α = softplus(ρ) with
α = 1 at initialisation, so the mix stays convex; the max in Eq. 7 is taken per row, which the row-wise
softmax makes equivalent to any constant and numerically safe. Eq. 9 as printed normalises the sum
φ(N(F_conv(x'_2) + x_3)), which would change x_3 even with F_conv = 0 and contradict the paper's own
reason for the zero initialisation ("initially preserves the prompt-driven features"); we apply the norm
and activation to the consensus branch and keep the zero-initialised convolution last, so the plug-in
starts out as exactly SAM 2's decoder (the zero-convolution pattern of ControlNet).

The same plug-in sits on segment-anything's mask decoder (LiteMedSAM, SAM, MedSAM) in
``calibnet.networks.safeclick_sam``; nothing here needs the sam2 package but :class:`SafeClickSegmenter`'s backbone.

Ablations (Table 3): without E1 the cross term disappears (CRL mixes the self term only); without E2 the
CRL works on x_f itself; without the CRL the experts' outputs are summed and go to the fusion directly.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d  # the same module as sam2's; SAM 1 needs no sam2
from torch import nn

from calibnet.networks.sam2_backbone import Sam2SliceSegmenter

DEFAULT_HEADS = 8
DEFAULT_MLP_RATIO = 4
DEFAULT_ALPHA = 1.0


@dataclass(frozen=True)
class SafeClickOptions:
    e1: bool = True
    e2: bool = True
    crl: bool = True
    heads: int = DEFAULT_HEADS
    mlp_ratio: int = DEFAULT_MLP_RATIO
    alpha: float = DEFAULT_ALPHA

    def describe(self) -> str:
        removed = [name for name, kept in (("E1", self.e1), ("E2", self.e2), ("CRL", self.crl)) if not kept]
        return "SafeClick" + (f" w/o {', '.join(removed)}" if removed else "")


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """T_cl: (B, C, H, W) -> (B, H·W, C)."""
    return x.flatten(2).transpose(1, 2)


def to_image(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """R: (B, H·W, C) -> (B, C, H, W)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, height, width)


class FeatureTransform(nn.Sequential):
    """Eq. 1: the middle encoder feature (B, C_i, H_p, W_p) -> (B, C, H, W): strided 3×3 convolution,
    LayerNorm over channels, GELU."""

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__(nn.Conv2d(in_channels, channels, kernel_size=3, stride=stride, padding=1),
                         LayerNorm2d(channels), nn.GELU())


class ExpertLayer(nn.Module):
    """A pre-norm transformer layer on image tokens: attention (cross when a context is given, Eq. 2; self
    otherwise, Eq. 4) with residual, then MLP with residual (Eqs. 3, 5)."""

    def __init__(self, channels: int, heads: int, mlp_ratio: int, cross: bool):
        super().__init__()
        self.norm_query = nn.LayerNorm(channels)
        self.norm_context = nn.LayerNorm(channels) if cross else None
        self.attention = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(nn.Linear(channels, mlp_ratio * channels), nn.GELU(),
                                 nn.Linear(mlp_ratio * channels, channels))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        height, width = x.shape[-2:]
        tokens = channels_last(x)
        query = self.norm_query(tokens)
        keys = self.norm_context(channels_last(context)) if self.norm_context is not None else query
        attended = self.attention(query, keys, keys, need_weights=False)[0] + tokens
        return to_image(self.mlp(self.norm_mlp(attended)) + attended, height, width)


class ConsensusReasoning(nn.Module):
    """Eqs. 6–8: x'_2 from x_2 (and x_1 for the cross term)."""

    def __init__(self, alpha: float = DEFAULT_ALPHA):
        super().__init__()
        self.rho = nn.Parameter(torch.tensor(math.log(math.expm1(alpha))))  # softplus(ρ) = α

    @property
    def alpha(self) -> torch.Tensor:
        return F.softplus(self.rho)

    @staticmethod
    def reference(phi_a: torch.Tensor, phi_b: torch.Tensor) -> torch.Tensor:
        """σ(max(Φ_a Φ_bᵀ)·K − Φ_a Φ_bᵀ) for (B, C, N) inputs: a (B, C, C) row-stochastic matrix."""
        energy = phi_a @ phi_b.transpose(1, 2)
        return torch.softmax(energy.amax(-1, keepdim=True) - energy, dim=-1)

    def forward(self, x2: torch.Tensor, x1: torch.Tensor | None = None) -> torch.Tensor:
        height, width = x2.shape[-2:]
        phi2 = x2.flatten(2)
        mix = self.reference(phi2, phi2)
        if x1 is not None:
            alpha = self.alpha
            mix = (mix + alpha * self.reference(x1.flatten(2), phi2)) / (1 + alpha)
        return (mix @ phi2 + phi2).reshape(-1, phi2.shape[1], height, width)


class SafeClickTransformer(nn.Module):
    """SAM 2's two-way transformer (E3) plus the SafeClick experts, CRL and zero-initialised fusion.

    Same call and return as the wrapped transformer; the image features x_f and x_i of the slice being
    decoded are given beforehand with :meth:`features` (a context manager).
    """

    def __init__(self, transformer: nn.Module, intermediate_channels: int, intermediate_stride: int,
                 options: SafeClickOptions = SafeClickOptions()):  # noqa: B008 (frozen dataclass)
        super().__init__()
        channels = transformer.embedding_dim
        self.options = options
        self.e3 = transformer
        self.transform = FeatureTransform(intermediate_channels, channels, intermediate_stride) if options.e1 else None
        self.e1 = ExpertLayer(channels, options.heads, options.mlp_ratio, cross=True) if options.e1 else None
        self.e2 = ExpertLayer(channels, options.heads, options.mlp_ratio, cross=False) if options.e2 else None
        self.crl = ConsensusReasoning(options.alpha) if options.crl else None
        self.fusion_norm = LayerNorm2d(channels)
        self.fusion_act = nn.LeakyReLU()
        self.fusion_conv = nn.Conv2d(channels, channels, kernel_size=1)
        nn.init.zeros_(self.fusion_conv.weight)
        nn.init.zeros_(self.fusion_conv.bias)
        self._features = None

    @property
    def embedding_dim(self) -> int:
        return self.e3.embedding_dim

    @contextmanager
    def features(self, final: torch.Tensor, intermediate: torch.Tensor | None):
        """Make x_f (B, C, H, W) and x_i (B, C_i, H_p, W_p) of the current slice(s) available to forward."""
        self._features = (final, intermediate)
        try:
            yield
        finally:
            self._features = None

    def consensus(self, final: torch.Tensor, intermediate: torch.Tensor | None) -> torch.Tensor:
        """The branch added to x_3: zero-conv(leaky ReLU(LN(x'_2)))."""
        x1 = self.e1(self.transform(intermediate), final) if self.e1 is not None else None
        x2 = self.e2(final) if self.e2 is not None else final
        if self.crl is not None:
            merged = self.crl(x2, x1)
        else:
            merged = x2 if x1 is None else x1 + x2
        return self.fusion_conv(self.fusion_act(self.fusion_norm(merged)))

    def forward(self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor):
        if self._features is None:
            raise RuntimeError("SafeClickTransformer needs the slice's image features: call it inside features()")
        queries, keys = self.e3(image_embedding, image_pe, point_embedding)
        final, intermediate = self._features
        branch = self.consensus(final, intermediate)
        if branch.shape[0] != keys.shape[0]:  # one image decoded with several prompts
            branch = branch.expand(keys.shape[0], -1, -1, -1)
        return queries, keys + channels_last(branch)


class SafeClickSegmenter(Sam2SliceSegmenter):
    """Slice-wise SAM 2 whose mask decoder carries the SafeClick plug-in (everything else as SAM 2)."""

    def __init__(self, sam2: nn.Module, use_box: bool = False, options: SafeClickOptions = SafeClickOptions()):  # noqa: B008
        super().__init__(sam2, use_box)
        self.needs_intermediate = options.e1
        decoder = self.mask_decoder
        middle_channels, middle_size = self.middle_shape[:2]
        self.plugin = SafeClickTransformer(decoder.transformer, middle_channels, middle_size // (self.image_size // 16),
                                           options)
        decoder.transformer = self.plugin

    def plugin_parameters(self) -> list:
        """The SafeClick module's own parameters (E3 is SAM 2's transformer, counted with the decoder)."""
        inside = {id(p) for p in self.plugin.e3.parameters()}
        return [p for p in self.plugin.parameters() if id(p) not in inside]

    def decoder_context(self, embedding: torch.Tensor):
        features = self.unpack(embedding)
        return self.plugin.features(features[0], features[3] if self.needs_intermediate else None)
