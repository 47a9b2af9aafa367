"""The prompt-quality protocol against hand-made masks and hand computations."""
import numpy as np
import pytest
from scipy import ndimage

from calibnet.errors import CalibnetError
from calibnet.prompt_quality import (IOU_TOLERANCE, box_at_iou, box_iou, displaced_point, object_radius,
                                     parse_setting, prompt_rng, scaled_box, slice_prompts)
from calibnet.prompts import slice_box


def _square(shape=(64, 64), top_left=(16, 26), side=9):
    mask = np.zeros(shape, bool)
    mask[top_left[0]:top_left[0] + side, top_left[1]:top_left[1] + side] = True
    return mask


@pytest.mark.parametrize("text, expected", [
    ("3P", dict(points=3)), ("10P", dict(points=10)), ("3B0.5", dict(boxes=3, box_iou=0.5)),
    ("3B0.75", dict(boxes=3, box_iou=0.75)), ("3P+3B0.5", dict(points=3, boxes=3, box_iou=0.5)),
    ("10P+3B0.75", dict(points=10, boxes=3, box_iou=0.75)), ("P0", dict(displacement=0.0)),
    ("P25", dict(displacement=0.25)), ("P100", dict(displacement=1.0)), ("B50", dict(box_scale=0.5)),
    ("B100", dict(box_scale=1.0)), ("B150", dict(box_scale=1.5)), ("default", dict(default=True)),
])
def test_settings_parse(text, expected):
    setting = parse_setting(text)
    assert setting.name == text
    for key, value in expected.items():
        assert getattr(setting, key) == value


@pytest.mark.parametrize("text", ["3B", "B0", "P101", "+3B0.5", "3P+", "3Q", "", "3B1.5", "boxes"])
def test_unknown_settings_are_refused_with_the_list(text):
    with pytest.raises(CalibnetError, match="unknown prompt setting.*3P\\+3B0.5"):
        parse_setting(text)


def test_box_iou_by_hand():
    assert box_iou((0, 0, 9, 9), (0, 0, 9, 9)) == 1.0
    assert box_iou((0, 0, 9, 9), (0, 5, 9, 14)) == pytest.approx(50 / 150)  # edges 10×10 boxes overlapping 10×5
    assert box_iou((0, 0, 1, 1), (5, 5, 6, 6)) == 0.0


def test_boxes_hit_the_iou_within_tolerance_on_random_masks_and_are_reproducible():
    rng = np.random.default_rng(0)
    for trial in range(20):
        mask = ndimage.binary_dilation(rng.random((48, 56)) > 0.995, iterations=int(rng.integers(2, 6)))
        if not mask.any():
            continue
        truth = slice_box(mask)
        for iou in (0.5, 0.75):
            setting = parse_setting(f"3B{iou}")
            first = slice_prompts(mask, setting, prompt_rng(1, f"case{trial}", 3, setting))
            again = slice_prompts(mask, setting, prompt_rng(1, f"case{trial}", 3, setting))
            other = slice_prompts(mask, setting, prompt_rng(2, f"case{trial}", 3, setting))
            assert len(first.boxes) == 3 and first.boxes == again.boxes and first.boxes != other.boxes
            for box in first.boxes:
                assert abs(box_iou(truth, box) - iou) <= IOU_TOLERANCE
                assert box[0] >= 0 and box[1] >= 0 and box[2] <= 47 and box[3] <= 55


def test_an_object_filling_the_slice_still_gets_boxes_at_the_iou():
    full = np.ones((20, 30), bool)
    for seed in range(5):
        box = box_at_iou(slice_box(full), 0.5, full.shape, np.random.default_rng(seed))
        assert abs(box_iou(slice_box(full), box) - 0.5) <= IOU_TOLERANCE
        assert box[0] >= 0 and box[1] >= 0 and box[2] <= 19 and box[3] <= 29


def test_displacement_is_exactly_the_fraction_of_the_equivalent_radius():
    mask = _square()
    radius = np.sqrt(81 / np.pi)
    assert object_radius(mask) == pytest.approx(radius)
    for fraction in (0.0, 0.25, 0.5, 1.0):
        point = displaced_point(mask, fraction, np.random.default_rng(5))
        assert np.hypot(point[0] - 20, point[1] - 30) == pytest.approx(fraction * radius, abs=1e-9)
    setting = parse_setting("P50")
    prompts = slice_prompts(mask, setting, prompt_rng(0, "c", 0, setting))
    assert prompts.labels == [1] and not prompts.boxes
    assert np.hypot(prompts.points[0][0] - 20, prompts.points[0][1] - 30) == pytest.approx(0.5 * radius)


def test_box_scaling_is_exact_about_the_centre():
    mask = _square()  # pixels 16..24 × 26..34: edges [16, 25) × [26, 35), centre (20.5, 30.5), side 9
    assert scaled_box(slice_box(mask), 1.0, mask.shape) == (16.0, 26.0, 24.0, 34.0)
    assert scaled_box(slice_box(mask), 1.5, mask.shape) == (13.75, 23.75, 26.25, 36.25)
    assert scaled_box(slice_box(mask), 0.5, mask.shape) == (18.25, 28.25, 21.75, 31.75)
    corner = _square(top_left=(0, 0), side=10)
    assert scaled_box(slice_box(corner), 1.5, corner.shape) == (0.0, 0.0, 11.5, 11.5)  # clipped at the border


def test_point_sets_and_the_default_protocol():
    mask = _square()
    setting = parse_setting("10P+3B0.75")
    prompts = slice_prompts(mask, setting, prompt_rng(0, "c", 0, setting))
    assert len(prompts.points) == 10 and prompts.labels == [1] * 10 and len(prompts.boxes) == 3
    assert all(mask[int(r), int(c)] for r, c in prompts.points)
    default = slice_prompts(mask, parse_setting("default"), np.random.default_rng(0))
    assert default.points[0] == (20.0, 30.0) and default.labels == [1, 0]
    assert not mask[tuple(map(int, default.points[1]))]
    assert slice_prompts(np.zeros((8, 8), bool), setting, np.random.default_rng(0)) is None
