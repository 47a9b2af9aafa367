"""The pieces of the adversarial confidence-prediction scheme on toy problems."""
import pytest
import torch

from calibnet.networks.confidence_head import (ALPHA_START, DELTA_S, AdversarialBatch, AdversarialBuffer,
                                               ConfidenceHead, adversarial_perturbation, update_alpha)


def test_head_maps_any_feature_size_to_scores_in_unit_interval():
    head = ConfidenceHead(in_channels=32)
    for shape in ((2, 32, 12, 14, 12), (1, 32, 7, 9, 5)):
        scores = head(torch.randn(shape))
        assert scores.shape == (shape[0], 2) and ((scores > 0) & (scores < 1)).all()
    assert ConfidenceHead(16, dims=2)(torch.randn(3, 16, 20, 20)).shape == (3, 2)


def test_perturbation_lowers_the_predicted_score_by_about_alpha():
    torch.manual_seed(0)
    weight = torch.randn(1, 50) * 0.01

    def predicted(x):  # a nearly linear score
        return (x.reshape(x.shape[0], -1) @ weight.T).squeeze(1) + 0.5

    x = torch.randn(4, 50, requires_grad=True)
    perturbed = adversarial_perturbation(x, predicted(x), alpha=0.05)
    drop = predicted(x) - predicted(perturbed)
    assert torch.allclose(drop, torch.full((4,), 0.05), atol=1e-4)


def test_alpha_moves_until_the_predicted_drop_matches_delta_s():
    torch.manual_seed(0)
    weight = torch.randn(1, 20)
    alpha = ALPHA_START
    for _ in range(600):
        x = torch.randn(8, 20, requires_grad=True)
        score = torch.sigmoid((x @ weight.T).squeeze(1) * 0.05)
        perturbed = adversarial_perturbation(x, score, alpha)
        drop = float((score - torch.sigmoid((perturbed @ weight.T).squeeze(1) * 0.05)).mean().detach())
        alpha = update_alpha(alpha, drop)
    assert drop == pytest.approx(DELTA_S, abs=0.01)
    assert alpha < ALPHA_START


def test_buffer_returns_exactly_the_previous_batch_and_empties():
    buffer = AdversarialBuffer()
    assert not buffer
    first, targets = torch.randn(2, 3), torch.tensor([0.5, 0.7])
    buffer.put(AdversarialBatch(first, targets, torch.tensor([0.9, 0.8]), torch.tensor([0.7, 0.6])))
    batch = buffer.take()
    assert torch.equal(batch.inputs, first) and torch.equal(batch.targets, targets) and not buffer
    assert torch.equal(batch.clean_predicted, torch.tensor([0.9, 0.8])) and buffer.take() is None


def test_2d_head_gives_one_score_row_per_sample_and_refuses_3d_features():
    head = ConfidenceHead(in_channels=32, dims=2, outputs=4)
    assert isinstance(head.features[0], torch.nn.Conv2d) and isinstance(head.pool, torch.nn.AdaptiveAvgPool2d)
    for shape in ((13, 32, 16, 14), (1, 32, 5, 9), (26, 32, 16, 14)):
        scores = head(torch.randn(shape))
        assert scores.shape == (shape[0], 4) and ((scores > 0) & (scores < 1)).all()
    from calibnet.errors import CalibnetError
    with pytest.raises(CalibnetError, match="2-D confidence head"):
        head(torch.randn(1, 32, 4, 16, 14))
    with pytest.raises(CalibnetError, match="not 1-D"):
        ConfidenceHead(8, dims=1)


def test_3d_head_is_the_same_network_as_before_dims_were_generic():
    """The 3-D head keeps its modules, parameter names and shapes, so existing checkpoints load and give
    bit-identical scores: compared with the explicit Conv3d/InstanceNorm3d/AdaptiveAvgPool3d head it was."""
    nn = torch.nn
    torch.manual_seed(0)
    head = ConfidenceHead(in_channels=32)
    before = nn.Module()
    before.features = nn.Sequential(nn.Conv3d(32, 16, 3, padding=1), nn.InstanceNorm3d(16, affine=True),
                                    nn.LeakyReLU(inplace=True), nn.Conv3d(16, 8, 3, padding=1),
                                    nn.InstanceNorm3d(8, affine=True), nn.LeakyReLU(inplace=True))
    before.pool = nn.AdaptiveAvgPool3d(4)
    before.scores = nn.Sequential(nn.Flatten(), nn.Linear(512, 128), nn.LeakyReLU(inplace=True), nn.Linear(128, 2))
    assert [(k, v.shape) for k, v in head.state_dict().items()] == \
        [(k, v.shape) for k, v in before.state_dict().items()]
    before.load_state_dict(head.state_dict())
    x = torch.randn(2, 32, 12, 14, 12)
    expected = torch.sigmoid(before.scores(before.pool(before.features(x))))
    assert torch.equal(head(x), expected) and head(x).shape == (2, 2)


