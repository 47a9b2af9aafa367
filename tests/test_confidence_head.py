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
