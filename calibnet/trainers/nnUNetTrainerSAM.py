"""SAM-backed methods (CalSAM paper): frozen image and prompt encoders, trained mask decoder, 3-D volumes
as axial slices, point prompts from the ground truth, cached slice embeddings.

Training reads the chosen configuration's preprocessed volumes (nnU-Net's normalisation and resampling)
and draws batches of whole axial slices that contain foreground, without spatial or intensity
augmentation, so each slice's frozen-encoder embedding is computed once, kept in the on-disk embedding store
and, up to a bound, in memory (keyed by case, slice and preprocessing); the decoder is what trains (Adam
β = (0.9, 0.999), lr 1e-4, cosine decay).
Prediction runs nnU-Net's predictor over the whole volume in one window, the prompts travelling as three
extra input channels (see ``calibnet.prompts.sam_prompt_maps``).
"""
from __future__ import annotations

import math
import os
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from calibnet.errors import CalibnetError
from calibnet.runs import target_mask
from calibnet.prompts import sam_prompt_maps, sam_slice_prompts
from calibnet.losses import (DEFAULT_CMP_GAMMA, DEFAULT_CMP_TAU, DEFAULT_LAMBDA_CMP, DEFAULT_LAMBDA_FIP,
                                      DEFAULT_DICEPP_GAMMA, DEFAULT_FOCAL_GAMMA, binary_soft_dice_loss,
                                      confidence_misalignment_penalty, dice_plus_plus_loss,
                                      fisher_information_penalty, focal_loss, full_precision)
from calibnet.trainers.nnUNetTrainerCalib import nnUNetTrainerCalib
from calibnet.networks.embedding_store import EMBEDDINGS_FOLDER, STORE_DTYPE
from calibnet.networks.sam_backbone import EMBED_CHUNK, SamConfig, SamSliceSegmenter, build_sam


EMBEDDING_CACHE_VARIABLE = "CALIBNET_EMBEDDING_CACHE_MIB"


class EmbeddingCache:
    """Frozen-encoder embeddings (float16, CPU) by (case, slice, preprocessing), the least recently used
    dropped once they pass ``max_bytes`` (None: unbounded); counts hits, misses and evictions. A dropped
    embedding is computed again when next asked for: with an embedding store attached, a read of the same
    float16 value from disk."""

    def __init__(self, max_bytes: float | None = None):
        self.store, self.max_bytes = OrderedDict(), max_bytes
        self.nbytes = self.hits = self.misses = self.evicted = 0

    def get(self, keys: list, compute) -> torch.Tensor:
        held = {}
        for key in keys:
            if key in self.store:
                held[key] = self.store[key]
                self.store.move_to_end(key)
        missing = [k for k in dict.fromkeys(keys) if k not in held]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            for key, embedding in zip(missing, compute(missing)):
                held[key] = embedding.detach().to("cpu", STORE_DTYPE)  # the store's values: half the memory
                self._keep(key, held[key])
        return torch.stack([held[k] for k in keys]).float()

    def _keep(self, key, embedding: torch.Tensor) -> None:
        self.store[key] = embedding
        self.nbytes += embedding.nbytes
        while self.max_bytes is not None and self.nbytes > self.max_bytes:
            _, dropped = self.store.popitem(last=False)
            self.nbytes -= dropped.nbytes
            self.evicted += 1

    def clear(self) -> None:
        """Drop every embedding (the counts stay)."""
        self.store.clear()
        self.nbytes = 0

    def describe(self) -> str:
        cap = "unbounded" if self.max_bytes is None else f"of {self.max_bytes / 2 ** 20:g} MiB"
        return f"{len(self.store)} slices held ({self.nbytes / 2 ** 20:.1f} MiB {cap}), {self.evicted} evicted"


def embedding_cache_bytes(default_mib: float | None) -> float | None:
    """The in-RAM embedding cache's bound in bytes: $CALIBNET_EMBEDDING_CACHE_MIB (a number of MiB, or "none"
    for unbounded) where set, else ``default_mib``; None: unbounded."""
    value = os.environ.get(EMBEDDING_CACHE_VARIABLE, "").strip()
    if not value:
        return None if default_mib is None else default_mib * 2 ** 20
    if value.lower() == "none":
        return None
    try:
        mib = float(value)
    except ValueError:
        mib = -1.0
    if not math.isfinite(mib) or mib < 0:
        raise CalibnetError(f"{EMBEDDING_CACHE_VARIABLE}={value}: give the MiB of slice embeddings to keep in RAM "
                            f"(a number ≥ 0) or none for no bound.")
    return mib * 2 ** 20


