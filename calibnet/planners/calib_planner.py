"""CalibPlanner: nnU-Net's ExperimentPlanner with the 128³ 3d_fullres patch of the calibnet papers.

nnU-Net picks the 3d_fullres patch from a GPU-memory budget; the papers behind calibnet train on
128³ patches. CalibPlanner keeps everything else of nnU-Net's plan (target spacing, normalisation,
resampling, 2d configuration) and replaces the 3d_fullres patch by 128³ where the median resampled
shape allows it, otherwise by each axis clipped to the median shape and rounded down to a multiple of
2^pools for that axis. The network topology and batch size are recomputed for that patch.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

from calibnet.errors import CalibnetError
from calibnet.runs import CALIB_PLANS_NAME

DEFAULT_PATCH_EDGE = 128


def calib_patch_size(spacing: Sequence[float], median_shape: Sequence[float], target: Sequence[int],
                     min_feature_map_size: int = 4) -> tuple[tuple, tuple, tuple, tuple]:
    """The largest patch ≤ ``target`` and ≤ ``median_shape`` per axis that nnU-Net's topology accepts.

    Returns ``(patch_size, pool_op_kernel_sizes, conv_kernel_sizes, shape_must_be_divisible_by)``.
    Each axis of the patch is a multiple of 2^(number of poolings along it).
    """
    patch = [max(1, int(min(t, np.floor(m)))) for t, m in zip(target, median_shape)]
    while True:
        _, pool_kernels, conv_kernels, _, divisible_by = get_pool_and_conv_props(
            spacing, patch, min_feature_map_size, 999999)
        rounded = [max(int(d), (p // int(d)) * int(d)) for p, d in zip(patch, divisible_by)]
        if rounded == patch:
            return tuple(patch), pool_kernels, conv_kernels, tuple(int(d) for d in divisible_by)
        patch = rounded


def check_patch_size(spacing: Sequence[float], patch_size: Sequence[int], min_feature_map_size: int = 4) -> tuple:
    """Topology for a user-chosen patch; a patch nnU-Net would have to pad is a clear error."""
    _, pool_kernels, conv_kernels, padded, divisible_by = get_pool_and_conv_props(
        spacing, list(patch_size), min_feature_map_size, 999999)
    if tuple(padded) != tuple(patch_size):
        raise CalibnetError(
            f"--patch-size {'x'.join(map(str, patch_size))} does not fit the network topology: each axis must be "
            f"divisible by {'x'.join(map(str, divisible_by))} here; try {'x'.join(map(str, padded))}.")
    return tuple(patch_size), pool_kernels, conv_kernels, tuple(int(d) for d in divisible_by)


class CalibPlanner(ExperimentPlanner):
    """ExperimentPlanner whose 3d_fullres patch is 128³ (or clipped to the median shape).

    ``patch_size`` forces a specific 3d_fullres patch (in nnU-Net's transposed axis order).
    """

    def __init__(self, dataset_name_or_id, gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = CALIB_PLANS_NAME,
                 overwrite_target_spacing=None, suppress_transpose: bool = False,
                 patch_size: Sequence[int] | None = None, target_patch_edge: int = DEFAULT_PATCH_EDGE):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)
        if patch_size is not None and len(patch_size) != 3:
            raise CalibnetError(f"--patch-size needs three values, got {patch_size}.")
        self.forced_patch_size = tuple(int(p) for p in patch_size) if patch_size is not None else None
        self.target_patch_edge = target_patch_edge

    def get_plans_for_configuration(self, spacing, median_shape, data_identifier: str,
                                    approximate_n_voxels_dataset: float, _cache: dict) -> dict:
        plan = super().get_plans_for_configuration(spacing, median_shape, data_identifier,
                                                   approximate_n_voxels_dataset, _cache)
        if not data_identifier.endswith("3d_fullres"):
            return plan
        if self.forced_patch_size is not None:
            patch, pools, convs, _ = check_patch_size(spacing, self.forced_patch_size,
                                                      self.UNet_featuremap_min_edge_length)
        else:
            patch, pools, convs, _ = calib_patch_size(spacing, median_shape, (self.target_patch_edge,) * 3,
                                                      self.UNet_featuremap_min_edge_length)
        return self._replan_3d_patch(plan, patch, pools, convs, approximate_n_voxels_dataset)

    def _replan_3d_patch(self, plan: dict, patch: tuple, pool_kernels, conv_kernels,
                         approximate_n_voxels_dataset: float) -> dict:
        """Rebuild the architecture and batch size of a 3d plan for a new patch, as nnU-Net would."""
        n_stages = len(pool_kernels)
        arch = plan["architecture"]["arch_kwargs"]
        arch.update({
            "n_stages": n_stages,
            "features_per_stage": tuple(min(self.UNet_max_features_3d, self.UNet_base_num_features * 2 ** i)
                                        for i in range(n_stages)),
            "kernel_sizes": conv_kernels,
            "strides": pool_kernels,
            "n_conv_per_stage": self.UNet_blocks_per_stage_encoder[:n_stages],
            "n_conv_per_stage_decoder": self.UNet_blocks_per_stage_decoder[:n_stages - 1],
        })
        estimate = self.static_estimate_VRAM_usage(
            patch, len(self.dataset_json["channel_names"]), len(self.dataset_json["labels"]),
            plan["architecture"]["network_class_name"], arch, plan["architecture"]["_kw_requires_import"])
        reference = self.UNet_reference_val_3d * (self.UNet_vram_target_GB / self.UNet_reference_val_corresp_GB)
        batch_size = round(reference / estimate * self.UNet_reference_val_corresp_bs_3d)
        five_percent = round(approximate_n_voxels_dataset * self.max_dataset_covered / np.prod(patch, dtype=np.float64))
        plan["batch_size"] = max(min(batch_size, five_percent), self.UNet_min_batch_size)
        plan["patch_size"] = tuple(int(p) for p in patch)
        return plan
