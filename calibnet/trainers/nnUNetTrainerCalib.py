"""The base of every calibnet trainer: nnU-Net training on one fold of ``calib_splits.json``."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from calibnet.checkpoints import weights_only_loads
from calibnet.errors import CalibnetError
from calibnet.files import atomic_path
from calibnet.losses import DEFAULT_FIP_ESTIMATOR, FipEstimator
from calibnet.planners.splits import describe_fold, get_fold, load_calib_splits


class NonFiniteLossError(CalibnetError):
    """A loss term became NaN or infinite during training."""


class nnUNetTrainerCalib(nnUNetTrainer):
    """nnUNetTrainer that trains on the train/val cases of a calibnet split fold.

    nnU-Net silently trains on a random 80:20 split when the fold index is beyond its split file; here
    an unknown fold is an error that lists the valid folds. The fold's test cases (the shifted domain)
    are never handed to training or checkpoint selection. A non-finite loss stops training with a
    message naming the epoch, the step and the term.

    What a trainer class declares about itself, read by launch/ and inference/ as plain attributes (the
    defaults are those of plain nnU-Net; a subclass overrides what differs):

    - ``split_family``: the family of calib_splits.json the fold index refers to (set per run by launch/).
    - ``requires_prompts``: the network takes prompt channels derived from the ground truth, appended to
      the image channels; the class then gives them at prediction time with :meth:`prompt_inputs`.
    - ``trains``: False for a method with nothing to train (zero-shot SAM / SAM 2): calib_train only saves
      the network as it is.
    - ``predicts_with_mirroring``: False where test-time mirroring never applies (MedSAM-U: UGMP's
      multiple prompts take its place), whatever the prediction asks.
    - ``use_box``: SAM prompts are boxes rather than points (the row's prompts are named B100); a SAM-FT run's
      ``calib_train --sam-prompt`` (``"sam_prompt"`` in calibnet_run.json) overrides it for that run.
    - ``caches_embeddings``: the frozen image encoder's slice embeddings are computed once and cached.
    - ``requires_checkpoint``: None, or the pretrained weights the method cannot do without ("MedSAM").
    - ``supports_ddp``: training on several GPUs (``calib_train --num-gpus N``) goes through nnU-Net's own DDP:
      its ``initialize()`` wraps ``self.network`` in DistributedDataParallel and splits the batch over the
      GPUs, and a step must run the network through that wrapper (``self.network(data)``) and backpropagate
      into the parameters' ``.grad``, for DDP to average the gradients. A subclass that does not (its own
      ``initialize``, parts of the network called one by one, ``torch.autograd.grad`` in the step) sets it
      False and says why in ``no_ddp_reason`` (one sentence, shown to the user).
    - ``network_options``: None when the network takes no options; else the options it is built with,
      recorded in calibnet_run.json (calib_train's network flags and the seed) and given back to
      ``network_for`` when the run is loaded. (Which calib_train flags a method accepts is declared in
      ``calibnet.methods``, not here.)

    SAM trainers also declare the classmethods ``backbone_config(record)`` and ``network_for(config,
    load_weights, **options)`` that rebuild the network of a run (``calibnet.trainers.nnUNetTrainerSAM``).
    """

    split_family = "loco"
    requires_prompts = False
    trains = True
    predicts_with_mirroring = True
    use_box = False
    caches_embeddings = False
    requires_checkpoint = None
    network_options = None
    supports_ddp = True
    no_ddp_reason = ""
    progress = None  # the epoch's progress bar while training
    step_in_epoch = 0
    seed = 0  # the run's --seed (prompts, FIP draws)
    lambda_fip = 0.0
    fip_estimator = DEFAULT_FIP_ESTIMATOR  # calib_train --fip-estimator (see calibnet.losses.FipEstimator)
    fip_every = 16  # --fip-estimator amortised: FIP's gradient taken afresh every fip_every-th step
    _fip_gradient = None  # amortised: λ1·∇FIP of the last fresh step, one tensor per trained parameter
    _fip_value = None

    @classmethod
    def prompt_inputs(cls, foreground: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        """The prompt channels appended to a preprocessed volume at prediction time (``requires_prompts``)."""
        raise NotImplementedError(f"{cls.__name__} takes no prompt channels")

    def use_run_folder(self, folder: os.PathLike) -> None:
        """Write checkpoints and logs to ``folder`` (one per split, fold and seed) instead of fold_X."""
        default, old_log = Path(self.output_folder), Path(self.log_file)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.output_folder = str(folder)
        self.log_file = str(folder / old_log.name)
        self.logger.output_folder = str(folder)
        if self.is_ddp:  # every rank's __init__ has made the default folder before rank 0 moves its log out of it
            torch.distributed.barrier()
        if default != folder and self.local_rank == 0:
            # nnU-Net's __init__ already logged a line there. Runs of other seeds of this fold share the default
            # folder and, started in the same second, the log's name: a sibling may have moved or removed it first.
            with contextlib.suppress(FileNotFoundError):
                shutil.move(old_log, self.log_file)
            with contextlib.suppress(OSError):  # gone, or a sibling's file is in it now
                default.rmdir()

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, written under a temporary name and renamed into place: a training killed while it
        writes checkpoint_latest.pth keeps the previous one, readable, to resume from."""
        if self.local_rank != 0 or self.disable_checkpointing:
            return super().save_checkpoint(filename)
        with atomic_path(filename) as tmp:
            super().save_checkpoint(str(tmp))

    def do_split(self):
        splits = load_calib_splits(self.preprocessed_dataset_folder_base)
        fold = get_fold(splits, self.split_family, self.fold,
                        where=f"{self.preprocessed_dataset_folder_base}/calib_splits.json")
        self.print_to_log_file(f"calibnet {self.split_family} split, {describe_fold(self.split_family, fold)}: "
                               f"{len(fold['train'])} train, {len(fold['val'])} val, "
                               f"{len(fold['test'])} test cases (test never used in training)")
        self.print_to_log_file(f"train cases: {', '.join(fold['train'])}")
        self.print_to_log_file(f"val cases: {', '.join(fold['val'])}")
        return fold["train"], fold["val"]

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """nnU-Net's, with its ``torch.load(weights_only=False)`` of the file made weights-only (a checkpoint carrying
        code is refused; ``calibnet.checkpoints.weights_only_loads``). nnU-Net 2.8.1 cannot be handed the contents
        instead: its branch for a dict never binds them."""
        if not isinstance(filename_or_checkpoint, (str, os.PathLike)):
            return super().load_checkpoint(filename_or_checkpoint)
        with weights_only_loads(filename_or_checkpoint):
            super().load_checkpoint(str(filename_or_checkpoint))

    def on_train_epoch_start(self):
        self.step_in_epoch = 0
        super().on_train_epoch_start()
        self.progress = tqdm(total=self.num_iterations_per_epoch, unit="step", leave=False,
                             desc=f"epoch {self.current_epoch + 1}/{self.num_epochs}",
                             disable=self.local_rank != 0)  # one bar on several GPUs

    def on_train_epoch_end(self, train_outputs):
        if self.progress is not None:
            self.progress.close()
        super().on_train_epoch_end(train_outputs)

    def train_step(self, batch: dict) -> dict:
        self.step_in_epoch += 1
        outputs = self.calib_train_step(batch)
        if not np.all(np.isfinite(outputs["loss"])):
            self.raise_non_finite("total loss")
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix(loss=f"{float(np.mean(outputs['loss'])):.4f}")
        return outputs

    def calib_train_step(self, batch: dict) -> dict:
        """One optimisation step; subclasses that change the objective override this."""
        return nnUNetTrainer.train_step(self, batch)

    @property
    def fip_estimator_spec(self) -> FipEstimator:
        return FipEstimator(self.fip_estimator, self.fip_every if self.fip_estimator == "amortised" else 1)

    def fip_due(self) -> bool:
        """Whether this step takes FIP afresh: always outside training (the validation loss) and with the exact
        estimator; with the amortised one every ``fip_every``-th training step of the run."""
        estimator = self.fip_estimator_spec
        if not self.network.training or estimator.name == "exact":
            return True
        step = self.current_epoch * self.num_iterations_per_epoch + max(self.step_in_epoch - 1, 0)
        return estimator.fresh(step, self._fip_gradient is not None)

    def amortised_fip_value(self) -> torch.Tensor:
        """The FIP of the last fresh step (a constant), logged in the loss of the steps that reuse its gradient."""
        return self._fip_value

    def fip_backward_and_step(self, terms: dict, parameters) -> None:
        """Backpropagate segmentation loss + λ1·FIP + λ2·CMP and update. With the amortised estimator a fresh
        FIP's parameter gradient is kept and added to the steps' own gradients until the next fresh one."""
        parameters = list(parameters)
        if not self.lambda_fip or self.fip_estimator == "exact" or not self.network.training:
            return self.backward_and_step(terms["total loss"], parameters)
        if terms["FIP"].requires_grad:
            grads = torch.autograd.grad(self.lambda_fip * terms["FIP"], parameters, retain_graph=True,
                                        allow_unused=True)
            self._fip_gradient = [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, parameters)]
            self._fip_value = terms["FIP"].detach()
        rest = terms["segmentation loss"] + self.lambda_cmp * terms.get("CMP", 0)
        self.backward_and_step(rest, parameters, extra_gradients=self._fip_gradient)

    def backward_and_step(self, loss: torch.Tensor, parameters, restrict_to_parameters: bool = False,
                          extra_gradients=None) -> None:
        """Backpropagate ``loss`` and update, as nnU-Net does (grad scaler on CUDA, gradient norm clipped at 12).

        ``restrict_to_parameters`` computes gradients for ``parameters`` only (not for inputs that require
        them, e.g. images being perturbed); ``extra_gradients`` (one tensor per parameter) are added to the
        loss's gradients before clipping."""
        parameters = list(parameters)
        inputs = parameters if restrict_to_parameters else None
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward(inputs=inputs)
            self._add_gradients(parameters, extra_gradients, float(self.grad_scaler.get_scale()))
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(parameters, 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward(inputs=inputs)
            self._add_gradients(parameters, extra_gradients)
            torch.nn.utils.clip_grad_norm_(parameters, 12)
            self.optimizer.step()

    @staticmethod
    def _add_gradients(parameters: list, gradients, scale: float = 1.0) -> None:
        for parameter, gradient in zip(parameters, gradients or ()):
            if parameter.grad is None:
                parameter.grad = gradient * scale
            else:
                parameter.grad.add_(gradient, alpha=scale)

    def raise_non_finite(self, term: str) -> None:
        raise NonFiniteLossError(
            f"training stopped: the {term} is not finite at epoch {self.current_epoch}, step {self.step_in_epoch} "
            f"({self.output_folder}); lower the learning rate or the loss weights, or check the data.")

    def check_finite(self, terms: dict) -> None:
        for name, value in terms.items():
            if not torch.isfinite(value).all():
                self.raise_non_finite(f"{name} term")
