"""Random degradations drawn for every patch (resize.py, train.py --degradation real), evaluation on
worsened inputs (evaluate.py --jpeg/--noise) and the shipped checkpoint for real photos (--real)."""
import signal

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import infer
import resize
import train
from conftest import TINY_RUN, make_images, run_main, run_train_stopped_at_step, smooth_image
from dataset import EpochSampler, PatchLoader, TrainDataset, device_batch, eval_pairs
from machinery.checkpoint import SHIPPED_REAL, checkpoint_for, load_checkpoint, load_model, shipped_checkpoint
from metrics import psnr
from resize import pil_bicubic


def test_a_real_draw_is_the_same_for_the_same_seed_and_differs_with_it():
    hr = smooth_image(np.random.default_rng(0), 128, 128)
    a, b = (resize.real(hr, 4, np.random.default_rng((0, 0, 7))) for _ in range(2))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    others = [resize.real(hr, 4, np.random.default_rng((0, 0, i))) for i in range(8)]
    assert len({o.tobytes() for o in others}) == 8
    clean = pil_bicubic(hr, 4).astype(int)
    assert all(np.abs(o.astype(int) - clean).mean() > 0.5 for o in others)  # each one degraded


def test_each_kernel_family_is_normalised_and_the_blur_keeps_a_flat_image_flat():
    rng = np.random.default_rng(1)
    kernels = [resize.blur_kernel(rng, resize.REAL["blur_sigma"]) for _ in range(40)]
    assert all(k.shape[0] % 2 == 1 and k.shape[0] == k.shape[1] and abs(k.sum() - 1) < 1e-9 for k in kernels)
    assert len({k.shape for k in kernels}) > 1
    flat = np.full((40, 50, 3), 173, np.uint8)
    assert np.array_equal(resize.blur(flat, kernels[0]), flat)
    widest = max(kernels, key=len)
    assert np.array_equal(resize.blur(flat[:2, :3], widest), flat[:2, :3])  # the kernel wider than the image
    assert any(not np.allclose(k, k.T) for k in kernels)  # anisotropic ones among them


def test_the_fft_blur_equals_a_direct_convolution_with_mirrored_edges():
    img = smooth_image(np.random.default_rng(2), 30, 41)
    kernel = resize.blur_kernel(np.random.default_rng(3), (1.0, 2.0))
    k = kernel.shape[0] // 2
    padded = np.pad(img.astype(np.float64), ((k, k), (k, k), (0, 0)), mode="symmetric")
    direct = np.zeros(img.shape)
    for dy in range(kernel.shape[0]):
        for dx in range(kernel.shape[1]):  # the kernel is point-symmetric: correlation = convolution
            direct += kernel[dy, dx] * padded[dy:dy + img.shape[0], dx:dx + img.shape[1]]
    assert np.abs(resize.blur(img, kernel).astype(int) - np.rint(direct)).max() <= 1


def real_set(tmp_path, seed=0):
    return TrainDataset(make_images(tmp_path / "images"), scale=4, patch_size=32, patches_per_image=6, seed=seed,
                        degradation="real", cache_dir=None, quiet=True)


def test_real_patches_are_drawn_per_patch_and_epoch_and_reproducible_by_seed(tmp_path):
    data = real_set(tmp_path)
    lr, hr, flips = data.batch(0, range(len(data)))
    again, _, _ = real_set(tmp_path).batch(0, range(len(data)))
    assert torch.equal(lr, again)
    assert len({bytes(p.numpy()) for p in lr}) == len(data)
    next_epoch, _, _ = data.batch(1, range(len(data)))
    assert not torch.equal(lr, next_epoch)
    other_seed, _, _ = real_set(tmp_path, seed=1).batch(0, range(len(data)))
    assert not torch.equal(lr, other_seed)
    one, _, _ = data.batch(0, [5])  # a sample is the same alone as in a batch: threads may cut it anywhere
    assert torch.equal(one[0], lr[5])
    clean = TrainDataset(tmp_path / "images", scale=4, patch_size=32, patches_per_image=6, cache_dir=None, quiet=True)
    clean_lr, clean_hr, _ = clean.batch(0, range(len(data)))
    assert torch.equal(hr, clean_hr) and not torch.equal(lr, clean_lr)  # the same crops, other LR