class PackedMask:
    """A boolean (Z, Y, X) mask kept as bits (np.packbits along X, an eighth of a bool array's RAM); indexing
    along Z gives the bool arrays the mask itself would."""

    def __init__(self, mask: np.ndarray):
        self.shape = mask.shape
        self.bits = np.packbits(np.asarray(mask, dtype=bool), axis=-1)

    def __getitem__(self, index) -> np.ndarray:
        return np.unpackbits(self.bits[index], axis=-1, count=self.shape[-1]).astype(bool)

    def __len__(self) -> int:
        return self.shape[0]

    def slices_with_foreground(self) -> np.ndarray:
        """Indices z of the slices holding any foreground."""
        return np.flatnonzero(self.bits.reshape(self.shape[0], -1).any(1))


class PreprocessedImage:
    """One case's preprocessed image (C, Z, Y, X) in nnU-Net's dataset files, opened again (memory-mapped by
    nnU-Net's dataset class) whenever it is indexed, so that only the slices asked for are read and no case
    stays in RAM; indexing gives float32 tensors."""

    def __init__(self, dataset, case_id: str, shape: tuple):
        self.dataset, self.case_id, self.shape = dataset, case_id, tuple(shape)

    def __getitem__(self, index) -> torch.Tensor:
        data = self.dataset.load_case(self.case_id)[0]
        return torch.from_numpy(np.array(data[index], dtype=np.float32))


class CosineLR:
    """lr = ½·lr0·(1 + cos(π·epoch/epochs)), stepped by nnU-Net with the epoch index."""

    def __init__(self, optimizer, initial_lr: float, epochs: int):
        self.optimizer, self.initial_lr, self.epochs = optimizer, initial_lr, max(1, epochs)

    def step(self, epoch: int) -> None:
        lr = 0.5 * self.initial_lr * (1 + math.cos(math.pi * min(epoch, self.epochs) / self.epochs))
        for group in self.optimizer.param_groups:
            group["lr"] = lr


class SliceBatches:
    """Endless batches of (case, slice) keys with foreground, drawn with a seeded generator."""

    def __init__(self, keys: list, batch_size: int, seed: int):
        if not keys:
            raise CalibnetError("no slice with foreground among the training cases: SAM methods need prompts.")
        self.keys, self.batch_size, self.rng = keys, batch_size, np.random.default_rng(seed)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        chosen = self.rng.choice(len(self.keys), size=min(self.batch_size, len(self.keys)), replace=False)
        return {"keys": [self.keys[i] for i in chosen]}


