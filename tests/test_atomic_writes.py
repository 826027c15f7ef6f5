"""Outputs written whole or not at all, with the permissions a plain open() gives."""
import os

import numpy as np
import pytest
from PIL import Image

from machinery.files import atomic_path
from machinery.images import save_image
from utils import UserError


def test_save_image_writes_whole_files_with_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        save_image(np.zeros((4, 5, 3), np.uint8), tmp_path / "a.png")
    finally:
        os.umask(old)
    assert Image.open(tmp_path / "a.png").size == (5, 4)
    assert (tmp_path / "a.png").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "b.png") as tmp:
            open(tmp, "wb").write(b"half")
            raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match="does not exist"):
        save_image(np.zeros((4, 5, 3), np.uint8), tmp_path / "missing" / "c.png")
