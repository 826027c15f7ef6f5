"""Training patches and evaluation pairs made from a folder of HR images.

    train = TrainDataset("data/DIV2K_train_HR", scale=4, patch_size=192, patches_per_image=20, seed=0)
    sampler = EpochSampler(train, seed=0)
    for lr, hr, flips in PatchLoader(train, sampler, batch_size=32, num_workers=4): ...
    for name, hr, lr in eval_pairs(list_images("data/DIV2K_valid_HR"), scale=4): ...

The LR image is always the bicubic downsampling (utils.downsample: PIL's by default, or
MATLAB's imresize) of the whole HR image, cropped to a multiple of the scale: in training and
evaluation alike.

    python dataset.py download --root data     # DIV2K_train_HR/ and DIV2K_valid_HR/ under data/
"""
import argparse
import hashlib
import http.client
import os
import shutil
import time
import urllib.error
import urllib.request
import zipfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from utils import UserError, downsample, list_images, load_rgb, make_dir, modcrop, run_cli, warn


class TrainDataset:
    """Random aligned HR/LR patch pairs, with flips and 90-degree rotations.

    Each image is decoded once, cropped to a multiple of the scale and downsampled once with
    PIL bicubic; both are kept in memory as uint8 (DIV2K_train_HR: about 5.9 GB). A sample is
    then two aligned crops: the LR patch is the same bicubic LR that evaluation uses, cut from
    the whole image (as DIV2K's own LR files are), and costs no resize. An epoch has
    `patches_per_image` samples per image. Sample `(epoch, i)` is a pure function of
    (seed, epoch, i): the same patches whatever the worker count, and after a resume.

    `batch` cuts samples as they lie, a row copy each; `augment` then flips and transposes the
    whole batch on the training device. Cutting is cheap on the CPU (26,000 to 44,000 patches/s per
    thread here); flipping or transposing 3-byte pixels there costs up to 60 times a plain cut,
    and on the device it is one batched select.

    Args:
        hr_dir: folder of HR images. Unreadable images and images smaller than `patch_size` are
            skipped, all named in one warning before training starts.
        scale: downsampling factor; `patch_size` must be a multiple of it.
        patch_size: side of the HR patch (the LR patch is patch_size // scale).
        patches_per_image: samples drawn from each image per epoch.
        seed: base of every sample's random crop and augmentation.
        degradation: how the LR image is made, "pil" or "matlab" (utils.downsample).
    """

    def __init__(self, hr_dir: str | Path, scale: int = 4, patch_size: int = 192, patches_per_image: int = 20,
                 seed: int = 0, degradation: str = "pil", num_threads: int = min(8, os.cpu_count() or 1)):
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
            self.hr = [modcrop(images[i], scale) for i in keep]
            del images
            self.lr = list(pool.map(lambda hr: downsample(hr, scale, degradation), self.hr))
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
        `pin_memory`, lr and hr are cut straight into page-locked memory (CUDA).
        """
        indices = np.asarray(indices)
        draws = self.draws(epoch)[indices]
        p, s = self.lr_patch, self.scale
        lr = torch.empty((len(draws), p, p, 3), dtype=torch.uint8, pin_memory=pin_memory)
        hr = torch.empty((len(draws), p * s, p * s, 3), dtype=torch.uint8, pin_memory=pin_memory)
        lr_np, hr_np = lr.numpy(), hr.numpy()  # numpy copies run without the GIL and on one core
        for j, (i, y, x) in enumerate(zip(indices.tolist(), *draws[:, :2].T.tolist())):
            k = i // self.patches_per_image
            lr_np[j] = self.lr[k][y:y + p, x:x + p]
            hr_np[j] = self.hr[k][y * s:(y + p) * s, x * s:(x + p) * s]
        return lr, hr, torch.from_numpy(draws[:, 2:].astype(bool))


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
    (that alone held one DataLoader worker process under 9,000 patches/s here, with no cutting
    at all). Batches come in the sampler's order whatever the thread count.
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


def try_load_rgb(path: Path) -> np.ndarray | str:
    """The decoded image, or why it can't be read (a string), so that all failures can be listed."""
    try:
        return load_rgb(path)
    except UserError as e:
        return str(e).removeprefix(f"{path}: ")


def eval_pairs(paths: list[Path], scale: int, degradation: str = "pil"):
    """Yield (name, hr, lr) for whole images: HR modcropped to the scale, LR its bicubic downsampling."""
    for path in paths:
        img = load_rgb(path)
        if min(img.shape[:2]) < scale:
            raise UserError(f"{path}: {img.shape[1]}x{img.shape[0]} is too small for x{scale} "
                            f"(an HR image needs at least {scale}x{scale} pixels)")
        hr = modcrop(img, scale)
        yield path.name, hr, downsample(hr, scale, degradation)


# ---------------------------------------------------------------- DIV2K download

DIV2K_URL = "https://data.vision.ee.ethz.ch/cvl/DIV2K"
# name: (zip size in bytes, SHA-256 of the zip, images inside). Sizes and checksums of the
# official zips as tensorflow_datasets pins them (datasets/div2k/checksums.tsv).
DIV2K_FILES = {
    "DIV2K_train_HR": (3_530_603_713, "9d0b9c463f6e35b6c62cc6a930ee2224f670b34c1df841a57670f9acf0f6c335", 800),
    "DIV2K_valid_HR": (448_993_893, "20dd31fd84d777bc1cf5d6b7654a3f569c0aec74458ae094122ad1d0489900fc", 100),
}
RETRIES = 5


