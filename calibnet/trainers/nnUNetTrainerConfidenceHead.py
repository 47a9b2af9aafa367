"""confidence_head: a per-case quality predictor trained on the frozen network of a finished base run
(the confidence-prediction paper, §3 and Algorithm 1).

The base run's network (nnunet, calunet, nnunet_dropout, …) is rebuilt from its own trainer class, loaded
from its checkpoint and frozen (no gradients, evaluation mode, so normalisation and dropout behave as at
prediction time). A :class:`~calibnet.networks.confidence_head.ConfidenceHead` reads the output of the
penultimate decoder stage and learns, with MSE, the volumetric Dice and NSD (per foreground label or
region) of the frozen network's own segmentation of each training patch against its ground truth. On a 2d
configuration the patches are nnU-Net's 2-D slice patches, so the head (2-D convolutions) learns the Dice and
NSD of each slice, as in the paper's own 2-D setting; ``calibnet.inference.confidence_heads`` turns its
per-slice scores into a per-case score.

With the adversarial scheme on (the default), after ``warmup_batches`` clean batches every batch is half
clean, half the previous batch's perturbed copies x' = x − α·∇ₓC/(‖∇ₓC‖² + ε), whose true scores come from
running the frozen network on x'; α follows the predicted drop towards Δs. Training stops early when the
source-val loss has not improved for ``patience`` epochs, and the best head is kept.

Only the head is written: checkpoints hold its weights and configuration, never the base network's.
"""
from __future__ import annotations

from copy import deepcopy
from pathlib import Path
from time import time

import numpy as np
import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

from calibnet.checkpoints import load_checkpoint
from calibnet.errors import CalibnetError
from calibnet.metrics.segmentation import case_metrics
from calibnet.files import atomic_path, atomic_write_json
from calibnet.networks.confidence_head import (ALPHA_START, DELTA_S, ETA, WARMUP_BATCHES, AdversarialBatch,
                                               AdversarialBuffer, ConfidenceHead, adversarial_perturbation,
                                               feature_channels, feature_stage, score_names, update_alpha)
from calibnet.trainers.nnUNetTrainerCalib import nnUNetTrainerCalib
from calibnet.runs import label_targets

HEAD_LEARNING_RATE = 1e-5
HEAD_EPOCHS = 100  # the paper's maximum: 100 epochs of 100 batches
HEAD_ITERATIONS = 100
PATIENCE = 20
HISTORY_FILENAME = "head_training.json"
PLOT_FILENAME = "head_training.png"


class EarlyStop(Exception):
    """Raised from ``on_epoch_end`` to leave nnU-Net's training loop once patience is exhausted."""


