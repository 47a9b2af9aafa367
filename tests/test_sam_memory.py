"""SAM training's RAM: a bounded embedding cache (the rest read back from the on-disk store), targets held as
bits, images read slice by slice from nnU-Net's files — and the same numbers as with everything in RAM."""
import numpy as np
import pytest
import torch

from calibnet.errors import CalibnetError
from calibnet.trainers.nnUNetTrainerSAM import (EMBEDDING_CACHE_VARIABLE, EmbeddingCache, PackedMask,
                                                PreprocessedImage, embedding_cache_bytes)


def _computing(calls: list):
    def compute(keys):
        calls.extend(keys)
        return [torch.full((2, 4), k + 0.1) for k in keys]  # 8 float16 values: 16 bytes held per key
    return compute


def test_the_cache_keeps_the_most_recently_used_within_its_bound():
    calls = []
    compute = _computing(calls)
    cache = EmbeddingCache(max_bytes=2 * 16)
    cache.get([1, 2], compute)
    cache.get([1], compute)  # 2 is now the least recently used
    cache.get([3], compute)
    assert list(cache.store) == [1, 3] and cache.nbytes == 32 and cache.evicted == 1
    values = cache.get([2, 1, 3], compute)  # 2 computed again, and 1 dropped to make room after it was handed out
    assert calls == [1, 2, 3, 2] and list(cache.store) == [3, 2] and cache.nbytes == 32 and cache.evicted == 2
    expected = torch.stack([torch.full((2, 4), k + 0.1).half().float() for k in (2, 1, 3)])
    assert torch.equal(values, expected)
    assert (cache.hits, cache.misses) == (3, 4)
    cache.clear()
    assert not cache.store and cache.nbytes == 0

    unbounded = EmbeddingCache()
    for key in range(50):
        unbounded.get([key], compute)
    assert len(unbounded.store) == 50 and unbounded.evicted == 0


def test_the_bound_comes_from_the_class_or_the_environment(monkeypatch):
    monkeypatch.delenv(EMBEDDING_CACHE_VARIABLE, raising=False)
    assert embedding_cache_bytes(512) == 512 * 2 ** 20 and embedding_cache_bytes(None) is None
    monkeypatch.setenv(EMBEDDING_CACHE_VARIABLE, "1.5")
    assert embedding_cache_bytes(512) == 1.5 * 2 ** 20
    monkeypatch.setenv(EMBEDDING_CACHE_VARIABLE, "none")
    assert embedding_cache_bytes(512) is None
    for wrong in ("-1", "lots", "nan"):
        monkeypatch.setenv(EMBEDDING_CACHE_VARIABLE, wrong)
        with pytest.raises(CalibnetError, match=EMBEDDING_CACHE_VARIABLE):
            embedding_cache_bytes(512)


def test_a_packed_mask_gives_the_slices_of_the_mask():
    mask = np.random.default_rng(0).random((5, 7, 13)) > 0.8
    mask[2] = False
    packed = PackedMask(mask)
    assert packed.bits.nbytes == 5 * 7 * 2 and len(packed) == 5 and packed.shape == mask.shape
    for z in range(5):
        assert packed[z].dtype == bool and np.array_equal(packed[z], mask[z])
        assert np.array_equal(packed[z:z + 1], mask[z:z + 1])
    assert np.array_equal(packed.slices_with_foreground(), [0, 1, 3, 4])


@pytest.mark.slow
def test_an_embedding_cache_of_two_slices_trains_exactly_as_everything_in_ram(tiny_dataset, monkeypatch):
    """calsam (tiny SAM) steps with the cache bounded to two slices — nearly every embedding evicted and read
    back from the store — give bit for bit the losses and weights of a run holding every slice in RAM."""
    from calibnet.launch.training_run import prepare_trainer
    from calibnet.paths import setup_data_roots
    from calibnet.runs import RunSpec

    tiny_dataset.activate()
    roots = setup_data_roots()

    def train(cap: str):
        monkeypatch.setenv(EMBEDDING_CACHE_VARIABLE, cap)
        trainer, *_ = prepare_trainer(RunSpec(511, "3d_fullres", "calsam", 0), roots.preprocessed, roots.results,
                                      "cpu")
        trainer.initialize()
        train_batches, val_batches = trainer.get_dataloaders()
        losses = []
        for step in range(3):
            trainer.network.train()
            trainer.step_in_epoch = step
            losses.append(float(trainer.calib_train_step(next(train_batches))["loss"]))
        trainer.network.eval()
        losses.append(float(trainer.validation_step(next(val_batches))["loss"]))
        return trainer, losses

    reference, reference_losses = train("none")
    held = reference.embedding_cache
    assert held.evicted == 0 and len(held.store) == held.misses
    slice_bytes = next(iter(held.store.values())).nbytes
    capped, capped_losses = train(str(2 * slice_bytes / 2 ** 20))
    cache = capped.embedding_cache
    assert len(cache.store) <= 2 and cache.evicted > 0 and cache.misses > held.misses  # read back from disk
    assert capped.network.embedding_store.encoded == 0

    assert capped_losses == reference_losses
    weights, expected = capped.network.state_dict(), reference.network.state_dict()
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in weights)

    case_id = sorted(capped.volumes)[0]
    image, foreground = capped.volumes[case_id]
    data, seg, _, _ = capped.dataset_class(capped.preprocessed_dataset_folder, [case_id]).load_case(case_id)
    assert isinstance(image, PreprocessedImage) and isinstance(foreground, PackedMask)
    assert torch.equal(image[:, 5:6], torch.from_numpy(np.asarray(data, dtype=np.float32)[:, 5:6]))
    assert np.array_equal(foreground[:], capped.foreground(np.asarray(seg)[0]))
