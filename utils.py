"""Shared helpers: image I/O, resizing, metrics, checkpoints, upscaling, seeding, devices.

One implementation of each, used by train.py, evaluate.py and infer.py. Images are numpy
arrays, HWC uint8 RGB in [0, 255], unless a docstring says otherwise.
"""
import argparse
import contextlib
import math
import os
import pickle
import random
import re
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from skimage.metrics import structural_similarity

from model import UPSAMPLE_STAGES

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class UserError(Exception):
    """A problem with the user's input: reported as one line, without a traceback."""


def run_cli(main, args) -> None:
    """Run a script's main(args); a UserError becomes `prog: error: ...` and exit status 1.

    Running out of memory and Ctrl-C are reported the same way (exit statuses 1 and 130);
    every output is written atomically, so neither leaves a half-written file.
    """
    prog = Path(sys.argv[0]).name
    try:
        main(args)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except (MemoryError, torch.OutOfMemoryError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not isinstance(e, torch.OutOfMemoryError) \
                and "can't allocate memory" not in str(e):
            raise
        print(f"{prog}: error: out of memory ({first_line(e)}): use a smaller --tile (or --batch_size)",
              file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; outputs already written are complete, none is half-written", file=sys.stderr)
        sys.exit(130)


def first_line(e: BaseException) -> str:
    """An exception's message, first line only (torch's run to pages)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def warn(message: str) -> None:
    """A one-line warning on stderr (not `warnings`, which prints a source line with it)."""
    print(f"{Path(sys.argv[0]).name}: warning: {message}", file=sys.stderr)


# ---------------------------------------------------------------- images

def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        hint = (f"; get DIV2K with: python dataset.py download --root {folder.parent}"
                if folder.name.startswith("DIV2K_") else "")
        raise UserError(f"{folder}: no such folder{hint}")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def open_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image, with its EXIF orientation applied."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        with Image.open(path) as img:
            img.load()
            return ImageOps.exif_transpose(img)
    except Image.DecompressionBombError as e:
        raise UserError(f"{path}: refused, too many pixels to decode safely ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{path}: not a readable image ({e})") from None


def to_rgb8(img: Image.Image) -> Image.Image:
    """Any PIL mode (L, LA, P, RGBA, CMYK, 16-bit, ...) as 8-bit RGB; alpha is dropped."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        # PIL's convert() clips 16-bit values at 255 instead of scaling them.
        img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257.0).round().clip(0, 255).astype(np.uint8))
    elif img.mode == "F":
        img = Image.fromarray(np.asarray(img).round().clip(0, 255).astype(np.uint8))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")


def load_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as HWC uint8 RGB."""
    return np.asarray(to_rgb8(open_image(path)))


def save_image(img: np.ndarray | Image.Image, path: str | Path) -> None:
    """Write an image atomically: a reader never sees a half-written file."""
    path = Path(path)
    img = img if isinstance(img, Image.Image) else Image.fromarray(img)
    with atomic_path(path) as tmp:
        img.save(tmp, format=Image.registered_extensions().get(path.suffix.lower(), "PNG"))


class atomic_path:
    """Context manager giving a temporary path beside `path`, renamed onto it on success."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __enter__(self) -> str:
        if not self.path.parent.is_dir():
            raise UserError(f"{self.path.parent}: output folder does not exist")
        if self.path.is_dir():
            raise UserError(f"{self.path}: is a folder, not a file name")
        try:
            fd, self.tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=TMP_SUFFIX)
        except OSError as e:
            raise UserError(f"{self.path.parent}: cannot write there ({e.strerror})") from None
        os.close(fd)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                with open(self.tmp, "rb+") as f:
                    os.fsync(f.fileno())
                # mkstemp makes the file 0600; give it the mode a plain open() would have.
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(self.tmp, 0o666 & ~umask)
                os.replace(self.tmp, self.path)
                return False
            except OSError as e:
                exc = e
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)
        if isinstance(exc, OSError):  # a full disk, a vanished folder, ...
            raise UserError(f"{self.path}: could not be written ({exc.strerror or exc})") from None
        return False


