"""Post-hoc calibration fitted on source-domain validation voxels (CalSAM Table 3): temperature scaling
(one scalar T on the log-probabilities) and Dirichlet calibration (Kull et al. 2019: a linear map of the
log-probabilities followed by softmax, with off-diagonal and intercept regularisation), both fitted by
minimising the NLL with L-BFGS in torch."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _log_probabilities(probabilities: np.ndarray) -> torch.Tensor:
    """(C, N) probabilities -> (N, C) log-probabilities."""
    return torch.log(torch.from_numpy(np.clip(probabilities, 1e-7, 1)).double()).T


def nll(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return float(F.nll_loss(_log_probabilities(probabilities), torch.from_numpy(labels).long()))


def fit_temperature(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """T > 0 minimising the NLL of softmax(log p / T)."""
    logits, target = _log_probabilities(probabilities), torch.from_numpy(labels).long()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), target)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    return torch.softmax(_log_probabilities(probabilities) / temperature, 1).T.numpy()


def fit_dirichlet(probabilities: np.ndarray, labels: np.ndarray, off_diagonal_penalty: float = 1e-3,
                  intercept_penalty: float = 1e-3) -> dict:
    """W (C×C) and b (C) minimising NLL(softmax(W·log p + b)) + ODIR regularisation; starts at identity."""
    x, target = _log_probabilities(probabilities), torch.from_numpy(labels).long()
    classes = x.shape[1]
    weight = torch.eye(classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")
    off_diagonal = 1 - torch.eye(classes, dtype=torch.float64)
    scale = classes * (classes - 1) if classes > 1 else 1

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, target) + off_diagonal_penalty * \
            ((weight * off_diagonal) ** 2).sum() / scale + intercept_penalty * (bias ** 2).sum() / classes
        loss.backward()
        return loss

    optimizer.step(closure)
    return {"W": weight.detach().numpy().tolist(), "b": bias.detach().numpy().tolist()}


def apply_dirichlet(probabilities: np.ndarray, parameters: dict) -> np.ndarray:
    weight = torch.tensor(parameters["W"], dtype=torch.float64)
    bias = torch.tensor(parameters["b"], dtype=torch.float64)
    return torch.softmax(_log_probabilities(probabilities) @ weight.T + bias, 1).T.numpy()