def test_a_loader_of_real_patches_gives_the_same_whole_batches_with_any_thread_count(tmp_path):
    data = real_set(tmp_path)
    threaded = list(PatchLoader(data, EpochSampler(data, seed=0), batch_size=4, num_workers=2))
    inline = list(PatchLoader(data, EpochSampler(data, seed=0), batch_size=4, num_workers=0))
    assert len(threaded) == len(inline) == len(data) // 4
    for (lr8, hr8, flips), (lr8_0, hr8_0, flips_0) in zip(threaded, inline):
        assert lr8.shape == (4, 8, 8, 3) and hr8.shape == (4, 32, 32, 3)
        assert torch.equal(lr8, lr8_0) and torch.equal(hr8, hr8_0) and torch.equal(flips, flips_0)
        lr, hr = device_batch(lr8, hr8, flips, torch.device("cpu"))
        assert lr.shape == (4, 3, 8, 8) and hr.shape == (4, 3, 32, 32)


def test_worsen_is_seeded_and_adds_the_noise_and_jpeg_asked_for():
    lr = smooth_image(np.random.default_rng(4), 64, 64)
    assert np.array_equal(resize.worsen(lr), lr)
    noisy = resize.worsen(lr, noise_sigma=5, seed=3)
    assert np.array_equal(noisy, resize.worsen(lr, noise_sigma=5, seed=3))
    assert not np.array_equal(noisy, resize.worsen(lr, noise_sigma=5, seed=4))
    assert 4 < np.std(noisy.astype(float) - lr) < 6
    q75 = resize.worsen(lr, jpeg_quality=75)
    assert 20 < psnr(q75, lr) < 60 and psnr(resize.worsen(lr, jpeg_quality=95), lr) > psnr(q75, lr)


def test_eval_pairs_worsen_each_lr_image_the_same_way_every_time(image_dir):
    paths = sorted(image_dir.iterdir())
    clean = list(eval_pairs(paths, 4))
    worse = list(eval_pairs(paths, 4, jpeg_quality=50, noise_sigma=3))
    assert [p[0] for p in worse] == [p[0] for p in clean]
    for (_, hr, lr), (_, hr2, lr2), (_, _, lr3) in zip(clean, worse, eval_pairs(paths, 4, jpeg_quality=50,
                                                                                 noise_sigma=3)):
        assert np.array_equal(hr, hr2) and np.array_equal(lr2, lr3) and not np.array_equal(lr, lr2)


def test_evaluate_scores_worsened_inputs_and_says_so(tiny_checkpoint, image_dir):
    flags = ["--checkpoint", tiny_checkpoint, "--data_dir", image_dir, "--precision", "fp32"]
    code, clean, err = run_main(evaluate, *flags)
    assert code == 0, err
    code, out, err = run_main(evaluate, *flags, "--jpeg", "30", "--noise", "8")
    assert code == 0, err
    assert "with Gaussian noise sigma 8 (seeded by file name) saved as JPEG q30" in out
    bicubic = [line for line in (clean, out) for line in line.splitlines() if line.startswith("mean of")]
    assert bicubic[0] != bicubic[1]
    for bad, why in (("--jpeg", "0"), ("--jpeg", "101"), ("--noise", "-1"), ("--noise", "nan")):
        code, _, err = run_main(evaluate, *flags, bad, why)
        assert code == 2 and bad in err and "Traceback" not in err
    code, _, err = run_main(evaluate, *flags, "--paper", "--jpeg", "75")
    assert code == 1 and "leave out --jpeg and --noise" in err