TMP_SUFFIX = ".tmp"


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete what `atomic_path` leaves behind when a process is killed mid-write; the paths removed."""
    stale = [p for p in Path(folder).glob(f".*{TMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink()
    return stale


def make_dir(path: str | Path) -> Path:
    """mkdir -p, with a one-line error when it can't be made."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{path}: cannot create folder ({e.strerror})") from None
    return path


def resize_bicubic(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """PIL bicubic resize (antialiased when shrinking), the degradation used throughout."""
    return np.asarray(Image.fromarray(img).resize((width, height), Image.BICUBIC))


DEGRADATIONS = ("pil", "matlab")


def downsample(img: np.ndarray, scale: int, degradation: str = "pil") -> np.ndarray:
    """The LR image: bicubic downsampling to exactly (H // scale, W // scale).

    degradation: "pil" (PIL's antialiased bicubic, a = -0.5) or "matlab" (MATLAB's
    `imresize(img, 1/scale, 'bicubic')`, what published SR tables use; `imresize_matlab`).
    """
    if degradation == "matlab":
        return imresize_matlab(img, 1 / scale)
    if degradation != "pil":
        raise ValueError(f"unknown degradation {degradation!r}: use one of {', '.join(DEGRADATIONS)}")
    return resize_bicubic(img, img.shape[1] // scale, img.shape[0] // scale)


def cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """Keys' cubic convolution kernel, MATLAB's 'bicubic' (a = -0.5)."""
    x = np.abs(x)
    return np.where(x <= 1, (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1,
                    np.where(x < 2, a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a, 0.0))


def resize_matrix(in_length: int, out_length: int, scale: float) -> np.ndarray:
    """The (out_length, in_length) matrix of MATLAB's bicubic imresize along one axis.

    MATLAB's convention: output pixel x (1-based) samples input position x / scale +
    (1 - 1 / scale) / 2; when shrinking, the kernel is stretched by 1 / scale (antialiasing);
    each row's weights are normalised to sum to 1; positions past an edge mirror back into the
    image (symmetric padding).
    """
    width = 4.0 / scale if scale < 1 else 4.0
    x = np.arange(1, out_length + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)
    taps = np.floor(u - width / 2)[:, None] + np.arange(int(np.ceil(width)) + 2)[None, :]
    weights = cubic((u[:, None] - taps) * scale) * scale if scale < 1 else cubic(u[:, None] - taps)
    weights /= weights.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(in_length), np.arange(in_length)[::-1]])
    columns = mirror[(taps.astype(np.int64) - 1) % (2 * in_length)]
    matrix = np.zeros((out_length, in_length))
    np.add.at(matrix, (np.repeat(np.arange(out_length), taps.shape[1]), columns.ravel()), weights.ravel())
    return matrix


def imresize_matlab(img: np.ndarray, scale: float) -> np.ndarray:
    """MATLAB's `imresize(img, scale, 'bicubic')` of an HWC uint8 image, as uint8.

    Output size ceil(scale * H) x ceil(scale * W), as MATLAB. Rows are resized first, then
    columns, in float64 with one rounding at the end; MATLAB's own uint8 path may round
    between the two passes, so a few pixels can differ from it by one level.
    """
    h, w = img.shape[:2]
    rows = resize_matrix(h, math.ceil(scale * h - 1e-9), scale)
    cols = resize_matrix(w, math.ceil(scale * w - 1e-9), scale)
    out = np.einsum("oh,hwc,pw->opc", rows, img.astype(np.float64), cols, optimize=True)
    return np.floor(out.clip(0, 255) + 0.5).astype(np.uint8)  # MATLAB rounds halves up


def modcrop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop H and W down to multiples of `scale`, keeping the top-left corner."""
    h, w = img.shape[0] - img.shape[0] % scale, img.shape[1] - img.shape[1] % scale
    return img[:h, :w]


def image_to_tensor(img: np.ndarray) -> torch.Tensor:
    """HWC uint8 -> (1, C, H, W) float32 in [0, 1], channels_last (a view of the same layout)."""
    return torch.from_numpy(np.require(img, requirements=["C", "W"])).permute(2, 0, 1).unsqueeze(0).float().div_(255)


def tensor_to_image(t: torch.Tensor) -> np.ndarray:
    """(1, C, H, W) or (C, H, W) float in [0, 1] -> HWC uint8, clamped and rounded.

    Rounded, not truncated (torchvision's to_pil_image truncates): metrics are taken on the
    uint8 image a user would save, as BasicSR does.
    """
    t = t.squeeze(0) if t.dim() == 4 else t
    return t.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


# ---------------------------------------------------------------- metrics

def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of uint8 RGB, as float64 in [16, 235] (BasicSR's `to_y_channel`)."""
    return img.astype(np.float64) @ np.array([65.481, 128.553, 24.966]) / 255.0 + 16.0


def _prepare(img1: np.ndarray, img2: np.ndarray, crop_border: int, y_channel: bool):
    if img1.shape != img2.shape:
        raise ValueError(f"image shapes differ: {img1.shape} vs {img2.shape}")
    if crop_border:
        img1 = img1[crop_border:-crop_border, crop_border:-crop_border]
        img2 = img2[crop_border:-crop_border, crop_border:-crop_border]
    if y_channel:
        return rgb_to_y(img1), rgb_to_y(img2)
    return img1.astype(np.float64), img2.astype(np.float64)


def psnr(img1: np.ndarray, img2: np.ndarray, crop_border: int = 0, y_channel: bool = False) -> float:
    """PSNR in dB of two HWC uint8 RGB images, on [0, 255]; inf when identical.

    Args:
        crop_border: pixels removed from each edge first (the protocol uses the scale).
        y_channel: compare BT.601 luma instead of RGB.
    """
    a, b = _prepare(img1, img2, crop_border, y_channel)
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def ssim(img1: np.ndarray, img2: np.ndarray, crop_border: int = 0, y_channel: bool = False) -> float:
    """SSIM of Wang et al. (11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03) on [0, 255].

    RGB: the mean of the per-channel SSIMs, as BasicSR. Same arguments as `psnr`.
    """
    a, b = _prepare(img1, img2, crop_border, y_channel)
    return float(structural_similarity(a, b, data_range=255, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False,
                                       channel_axis=None if y_channel else -1))


# ---------------------------------------------------------------- inference

def tiles(height: int, width: int, size: int):
    """(y0, y1, x0, x1) of the size x size tiles covering a height x width image, row by row."""
    for y0 in range(0, height, size):
        for x0 in range(0, width, size):
            yield y0, min(y0 + size, height), x0, min(x0 + size, width)


def grow(box: tuple, by: int, limit: tuple) -> tuple:
    """A (y0, y1, x0, x1) box grown by `by` pixels on each side, clipped to `limit`."""
    (y0, y1, x0, x1), (ly0, ly1, lx0, lx1) = box, limit
    return max(y0 - by, ly0), min(y1 + by, ly1), max(x0 - by, lx0), min(x1 + by, lx1)


# Tiled is the default: on CPU it measured faster than whole images and uses a fraction of the
# memory (benchmark.py); with the default padding the output is the same.
DEFAULT_TILE = 256

# HR stages run on LR blocks of at most this size (plus their small margin): their tensors are
# the largest (64 channels at up to 4x4 the pixels), and small blocks keep them in cache.
RECONSTRUCT_TILE = 128


@torch.inference_mode()
def upscale(model: torch.nn.Module, img: np.ndarray, tile: int = DEFAULT_TILE, tile_pad: int | None = None,
            self_ensemble: bool = False) -> np.ndarray:
    """Super-resolve one HWC uint8 RGB image with `model`, whole or in tiles.

    Each tile's LR features are computed with `tile_pad` pixels of context; the HR stages then
    run on blocks of those features (at most RECONSTRUCT_TILE wide) with only the few pixels
    of margin that upsampling needs (`model.reconstruct_radius()`). The output is written into
    one preallocated array.

    Args:
        tile: LR tile size in pixels; 0 runs the whole image at once.
        tile_pad: LR pixels of context around each tile; None: the model's `receptive_radius()`,
            with which (or more) the result equals the whole-image result.
        self_ensemble: average the outputs for the 8 flips/rotations of the input, each mapped
            back (EDSR's "+"), before rounding; 8 times the work.
    Returns: HWC uint8 RGB of exactly (scale * H, scale * W).
    """
    if not self_ensemble:
        return super_resolve(model, img, tile, tile_pad, np.uint8)
    total = None
    for k in range(4):
        for flip in (False, True):
            t = np.rot90(img, k)[:, ::-1] if flip else np.rot90(img, k)
            sr = super_resolve(model, np.ascontiguousarray(t), tile, tile_pad, np.float32)
            sr = np.rot90(sr[:, ::-1] if flip else sr, -k)
            if total is None:
                total = sr.copy()
            else:
                total += sr
    return np.rint(np.clip(total / 8, 0, 1) * 255).astype(np.uint8)


def super_resolve(model: torch.nn.Module, img: np.ndarray, tile: int, tile_pad: int | None, dtype) -> np.ndarray:
    """`upscale` without the ensemble: HWC uint8 (rounded) or float32 (raw, in [0, 1] units)."""
    device = next(model.parameters()).device
    s, margin = model.scale, model.reconstruct_radius()
    tile_pad = model.receptive_radius() if tile_pad is None else tile_pad
    x = image_to_tensor(img).to(device)
    h, w = img.shape[:2]

    def to_array(t: torch.Tensor) -> np.ndarray:
        return tensor_to_image(t) if dtype == np.uint8 else t.squeeze(0).float().permute(1, 2, 0).cpu().numpy()

    if tile <= 0 or (tile >= h and tile >= w):
        needed, free = untiled_bytes(model, h, w), available_memory(device)
        if needed < 0.8 * free:
            return to_array(model(x))
        warn(f"{w}x{h} in one piece needs about {needed / 1e9:.1f} GB and {free / 1e9:.1f} GB are free: "
             f"tiling it by {DEFAULT_TILE} instead (same result)")
        tile = DEFAULT_TILE
    out = np.empty((h * s, w * s, 3), dtype=dtype)
    for box in tiles(h, w, tile):
        py0, py1, px0, px1 = padded = grow(box, tile_pad, (0, h, 0, w))
        features = model.features(x[:, :, py0:py1, px0:px1].contiguous(memory_format=torch.channels_last))
        y0, y1, x0, x1 = box
        for by0, by1, bx0, bx1 in tiles(y1 - y0, x1 - x0, min(tile, RECONSTRUCT_TILE)):
            b0, b1, c0, c1 = block = (y0 + by0, y0 + by1, x0 + bx0, x0 + bx1)
            my0, my1, mx0, mx1 = grow(block, margin, padded)
            f = features[:, :, my0 - py0:my1 - py0, mx0 - px0:mx1 - px0]
            sr = model.reconstruct(f.contiguous(memory_format=torch.channels_last),
                                   x[:, :, my0:my1, mx0:mx1].contiguous(memory_format=torch.channels_last))
            out[b0 * s:b1 * s, c0 * s:c1 * s] = to_array(
                sr[:, :, (b0 - my0) * s:(b1 - my0) * s, (c0 - mx0) * s:(c1 - mx0) * s])
    return out


def untiled_bytes(model: torch.nn.Module, height: int, width: int) -> int:
    """Roughly the peak memory of running `model` on a whole height x width LR image.

    Float32 activations: the last upsampling conv's input and output (the tail runs before
    its PixelShuffle, so no larger map follows) and two feature maps at LR size; benchmark.py
    measured a 15.6 GB peak for a 2040x1360 input at x4 (this gives 15.6 GB).
    """
    last_input = model.scale // UPSAMPLE_STAGES[model.scale][-1]  # the last stage's input, in LR sizes
    return 4 * model.num_features * height * width * (model.scale ** 2 + last_input ** 2 + 2)


def available_memory(device: torch.device) -> float:
    """Bytes free for new allocations on `device` (CPU: the kernel's MemAvailable); inf if unknown."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return math.inf


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(checkpoint: dict, path: str | Path) -> None:
    """torch.save to a temporary file, fsync, rename: a kill never leaves a torn checkpoint."""
    with atomic_path(Path(path)) as tmp:
        torch.save(checkpoint, tmp)


def weights_only_reason(e: pickle.UnpicklingError) -> str:
    """torch's weights_only refusal, without its advice to retry with weights_only=False."""
    found = re.search(r"Unsupported global: GLOBAL \S+|unsupported GLOBAL \S+|Unsupported operand \d+", str(e))
    detail = found.group(0) if found else ""
    return ("it holds objects that weights_only=True loading does not allow, which could run code"
            + (f" ({detail})" if detail else ""))


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint dict with weights_only=True: a file that would run code is refused."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint")
    with open(path, "rb") as f:
        magic = f.read(4)
    # torch.save writes a zip (PK..); the legacy format and plain pickles start with PROTO (0x80)
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):
        raise UserError(f"{path}: not a PyTorch checkpoint (neither a zip nor a pickle file)")
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4 ..." for plain pickles
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: refused: {weights_only_reason(e)}") from None
    except Exception as e:  # torch raises RuntimeError, EOFError, KeyError, ... here
        raise UserError(f"{path}: not a loadable checkpoint ({first_line(e)})") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "model_args" not in checkpoint:
        raise UserError(f"{path}: not a ResShuffle checkpoint (no 'model' and 'model_args' entries)")
    return checkpoint


