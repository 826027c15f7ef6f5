"""Super-resolving whole images with a network of model.NETWORKS: in tiles with context, with self-ensemble.

A tile is padded by the network's `receptive_radius()`, so tiled equals whole. Where the
network also splits into `features` (the LR body, which sees `feature_radius` pixels) and
`reconstruct` (the HR stages, which see `reconstruct_radius`), as ResShuffle does, the HR
stages run on small blocks of each tile's features. A network that states no radius runs
whole, or tiled with the `tile_pad` a user gives (`tiling`). Images are HWC uint8 RGB numpy arrays.
"""
import contextlib
import math
import os

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from utils import warn

from .images import to_rgb8
from .precision import autocast

# Tiled is the default: on CPU it measured as fast as whole images or faster, in a fraction of
# the memory (benchmark.py); with the default padding the output is the same.
DEFAULT_TILE = 256

# On CUDA, memory a whole image needs beyond model.untiled_bytes: cuDNN's workspaces, and the
# caching allocator's rounding and fragmentation (an estimate, unmeasured here: no GPU).
CUDA_MEMORY_MARGIN = 1.5

# HR stages run on LR blocks of at most this size (plus their small margin): their tensors are
# the largest (64 channels at up to 4x4 the pixels), and small blocks keep them in cache.
RECONSTRUCT_TILE = 128


def upscale_image(model, img: Image.Image, tile: int = DEFAULT_TILE, tile_pad: int | None = None,
                  self_ensemble: bool = False, precision: str = "fp32", progress: bool = True) -> Image.Image:
    """Upscale a PIL image of any mode, as infer.py and app.py do: grayscale stays grayscale,
    alpha is kept (upscaled with bicubic)."""
    scale = model.scale
    size = (img.width * scale, img.height * scale)
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    gray = img.mode in ("L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F", "1")
    alpha = img.convert("RGBA").getchannel("A").resize(size, Image.BICUBIC) if has_alpha else None
    sr = Image.fromarray(upscale(model, np.asarray(to_rgb8(img)), tile=tile, tile_pad=tile_pad,
                                 self_ensemble=self_ensemble, progress=progress, precision=precision))
    if gray:
        sr = sr.convert("L")
    if alpha is not None:
        sr.putalpha(alpha)
    return sr


@contextlib.contextmanager
def exact_cuda():
    """On CUDA, compute what the CPU computes while evaluating or upscaling: no TF32 convolutions
    (cuDNN's default on Ampere and newer) and no cudnn.benchmark (its algorithm, chosen per tile
    shape, can differ between tiles). Training keeps both; the flags are restored after."""
    flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.benchmark) = flags


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


@torch.inference_mode()
def upscale(model: torch.nn.Module, img: np.ndarray, tile: int = DEFAULT_TILE, tile_pad: int | None = None,
            self_ensemble: bool = False, progress: bool = False, precision: str = "fp32") -> np.ndarray:
    """Super-resolve one HWC uint8 RGB image with `model`, whole or in tiles.

    Args:
        tile: LR tile size in pixels; 0 runs the whole image at once (tiled anyway, with a
            warning, when free memory is short).
        tile_pad: LR pixels of context around each tile; None: the model's `receptive_radius()`,
            with which (or more) the result equals the whole-image result (a model without
            one then runs whole images).
        self_ensemble: average the outputs for the 8 flips/rotations of the input, each mapped
            back (EDSR's "+"), before rounding; 8 times the work.
        progress: a progress bar over the tiles (on stderr, cleared when done) for images of
            more than one tile.
        precision: "fp32" (exact: the same on every device), or "bf16" / "fp16" autocast
            (precision.py), faster where the device runs it natively; outputs differ by a level or so.
    Returns: HWC uint8 RGB of exactly (scale * H, scale * W).
    """
    passes = 8 if self_ensemble else 1
    tile, tile_pad = tiling(model, tile, tile_pad)
    per_pass = len(list(tiles(*img.shape[:2], tile))) if tile > 0 else 1
    # What the bar counts: tiles, the 8 flips of a one-tile image, or tiles of all 8 flips.
    what = "tiles" if passes == 1 else "flips" if per_pass == 1 else "tiles (8 flips)"
    device = next(model.parameters()).device
    # None: on a terminal only; in a log it would be mixed into the per-image lines.
    hide = None if progress and passes * per_pass > 1 else True
    with tqdm(total=passes * per_pass, desc=what, unit="tile" if "tiles" in what else "flip", leave=False,
              disable=hide) as bar, exact_cuda(), autocast(device, precision):
        if not self_ensemble:
            return super_resolve(model, img, tile, tile_pad, np.uint8, bar)
        total = None
        for k in range(4):
            for flip in (False, True):
                t = np.rot90(img, k)[:, ::-1] if flip else np.rot90(img, k)
                sr = super_resolve(model, np.ascontiguousarray(t), tile, tile_pad, np.float32, bar)
                sr = np.rot90(sr[:, ::-1] if flip else sr, -k)
                total = sr.copy() if total is None else total + sr
        return np.rint(np.clip(total / 8, 0, 1) * 255).astype(np.uint8)


