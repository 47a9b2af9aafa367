import numpy as np
from scipy import ndimage

from calibnet.prompts import point_prompt_heatmaps, slice_point_prompts


def test_centroid_and_distant_background_point():
    mask = np.zeros((20, 20), bool)
    mask[4:9, 4:9] = True
    fg, bg = slice_point_prompts(mask, np.random.default_rng(0), min_background_distance=5)
    assert fg == (6, 6)
    assert ndimage.distance_transform_edt(~mask)[bg] >= 5


def test_non_convex_mask_gets_a_point_inside_it():
    mask = np.zeros((21, 21), bool)
    mask[2:19, 2:5] = True  # a U shape whose centroid lies in the hole
    mask[2:19, 16:19] = True
    mask[16:19, 2:19] = True
    fg, _ = slice_point_prompts(mask, np.random.default_rng(0))
    assert mask[fg]


def test_empty_slice_gets_no_prompt_and_heatmaps_are_seeded():
    foreground = np.zeros((3, 16, 16), bool)
    foreground[1, 5:9, 5:9] = True
    assert slice_point_prompts(foreground[0], np.random.default_rng(0)) is None
    a = point_prompt_heatmaps(foreground, np.random.default_rng(3))
    b = point_prompt_heatmaps(foreground, np.random.default_rng(3))
    assert a.shape == (2, 3, 16, 16) and np.array_equal(a, b)
    assert a[:, 0].max() == 0 and a[:, 2].max() == 0
    assert a[0, 1].max() == 1.0 and np.unravel_index(a[0, 1].argmax(), (16, 16)) == (6, 6)
    assert a[1, 1].max() == 1.0 and not foreground[1][np.unravel_index(a[1, 1].argmax(), (16, 16))]
