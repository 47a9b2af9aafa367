"""The SafeClick plug-in (``calibnet.networks.safeclick``) on a SAM 1-family mask decoder: LiteMedSAM by default.

No paper has this. SafeClick is published as a plug-in for SAM 2's decoder; SAM 2 has no pretrained weights
that calibnet can reach offline, so on a CPU its claim (robustness to imperfect prompts) could only be
tested on random weights. segment-anything's mask decoder — which LiteMedSAM, MedSAM and SAM ViT-B/L/H all
use — has the same two-way transformer (the paper's expert E3), so the plug-in is placed there unchanged:
:class:`calibnet.networks.safeclick.SafeClickTransformer` wraps the decoder's transformer, E2, the CRL and the
zero-initialised fusion act on the image embedding x_f as on SAM 2, and the plug-in starts out as exactly
the backbone's decoder.

E1 reads x_i, the output of the m/2-th of the image encoder's m blocks — the rule the SAM 2 path applies
to Hiera's blocks (SafeClick §2, "the m/2-th layer output from the m-layer image encoder"):

- LiteMedSAM's TinyViT has 12 blocks (2 MBConv, then 2, 6 and 2 TinyViT blocks): x_i is the output of the
  6th, the second block of the 6-block stage (``layers[2].blocks[1]``), 160 channels at 64×64 tokens — the
  resolution of the 256×64×64 image embedding, so Eq. 1's convolution has stride 1;
- SAM's ViT (vit_b/l/h; 12, 24, 32 blocks) and the ``tiny`` test SAM (2 blocks): ``blocks[m/2 - 1]``, at
  the ViT's width and the embedding's grid.

x_i is captured with a forward hook while the frozen encoder runs and packed with the image embedding into
one flat embedding per slice (only when E1 is on), so it is cached (and stored) with it; without E1 the
embedding is the plain SAM one and is shared with the other SAM methods' runs.
"""
from __future__ import annotations

import torch
from segment_anything.modeling import Sam
from torch import nn

from calibnet.errors import CalibnetError
from calibnet.networks.safeclick import SafeClickOptions, SafeClickTransformer, to_image
from calibnet.networks.fast_encoder import encode_fast
from calibnet.networks.sam_backbone import SamSliceSegmenter


def encoder_blocks(encoder: nn.Module) -> list:
    """The blocks of a SAM 1-family image encoder in order: TinyViT's stages' blocks, or the ViT's blocks."""
    if hasattr(encoder, "layers"):  # TinyViT: stages, each with .blocks (MBConv, then TinyViT blocks)
        return [block for layer in encoder.layers for block in layer.blocks]
    if hasattr(encoder, "blocks"):
        return list(encoder.blocks)
    raise CalibnetError(f"SafeClick cannot find the blocks of a {type(encoder).__name__} image encoder.")


def middle_block(encoder: nn.Module) -> tuple[int, tuple]:
    """Index of the m/2-th of the encoder's m blocks in :func:`encoder_blocks`, and (C, H, W) of its output."""
    blocks = encoder_blocks(encoder)
    index = len(blocks) // 2 - 1
    block = blocks[index]
    if hasattr(block, "input_resolution"):  # a TinyViT block: (B, H·W, C) tokens
        height, width = block.input_resolution
        return index, (block.dim, height, width)
    if hasattr(block, "norm1") and hasattr(encoder, "patch_embed"):  # a SAM ViT block: (B, H, W, C)
        grid = encoder.img_size // encoder.patch_embed.proj.stride[0]
        return index, (block.norm1.normalized_shape[0], grid, grid)
    raise CalibnetError(f"SafeClick's E1 cannot read a {type(block).__name__} (block {index + 1} of {len(blocks)}).")


def middle_feature(output: torch.Tensor, shape: tuple) -> torch.Tensor:
    """A middle block's output -> (B, C, H, W): TinyViT's tokens (B, H·W, C) or the ViT's (B, H, W, C)."""
    _, height, width = shape
    if output.dim() == 3:
        return to_image(output, height, width)
    return output.permute(0, 3, 1, 2)


class SafeClickSamSegmenter(SamSliceSegmenter):
    """Slice-wise SAM (LiteMedSAM, SAM, MedSAM or the tiny test SAM) whose mask decoder carries SafeClick.

    With E1 an "embedding" is flat (N, D): the image embedding then the middle block's output, in the order of
    :meth:`feature_shapes`; without E1 it is the image embedding (N, C, H, W) as for every SAM method.
    """

    def __init__(self, sam: Sam, use_box: bool = False, unit_intensities: bool = False,
                 image_channel: int | None = None,
                 options: SafeClickOptions = SafeClickOptions()):  # noqa: B008 (frozen dataclass)
        super().__init__(sam, use_box, unit_intensities, image_channel)
        self.needs_intermediate = options.e1
        self.middle_index, self.middle_shape = middle_block(self.image_encoder)
        grid = self.prompt_encoder.image_embedding_size[0]
        decoder = self.mask_decoder
        self.plugin = SafeClickTransformer(decoder.transformer, self.middle_shape[0], self.middle_shape[1] // grid,
                                           options)
        decoder.transformer = self.plugin

    @property
    def embedding_layout(self) -> str:
        return "sam+middle" if self.needs_intermediate else "sam"

    def plugin_parameters(self) -> list:
        """The SafeClick module's own parameters (E3 is the backbone's transformer, counted with the decoder)."""
        inside = {id(p) for p in self.plugin.e3.parameters()}
        return [p for p in self.plugin.parameters() if id(p) not in inside]

    def feature_shapes(self) -> list:
        """(C, H, W) of each packed feature: the image embedding [, the middle block's output]."""
        height, width = self.prompt_encoder.image_embedding_size
        image = (self.mask_decoder.transformer_dim, height, width)
        return [image, self.middle_shape] if self.needs_intermediate else [image]

    def unpack(self, embedding: torch.Tensor) -> tuple:
        """(image embedding (N, C, H, W), middle feature (N, C_i, H_i, W_i) or None) of an embedding."""
        if not self.needs_intermediate:
            return embedding, None
        (c, h, w), middle = self.feature_shapes()
        image = embedding[:, :c * h * w].reshape(-1, c, h, w)
        return image, embedding[:, c * h * w:].reshape(-1, *middle)

    def encode(self, inputs: torch.Tensor) -> torch.Tensor:
        """The frozen encoder on prepared (N, 3, S, S) inputs; with E1 the middle block's output is captured on
        the way and packed after the image embedding."""
        if not self.needs_intermediate:
            return super().encode(inputs)
        captured = []
        fast = not torch.is_grad_enabled()  # the inference copy, as the plain encode: the same image embedding
        encoder = self.inference_image_encoder() if fast else self.image_encoder
        block = encoder_blocks(encoder)[self.middle_index]
        hook = block.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            image = encode_fast(encoder, inputs) if fast else encoder(inputs)
        finally:
            hook.remove()
        middle = middle_feature(torch.cat(captured), self.middle_shape)  # one capture per encoder call
        return torch.cat([image.flatten(1), middle.flatten(1)], dim=1)

    def decode_low_res(self, embedding: torch.Tensor, points, boxes) -> torch.Tensor:
        """The backbone's low-resolution logits of B slices, one prompt each, with the plug-in told each slice's
        x_f and x_i (its experts work on each slice alone, so the batch pairs as the decoder's does)."""
        image, middle = self.unpack(embedding)
        with self.plugin.features(image, middle):
            return super().decode_low_res(image, points, boxes)
