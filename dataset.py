"""Training patches and evaluation pairs made from a folder of HR images.

    train = TrainDataset("data/DIV2K_train_HR", scale=4, patch_size=192, patches_per_image=20, seed=0)
    loader = DataLoader(train, batch_size=32, sampler=EpochSampler(train, seed=0), ...)
    for name, hr, lr in eval_pairs(list_images("data/DIV2K_valid_HR"), scale=4): ...

The LR image is always PIL's bicubic downsampling (utils.downsample) of the whole HR image,
cropped to a multiple of the scale: in training, evaluation and inference alike.
"""
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from tqdm import tqdm

from utils import UserError, downsample, list_images, load_rgb, modcrop, warn


class TrainDataset(Dataset):
    """Random HR patches and the matching LR patches, with flips and 90-degree rotations.

    Each image is decoded once, cropped to a multiple of the scale and downsampled once with
    PIL bicubic; both are kept in memory as uint8 (DIV2K_train_HR: about 5.9 GB). A sample is
    then two aligned crops: the LR patch is the same bicubic LR that evaluation uses, cut from
    the whole image (as DIV2K's own LR files are), and costs no resize. An epoch has
    `patches_per_image` samples per image. Sample `(epoch, i)` is a pure function of
    (seed, epoch, i): the same patches whatever the worker count, and after a resume.

    Items are (lr, hr) uint8 tensors in HWC layout; a batch of them, permuted to NCHW, is
    already channels_last, so the training step needs no layout conversion.

    Args:
        hr_dir: folder of HR images. Unreadable images and images smaller than `patch_size` are
            skipped, all named in one warning before training starts.
        scale: downsampling factor; `patch_size` must be a multiple of it.
        patch_size: side of the HR patch (the LR patch is patch_size // scale).
        patches_per_image: samples drawn from each image per epoch.
        seed: base of every sample's random crop and augmentation.
    """

    def __init__(self, hr_dir: str | Path, scale: int = 4, patch_size: int = 192,
                 patches_per_image: int = 20, seed: int = 0, num_threads: int = min(8, os.cpu_count() or 1)):
        if patch_size % scale:
            raise UserError(f"patch size {patch_size} is not a multiple of the scale {scale}")
        paths = list_images(hr_dir)
        if not paths:
            raise UserError(f"{hr_dir}: no images found")
        # Decoding and resizing run in threads: PIL releases the GIL for both.
        with ThreadPoolExecutor(max(1, num_threads)) as pool:
            images = list(tqdm(pool.map(try_load_rgb, paths), total=len(paths), desc=f"decoding {Path(hr_dir).name}",
                               unit="img", leave=False))
            skipped = [f"{p.name} ({im})" for p, im in zip(paths, images) if isinstance(im, str)]
            skipped += [f"{p.name} ({im.shape[1]}x{im.shape[0]}, smaller than the {patch_size}px patch)"
                        for p, im in zip(paths, images) if not isinstance(im, str) and min(im.shape[:2]) < patch_size]
            if skipped:
                warn(f"{hr_dir}: skipping {len(skipped)} of {len(paths)} images: {'; '.join(skipped)}")
            keep = [i for i, im in enumerate(images) if not isinstance(im, str) and min(im.shape[:2]) >= patch_size]
            if not keep:
                raise UserError(f"{hr_dir}: none of its {len(paths)} images is readable and at least "
                                f"{patch_size}x{patch_size}")
            self.paths = [paths[i] for i in keep]
            # torch wants writable memory; PIL's arrays are read-only (np.require copies those).
            hrs = [np.require(modcrop(images[i], scale), requirements=["W"]) for i in keep]
            del images
            lrs = list(pool.map(lambda hr: np.require(downsample(hr, scale), requirements=["W"]), hrs))
        self.hr, self.lr = [torch.from_numpy(hr) for hr in hrs], [torch.from_numpy(lr) for lr in lrs]
        self.scale, self.lr_patch = scale, patch_size // scale
        self.patches_per_image, self.seed = patches_per_image, seed
        self._draws_epoch, self._draws = None, None

    def __len__(self) -> int:
        return len(self.hr) * self.patches_per_image

    def draws(self, epoch: int) -> np.ndarray:
        """Every sample's (y, x, hflip, vflip, transpose) for one epoch, LR coordinates; cached."""
        if self._draws_epoch != epoch:
            rng = np.random.default_rng((self.seed, epoch))
            room = np.array([(lr.shape[0] - self.lr_patch + 1, lr.shape[1] - self.lr_patch + 1) for lr in self.lr])
            room = np.repeat(room, self.patches_per_image, axis=0)
            yx = (rng.random((len(self), 2)) * room).astype(np.int64)
            flags = rng.random((len(self), 3)) < 0.5
            self._draws, self._draws_epoch = np.concatenate([yx, flags], axis=1), epoch
        return self._draws

    def __getitem__(self, index):
        epoch, i = index if isinstance(index, tuple) else (0, index)
        y, x, hflip, vflip, transpose = self.draws(epoch)[i].tolist()
        k, p, s = i // self.patches_per_image, self.lr_patch, self.scale
        lr = self.lr[k][y:y + p, x:x + p]
        hr = self.hr[k][y * s:(y + p) * s, x * s:(x + p) * s]
        dims = [1] * hflip + [0] * vflip
        if dims:
            lr, hr = lr.flip(dims), hr.flip(dims)
        if transpose:
            lr, hr = lr.transpose(0, 1), hr.transpose(0, 1)
        return lr.contiguous(), hr.contiguous()


class EpochSampler(Sampler):
    """A fresh permutation of the dataset each epoch, yielding (epoch, index) pairs.

    The epoch travels with the index, so workers (persistent ones too) draw the right
    patches without being told the epoch. Call `set_epoch` before each epoch; its `start`
    skips that many samples of the epoch's order (a run resumed mid-epoch). With
    `world_size` processes (torchrun), process `rank` takes every world_size-th sample of
    the same order, so the processes see different patches and the same number of them.
    """

    def __init__(self, dataset: Dataset, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.length, self.seed, self.epoch, self.start = len(dataset), seed, 0, 0
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return (self.length - self.start) // self.world_size

    def __iter__(self):
        order = np.random.default_rng((self.seed, self.epoch, 0x5A)).permutation(self.length)
        mine = order[self.start + self.rank::self.world_size][:len(self)]
        return iter([(self.epoch, int(i)) for i in mine])


def try_load_rgb(path: Path) -> np.ndarray | str:
    """The decoded image, or why it can't be read (a string), so that all failures can be listed."""
    try:
        return load_rgb(path)
    except UserError as e:
        return str(e).removeprefix(f"{path}: ")


def eval_pairs(paths: list[Path], scale: int):
    """Yield (name, hr, lr) for whole images: HR modcropped to the scale, LR its bicubic downsampling."""
    for path in paths:
        hr = modcrop(load_rgb(path), scale)
        if min(hr.shape[:2]) < scale:
            raise UserError(f"{path}: {hr.shape[1]}x{hr.shape[0]} is too small for x{scale}")
        yield path.name, hr, downsample(hr, scale)

