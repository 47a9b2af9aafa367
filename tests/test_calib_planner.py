import numpy as np
import pytest

from calibnet.errors import CalibnetError
from calibnet.planners.calib_planner import calib_patch_size, check_patch_size


def _pool_product(pool_kernels):
    return np.prod(np.array(pool_kernels), axis=0)


def test_128_cube_when_the_median_shape_allows_it():
    patch, pools, _, divisible = calib_patch_size((1.0, 1.0, 1.0), (140, 172, 138), (128, 128, 128))
    assert patch == (128, 128, 128)
    assert list(_pool_product(pools)) == [32, 32, 32]  # 5 poolings: 128 / 32 = 4 = min feature map
    assert divisible == (32, 32, 32)


def test_small_median_shape_clips_each_axis_and_stays_divisible():
    patch, pools, _, divisible = calib_patch_size((5.875,) * 3, (26, 31, 25), (128, 128, 128))
    assert patch == (24, 28, 24)
    assert all(p <= m for p, m in zip(patch, (26, 31, 25)))
    assert all(p % d == 0 for p, d in zip(patch, _pool_product(pools)))


def test_anisotropic_spacing_keeps_patch_within_median_and_divisible():
    spacing, median = (5.0, 0.8, 0.8), (30, 250, 250)
    patch, pools, _, _ = calib_patch_size(spacing, median, (128, 128, 128))
    assert patch[1:] == (128, 128)
    assert patch[0] <= 30
    assert all(p % d == 0 for p, d in zip(patch, _pool_product(pools)))


def test_forced_patch_must_fit_the_topology():
    assert check_patch_size((1.0,) * 3, (96, 128, 128))[0] == (96, 128, 128)
    with pytest.raises(CalibnetError, match="divisible by 16x32x32.*try 112x128x128"):
        check_patch_size((1.0,) * 3, (100, 128, 128))
