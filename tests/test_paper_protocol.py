"""Evaluating as papers do: MATLAB bicubic, benchmark sets, --paper, self-ensemble, EMA weights."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import evaluate
import infer
import train
from conftest import TINY_RUN, make_images, run_main, smooth_image
from machinery.checkpoint import load_checkpoint
from machinery.upscale import upscale
from resize import downsample, imresize_matlab
from training import ema_decay_at, update_ema


def matlab_reference(img: np.ndarray, scale: float) -> np.ndarray:
    """MATLAB's imresize(img, scale, 'bicubic') written out pixel by pixel, from its documented
    steps (for shrinking): kernel stretched by 1/scale, weights normalised, mirrored edges."""
    def keys(x):
        x = abs(x)
        return 1.5 * x ** 3 - 2.5 * x ** 2 + 1 if x <= 1 else (-0.5 * x ** 3 + 2.5 * x ** 2 - 4 * x + 2 if x < 2 else 0)

    def resize_axis(a, n_out):  # a: (n_in, ...) float; resizes axis 0
        n_in = a.shape[0]
        out = np.zeros((n_out,) + a.shape[1:])
        for x in range(1, n_out + 1):
            u = x / scale + 0.5 * (1 - 1 / scale)
            total, acc = 0.0, 0.0
            for k in range(math.floor(u - 2 / scale), math.floor(u + 2 / scale) + 2):
                w = scale * keys(scale * (u - k))
                j = k
                while j < 1 or j > n_in:  # mirror: ..., 2, 1, [1, 2, ..., n], n, n-1, ...
                    j = 1 - j if j < 1 else 2 * n_in + 1 - j
                total += w
                acc = acc + w * a[j - 1]
            out[x - 1] = acc / total
        return out

    h, w = img.shape[:2]
    rows = resize_axis(img.astype(np.float64), math.ceil(h * scale))
    both = resize_axis(rows.transpose(1, 0, 2), math.ceil(w * scale)).transpose(1, 0, 2)
    return np.floor(np.clip(both, 0, 255) + 0.5).astype(np.uint8)


@pytest.mark.parametrize("scale", [1 / 2, 1 / 3, 1 / 4])
def test_matlab_bicubic_matches_a_pixel_by_pixel_reference(scale):
    img = np.random.default_rng(0).integers(0, 256, (11, 13, 3), dtype=np.uint8)
    np.testing.assert_array_equal(imresize_matlab(img, scale), matlab_reference(img, scale))


def test_matlab_bicubic_reproduces_a_linear_ramp_away_from_the_edges():
    # Keys' kernel reproduces linear functions: output pixel x samples the input at
    # u = x / s + (1 - 1 / s) / 2 (1-based), so a ramp 10 * (k - 1) gives 10 * (u - 1).
    ramp = np.tile((np.arange(32) * 6).astype(np.uint8), (4, 1))[..., None].repeat(3, axis=2)
    out = imresize_matlab(ramp, 1 / 4)[0, :, 0].astype(float)
    u = np.arange(1, 9) * 4 - 1.5
    np.testing.assert_allclose(out[2:6], np.floor(6 * (u[2:6] - 1) + 0.5))


def test_matlab_and_pil_agree_on_shapes_and_nearly_on_values():
    img = smooth_image(np.random.default_rng(1), 48, 64)
    for scale in (2, 3, 4):
        hr = img[:48 - 48 % scale, :64 - 64 % scale]
        matlab, pil = downsample(hr, scale, "matlab"), downsample(hr, scale, "pil")
        assert matlab.shape == pil.shape == (48 // scale, 64 // scale, 3)
        inner = np.abs(matlab[2:-2, 2:-2].astype(int) - pil[2:-2, 2:-2].astype(int))
        assert inner.mean() < 1.5 and not np.array_equal(matlab, pil)  # both antialiased cubic, a = -0.5


class Bicubic(torch.nn.Module):
    """An x2 'network' that is bicubic upsampling: equivariant to flips and 90-degree rotations."""
    scale, num_features = 2, 3

    def __init__(self, shift: int = 0):
        super().__init__()
        self.weight, self.shift = torch.nn.Parameter(torch.zeros(1)), shift

    def features(self, x):
        return torch.roll(x, self.shift, dims=3) if self.shift else x  # a shift breaks the symmetry

    def reconstruct(self, features, x):
        return F.interpolate(features, scale_factor=2, mode="bicubic", align_corners=False) + self.weight

    def forward(self, x):
        return self.reconstruct(self.features(x), x)

    def reconstruct_radius(self):
        return 2

    def receptive_radius(self):
        return 2 + self.shift

    def untiled_bytes(self, height, width):
        return 0


def test_self_ensemble_keeps_an_equivariant_models_output_and_composes_with_tiles():
    img = smooth_image(np.random.default_rng(2), 13, 21)  # not square: rotations change the shape
    plain = upscale(Bicubic(), img, tile=0)
    ensemble = upscale(Bicubic(), img, tile=0, self_ensemble=True)
    assert plain.shape == ensemble.shape == (26, 42, 3)
    assert np.abs(plain.astype(int) - ensemble.astype(int)).max() <= 1
    tiled = upscale(Bicubic(), img, tile=5, self_ensemble=True)
    assert np.abs(tiled.astype(int) - ensemble.astype(int)).max() <= 1
    # The test can fail: a model that is not equivariant gives another output.
    shifted = Bicubic(shift=3)
    assert np.abs(upscale(shifted, img, tile=0, self_ensemble=True).astype(int)
                  - upscale(shifted, img, tile=0).astype(int)).max() > 10


def test_ema_moves_each_parameter_by_its_decay():
    model, ema = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(ema.weight)
    for step in (1, 2, 3):  # "training" sets the weight to the step number
        torch.nn.init.constant_(model.weight, step)
        update_ema(ema, model, decay=0.5)
    assert ema.weight.item() == pytest.approx(2.125)  # 0 -> 0.5 -> 1.25 -> 2.125


def test_ema_decay_warms_up_then_holds():
    # The first updates follow the weights closely (the initial weights fade fast).
    assert ema_decay_at(0.999, 0) == pytest.approx(0.1)
    assert ema_decay_at(0.999, 100) == pytest.approx(101 / 110)
    assert ema_decay_at(0.999, 100_000) == 0.999


def test_the_ema_decay_follows_the_step_count_across_epochs(image_dir, tmp_path, monkeypatch):
    decays, real = [], train.update_ema
    monkeypatch.setattr(train, "update_ema", lambda ema, model, decay: decays.append(decay) or real(ema, model, decay))
    code, _, err = run_main(train, "--train_dir", image_dir, "--val_dir", image_dir, "--checkpoint_dir", tmp_path,
                            *TINY_RUN, "--ema", "0.9", "--num_epochs", "2")
    assert code == 0, err
    assert decays == [ema_decay_at(0.9, t) for t in range(6)]  # 3 steps an epoch, t counted from 0


EMA_RUN = [*TINY_RUN, "--ema", "0.5", "--degradation", "matlab"]


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    """A 2-epoch --ema --degradation matlab run, and its export: (images, run folder, exported weights)."""
    root = tmp_path_factory.mktemp("ema")
    images = make_images(root / "images")
    code, _, err = run_main(train, "--train_dir", images, "--val_dir", images, "--checkpoint_dir", root,
                            "--run_name", "a", *EMA_RUN, "--num_epochs", "2")
    assert code == 0, err
    assert run_main(train, "--export", root / "a" / "best.pt", root / "export.pt")[0] == 0
    return images, root / "a", root / "export.pt"


def test_ema_and_degradation_are_saved_beside_the_weights(ema_run):
    _, run_dir, exported = ema_run
    a = load_checkpoint(run_dir / "last.pt")
    assert a["degradation"] == "matlab" and set(a["ema"]) == set(a["model"])
    assert not torch.equal(a["ema"]["tail.weight"], a["model"]["tail.weight"])
    assert {"model", "ema", "model_args", "degradation", "training"} == set(torch.load(exported, weights_only=True))


def test_a_resumed_ema_equals_the_never_stopped_one(ema_run, tmp_path):
    images, run_dir, _ = ema_run
    args = ["--train_dir", images, "--val_dir", images, "--checkpoint_dir", tmp_path, *EMA_RUN]
    assert run_main(train, *args, "--run_name", "b", "--num_epochs", "1")[0] == 0
    code, out, err = run_main(train, "--resume", tmp_path / "b" / "last.pt", "--num_epochs", "2")
    assert code == 0 and "val (EMA) PSNR/SSIM" in out, err
    a, b = load_checkpoint(run_dir / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    assert all(torch.equal(b["ema"][k], v) for k, v in a["ema"].items())


def test_infer_uses_the_ema_weights_unless_told_otherwise(ema_run, tmp_path):
    images, _, exported = ema_run
    outputs = []
    for flags in ([], ["--raw_weights"]):
        out_path = tmp_path / f"sr{len(flags)}.png"
        assert run_main(infer, images / "img0.png", "-o", out_path, "--checkpoint", exported, *flags)[0] == 0
        outputs.append(np.asarray(Image.open(out_path)))
    assert not np.array_equal(*outputs)


def test_evaluate_names_the_weights_and_warns_on_another_degradation(ema_run):
    images, _, exported = ema_run
    code, out, err = run_main(evaluate, "--data_dir", images, "--checkpoint", exported)
    assert code == 0 and "EMA weights, trained on matlab LR" in out
    assert "trained on matlab LR images and is evaluated on pil" in err
    code, out, err = run_main(evaluate, "--data_dir", images, "--checkpoint", exported, "--paper")
    assert code == 0 and "warning" not in err


def test_benchmark_sets_and_the_paper_protocol_in_one_table(tiny_checkpoint, tmp_path):
    rng = np.random.default_rng(4)
    for name, n in [("Set5", 2), ("Urban100", 3)]:
        (tmp_path / "bench" / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(smooth_image(rng, 40, 52)).save(tmp_path / "bench" / name / f"{i}.png")
    code, out, err = run_main(evaluate, "--benchmark", tmp_path / "bench", "--checkpoint", tiny_checkpoint, "--paper",
                              "--csv", tmp_path / "t.csv")
    assert code == 0, err
    assert "protocol (--paper): x4, LR = MATLAB imresize bicubic of the modcropped HR, Y (BT.601), crop border 4" in out
    lines = [line.split() for line in out.splitlines() if line.startswith(("Set5 ", "Urban100 "))]
    assert [(line[0], line[1]) for line in lines] == [("Set5", "2"), ("Urban100", "3")]
    # bicubic and the network, RGB and Y; then the network's parameters, training hours, MP/s
    assert all(len(line) == 9 and line[7] == "-" and float(line[8]) > 0 for line in lines)
    assert "mean of" not in out  # several sets: the table only, unless --per_image
    code, out, _ = run_main(evaluate, "--benchmark", tmp_path / "bench", "--checkpoint", tiny_checkpoint,
                            "--self_ensemble", "--per_image", "--max_images", "1")
    assert code == 0 and "self-ensemble x8" in out and out.count("mean of 1 image") == 2
    code, _, err = run_main(evaluate, "--benchmark", tmp_path, "--checkpoint", tiny_checkpoint)
    assert code == 1 and "holds none of Set5, Set14, B100, Urban100, DIV2K_valid_HR" in err
