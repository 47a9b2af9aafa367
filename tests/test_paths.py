import os

from nnunetv2 import paths as nnunet_paths

from calibnet.paths import setup_data_roots


def test_calibnet_data_sets_all_three_nnunet_roots(tmp_path):
    os.environ["CALIBNET_DATA"] = str(tmp_path / "d")
    roots = setup_data_roots()
    assert roots.raw == tmp_path / "d" / "raw"
    assert roots.preprocessed == tmp_path / "d" / "preprocessed"
    assert roots.results == tmp_path / "d" / "results"
    assert nnunet_paths.nnUNet_raw.is_set()
    assert os.fspath(nnunet_paths.nnUNet_raw) == str(tmp_path / "d" / "raw")
    assert os.fspath(nnunet_paths.nnUNet_results) == str(tmp_path / "d" / "results")
    assert roots.raw.is_dir() and roots.results.is_dir()
    assert set(roots.origin.values()) == {"CALIBNET_DATA"}


def test_existing_nnunet_roots_win(tmp_path):
    os.environ["CALIBNET_DATA"] = str(tmp_path / "d")
    os.environ["nnUNet_raw"] = str(tmp_path / "mine")
    roots = setup_data_roots()
    assert roots.raw == tmp_path / "mine"
    assert os.fspath(nnunet_paths.nnUNet_raw) == str(tmp_path / "mine")
    assert roots.origin["raw"] == "nnUNet_raw"
    assert roots.preprocessed == tmp_path / "d" / "preprocessed"
    assert "from nnUNet_raw" in roots.describe()


def test_default_is_calibnet_data_in_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    roots = setup_data_roots(create=False)
    assert roots.raw == tmp_path / "calibnet_data" / "raw"
    assert not roots.raw.exists()
