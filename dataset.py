"""Training patches and evaluation pairs made from a folder of HR images.

    train = TrainDataset("data/DIV2K_train_HR", scale=4, patch_size=192, patches_per_image=20, seed=0)
    sampler = EpochSampler(train, seed=0)
    for lr, hr, flips in PatchLoader(train, sampler, batch_size=32, num_workers=4):
        lr, hr = device_batch(lr, hr, flips, device)   # flipped on the device, float in [0, 1]
    for name, hr, lr in eval_pairs(list_images("data/DIV2K_valid_HR"), scale=4): ...

The LR image is the bicubic downsampling (resize.downsample: PIL's by default, or MATLAB's
imresize) of the whole HR image, cropped to a multiple of the scale: in training and evaluation
alike. A random degradation (resize.RANDOM_DEGRADATIONS, --degradation real) instead makes each
training patch's LR from its HR patch with a fresh draw; evaluation then measures on fixed inputs
(`eval_pairs`' jpeg_quality and noise_sigma). To change the data a run sees, this is the file.
"""
import os
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from machinery.datacache import decoded_pairs, mapped_pairs
from machinery.images import image_size, list_images, load_rgb
from metrics import check_measurable
from resize import RANDOM_DEGRADATIONS, REAL_VALIDATION, downsample, modcrop, worsen
from utils import UserError, plural, shown, warn


