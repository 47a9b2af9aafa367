"""Bottleneck adapters for SAM's image encoder (MedSAM-U's multi-prompt adaptation, MPA, after Med-SA).

Each adapted transformer block of ``ImageEncoderViT`` is wrapped, not edited: the wrapper runs the block,
then adds ``up(ReLU(down(y)))`` to its output ``y`` (channels-last, as the blocks work). The up-projection
starts at zero, so an adapted encoder first computes exactly what the pretrained one did (our choice; the
paper does not state the initialisation). The installed segment-anything package is left untouched.
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
                         f"e.g. 0,3,6,9") from None
    if not indices:
        raise ValueError("adapter-blocks: give 'all' or at least one block index")
    return indices


def insert_adapters(image_encoder: torch.nn.Module, blocks: list, ratio: float = DEFAULT_BOTTLENECK_RATIO) -> list:
    """Wrap ``image_encoder.blocks[i]`` for every i in ``blocks`` with an adapter; returns the adapters."""
    adapters = []
    for index in blocks:
        block = image_encoder.blocks[index]
        if isinstance(block, AdaptedBlock):
            raise ValueError(f"block {index} already has an adapter")
        width = block.norm1.normalized_shape[0]
        adapter = BottleneckAdapter(width, ratio).to(next(block.parameters()).device)
        image_encoder.blocks[index] = AdaptedBlock(block, adapter)
        adapters.append(adapter)
    return adapters


def adapter_parameters(module: torch.nn.Module) -> list:
    """Every parameter of the adapters inside ``module``."""
    return [p for m in module.modules() if isinstance(m, BottleneckAdapter) for p in m.parameters()]