def load_model(path: str | Path, device: torch.device, raw_weights: bool = False) -> torch.nn.Module:
    """Rebuild the network a checkpoint describes and load its weights, in eval mode.

    A checkpoint trained with --ema holds two sets: the EMA weights are used unless
    `raw_weights`. The model gets two attributes: `weights` ("ema" or "raw") and
    `degradation` (what it was trained on, None if the checkpoint does not say).
    """
    from model import ResShuffle

    checkpoint = load_checkpoint(path)
    kind = "ema" if checkpoint.get("ema") is not None and not raw_weights else "raw"
    state = checkpoint["ema"] if kind == "ema" else checkpoint["model"]
    try:
        model = ResShuffle(**checkpoint["model_args"])
        model.load_state_dict(state)
    except (TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise UserError(f"{path}: its weights are {describe_weights(state)}, which does not match "
                        f"its model_args {checkpoint['model_args']} ({first_line(e)})") from None
    model.weights, model.degradation = kind, checkpoint.get("degradation")
    return model.to(device, memory_format=torch.channels_last).eval()


def describe_weights(state_dict) -> str:
    """What network a state_dict's tensor shapes describe, e.g. 'a x4 network with 64 features and
    16 residual blocks'; or what it is instead, for weights of some other network."""
    try:
        features = state_dict["head.0.weight"].shape[0]
        blocks = len({k.split(".")[1] for k in state_dict if k.startswith("body.") and k.count(".") >= 2})
        stages = [v.shape[0] // features for k, v in sorted(state_dict.items())
                  if k.startswith("upsample.") and k.endswith(".weight")]
        scale = math.prod(math.isqrt(r) for r in stages)
        return f"a x{scale} network with {features} features and {blocks} residual blocks"
    except (KeyError, AttributeError, IndexError, TypeError, ZeroDivisionError, ValueError):
        keys = list(state_dict)[:3] if isinstance(state_dict, dict) else []
        return f"not a ResShuffle network's (first entries: {', '.join(map(str, keys)) or 'none'})"


# ---------------------------------------------------------------- runtime

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def select_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when available, else CPU; 'cuda' without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but CUDA is not available here")
    return device


# ---------------------------------------------------------------- argparse types

def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value
