"""dataset.py: aligned patches under every flip, each file decoded once, patches by (seed, epoch), the loader."""
import numpy as np
import pytest
import torch
from PIL import Image

from dataset import EpochSampler, PatchLoader, TrainDataset, augment, eval_pairs
from machinery import images
from machinery.images import list_images, load_rgb
from utils import UserError


def noise_dir(tmp_path, sizes):
    """PNGs of random noise, so that every patch position is unique."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "hr"
    folder.mkdir()
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def sample(data, epoch, i):
    """Sample i of the epoch as training sees it: cut, then flipped; HWC numpy arrays."""
    lr, hr, flips = data.batch(epoch, [i])
    return tuple(augment(t.permute(0, 3, 1, 2), flips)[0].permute(1, 2, 0).numpy() for t in (lr, hr))


def d4(patch):
    """The 8 flips/rotations of a square patch."""
    out = []
    for k in range(4):
        r = np.rot90(patch, k)
        out += [r, r[:, ::-1]]
    return out


def test_samples_are_aligned_crops_of_the_image_and_its_bicubic_lr_under_all_eight_transforms(tmp_path):
    scale, p = 2, 8
    folder = noise_dir(tmp_path, [(41, 45)])
    data = TrainDataset(folder, scale=scale, patch_size=p, patches_per_image=200)
    img = load_rgb(folder / "0.png")[:40, :44]  # modcropped to a multiple of 2
    whole_lr = np.asarray(Image.fromarray(img).resize((22, 20), Image.BICUBIC))
    seen = set()
    for i in range(len(data)):
        lr, hr = sample(data, 0, i)
        assert hr.shape == (p, p, 3) and lr.shape == (p // scale, p // scale, 3)
        # Find the crop: with random noise, one transform and one position match.
        matches = [(k, y, x) for k, t in enumerate(d4(hr))
                   for y in range(img.shape[0] - p + 1) for x in range(img.shape[1] - p + 1)
                   if (img[y, x] == t[0, 0]).all() and np.array_equal(img[y:y + p, x:x + p], t)]
        assert len(matches) == 1, f"patch {i} is not a transformed crop of the image"
        k, y, x = matches[0]
        assert y % scale == 0 and x % scale == 0
        # The LR patch is the same crop of the whole image's bicubic LR, under the same transform.
        q = p // scale
        np.testing.assert_array_equal(d4(lr)[k], whole_lr[y // scale:y // scale + q, x // scale:x // scale + q])
        seen.add(k)
    assert seen == set(range(8))


def test_unreadable_and_small_images_are_skipped_and_listed_in_one_warning(tmp_path, capsys):
    folder = noise_dir(tmp_path, [(40, 40), (20, 60), (50, 50)])
    (folder / "3_empty.png").write_bytes(b"")
    (folder / "4_text.jpg").write_text("not an image")
    data = Image.open(folder / "2.png")
    data.save(folder / "5_cut.png")
    (folder / "5_cut.png").write_bytes((folder / "5_cut.png").read_bytes()[:200])
    data = TrainDataset(folder, scale=2, patch_size=32, patches_per_image=2)
    assert [p.name for p in data.paths] == ["0.png", "2.png"] and len(data.hr) == len(data.lr) == 2
    assert len(data) == 4
    warning = [line for line in capsys.readouterr().err.splitlines() if "warning:" in line]
    assert len(warning) == 1 and "skipping 4 of 6 images" in warning[0]
    for name in ["1.png (60x20, smaller than the 32px patch)", "3_empty.png (not a readable image",
                 "4_text.jpg (not a readable image", "5_cut.png (not a readable image"]:
        assert name in warning[0], name

    for p in folder.glob("[02].png"):
        p.unlink()
    with pytest.raises(UserError, match="none of its 4 images is readable and at least 32x32"):
        TrainDataset(folder, scale=2, patch_size=32)


@pytest.mark.parametrize("cache", [False, True], ids=["in memory", "cached"])
def test_each_file_is_decoded_once(tmp_path, monkeypatch, cache):
    calls = []
    real = images.load_rgb
    monkeypatch.setattr(images, "load_rgb", lambda p: calls.append(p) or real(p))
    data = TrainDataset(noise_dir(tmp_path, [(40, 40), (48, 40)]), scale=2, patch_size=16, patches_per_image=10,
                        cache_dir=tmp_path / "cache" if cache else None)
    for epoch in range(3):
        for i in range(len(data)):
            data.batch(epoch, [i])
    assert sorted(p.name for p in calls) == ["0.png", "1.png"]


def batches(data, num_workers, epoch):
    sampler = EpochSampler(data, seed=5)
    sampler.set_epoch(epoch)
    loader = PatchLoader(data, sampler, batch_size=4, num_workers=num_workers)
    return [torch.cat([lr.flatten(), hr.flatten(), flips.flatten()]) for lr, hr, flips in loader]


def test_patches_depend_on_seed_and_epoch_only(tmp_path):
    folder = noise_dir(tmp_path, [(40, 40), (48, 40)])
    data = TrainDataset(folder, scale=2, patch_size=16, patches_per_image=4, seed=5)
    again = TrainDataset(folder, scale=2, patch_size=16, patches_per_image=4, seed=5)
    one = batches(data, 0, epoch=2)
    assert len(one) == 2 and len(batches(again, 2, epoch=2)) == 2
    assert all(torch.equal(a, b) for a, b in zip(one, batches(again, 2, epoch=2)))  # workers change nothing
    assert not torch.equal(torch.cat(one), torch.cat(batches(data, 0, epoch=3)))
    other_seed = TrainDataset(folder, scale=2, patch_size=16, patches_per_image=4, seed=6)
    assert not torch.equal(torch.cat(one), torch.cat(batches(other_seed, 0, epoch=2)))


def test_the_loader_gives_whole_batches_from_the_resume_point_and_can_be_left_early(tmp_path):
    data = TrainDataset(noise_dir(tmp_path, [(40, 40), (48, 40)]), scale=2, patch_size=16, patches_per_image=7)
    sampler = EpochSampler(data, seed=1)
    sampler.set_epoch(3, start=5)  # 14 samples, 5 done: 9 left, 2 whole batches of 4
    order = list(sampler)
    for workers in (0, 1, 3):
        loader = PatchLoader(data, sampler, batch_size=4, num_workers=workers)
        got = list(loader)
        assert len(got) == len(loader) == 2
        for k, (lr, hr, flips) in enumerate(got):
            want = data.batch(3, order[4 * k:4 * k + 4])
            assert lr.shape == (4, 8, 8, 3) and hr.shape == (4, 16, 16, 3) and flips.shape == (4, 3)
            assert all(torch.equal(a, b) for a, b in zip((lr, hr, flips), want))
        it = iter(loader)
        next(it)
        it.close()  # a stop signal leaves the epoch early: the threads end, nothing hangs


def test_patch_size_must_be_a_multiple_of_the_scale(tmp_path):
    with pytest.raises(UserError, match="not a multiple"):
        TrainDataset(noise_dir(tmp_path, [(40, 40)]), scale=3, patch_size=16)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "I;16", "CMYK"])
def test_any_mode_loads_as_8bit_rgb(tmp_path, mode):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8))
    if mode == "I;16":
        gray16 = np.full((9, 7), 65535, np.uint16)
        gray16[0, 0] = 257 * 10
        img = Image.fromarray(gray16)
    else:
        img = rgb.convert(mode)
    path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    img.save(path)
    out = load_rgb(path)
    assert out.shape == (9, 7, 3) and out.dtype == np.uint8
    if mode == "I;16":  # scaled to 8 bits, not clipped
        assert out[0, 0].tolist() == [10, 10, 10] and out[1, 1].tolist() == [255, 255, 255]


def test_eval_pairs_modcrop_and_downsample(tmp_path):
    folder = noise_dir(tmp_path, [(50, 63)])
    [(name, hr, lr)] = list(eval_pairs(list_images(folder), scale=4))
    assert name == "0.png" and hr.shape == (48, 60, 3) and lr.shape == (12, 15, 3)
    np.testing.assert_array_equal(hr, load_rgb(folder / "0.png")[:48, :60])
    np.testing.assert_array_equal(lr, np.asarray(Image.fromarray(hr).resize((15, 12), Image.BICUBIC)))
