import os

import numpy as np
import pytest
import torch
from PIL import Image

from utils import UserError, atomic_path, image_to_tensor, save_image, tensor_to_image, upscale


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


def test_tensor_conversion_round_trips_and_rounds():
    img = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    t = image_to_tensor(img)
    assert t.shape == (1, 3, 6, 7) and t.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_array_equal(tensor_to_image(t), img)
    # 0.5/255 above a level rounds up, just below rounds down; out-of-range values clamp.
    levels = torch.tensor([10.6, 10.4, -3.0, 300.0]).view(1, 1, 1, 4).expand(1, 3, 1, 4) / 255
    assert tensor_to_image(levels)[0, :, 0].tolist() == [11, 10, 0, 255]


class Shift(torch.nn.Module):
    """A 'model' whose features copy the input 3 pixels to the left, upscaled x2 by nearest."""
    scale, num_features = 2, 3

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def features(self, x):
        return torch.nn.functional.pad(x, (3, 0))[..., :-3]

    def reconstruct(self, features, x):
        return torch.nn.functional.interpolate(features, scale_factor=2, mode="nearest") + self.weight

    def forward(self, x):
        return self.reconstruct(self.features(x), x)

    def reconstruct_radius(self):
        return 0

    def receptive_radius(self):
        return 3


def test_tiles_are_placed_where_they_belong():
    img = np.random.default_rng(1).integers(0, 256, (11, 17, 3), dtype=np.uint8)
    whole = upscale(Shift(), img)
    np.testing.assert_array_equal(upscale(Shift(), img, tile=4), whole)  # tile_pad: the receptive radius
    assert not np.array_equal(upscale(Shift(), img, tile=4, tile_pad=2), whole)