def super_resolve(model: torch.nn.Module, img: np.ndarray, tile: int, tile_pad: int, dtype,
                  bar: tqdm | None = None) -> np.ndarray:
    """`upscale` without the ensemble: HWC uint8 (rounded) or float32 (raw, in [0, 1] units).
    `tile` and `tile_pad` as `tiling` resolved them.

    Each tile runs with `tile_pad` pixels of context (a split network: its LR features, then
    `reconstruct_tile`), and is written into one preallocated array.
    """
    device = next(model.parameters()).device
    s = model.scale
    x = image_to_tensor(img).to(device)
    h, w = img.shape[:2]

    def to_array(t: torch.Tensor) -> np.ndarray:
        return tensor_to_image(t) if dtype == np.uint8 else t.squeeze(0).float().permute(1, 2, 0).cpu().numpy()

    if tile <= 0 or (tile >= h and tile >= w):
        # A network that states no radius can't be tiled exactly without a tile_pad: it runs whole.
        if tile_pad == 0 and not hasattr(model, "receptive_radius") or fits_in_memory(model, h, w, device):
            out = to_array(model(x))
            if bar is not None:
                bar.update()
            return out
        tile = DEFAULT_TILE
    out = np.empty((h * s, w * s, 3), dtype=dtype)
    split = hasattr(model, "features") and hasattr(model, "reconstruct")
    for box in tiles(h, w, tile):
        padded = grow(box, tile_pad, (0, h, 0, w))
        if split:
            reconstruct_tile(model, x, box, padded, min(tile, RECONSTRUCT_TILE), out, to_array)
        else:
            (py0, py1, px0, px1), (y0, y1, x0, x1) = padded, box
            sr = model(channels_last(x[:, :, py0:py1, px0:px1]))
            out[y0 * s:y1 * s, x0 * s:x1 * s] = to_array(
                sr[:, :, (y0 - py0) * s:(y1 - py0) * s, (x0 - px0) * s:(x1 - px0) * s])
        if bar is not None:
            bar.update()
    return out


def reconstruct_tile(model: torch.nn.Module, x: torch.Tensor, box: tuple, padded: tuple, block_size: int,
                     out: np.ndarray, to_array) -> None:
    """One tile of a network split into `features` and `reconstruct`: its features from the
    `padded` box, then the HR stages on blocks of them with the few pixels of margin they need."""
    s, margin = model.scale, model.reconstruct_radius()
    (py0, py1, px0, px1), (y0, y1, x0, x1) = padded, box
    features = model.features(channels_last(x[:, :, py0:py1, px0:px1]))
    for by0, by1, bx0, bx1 in tiles(y1 - y0, x1 - x0, block_size):
        b0, b1, c0, c1 = block = (y0 + by0, y0 + by1, x0 + bx0, x0 + bx1)
        my0, my1, mx0, mx1 = grow(block, margin, padded)
        f = features[:, :, my0 - py0:my1 - py0, mx0 - px0:mx1 - px0]
        sr = model.reconstruct(channels_last(f), channels_last(x[:, :, my0:my1, mx0:mx1]))
        out[b0 * s:b1 * s, c0 * s:c1 * s] = to_array(
            sr[:, :, (b0 - my0) * s:(b1 - my0) * s, (c0 - mx0) * s:(c1 - mx0) * s])


def tiling(model: torch.nn.Module, tile: int, tile_pad: int | None) -> tuple[int, int]:
    """(tile, tile_pad) as `upscale` runs them: tile_pad None is the network's receptive radius;
    a network that states none runs whole images (tile 0) unless a tile_pad is given."""
    if tile_pad is not None:
        return tile, tile_pad
    if hasattr(model, "receptive_radius"):
        return tile, model.receptive_radius()
    return 0, 0


def describe_tiling(model: torch.nn.Module, tile: int, tile_pad: int | None) -> str:
    """How `upscale` runs images with these settings, for infer.py's and evaluate.py's first line."""
    run_tile, run_pad = tiling(model, tile, tile_pad)
    if run_tile <= 0 and tile > 0:
        return "whole images: the network states no receptive radius to pad tiles by; --tile_pad N tiles it"
    if run_tile <= 0:
        return "whole images"
    exact = hasattr(model, "receptive_radius") and run_pad >= model.receptive_radius()
    return (f"tiles of {run_tile} LR px with {run_pad} px of context"
            f"{' (the same result as whole images)' if exact else ''}")


def channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def tiles(height: int, width: int, size: int):
    """(y0, y1, x0, x1) of the size x size tiles covering a height x width image, row by row."""
    for y0 in range(0, height, size):
        for x0 in range(0, width, size):
            yield y0, min(y0 + size, height), x0, min(x0 + size, width)


def grow(box: tuple, by: int, limit: tuple) -> tuple:
    """A (y0, y1, x0, x1) box grown by `by` pixels on each side, clipped to `limit`."""
    (y0, y1, x0, x1), (ly0, ly1, lx0, lx1) = box, limit
    return max(y0 - by, ly0), min(y1 + by, ly1), max(x0 - by, lx0), min(x1 + by, lx1)


def fits_in_memory(model: torch.nn.Module, height: int, width: int, device: torch.device) -> bool:
    """Whether a whole height x width image fits in free memory; says so when it does not.
    A network that states no `untiled_bytes` is taken to fit (it may state no radius to tile by)."""
    if not hasattr(model, "untiled_bytes"):
        return True
    needed, free = model.untiled_bytes(height, width), available_memory(device)
    if device.type == "cuda":
        needed *= CUDA_MEMORY_MARGIN
    if needed < 0.8 * free:
        return True
    warn(f"{width}x{height} in one piece needs about {needed / 1e9:.1f} GB and {free / 1e9:.1f} GB are free: "
         f"tiling it by {DEFAULT_TILE} instead (same result)")
    return False


def available_memory(device: torch.device) -> float:
    """Bytes free for new allocations on `device` (CPU: the kernel's MemAvailable); inf if unknown."""
    if device.type == "cuda":  # free on the GPU, plus what PyTorch holds reserved but unused
        reserved_unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return float(torch.cuda.mem_get_info(device)[0] + reserved_unused)
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
