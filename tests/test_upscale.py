"""Tiled inference: tensors in and out, tiles in their places."""
import numpy as np
import pytest
import torch

from machinery.upscale import image_to_tensor, tensor_to_image, upscale


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

    def untiled_bytes(self, height, width):
        return 0


def test_tiles_are_placed_where_they_belong():
    img = np.random.default_rng(1).integers(0, 256, (11, 17, 3), dtype=np.uint8)
    whole = upscale(Shift(), img)
    np.testing.assert_array_equal(upscale(Shift(), img, tile=4), whole)  # tile_pad: the receptive radius
    assert not np.array_equal(upscale(Shift(), img, tile=4, tile_pad=2), whole)


def test_upscaling_runs_without_tf32_or_cudnn_benchmark_and_restores_them(monkeypatch):
    """GPU PSNR must equal CPU PSNR: no TF32 convolutions, no per-shape algorithm choice while
    upscaling; training's settings come back after."""
    from machinery import upscale as upscale_module
    seen = []

    class Spy(torch.nn.Module):
        scale = 2

        def receptive_radius(self):
            return 0

        def reconstruct_radius(self):
            return 0

        def forward(self, x):
            seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
                         torch.backends.cudnn.benchmark))
            return torch.nn.functional.interpolate(x, scale_factor=2)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    spy = Spy()
    spy.register_parameter("p", torch.nn.Parameter(torch.zeros(1)))
    monkeypatch.setattr(upscale_module, "fits_in_memory", lambda *a: True)
    upscale_module.upscale(spy, np.zeros((8, 8, 3), np.uint8), tile=0)
    assert seen == [(False, False, False)]
    assert torch.backends.cudnn.benchmark and torch.backends.cudnn.allow_tf32


def test_torchrun_with_more_processes_than_gpus_is_one_line(monkeypatch):
    from machinery import distributed
    from utils import UserError
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match=r"more processes on this machine than it has GPUs \(1\): use "
                                        r"--nproc_per_node 1 or fewer"):
        distributed.setup("cuda")
