"""Training patches and evaluation pairs made from a folder of HR images.

    train = TrainDataset("data/DIV2K_train_HR", scale=4, patch_size=192, patches_per_image=20, seed=0)
    loader = DataLoader(train, batch_size=32, sampler=EpochSampler(train, seed=0), ...)
    for name, hr, lr in eval_pairs(list_images("data/DIV2K_valid_HR"), scale=4): ...

The LR image is always PIL's bicubic downsampling (utils.downsample) of the HR image.
"""
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from tqdm import tqdm

from utils import UserError, downsample, list_images, load_rgb, modcrop


def decode_all(paths: list[Path], num_threads: int = 4, desc: str = "decoding") -> list[np.ndarray]:
    """Decode every file once, in threads (PIL releases the GIL while decoding)."""
    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        return list(tqdm(pool.map(load_rgb, paths), total=len(paths), desc=desc, unit="img", leave=False))


class TrainDataset(Dataset):
    """Random HR patches and their bicubic LR, with flips and 90-degree rotations.

    All images are decoded once and kept in memory as uint8 (DIV2K_train_HR: about 5.5 GB),
    so a sample costs a crop and one small resize, never a decode. An epoch has
    `patches_per_image` samples per image. Sample `(epoch, i)` is a pure function of
    (seed, epoch, i): the same patches whatever the worker count, and after a resume.

    Items are (lr, hr) uint8 tensors in HWC layout; a batch of them, permuted to NCHW, is
    already channels_last, so the training step needs no layout conversion.

    Args:
        hr_dir: folder of HR images. Images smaller than `patch_size` are skipped with a warning.
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
        images = decode_all(paths, num_threads, desc=f"decoding {Path(hr_dir).name}")
        small = [(p, im.shape) for p, im in zip(paths, images) if min(im.shape[:2]) < patch_size]
        if small:
            warnings.warn(f"skipping {len(small)} image(s) smaller than the {patch_size}x{patch_size} patch: "
                          + ", ".join(f"{p.name} ({s[1]}x{s[0]})" for p, s in small), stacklevel=2)
        keep = [i for i, im in enumerate(images) if min(im.shape[:2]) >= patch_size]
        if not keep:
            raise UserError(f"{hr_dir}: no image is at least {patch_size}x{patch_size}")
        self.paths = [paths[i] for i in keep]
        self.images = [images[i] for i in keep]
        self.scale, self.patch_size = scale, patch_size
        self.patches_per_image, self.seed = patches_per_image, seed

    def __len__(self) -> int:
        return len(self.images) * self.patches_per_image

    def __getitem__(self, index):
        epoch, i = index if isinstance(index, tuple) else (0, index)
        rng = np.random.default_rng((self.seed, epoch, i))
        img = self.images[i // self.patches_per_image]
        p = self.patch_size
        y = rng.integers(0, img.shape[0] - p + 1)
        x = rng.integers(0, img.shape[1] - p + 1)
        hr = img[y:y + p, x:x + p]
        hflip, vflip, rot90 = rng.random(3) < 0.5
        if hflip:
            hr = hr[:, ::-1]
        if vflip:
            hr = hr[::-1]
        if rot90:
            hr = hr.transpose(1, 0, 2)
        hr = np.require(hr, requirements=["C", "W"])  # torch wants writable memory
        lr = np.require(downsample(hr, self.scale), requirements=["W"])
        return torch.from_numpy(lr), torch.from_numpy(hr)


class EpochSampler(Sampler):
    """A fresh permutation of the dataset each epoch, yielding (epoch, index) pairs.

    The epoch travels with the index, so workers (persistent ones too) draw the right
    patches without being told the epoch. Call `set_epoch` before each epoch.
    """

    def __init__(self, dataset: Dataset, seed: int = 0):
        self.length, self.seed, self.epoch = len(dataset), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        order = np.random.default_rng((self.seed, self.epoch, 0x5A)).permutation(self.length)
        return iter([(self.epoch, int(i)) for i in order])


def eval_pairs(paths: list[Path], scale: int):
    """Yield (name, hr, lr) for whole images: HR modcropped to the scale, LR its bicubic downsampling."""
    for path in paths:
        hr = modcrop(load_rgb(path), scale)
        if min(hr.shape[:2]) < scale:
            raise UserError(f"{path}: {hr.shape[1]}x{hr.shape[0]} is too small for x{scale}")
        yield path.name, hr, downsample(hr, scale)