@pytest.mark.slow
def test_a_resumed_run_under_the_real_degradation_equals_the_uninterrupted_one(tmp_path, monkeypatch):
    images = make_images(tmp_path / "images")

    def flags(name):
        return ["--train_dir", images, "--val_dir", images, "--checkpoint_dir", tmp_path / "runs", "--run_name", name,
                *TINY_RUN, "--data_cache", "none", "--num_epochs", "2", "--degradation", "real"]
    code, out, err = run_main(train, *flags("whole"))
    assert code == 0, err
    assert "degradation real: drawn anew for every patch" in out and "JPEG q75" in out
    code, _, err = run_train_stopped_at_step(monkeypatch, 5, *flags("stopped"))  # epoch 2 of 3-step epochs
    assert code == 128 + signal.SIGINT, err
    code, _, err = run_main(train, "--resume", tmp_path / "runs" / "stopped" / "last.pt")
    assert code == 0, err
    resumed = load_checkpoint(tmp_path / "runs" / "stopped" / "last.pt")
    whole = load_checkpoint(tmp_path / "runs" / "whole" / "last.pt")
    assert resumed["degradation"] == "real"
    for name, tensor in whole["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name  # bit for bit on a CPU


def test_real_picks_the_shipped_real_checkpoint_and_not_beside_checkpoint(tiny_checkpoint, image_dir, tmp_path):
    assert checkpoint_for(None, None, real=True) == shipped_checkpoint(4, real=True)
    assert shipped_checkpoint(4, real=True).name == "resshuffle_real_x4.safetensors"
    code, _, err = run_main(infer, image_dir / "img0.png", "-o", tmp_path / "out.png", "--real",
                            "--checkpoint", tiny_checkpoint)
    assert code == 1 and "--real picks a shipped checkpoint" in err and not (tmp_path / "out.png").exists()
    code, _, err = run_main(evaluate, "--real", "--checkpoint", tiny_checkpoint, "--data_dir", image_dir)
    assert code == 1 and "--real picks a shipped checkpoint" in err
    code, _, err = run_main(evaluate, "--real", "--scale", "2", "--data_dir", image_dir)
    assert code == 1 and "no real-input resshuffle x2 checkpoint is shipped" in err and "--degradation real" in err


@pytest.mark.parametrize("scale", SHIPPED_REAL["resshuffle"])
def test_the_shipped_real_checkpoint_beats_bicubic_on_jpeg_photos_it_never_saw(scale):
    """On average over the three scikit-image photos that neither trained nor picked it (chelsea,
    rocket, hubble_deep_field), downscaled and saved as JPEG q75: +0.21 dB when it shipped (-0.08
    on chelsea, a soft photo; docs/real-inputs.md)."""
    from skimage import data
    model, info = load_model(shipped_checkpoint(scale, real=True), torch.device("cpu"))
    assert info["degradation"] == "real"
    gains = []
    for photo in (data.chelsea(), data.rocket(), data.hubble_deep_field()):
        hr = photo[:photo.shape[0] // scale * scale, :photo.shape[1] // scale * scale]
        lr = resize.worsen(pil_bicubic(hr, scale), jpeg_quality=75)
        with torch.no_grad():
            sr = model(torch.from_numpy(lr.copy()).permute(2, 0, 1)[None].float() / 255).clamp(0, 1)
        sr8 = (sr[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        bicubic = np.asarray(Image.fromarray(lr).resize(hr.shape[1::-1], Image.BICUBIC))
        gains.append(psnr(sr8, hr, crop_border=scale) - psnr(bicubic, hr, crop_border=scale))
    assert np.mean(gains) > 0.1, gains


def test_torch_hub_loads_the_real_weights_by_a_keyword_and_says_where_none_ship():
    hub = pytest.importorskip("hubconf")
    net = hub.resshuffle(real=True)
    expected, _ = load_model(shipped_checkpoint(4, real=True), torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), expected.state_dict().values()))
    with pytest.raises(ValueError, match="real-input pretrained weights ship for resshuffle x4, not resshuffle x2"):
        hub.resshuffle(scale=2, real=True)
    with pytest.raises(ValueError, match="goes with pretrained=True"):
        hub.resshuffle(real=True, pretrained=False)