class _SliceNetwork(torch.nn.Module):
    """A 2-D "U-Net" whose penultimate decoder stage halves the resolution, as nnU-Net's 2d networks do."""

    def __init__(self):
        super().__init__()
        self.decoder = torch.nn.Module()
        self.decoder.stages = torch.nn.ModuleList([torch.nn.AvgPool2d(2), torch.nn.Identity()])

    def forward(self, x):
        return self.decoder.stages[1](self.decoder.stages[0](x))


class _SlicePredictor:
    """nnU-Net's 2d call pattern on a 3-D case: slicers (channels, slice index, y, x), one call per tile, then
    the mirrored copy."""

    def __init__(self):
        self.network = _SliceNetwork()

    def _internal_predict_sliding_window_return_logits(self, data, slicers, do_on_device=True):
        for slicer in slicers:
            self._internal_maybe_mirror_and_predict(data[slicer][None])

    def _internal_maybe_mirror_and_predict(self, x):
        self.network(x)
        self.network(torch.flip(x, (2, 3)))


def test_feature_capture_places_2d_tiles_slice_by_slice():
    from calibnet.inference.confidence_heads import FeatureCapture

    predictor = _SlicePredictor()
    capture = FeatureCapture(predictor, expected_channels=1)
    data = torch.randn(1, 3, 8, 12)
    slicers = [(slice(None), z, slice(0, 8), slice(s, s + 8)) for z in range(3) for s in (0, 4)]
    predictor._internal_predict_sliding_window_return_logits(data, slicers)
    assert len(capture.tiles) == 6
    features = capture.case_features()
    assert features.shape == (1, 1, 3, 4, 6)
    torch.testing.assert_close(features, torch.nn.functional.avg_pool3d(data[None], (1, 2, 2)))


def test_2d_head_scores_a_case_as_the_foreground_weighted_mean_of_its_slices():
    from calibnet.inference.confidence_heads import LoadedHead, slice_foreground, weighted_slice_mean

    torch.manual_seed(0)
    head = ConfidenceHead(in_channels=4, dims=2, outputs=4).eval()
    loaded = LoadedHead("adversarial_head", head, ["dice:a", "dice:b", "nsd:a", "nsd:b"], None)
    features = torch.randn(1, 4, 5, 6, 6)  # 5 slices
    logits = torch.full((3, 5, 12, 12), -5.0)
    logits[0] = 0.0  # background wins everywhere ...
    logits[1, 1, :3, :4] = 5.0  # ... except 12 pixels of label a in slice 1 and 4 in slice 3
    logits[1, 3, :2, :2] = 5.0
    dataset_json = {"labels": {"background": 0, "a": 1, "b": 2}}
    weights = slice_foreground(logits, dataset_json)
    assert weights["a"].tolist() == [0, 12, 0, 4, 0] and weights["b"].tolist() == [0] * 5
    per_slice = head(features[0].transpose(0, 1)).detach().double()
    assert per_slice.shape == (5, 4)
    scores = loaded.scores(features, weights)
    expected_a = float((per_slice[1, 0] * 12 + per_slice[3, 0] * 4) / 16)
    assert scores["adversarial_head_predicted_per_label"]["dice"]["a"] == pytest.approx(expected_a)
    # label b is predicted nowhere: the plain mean over slices
    assert scores["adversarial_head_predicted_per_label"]["nsd"]["b"] == pytest.approx(float(per_slice[:, 3].mean()))
    assert scores["adversarial_head_predicted_dice"] == pytest.approx((expected_a + float(per_slice[:, 1].mean())) / 2)
    assert weighted_slice_mean(torch.tensor([0.2, 0.6]), None) == pytest.approx(0.4)
    regions = slice_foreground(torch.stack([logits[1], -logits[1]]), {"labels": {"background": 0, "r": [1, 2],
                                                                                 "s": [2]}})
    assert regions["r"].tolist() == [0, 12, 0, 4, 0] and regions["s"].tolist() == [144, 132, 144, 140, 144]