class nnUNetTrainerConfidenceHead(nnUNetTrainerCalib):
    """Trains a confidence head on a frozen base network; call :meth:`attach_base` before training."""

    adversarial = True
    warmup_batches = WARMUP_BATCHES
    patience = PATIENCE
    delta_s = DELTA_S
    eta = ETA
    supports_ddp = False
    no_ddp_reason = ("the head trains beside the frozen base network, outside nnU-Net's DDP wrapper (which would "
                     "wrap only the frozen network, which has no gradients), so the head's gradients would not be "
                     "averaged across GPUs.")

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device | None = None):
        super().__init__(plans, configuration, fold, dataset_json, device or torch.device("cuda"))
        self.enable_deep_supervision = False  # the head needs the final segmentation only
        self.initial_lr = HEAD_LEARNING_RATE
        self.num_epochs = HEAD_EPOCHS
        self.num_iterations_per_epoch = HEAD_ITERATIONS
        self.base_checkpoint = None
        self.head = None
        self.alpha = ALPHA_START
        self.buffer = AdversarialBuffer()
        self.batches_seen = 0
        self.history = []
        self.epoch_drops = {"predicted": [], "actual": [], "alpha": []}
        self.best = {"val_loss": float("inf"), "epoch": -1, "state": None}
        self.stopped_early = False
        self.targets = label_targets(dataset_json, {})
        self.outputs = score_names(list(self.targets.masks))

    def attach_base(self, base_trainer_class: type, base_checkpoint: Path, base_record: dict) -> None:
        """Use the architecture of ``base_trainer_class`` with the weights of ``base_checkpoint``."""
        self.build_network_architecture = base_trainer_class.build_network_architecture
        self.base_checkpoint = Path(base_checkpoint)
        self.base_record = base_record

    def _do_i_compile(self):
        return False  # the frozen network carries a forward hook

    def configure_optimizers(self):
        """Called by nnU-Net's initialize() once the network exists: load and freeze it, build the head."""
        if self.base_checkpoint is None:
            raise CalibnetError("confidence_head needs a base run: train it with calib_train ... confidence_head "
                                "FOLD --base METHOD.")
        checkpoint = load_checkpoint(self.base_checkpoint)
        try:
            self.network.load_state_dict(checkpoint["network_weights"])
        except (RuntimeError, KeyError) as e:
            raise CalibnetError(f"{self.base_checkpoint} does not fit its run's architecture "
                                f"({str(e).splitlines()[0]}); retrain the base run.") from None
        self.network.requires_grad_(False)
        self.network.eval()
        self._features = None
        feature_stage(self.network).register_forward_hook(self._keep_features)
        self.head_config = {"in_channels": feature_channels(self.network),
                            "dims": len(self.configuration_manager.patch_size),  # 3d_fullres: 3, 2d: 2 (slices)
                            "outputs": len(self.outputs)}
        self.head = ConfidenceHead(**self.head_config).to(self.device)
        optimizer = torch.optim.Adam(self.head.parameters(), lr=self.initial_lr)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs, exponent=0.0)  # constant lr

    def _keep_features(self, _module, _inputs, output):
        self._features = output

    def set_deep_supervision_enabled(self, enabled: bool):
        super().set_deep_supervision_enabled(False)

    # ------------------------------------------------------------------ scores
    def true_scores(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(N, 2L) Dice and NSD@1mm of the frozen network's segmentation of each sample against its ground
        truth, per foreground label/region, with calibnet's empty-mask conventions (DESIGN §7). A sample is a
        3-D patch (3d_fullres) or a 2-D slice patch (2d, NSD with the in-plane spacing)."""
        spacing = self.configuration_manager.spacing
        logits, target = logits.detach().float().cpu(), target.detach().cpu()
        rows = []
        for sample in range(logits.shape[0]):
            dice, nsd = [], []
            for index, values in enumerate(self.targets.masks.values()):
                if self.targets.regions:
                    predicted, truth = logits[sample, index] > 0, target[sample, index] > 0
                else:
                    predicted = torch.isin(logits[sample].argmax(0), torch.tensor(values))
                    truth = torch.isin(target[sample, 0].long(), torch.tensor(values))
                metrics = case_metrics(predicted.numpy(), truth.numpy(), spacing)
                dice.append(metrics["DSC"])
                nsd.append(metrics["NSD@1mm"])
            rows.append(dice + nsd)
        return torch.tensor(rows, dtype=torch.float32, device=self.device)

    # ------------------------------------------------------------------ training
    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.network.eval()
        self.head.train()
        self.epoch_drops = {"predicted": [], "actual": [], "alpha": []}

    def calib_train_step(self, batch: dict) -> dict:
        clean = batch["data"].to(self.device, non_blocking=True)
        clean_target = batch["target"].to(self.device, non_blocking=True)
        n_clean = clean.shape[0]
        previous = self.buffer.take() if self.adversarial and self.batches_seen >= self.warmup_batches else None
        inputs = clean if previous is None else torch.cat([clean, previous.inputs])
        target = clean_target if previous is None else torch.cat([clean_target, previous.targets])
        perturb = self.adversarial and self.batches_seen + 1 >= self.warmup_batches
        inputs = inputs.detach().requires_grad_(perturb)
        logits = self.network(inputs)
        true = self.true_scores(logits, target)
        predicted = self.head(self._features)
        self.check_finite({"head output": predicted})
        loss = torch.nn.functional.mse_loss(predicted, true)
        if perturb:
            clean_predicted = predicted[:n_clean].mean(1)
            perturbed = adversarial_perturbation(inputs, clean_predicted, self.alpha)[:n_clean]
            self.buffer.put(AdversarialBatch(perturbed, clean_target, clean_predicted, true[:n_clean].mean(1)))
        if previous is not None:
            predicted_drop = float((previous.clean_predicted - predicted[n_clean:].detach().mean(1)).mean())
            actual_drop = float((previous.clean_true - true[n_clean:].mean(1)).mean())
            self.alpha = update_alpha(self.alpha, predicted_drop, self.delta_s, self.eta)
            self.epoch_drops["predicted"].append(predicted_drop)
            self.epoch_drops["actual"].append(actual_drop)
            self.epoch_drops["alpha"].append(self.alpha)
        self.optimizer.zero_grad(set_to_none=True)
        self.backward_and_step(loss, self.head.parameters(), restrict_to_parameters=True)
        self.batches_seen += 1
        return {"loss": loss.detach().cpu().numpy()}

    def on_validation_epoch_start(self):
        self.network.eval()
        self.head.eval()

    def validation_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        logits = self.network(data)
        true = self.true_scores(logits, batch["target"])
        loss = torch.nn.functional.mse_loss(self.head(self._features), true)
        return {"loss": loss.detach().cpu().numpy()}

    def on_validation_epoch_end(self, val_outputs: list):
        self.logger.log("val_losses", float(np.mean([o["loss"] for o in val_outputs])), self.current_epoch)

    def on_epoch_end(self):
        self.logger.log("epoch_end_timestamps", time(), self.current_epoch)
        train_loss = float(self.logger.get_value("train_losses", step=-1))
        val_loss = float(self.logger.get_value("val_losses", step=-1))
        drops = {k: float(np.mean(v)) if v else None for k, v in self.epoch_drops.items()}
        self.history.append({"epoch": self.current_epoch, "train_mse": train_loss, "val_mse": val_loss,
                             "alpha": self.alpha, "predicted_drop": drops["predicted"],
                             "actual_drop": drops["actual"], "adversarial_batches": len(self.epoch_drops["alpha"])})
        self.print_to_log_file(f"head train MSE {train_loss:.5f}, val MSE {val_loss:.5f}"
                               + (f", alpha {self.alpha:.4f}, predicted drop {drops['predicted']:.4f}, actual drop "
                                  f"{drops['actual']:.4f}" if drops["predicted"] is not None else ""))
        if val_loss < self.best["val_loss"]:
            self.best = {"val_loss": val_loss, "epoch": self.current_epoch,
                         "state": deepcopy(self.head.state_dict())}
            self.save_checkpoint(str(Path(self.output_folder) / "checkpoint_best.pth"))
        atomic_write_json(Path(self.output_folder) / HISTORY_FILENAME, self.history_record())
        plot_head_training(self.history, Path(self.output_folder) / PLOT_FILENAME, self.delta_s)
        self.current_epoch += 1
        self.stop_if_patience_exhausted()

    @property
    def epochs_without_improvement(self) -> int:
        return self.current_epoch - 1 - self.best["epoch"]  # on_epoch_end has already counted this epoch

    def stop_if_patience_exhausted(self) -> None:
        """End nnU-Net's loop once the source-val loss has not improved for ``patience`` epochs.

        nnU-Net's ``run_training`` iterates over ``range(current_epoch, num_epochs)``, fixed when the loop
        starts, so lowering ``num_epochs`` here would not end it; :class:`EarlyStop` leaves the loop instead and
        :meth:`run_training` finishes with nnU-Net's own ``on_train_end``."""
        if self.epochs_without_improvement < self.patience:
            return
        self.print_to_log_file(f"early stop: no val improvement for {self.patience} epochs; keeping the head of "
                               f"epoch {self.best['epoch']}")
        self.stopped_early = True
        self.num_epochs = self.current_epoch  # the bound training actually reached
        raise EarlyStop

    def run_training(self):
        """nnU-Net's own loop (``nnUNetTrainer.run_training``); ``on_epoch_end`` may end it early."""
        try:
            super().run_training()
        except EarlyStop:
            self.on_train_end()

    def on_train_end(self):
        """Restore the best epoch's head before nnU-Net's ``on_train_end`` writes checkpoint_final."""
        if self.best["state"] is not None:
            self.head.load_state_dict(self.best["state"])
        super().on_train_end()
        atomic_write_json(Path(self.output_folder) / HISTORY_FILENAME, self.history_record())

    def history_record(self) -> dict:
        return {"adversarial": self.adversarial, "warmup_batches": self.warmup_batches, "delta_s": self.delta_s,
                "eta": self.eta, "alpha_start": ALPHA_START, "learning_rate": self.initial_lr,
                "patience": self.patience, "best_epoch": self.best["epoch"], "best_val_mse": self.best["val_loss"],
                "stopped_early": self.stopped_early, "epochs": self.history}

    def save_checkpoint(self, filename: str) -> None:
        """Only the head: its weights, configuration, outputs and how it was trained."""
        checkpoint = {"head_weights": self.head.state_dict(), "head_config": self.head_config,
                      "outputs": self.outputs, "regions": self.targets.regions, "trainer_name": type(self).__name__,
                      "adversarial": self.adversarial, "alpha": self.alpha, "current_epoch": self.current_epoch + 1,
                      "best_epoch": self.best["epoch"], "base_checkpoint": str(self.base_checkpoint),
                      "base": self.base_record.get("spec", {})}
        with atomic_path(filename) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, filename_or_checkpoint):
        raise CalibnetError("confidence_head runs cannot be continued; train the head again (it is small).")