def fetch(url: str, dest: Path, size: int, sha256: str) -> None:
    """Download `url` to `dest`, resuming `dest`.part across dropped connections and runs.

    The file is renamed to `dest` only once its size and SHA-256 match; a mismatch deletes it.
    """
    part = dest.with_name(dest.name + ".part")
    failures, restarted = 0, False
    with tqdm(total=size, initial=part.stat().st_size if part.exists() else 0, unit="B", unit_scale=True,
              unit_divisor=1024, desc=dest.name) as bar:
        while (have := part.stat().st_size if part.exists() else 0) < size:
            request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    total = (response.headers.get("Content-Range", "").rpartition("/")[2] if response.status == 206
                             else response.headers.get("Content-Length"))
                    if total and total.isdigit() and int(total) != size:
                        raise UserError(f"{url}: the file there is {int(total):,} bytes, not {size:,}: "
                                        f"not the zip expected; try another --url_base")
                    if have and response.status != 206:  # the server sent the whole file: start over
                        bar.reset(total=size)
                    with open(part, "ab" if have and response.status == 206 else "wb") as f:
                        while chunk := response.read(1 << 20):
                            f.write(chunk)
                            bar.update(len(chunk))
                error = "closed early" if part.stat().st_size < size else None
            except urllib.error.HTTPError as e:
                if e.code == 416 and not restarted:  # asked past the end: a .part of something else
                    part.unlink()
                    restarted = True
                    continue
                raise UserError(f"{url}: {e.code} {e.reason}"
                                f"{' (the file there is shorter than DIV2K' + chr(39) + 's)' if e.code == 416 else ''}"
                                ) from None
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as e:
                error = str(getattr(e, "reason", None) or e) or type(e).__name__  # refused, reset, cut short
            except OSError as e:
                raise UserError(f"{part}: cannot write ({e.strerror or e})") from None
            if error:
                failures += 1
                have = part.stat().st_size if part.exists() else 0
                if failures > RETRIES:
                    raise UserError(f"{url}: {failures} failed attempts, last: {error}"
                                    f"{f'; run again to resume from {part} ({have:,} bytes)' if have else ''}")
                tqdm.write(f"{dest.name}: {error}; retrying" + (f" from byte {have:,}" if have else ""))
                time.sleep(min(2 ** failures, 30) * RETRY_SLEEP)
    got, digest = part.stat().st_size, file_sha256(part)
    if got != size or digest != sha256:
        part.unlink()
        raise UserError(f"{url}: corrupt download ({got:,} bytes, SHA-256 {digest[:16]}...; expected {size:,} "
                        f"bytes, {sha256[:16]}...): deleted; run again, or pass another --url_base")
    os.replace(part, dest)


RETRY_SLEEP = 1.0  # seconds, times 2, 4, 8, ... (tests set it to 0)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def extract(archive: Path, root: Path, name: str, count: int) -> Path:
    """Unzip `archive` to root/name, whole or not at all: into a hidden folder, then renamed."""
    work = root / f".{name}.extracting"
    shutil.rmtree(work, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as z:
            for member in z.namelist():
                if member.startswith(("/", "\\")) or ".." in Path(member).parts:
                    raise UserError(f"{archive}: refusing the unsafe member {member!r}")
            z.extractall(work)
        src = work / name if (work / name).is_dir() else work
        found = len(list_images(src))
        if found != count:
            raise UserError(f"{archive}: holds {found} images where {name} has {count}")
        os.replace(src, root / name)
    except zipfile.BadZipFile as e:
        raise UserError(f"{archive}: not a readable zip ({e})") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return root / name


def download_div2k(root: Path, url_base: str = DIV2K_URL, names=tuple(DIV2K_FILES), keep_zip: bool = False) -> None:
    """Fetch, check and extract DIV2K's HR sets into root/<name>/, skipping those already complete."""
    root = make_dir(root)
    for name in names:
        size, sha256, count = DIV2K_FILES[name]
        target = root / name
        if target.is_dir():
            found = len(list_images(target))
            if found != count:
                raise UserError(f"{target}: {found} of {count} images; delete the folder to download it again")
            print(f"{target}: already there, {count} images")
            continue
        archive = root / f"{name}.zip"
        if not archive.exists():
            fetch(f"{url_base.rstrip('/')}/{name}.zip", archive, size, sha256)
        elif file_sha256(archive) != sha256:
            raise UserError(f"{archive}: checksum mismatch; delete it to download again")
        extract(archive, root, name, count)
        if not keep_zip:
            archive.unlink()
        print(f"{target}: {count} images")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Get the data: python dataset.py download --root data")
    commands = parser.add_subparsers(dest="command", required=True)
    download = commands.add_parser("download", help="download DIV2K_train_HR and DIV2K_valid_HR")
    download.add_argument("--root", default="data", help="folder to put DIV2K_train_HR/ and DIV2K_valid_HR/ in")
    download.add_argument("--url_base", default=DIV2K_URL, help="where the zips are (a mirror of the official site)")
    download.add_argument("--sets", nargs="+", choices=list(DIV2K_FILES), default=list(DIV2K_FILES))
    download.add_argument("--keep_zip", action="store_true", help="keep the zips after extracting them")
    return parser


def main(args):
    if args.command == "download":
        download_div2k(Path(args.root), url_base=args.url_base, names=args.sets, keep_zip=args.keep_zip)


if __name__ == "__main__":
    run_cli(main, build_parser().parse_args())
