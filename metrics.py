"""Image-quality metrics by name: PSNR and SSIM as BasicSR defines them (uint8 images, a cropped
border, RGB or BT.601 luma).

`METRICS` is the one place a metric is named: add one there and train.py's validation and
log.csv, bicubic's scores, curves.png, and evaluate.py's tables and --csv all show it. Training
keeps its best checkpoint by PSNR.
"""
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import scipy.stats
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity

from utils import UserError

SSIM_WINDOW = 11  # the Gaussian window's side (sigma 1.5, truncated at 3.5 sigma)


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


def check_measurable(name: str, width: int, height: int, scale: int, crop_border: int) -> None:
    """Fail before any work if an HR image is too small to be measured at `scale`: after the
    modcrop and the border crop, SSIM's window must fit."""
    side = min(width // scale * scale, height // scale * scale) - 2 * crop_border
    if side < SSIM_WINDOW:
        need = -(-(SSIM_WINDOW + 2 * crop_border) // scale) * scale
        raise UserError(f"{name}: {width}x{height} is too small to measure at x{scale} with crop border {crop_border}: "
                        f"SSIM's {SSIM_WINDOW}x{SSIM_WINDOW} window needs images of at least {need}x{need}")


def psnr_on_device(img: torch.Tensor, hr: torch.Tensor) -> float:
    """`psnr` in torch, where the images are (RGB; border already cropped; HWC uint8 tensors)."""
    mse = (img.double() - hr.double()).square().mean()
    return math.inf if mse == 0 else float(10 * torch.log10(255.0 ** 2 / mse))


def ssim_on_device(img: torch.Tensor, hr: torch.Tensor) -> float:
    """`ssim` in torch (RGB; border already cropped): the same definitions in float64. The
    Gaussian filtered 'valid' is skimage's filtered map with its border of half a window cropped."""
    a, b = (t.permute(2, 0, 1).unsqueeze(1).double() for t in (img, hr))  # (3, 1, H, W): one channel each
    x = torch.arange(SSIM_WINDOW, dtype=torch.float64, device=a.device) - SSIM_WINDOW // 2
    g = torch.exp(-x ** 2 / (2 * 1.5 ** 2))
    g = g / g.sum()

    def blur(t):  # Gaussian, separable, 'valid'
        return F.conv2d(F.conv2d(t, g.view(1, 1, -1, 1)), g.view(1, 1, 1, -1))

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2, blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(ssim_map.mean())


@dataclass(frozen=True)
class Metric:
    """A metric of a uint8 image against its HR reference.

    fn: (img, hr, crop_border, y_channel) -> float, on HWC uint8 numpy arrays.
    label, unit: how tables name it ("PSNR", "dB").
    on_device: the same in torch on HWC uint8 tensors, RGB, border cropped (train.py validates on
        a GPU this way); None: `fn` on the CPU.
    """
    fn: Callable
    label: str
    unit: str = ""
    on_device: Callable | None = None


METRICS = {
    "psnr": Metric(psnr, "PSNR", "dB", psnr_on_device),
    "ssim": Metric(ssim, "SSIM", "", ssim_on_device),
}


def measure(img: np.ndarray, hr: np.ndarray, crop_border: int, channels=("rgb",), prefix: str = "") -> dict:
    """Every metric of one uint8 RGB image against its HR reference.

    Keys: the metric's name ("psnr") for "rgb", with "_y" ("psnr_y") for "y"; each after `prefix`.
    """
    return {f"{prefix}{name}{'_y' if channel == 'y' else ''}": metric.fn(img, hr, crop_border, channel == "y")
            for channel in channels for name, metric in METRICS.items()}


def measure_on_device(img: torch.Tensor, hr: torch.Tensor, crop_border: int) -> dict:
    """`measure`'s RGB metrics computed by torch where the images are (HWC uint8 tensors on one
    device): train.py validates on the GPU this way, where the CPU would take minutes per DIV2K epoch."""
    cropped = [t[crop_border:-crop_border, crop_border:-crop_border] if crop_border else t for t in (img, hr)]
    return {name: metric.on_device(*cropped) if metric.on_device is not None
            else metric.fn(img.cpu().numpy(), hr.cpu().numpy(), crop_border, False)
            for name, metric in METRICS.items()}


def mean(rows: list[dict], key: str) -> float:
    """The mean of one metric over per-image rows (the protocol's per-set figure)."""
    return float(np.mean([r[key] for r in rows]))


def means(rows: list[dict], prefix: str = "", suffix: str = "") -> dict:
    """{name: mean} of every metric over per-image rows, from the keys prefix + name + suffix."""
    return {name: mean(rows, f"{prefix}{name}{suffix}") for name in METRICS}


def smooth_share(img: np.ndarray, block: int = 8, sd: float = 2.0) -> float:
    """The share of an HWC uint8 RGB image that is smooth (sky, walls, blurred backgrounds): of its
    `block` x `block` tiles, those whose BT.601 luma varies by under `sd` levels (standard deviation)."""
    y = rgb_to_y(img)
    h, w = y.shape[0] // block * block, y.shape[1] // block * block
    if h == 0 or w == 0:
        return 0.0
    tiles = y[:h, :w].reshape(h // block, block, w // block, block)
    return float((tiles.std(axis=(1, 3)) < sd).mean())


def paired_difference(scores: list[float], baseline: list[float], confidence: float = 0.95) -> dict:
    """How far `scores` are from `baseline` on the same images, in order: the mean of the per-image
    differences, its `confidence` t-interval (mean +- t(n - 1) x sd / sqrt(n), sd with n - 1), and
    on how many images `scores` is ahead. With one image, or all differences equal, the interval is
    that one value. Keys: mean, low, high, ahead, images."""
    d = np.asarray(scores, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    n = len(d)
    half = 0.0
    if n > 1:
        half = float(scipy.stats.t.ppf(0.5 + confidence / 2, n - 1) * d.std(ddof=1) / math.sqrt(n))
    return {"mean": float(d.mean()), "low": float(d.mean()) - half, "high": float(d.mean()) + half,
            "ahead": int((d > 0).sum()), "images": n}


def format_scores(scores: dict) -> str:
    """'29.8578 dB / 0.8365': {name: value} of every metric, in METRICS' order."""
    return " / ".join(f"{scores[name]:.4f}{' ' + m.unit if m.unit else ''}" for name, m in METRICS.items())


def metric_labels() -> str:
    """'PSNR/SSIM': the metrics, as table headings name them."""
    return "/".join(m.label for m in METRICS.values())