def plot_head_training(history: list, path: Path, delta_s: float) -> None:
    """Losses per epoch, and α with the predicted and actual drops (the paper's Figure 1)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    figure, (losses, drops) = plt.subplots(1, 2, figsize=(10, 3.6))
    losses.plot(epochs, [h["train_mse"] for h in history], label="train MSE")
    losses.plot(epochs, [h["val_mse"] for h in history], label="source val MSE")
    losses.set_xlabel("epoch")
    losses.legend()
    adversarial = [h for h in history if h["alpha"] is not None and h["predicted_drop"] is not None]
    if adversarial:
        x = [h["epoch"] for h in adversarial]
        drops.plot(x, [h["predicted_drop"] for h in adversarial], "o-", label="predicted drop C(z) − C(z′)")
        drops.plot(x, [h["actual_drop"] for h in adversarial], "s-", label="actual drop g(x) − g(x′)")
        drops.plot(x, [h["alpha"] for h in adversarial], "^-", label="α")
        drops.axhline(delta_s, color="grey", ls="--", lw=1, label="Δs")
        drops.legend(fontsize=8)
    else:
        drops.text(0.5, 0.5, "no adversarial batches", ha="center", va="center", transform=drops.transAxes)
    drops.set_xlabel("epoch")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=110)
    plt.close(figure)

