import os

import pytest

from calibnet.files import atomic_output_dir, atomic_write_text


def test_atomic_write_leaves_no_partial_file_on_error(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        from calibnet.files import atomic_path
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_write_has_ordinary_permissions(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "x")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~mask


def test_output_dir_appears_only_when_complete(tmp_path):
    final = tmp_path / "Dataset001_X"
    with pytest.raises(ValueError):
        with atomic_output_dir(final) as tmp:
            (tmp / "half.txt").write_text("x")
            raise ValueError
    assert list(tmp_path.iterdir()) == []
    with atomic_output_dir(final) as tmp:
        (tmp / "done.txt").write_text("x")
    assert (final / "done.txt").is_file() and len(list(tmp_path.iterdir())) == 1
    with pytest.raises(FileExistsError):
        with atomic_output_dir(final):
            pass
