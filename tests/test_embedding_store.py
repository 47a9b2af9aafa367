"""The embedding store: frozen-encoder embeddings on disk, shared across runs, damaged entries recomputed."""
import re

import pytest
import torch

from calibnet.cli import train as train_cli
from calibnet.networks.embedding_store import EMBEDDINGS_FOLDER, EmbeddingStore, tensor_digest, weights_digest
from conftest import run_cli


class CountingEncoder:
    """A stand-in encoder: (N, 3, 4, 4) -> (N, 2, 2, 2), remembering how many inputs it encoded."""

    def __init__(self):
        self.calls = 0

    def __call__(self, inputs):
        self.calls += len(inputs)
        return inputs[:, :2, :2, :2] * 3 + 0.123456789


@pytest.fixture()
def inputs():
    return torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(0))


def test_a_second_store_on_the_same_folder_encodes_nothing(tmp_path, inputs):
    encoder = CountingEncoder()
    first = EmbeddingStore(tmp_path, "a" * 64, "sam").embeddings(inputs, encoder)
    assert encoder.calls == 5
    store = EmbeddingStore(tmp_path, "a" * 64, "sam")
    again = store.embeddings(inputs[[4, 0]], encoder)
    assert encoder.calls == 5 and (store.hits, store.encoded, store.recomputed) == (2, 0, 0)
    assert torch.equal(again, first[[4, 0]])
    # entries are float16: what a cold and a warm store hand out is the same value
    assert torch.equal(first, encoder(inputs).half().float())
    assert "2 slices found, 0 encoded" in store.summary()


def test_other_weights_or_layout_never_share_entries(tmp_path, inputs):
    encoder = CountingEncoder()
    EmbeddingStore(tmp_path, "a" * 64, "sam").embeddings(inputs, encoder)
    EmbeddingStore(tmp_path, "b" * 64, "sam").embeddings(inputs, encoder)
    EmbeddingStore(tmp_path, "a" * 64, "sam2").embeddings(inputs, encoder)
    assert encoder.calls == 15
    changed = inputs.clone()
    changed[0, 0, 0, 0] += 1e-6  # another preprocessing of the same slice is another entry
    EmbeddingStore(tmp_path, "a" * 64, "sam").embeddings(changed, encoder)
    assert encoder.calls == 16


@pytest.mark.parametrize("damage", ["garbage", "truncated", "values", "shape", "dtype"])
def test_a_damaged_entry_is_encoded_again_not_used(tmp_path, inputs, damage):
    encoder = CountingEncoder()
    store = EmbeddingStore(tmp_path, "a" * 64, "sam")
    expected = store.embeddings(inputs, encoder)
    path = store.path(tensor_digest(inputs[2].float()))
    entry = torch.load(path, weights_only=True)
    if damage == "garbage":
        path.write_bytes(b"not a torch file")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:50])
    elif damage == "values":  # bytes changed, digest not updated
        torch.save({"embedding": entry["embedding"] + 1, "sha256": entry["sha256"]}, path)
    elif damage == "shape":  # consistent digest, but not what this encoder makes
        wrong = torch.zeros(3, 2, 2, dtype=torch.float16)
        torch.save({"embedding": wrong, "sha256": tensor_digest(wrong)}, path)
    else:
        wrong = entry["embedding"].float()
        torch.save({"embedding": wrong, "sha256": tensor_digest(wrong)}, path)
    store = EmbeddingStore(tmp_path, "a" * 64, "sam")
    assert torch.equal(store.embeddings(inputs, encoder), expected)
    assert encoder.calls == 6 and (store.hits, store.encoded, store.recomputed) == (4, 1, 1)
    assert "1 damaged entries encoded again" in store.summary()
    repaired = torch.load(path, weights_only=True)  # rewritten whole
    assert torch.equal(repaired["embedding"], expected[2].half()) and repaired["sha256"] == tensor_digest(
        repaired["embedding"])


def test_weights_digest_sees_every_value():
    module = torch.nn.Linear(3, 2)
    before = weights_digest(module)
    assert weights_digest(module) == before
    with torch.no_grad():
        module.bias[1] += 1e-7
    assert weights_digest(module) != before
    assert weights_digest(module, torch.zeros(2)) != weights_digest(module)


@pytest.mark.slow
def test_a_second_method_on_the_same_backbone_encodes_no_slice(tiny_dataset):
    """samft after calsam (or the other way round) on the same tiny SAM: every slice comes from the store."""
    tiny_dataset.activate()
    short = ["--epochs", 1, "--iters-per-epoch", 1, "--device", "cpu", "--disable-tta", "--sam-model", "tiny"]
    run_cli(train_cli.main, [511, "3d_fullres", "sam_cmp", 2, *short])
    run_cli(train_cli.main, [511, "3d_fullres", "sam_fip", 2, *short, "--seed", 3])
    folder = (tiny_dataset.data_dir / "results" / "Dataset511_Tiny" / "nnUNetTrainerSAMFIP__CalibPlans__3d_fullres"
              / "loco_fold2_seed3")
    log = "".join(p.read_text() for p in folder.glob("training_log_*.txt"))
    found, encoded = map(int, re.search(r"embedding store \S+: (\d+) slices found, (\d+) encoded", log).groups())
    assert found > 0 and encoded == 0
    stores = list((tiny_dataset.preprocessed / EMBEDDINGS_FOLDER).glob("sam-*"))
    assert len(stores) == 1 and len(list(stores[0].glob("*/*.pt"))) >= found