class nnUNetTrainerSAMFT(nnUNetTrainerCalib):
    """SAM-FT: frozen SAM encoders, mask decoder trained with Dice + BCE (per slice, averaged over the batch)."""

    requires_prompts = True
    trains = True
    use_box = False
    sam_prompt = None  # a run's calib_train --sam-prompt ("points" | "box", in calibnet_run.json); None: use_box
    sam_config = SamConfig()
    target_label = None  # None: the union of all foreground labels; else one label value
    lambda_fip = 0.0
    lambda_cmp = 0.0
    cmp_tau = DEFAULT_CMP_TAU
    cmp_gamma = DEFAULT_CMP_GAMMA
    slices_per_batch = 8
    caches_embeddings = True  # the image encoder is frozen, so each slice is encoded once
    # RAM kept for slice embeddings once the on-disk store holds them all, least recently used out first (None:
    # every slice in RAM); $CALIBNET_EMBEDDING_CACHE_MIB overrides it
    embedding_cache_mib = 512
    predicts_with_mirroring = False  # SAM predicts once per prompt; mirroring would re-encode every slice 8×
    reads_unit_intensities = False  # MedSAM's encoder reads [0, 1] whatever the checkpoint's architecture
    supports_ddp = False
    no_ddp_reason = ("its trainer builds the SAM network in its own initialize(), so nnU-Net's DDP would not wrap "
                     "the trained decoder and its gradients would not be averaged across GPUs.")

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 (nnU-Net's signature)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False
        self.initial_lr = 1e-4
        self.embedding_cache = EmbeddingCache()

    # --- network and optimiser -------------------------------------------------------------------------
    @classmethod
    def backbone_config(cls, record: dict) -> SamConfig:
        """The backbone recorded in calibnet_run.json ("backbone")."""
        return SamConfig(**record)

    @classmethod
    def network_for(cls, sam_config: SamConfig, load_weights: bool = True, use_box: bool | None = None,
                    **_options) -> SamSliceSegmenter:
        """The network; ``use_box`` (a run's --sam-prompt) overrides the class's prompts."""
        return SamSliceSegmenter(build_sam(sam_config, load_weights),
                                 use_box=cls.use_box if use_box is None else use_box,
                                 unit_intensities=cls.unit_intensities(sam_config),
                                 image_channel=sam_config.image_channel)

    @classmethod
    def unit_intensities(cls, sam_config: SamConfig) -> bool:
        """Whether the encoder reads intensities in [0, 1] (LiteMedSAM, MedSAM) rather than SAM's."""
        return sam_config.unit_intensities or cls.reads_unit_intensities

    def initialize(self):
        if self.was_initialized:
            raise RuntimeError("trainer already initialised")
        self._set_batch_size_and_oversample()
        options = dict(self.network_options or {})
        if self.sam_prompt is not None:  # --sam-prompt: the network decodes the prompts it trains with
            options["use_box"] = self.box_prompts
        self.network = self.network_for(self.sam_config, **options).to(self.device)
        self.optimizer, self.lr_scheduler = self.configure_optimizers()
        self.loss = None  # the SAM objective is computed in calib_train_step
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
        self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        self.was_initialized = True
        self.print_to_log_file(f"SAM backbone: {self.sam_config.describe()}; image and prompt encoders frozen")

    def trainable_parameters(self) -> list:
        """What the optimiser updates: SAM's mask decoder."""
        return self.network.decoder_parameters()

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.trainable_parameters(), lr=self.initial_lr, betas=(0.9, 0.999))
        return optimizer, CosineLR(optimizer, self.initial_lr, self.num_epochs)

    # --- data ------------------------------------------------------------------------------------------
    def foreground(self, seg: np.ndarray) -> np.ndarray:
        """Binary target of a label map: the chosen label, or all foreground."""
        return target_mask(seg, self.target_label)

    def _load_volumes(self, case_ids: list) -> None:
        """``self.volumes[case_id]`` = (image (C, Z, Y, X), binary target (Z, Y, X)): the image read slice by
        slice from nnU-Net's memory-mapped files when indexed (read whole only from an .npz nnU-Net cannot map),
        the target held as bits, so that RAM does not grow with the cases' voxels."""
        dataset = self.dataset_class(self.preprocessed_dataset_folder, case_ids)
        for case_id in case_ids:
            data, seg, _, _ = dataset.load_case(case_id)
            in_memory = isinstance(data, np.ndarray) and not isinstance(data, np.memmap)
            image = (torch.from_numpy(np.asarray(data, dtype=np.float32)) if in_memory
                     else PreprocessedImage(dataset, case_id, data.shape))
            self.volumes[case_id] = (image, PackedMask(self.foreground(np.asarray(seg)[0])))

    def get_dataloaders(self):
        self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        train_ids, val_ids = self.do_split()
        self.volumes = {}
        self._load_volumes(list(train_ids) + list(val_ids))
        batches, all_keys = [], []
        for offset, ids in enumerate((train_ids, val_ids)):
            keys = [(case_id, int(z)) for case_id in ids for z in self.volumes[case_id][1].slices_with_foreground()]
            batches.append(SliceBatches(keys, self.slices_per_batch, self.seed + offset))
            all_keys += keys
        if self.caches_embeddings:
            store = self.network.use_embedding_store(Path(self.preprocessed_dataset_folder_base) / EMBEDDINGS_FOLDER)
            self.embedding_cache.max_bytes = embedding_cache_bytes(self.embedding_cache_mib)  # the rest is on disk
            starts = range(0, len(all_keys), EMBED_CHUNK)
            for start in tqdm(starts, desc="encoding slices", unit="batch", disable=len(starts) < 8):
                self.embeddings(all_keys[start:start + EMBED_CHUNK])  # every slice once, before the first step
            self.print_to_log_file(f"{store.summary()} ({self.sam_config.describe()})")
        return batches[0], batches[1]

    def on_epoch_end(self):
        cache = self.embedding_cache
        self.print_to_log_file(f"embedding cache after epoch {self.current_epoch}: {cache.hits} hits, "
                               f"{cache.misses} misses, {cache.describe()}")
        super().on_epoch_end()

    def slice_rng(self, case_id: str, z: int, per_epoch: bool = False) -> np.random.Generator:
        """The generator of one training slice's prompts: seed, case, slice (and epoch when they are redrawn)."""
        key = [self.seed, zlib.crc32(case_id.encode()), z] + ([self.current_epoch] if per_epoch else [])
        return np.random.default_rng(key)

    @property
    def box_prompts(self) -> bool:
        """Whether this run prompts each slice with its ground-truth box: its --sam-prompt, else the class's use_box."""
        return self.use_box if self.sam_prompt is None else self.sam_prompt == "box"

    def slice_prompts(self, keys: list) -> list:
        """Prompts of each (case, slice), reproducible from the seed, case and slice: points (CalSAM) or the
        slice's ground-truth box (vanilla SAM; SAM-FT with --sam-prompt box)."""
        prompts = []
        for case_id, z in keys:
            rng = self.slice_rng(case_id, z)
            prompts.append(sam_slice_prompts(self.volumes[case_id][1][z:z + 1], rng, self.box_prompts)[0])
        return prompts

    def embeddings(self, keys: list) -> torch.Tensor:
        preprocessing = f"{self.configuration_manager.data_identifier}|{self.sam_config}"

        def compute(missing):
            by_shape = {}  # cases differ in size: encode the slices of one shape together
            for key in missing:
                by_shape.setdefault(tuple(self.volumes[key[0]][0].shape[-2:]), []).append(key)
            embedded = {}
            for keys_of_shape in by_shape.values():
                slices = torch.stack([self.network.slice_images(self.volumes[c][0][:, z:z + 1])[0]
                                      for c, z, _ in keys_of_shape])
                embedded.update(zip(keys_of_shape, self.network.embed(slices.to(self.device))))
            return [embedded[key] for key in missing]

        return self.embedding_cache.get([(c, z, preprocessing) for c, z in keys], compute).to(self.device)

    # --- objective -------------------------------------------------------------------------------------
    def _forward_slices(self, keys: list, z: torch.Tensor) -> tuple[list, list]:
        """Each slice's flattened logits and binary target: slices differ in size from case to case, so the
        slices of one size are decoded together (each from its own embedding, so slice b's logits depend on
        z_b alone, as FIP needs)."""
        prompts = self.slice_prompts(keys)
        foregrounds = [self.volumes[case_id][1][slice_index] for case_id, slice_index in keys]
        by_shape = {}
        for index, foreground in enumerate(foregrounds):
            by_shape.setdefault(foreground.shape, []).append(index)
        logits = [None] * len(keys)
        for shape, indices in by_shape.items():
            decoded = self.network.decode(z[indices], [prompts[i] for i in indices], shape)
            for index, slice_logits in zip(indices, decoded):
                logits[index] = slice_logits.flatten()
        targets = [torch.from_numpy(foreground.astype(np.float32)).flatten().to(device=self.device, dtype=flat.dtype)
                   for foreground, flat in zip(foregrounds, logits)]
        return logits, targets

    def _forward(self, keys: list, z: torch.Tensor):
        """The batch's logits and targets, every slice's flattened and concatenated."""
        logits, targets = self._forward_slices(keys, z)
        return torch.cat(logits), torch.cat(targets)

    @staticmethod
    def dice_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return binary_soft_dice_loss(logits, target) + F.binary_cross_entropy_with_logits(logits, target)

    def slice_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The segmentation loss of one slice (flattened logits and binary target): Dice + BCE."""
        return self.dice_bce(logits, target)

    def loss_terms(self, keys: list) -> dict:
        """Segmentation loss = mean over the batch's slices of each slice's own loss (Dice and BCE per slice);
        FIP = ½·mean over slices of ‖∂L(slice b)/∂z_b‖² of those same per-slice losses (CalSAM Eq. 3; each
        slice is decoded from its own embedding, so one gradient of their sum gives every g_b); CMP = mean
        over all pixels of the batch. Computed in float32 with autocast off."""
        fresh_fip = self.lambda_fip and self.fip_due()
        z = self.embeddings(keys).detach().float().requires_grad_(bool(fresh_fip))
        with full_precision():
            slice_logits, slice_targets = self._forward_slices(keys, z)
            per_slice = torch.stack([self.slice_loss(l, t) for l, t in zip(slice_logits, slice_targets)])
            logits, target = torch.cat(slice_logits), torch.cat(slice_targets)
            terms = {"segmentation loss": per_slice.mean()}
            if fresh_fip:
                terms["FIP"] = fisher_information_penalty(per_slice, [z], create_graph=self.network.training)
            elif self.lambda_fip:  # --fip-estimator amortised between refreshes: the last penalty, a constant
                terms["FIP"] = self.amortised_fip_value()
            if self.lambda_cmp:
                terms["CMP"] = confidence_misalignment_penalty(logits[None, None], target[None, None], self.cmp_tau,
                                                               self.cmp_gamma, regions=True)
        self.check_finite(terms)
        terms["total loss"] = terms["segmentation loss"] + self.lambda_fip * terms.get("FIP", 0) + \
            self.lambda_cmp * terms.get("CMP", 0)
        self.check_finite({"total loss": terms["total loss"]})
        terms["logits"], terms["target"] = logits, target
        return terms

    def calib_train_step(self, batch: dict) -> dict:
        self.optimizer.zero_grad(set_to_none=True)
        terms = self.loss_terms(batch["keys"])
        self.fip_backward_and_step(terms, self.trainable_parameters())
        return {"loss": terms["total loss"].detach().cpu().numpy()}

    def validation_step(self, batch: dict) -> dict:
        with torch.enable_grad():  # FIP needs gradients even in validation
            terms = self.loss_terms(batch["keys"])
        predicted = terms["logits"].detach() > 0
        target = terms["target"] > 0.5
        tp = float((predicted & target).sum())
        fp = float((predicted & ~target).sum())
        fn = float((~predicted & target).sum())
        return {"loss": terms["total loss"].detach().cpu().numpy(), "tp_hard": np.array([tp]),
                "fp_hard": np.array([fp]), "fn_hard": np.array([fn])}

    @classmethod
    def prompt_inputs(cls, foreground: np.ndarray, rng: np.random.Generator,
                      use_box: bool | None = None) -> torch.Tensor:
        """The prompt channels appended to a preprocessed volume at prediction time: boxes or points as the
        network decodes them (``use_box``: a run's, see ``LoadedModel.prompt_inputs``; None: the class's)."""
        return torch.from_numpy(sam_prompt_maps(foreground, rng, cls.use_box if use_box is None else use_box))


class nnUNetTrainerCalSAM(nnUNetTrainerSAMFT):
    """CalSAM: SAM-FT + λ1·FIP on the cached embeddings (detached, requires_grad) + λ2·CMP."""

    lambda_fip = DEFAULT_LAMBDA_FIP
    lambda_cmp = DEFAULT_LAMBDA_CMP


class nnUNetTrainerSAMFTFocal(nnUNetTrainerSAMFT):
    """CalSAM Table 3's "SAM-FT + Focal Loss": SAM-FT with Dice + focal loss (γ = 2) in place of Dice + BCE."""

    focal_gamma = DEFAULT_FOCAL_GAMMA

    def slice_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return binary_soft_dice_loss(logits, target) + focal_loss(logits[None, None], target[None, None],
                                                                  self.focal_gamma, regions=True)


class nnUNetTrainerSAMFTDicePP(nnUNetTrainerSAMFT):
    """CalSAM Table 3's "SAM-FT + Dice++": SAM-FT trained with the Dice++ loss (γ = 2) alone."""

    dicepp_gamma = DEFAULT_DICEPP_GAMMA

    def slice_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return dice_plus_plus_loss(logits[None, None], target[None, None], self.dicepp_gamma, regions=True)


class nnUNetTrainerSAMFIP(nnUNetTrainerSAMFT):
    """Ablation: SAM-FT + λ1·FIP."""

    lambda_fip = DEFAULT_LAMBDA_FIP


class nnUNetTrainerSAMCMP(nnUNetTrainerSAMFT):
    """Ablation: SAM-FT + λ2·CMP."""

    lambda_cmp = DEFAULT_LAMBDA_CMP


class nnUNetTrainerVanillaSAM(nnUNetTrainerSAMFT):
    """Zero-shot SAM with the slice's ground-truth box as prompt: no training."""

    trains = False
    use_box = True


class nnUNetTrainerMedSAM(nnUNetTrainerSAMFT):
    """SAM-FT from a MedSAM (SAM ViT-B) checkpoint."""

    requires_checkpoint = "MedSAM"
    reads_unit_intensities = True
