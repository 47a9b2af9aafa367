"""The frozen image encoder prepared for inference only: what makes it faster on a CPU without moving its output.

A frozen encoder in eval mode normalises with fixed BatchNorm statistics, so each convolution followed by a
BatchNorm (TinyViT's ``Conv2d_BN``, 27 of them in LiteMedSAM, several at 256² resolution) is one affine map:
folding the BatchNorm into the convolution's weights and bias removes a full pass over the activations. The
folded copy runs in channels-last memory format, which oneDNN's convolutions (the depthwise 3×3 ones above
all) read without reordering. Both change only float32 rounding (measured by ``benchmarks/encoder_speed.py``
and tested: max |Δ| / max |embedding| ≈ 4e-6 on LiteMedSAM, far inside the 1e-3 the embedding store
tolerates), so entries the plain encoder wrote stay valid. What was measured and left out (bfloat16
autocast: 5–8 % relative error) is stated in docs/sam_methods.md.

The copy is built from the encoder's current weights and rebuilt when they change (a checkpoint loaded
into the network after construction), so it can never encode with stale weights.
"""
from __future__ import annotations

import copy

import torch


def _fold(conv: torch.nn.Conv2d, norm: torch.nn.BatchNorm2d) -> torch.nn.Conv2d:
    """conv followed by an eval-mode BatchNorm as one convolution with a bias."""
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    folded = torch.nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                             conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
    folded = folded.to(conv.weight.device, conv.weight.dtype)
    folded.weight.copy_(conv.weight * scale[:, None, None, None])
    bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
    folded.bias.copy_((bias - norm.running_mean) * scale + norm.bias)
    return folded


def _conv_bn_pair(child: torch.nn.Module) -> list | None:
    """(Conv2d, BatchNorm2d with running statistics) when ``child`` is a Sequential of exactly those."""
    parts = list(child.children()) if isinstance(child, torch.nn.Sequential) else []
    if (len(parts) == 2 and isinstance(parts[0], torch.nn.Conv2d) and isinstance(parts[1], torch.nn.BatchNorm2d)
            and parts[1].track_running_stats and parts[1].running_mean is not None):
        return parts
    return None


def _fold_batch_norms(module: torch.nn.Module) -> int:
    """Replace, in place, every Sequential of exactly (Conv2d, BatchNorm2d) by one folded Conv2d; the count."""
    count = 0
    for name, child in module.named_children():
        parts = _conv_bn_pair(child)
        if parts:
            setattr(module, name, _fold(*parts))
            count += 1
        else:
            count += _fold_batch_norms(child)
    return count


def weights_version(module: torch.nn.Module) -> tuple | None:
    """Changes whenever a parameter or buffer of ``module`` is replaced or written in place (load_state_dict);
    None when a weight was made under ``torch.inference_mode`` (such tensors keep no version counter, so an
    in-place load could not be seen: the caller must not cache)."""
    tensors = list(module.parameters()) + list(module.buffers())
    if any(t.is_inference() for t in tensors):
        return None
    return tuple((id(t), t.data_ptr(), t._version) for t in tensors)


@torch.no_grad()
def inference_encoder(encoder: torch.nn.Module) -> torch.nn.Module:
    """An eval-mode copy of ``encoder`` for inference only: Conv+BatchNorm pairs folded, channels-last weights;
    the original is left untouched (the embedding store names its folder by the original's weights)."""
    if not any(_conv_bn_pair(m) for m in encoder.modules()):
        return encoder  # nothing to fold (SAM's ViTs): no copy of a large encoder's weights
    fast = copy.deepcopy(encoder).eval().requires_grad_(False)
    _fold_batch_norms(fast)
    return fast.to(memory_format=torch.channels_last)


@torch.no_grad()
def encode_fast(fast: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """``fast`` (from :func:`inference_encoder`) on (N, 3, S, S) inputs; a contiguous (N, C, H, W) result like the
    original encoder's. One slice per call: TinyViT's first stage holds 64 MiB of activations per 256² slice,
    and batches larger than one ran slower on the CPU (measured: 1.17 slices/s at batch 1, 0.74 at batch 4)."""
    if inputs.device.type != "cpu":  # an accelerator wants the whole batch at once
        return fast(inputs.contiguous(memory_format=torch.channels_last)).contiguous()
    return torch.cat([fast(x[None].contiguous(memory_format=torch.channels_last)).contiguous() for x in inputs])