class TrainDataset:
    """Random aligned HR/LR patch pairs, with flips and 90-degree rotations.

    Each image is decoded once, cropped to a multiple of the scale and downsampled once with
    PIL bicubic; both are kept as uint8 (3 bytes a pixel of each): in `cache_dir`, as one
    file that every process maps (machinery/datacache.py), or with None in this process's memory. A sample is
    then two aligned crops: the LR patch is the same bicubic LR that evaluation uses, cut from
    the whole image (as DIV2K's own LR files are), and costs no resize. An epoch has
    `patches_per_image` samples per image. Sample `(epoch, i)` is a pure function of
    (seed, epoch, i): the same patches whatever the worker count, and after a resume.

    `batch` cuts samples as they lie, a row copy each; `augment` then flips and transposes the
    whole batch on the training device (`device_batch`). Cutting is row copies, cheap on the CPU;
    flipping or transposing 3-byte pixels there costs many times a plain cut, and on the device
    it is one batched select.

    Args:
        hr_dir: folder of HR images. Unreadable images and images smaller than `patch_size` are
            skipped, all named in one warning before training starts.
        scale: downsampling factor; `patch_size` must be a multiple of it.
        patch_size: side of the HR patch (the LR patch is patch_size // scale).
        patches_per_image: samples drawn from each image per epoch.
        seed: base of every sample's random crop and augmentation.
        degradation: how the LR image is made, "pil" or "matlab" (resize.downsample), or a random
            one (resize.RANDOM_DEGRADATIONS) drawn for each sample from its HR patch, seeded by
            (seed, epoch, i); the cache then holds the images as for "pil".
        cache_dir: the folder of decoded caches (built there where missing), or None: decode
            into memory. The patches are the same, bit for bit.
        quiet: no progress bar and no warning (torchrun processes other than rank 0).
    """

    def __init__(self, hr_dir: str | Path, scale: int = 4, patch_size: int = 192, patches_per_image: int = 20,
                 seed: int = 0, degradation: str = "pil", cache_dir: str | Path | None = None,
                 num_threads: int = min(8, os.cpu_count() or 1), quiet: bool = False):
        if patch_size % scale:
            raise UserError(f"patch size {patch_size} is not a multiple of the scale {scale}")
        self.random = RANDOM_DEGRADATIONS.get(degradation)
        degradation = "pil" if self.random else degradation  # the HR images are cached as for "pil"
        paths = list_images(hr_dir)
        if not paths:
            raise UserError(f"{shown(hr_dir)}: no images found")
        if cache_dir is None:
            pairs = list(tqdm(decoded_pairs(paths, scale, degradation, num_threads), total=len(paths),
                              desc=f"decoding {shown(Path(hr_dir).name)}", unit="img", leave=False, disable=quiet))
        else:
            pairs = mapped_pairs(paths, hr_dir=Path(hr_dir), scale=scale, degradation=degradation,
                                 cache_dir=cache_dir, num_threads=num_threads, quiet=quiet)
        skipped = [f"{shown(p.name)} ({pair})" for p, pair in zip(paths, pairs) if isinstance(pair, str)]
        skipped += [f"{shown(p.name)} ({pair[2][0]}x{pair[2][1]}, smaller than the {patch_size}px patch)"
                    for p, pair in zip(paths, pairs)
                    if not isinstance(pair, str) and min(pair[0].shape[:2]) < patch_size]
        if skipped and not quiet:
            warn(f"{shown(hr_dir)}: skipping {len(skipped)} of {len(paths)} images: {'; '.join(skipped)}")
        keep = [i for i, pair in enumerate(pairs) if not isinstance(pair, str) and min(pair[0].shape[:2]) >= patch_size]
        if not keep:
            raise UserError(f"{shown(hr_dir)}: none of its {plural(len(paths), 'image')} is readable and at least "
                            f"{patch_size}x{patch_size}")
        self.paths = [paths[i] for i in keep]
        self.hr, self.lr = [pairs[i][0] for i in keep], [pairs[i][1] for i in keep]
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

    def batch(self, epoch: int, indices, pin_memory: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Samples `indices` of `epoch`, not yet augmented: (lr, hr, flips).

        lr and hr are uint8 NHWC (N, p, p, 3) and (N, p * scale, p * scale, 3): permuted to NCHW,
        they are channels_last already, so the training step needs no layout conversion. flips
        is bool (N, 3), each sample's (hflip, vflip, transpose) for `augment`. With
        `pin_memory`, all three are made in page-locked memory (CUDA), lr and hr cut straight into it.
        """
        indices = np.asarray(indices)
        draws = self.draws(epoch)[indices]
        p, s = self.lr_patch, self.scale
        lr = torch.empty((len(draws), p, p, 3), dtype=torch.uint8, pin_memory=pin_memory)
        hr = torch.empty((len(draws), p * s, p * s, 3), dtype=torch.uint8, pin_memory=pin_memory)
        lr_np, hr_np = lr.numpy(), hr.numpy()  # numpy copies run without the GIL and on one core
        for j, (i, y, x) in enumerate(zip(indices.tolist(), *draws[:, :2].T.tolist())):
            k = i // self.patches_per_image
            hr_np[j] = self.hr[k][y * s:(y + p) * s, x * s:(x + p) * s]
            if self.random:
                lr_np[j] = self.random(hr_np[j], s, np.random.default_rng((self.seed, epoch, i, 0xDE6)))
            else:
                lr_np[j] = self.lr[k][y:y + p, x:x + p]
        flips = torch.empty((len(draws), 3), dtype=torch.bool, pin_memory=pin_memory)  # pinned: non_blocking stays so
        flips.numpy()[:] = draws[:, 2:]
        return lr, hr, flips


def augment(x: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Flip each sample of an NCHW batch of square patches as its row of `flips` says.

    Left-right, then top-bottom, then transposed, each where its column is True: with the
    three, each of the 8 flips and 90-degree rotations is equally likely. Keeps x's memory format.
    """
    f = flips.to(x.device, non_blocking=True).view(-1, 3, 1, 1, 1)
    x = torch.where(f[:, 0], x.flip(3), x)
    x = torch.where(f[:, 1], x.flip(2), x)
    x = torch.where(f[:, 2], x.transpose(2, 3), x)
    return x.contiguous(memory_format=torch.channels_last)


def device_batch(lr: torch.Tensor, hr: torch.Tensor, flips: torch.Tensor,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader batch as the network takes it: on `device`, flipped (`augment`), float in [0, 1].

    Permuted to NCHW, the NHWC uint8 batch is channels_last already: no layout conversion. The
    flips run on the uint8 batch, on the device.
    """
    flips = flips.to(device, non_blocking=True)  # once, for both
    lr = augment(lr.to(device, non_blocking=True).permute(0, 3, 1, 2), flips).float().div_(255)
    hr = augment(hr.to(device, non_blocking=True).permute(0, 3, 1, 2), flips).float().div_(255)
    return lr, hr


class EpochSampler:
    """A fresh permutation of the dataset's indices each epoch.

    Call `set_epoch` before each epoch; its `start` skips that many samples of the epoch's
    order (a run resumed mid-epoch). With `world_size` processes (torchrun), process `rank`
    takes every world_size-th sample of the same order, so the processes see different
    patches and the same number of them.
    """

    def __init__(self, dataset, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.length, self.seed, self.epoch, self.start = len(dataset), seed, 0, 0
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return (self.length - self.start) // self.world_size

    def __iter__(self):
        order = np.random.default_rng((self.seed, self.epoch, 0x5A)).permutation(self.length)
        return iter(order[self.start + self.rank::self.world_size][:len(self)].tolist())


class PatchLoader:
    """The sampler's current epoch in whole batches of (lr, hr, flips), cut by threads ahead of use.

    `num_workers` threads each keep two batches ready (0: each batch is cut when asked for).
    Threads, not worker processes: the images are already decoded in this process, a batch is
    row copies that run without the GIL, and nothing is pickled or sent through shared memory
    (which alone caps a DataLoader worker process well below a thread; docs/speed.md). Under a
    random degradation a batch also degrades each patch (PIL and torch.fft, mostly without the
    GIL too; benchmark.py times it). Batches come in the sampler's order whatever the thread count.
    """

    def __init__(self, dataset: TrainDataset, sampler: EpochSampler, batch_size: int, num_workers: int = 0,
                 pin_memory: bool = False):
        self.dataset, self.sampler, self.batch_size = dataset, sampler, batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self):
        epoch, order, b = self.sampler.epoch, list(self.sampler), self.batch_size
        chunks = [order[k:k + b] for k in range(0, len(self) * b, b)]
        self.dataset.draws(epoch)  # drawn once, before the threads read it

        def cut(chunk):
            return self.dataset.batch(epoch, chunk, pin_memory=self.pin_memory)

        if not self.num_workers:
            yield from map(cut, chunks)
            return
        pool = ThreadPoolExecutor(self.num_workers)
        try:
            ahead = deque(pool.submit(cut, c) for c in chunks[:2 * self.num_workers])
            for c in chunks[2 * self.num_workers:]:
                batch = ahead.popleft().result()
                ahead.append(pool.submit(cut, c))
                yield batch
            while ahead:
                yield ahead.popleft().result()
        finally:  # also when the consumer stops early (a stop signal)
            pool.shutdown(wait=True, cancel_futures=True)


def eval_pairs(paths: list[Path], scale: int, degradation: str = "pil", jpeg_quality: int | None = None,
               noise_sigma: float = 0.0):
    """Yield (name, hr, lr) for whole images: HR modcropped to the scale, LR its bicubic downsampling,
    worsened as people's photos come where asked (resize.worsen: Gaussian noise of `noise_sigma`
    levels seeded by the image's file name, then JPEG at `jpeg_quality`)."""
    for path in paths:
        img = load_rgb(path)
        if min(img.shape[:2]) < scale:
            raise UserError(f"{shown(path)}: {img.shape[1]}x{img.shape[0]} is too small for x{scale} "
                            f"(an HR image needs at least {scale}x{scale} pixels)")
        hr = modcrop(img, scale)
        lr = downsample(hr, scale, degradation)
        yield path.name, hr, worsen(lr, jpeg_quality=jpeg_quality, noise_sigma=noise_sigma,
                                       seed=zlib.crc32(os.fsencode(path.name)))


def validation_inputs(degradation: str) -> dict:
    """`eval_pairs`' keyword arguments for validating a run trained under `degradation`: the same
    one, or for a random one, the fixed inputs resize.REAL_VALIDATION names."""
    return dict(REAL_VALIDATION) if degradation in RANDOM_DEGRADATIONS else {"degradation": degradation}


def check_measurable_images(paths: list, scale: int, crop_border: int) -> None:
    """`check_measurable` for image files, from their headers: before any image is decoded."""
    for path in paths:
        width, height = image_size(path)
        check_measurable(shown(path), width, height, scale=scale, crop_border=crop_border)


def count_patchable(paths: list[Path], patch_size: int) -> int:
    """How many of the images can give a patch_size patch, from their headers: TrainDataset's
    count before it decodes them (an unreadable file counts as none, as there)."""
    count = 0
    for path in paths:
        try:
            count += min(image_size(path)) >= patch_size
        except UserError:
            pass
    return count
