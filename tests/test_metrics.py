"""metrics.py: PSNR and SSIM as BasicSR defines them, against direct computations."""
import math

import numpy as np
import pytest

from metrics import psnr, ssim


@pytest.fixture
def pair():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    return a, b


def y_by_hand(img):
    """BT.601 luma, pixel by pixel, from the standard's coefficients."""
    out = np.empty(img.shape[:2])
    for i in range(img.shape[0]):
        for j in range(img.shape[1]):
            r, g, b = (float(v) for v in img[i, j])
            out[i, j] = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    return out


def ssim_by_hand(x, y):
    """Wang et al.'s SSIM with an 11x11 Gaussian (sigma 1.5) over the valid region, one channel."""
    g = np.exp(-(np.arange(11) - 5) ** 2 / (2 * 1.5 ** 2))
    window = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px, py = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
            mx, my = (window * px).sum(), (window * py).sum()
            vx, vy = (window * px ** 2).sum() - mx ** 2, (window * py ** 2).sum() - my ** 2
            cov = (window * px * py).sum() - mx * my
            values.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return np.mean(values)


def test_identical_images_give_inf_psnr_and_ssim_one(pair):
    a, _ = pair
    assert psnr(a, a) == math.inf
    assert ssim(a, a) == pytest.approx(1.0)
    assert psnr(a, a, crop_border=4, y_channel=True) == math.inf


def test_known_mse_gives_its_psnr():
    a = np.full((10, 10, 3), 100, np.uint8)
    b = a + 5  # MSE 25
    assert psnr(a, b) == pytest.approx(10 * math.log10(255 ** 2 / 25))


def test_crop_border_ignores_the_edges():
    a = np.full((16, 16, 3), 100, np.uint8)
    b = a.copy()
    b[:2] = 0
    b[:, -2:] = 0
    assert psnr(a, b, crop_border=2) == math.inf
    assert psnr(a, b, crop_border=1) < 30


def test_rgb_psnr_matches_a_direct_computation(pair):
    a, b = pair
    a, b = a[3:-3, 3:-3], b[3:-3, 3:-3]
    mse = sum((int(x) - int(y)) ** 2 for x, y in zip(a.ravel(), b.ravel())) / a.size
    assert psnr(*pair, crop_border=3) == pytest.approx(10 * math.log10(255 ** 2 / mse), abs=1e-9)


def test_y_psnr_matches_a_direct_computation(pair):
    a, b = pair
    ya, yb = y_by_hand(a), y_by_hand(b)
    assert psnr(a, b, y_channel=True) == pytest.approx(10 * math.log10(255 ** 2 / np.mean((ya - yb) ** 2)), abs=1e-9)


def test_ssim_matches_wangs_definition_on_y_and_rgb(pair):
    a, b = pair
    assert ssim(a, b, y_channel=True) == pytest.approx(ssim_by_hand(y_by_hand(a), y_by_hand(b)), abs=1e-6)
    by_channel = [ssim_by_hand(a[..., c].astype(float), b[..., c].astype(float)) for c in range(3)]
    assert ssim(a, b) == pytest.approx(np.mean(by_channel), abs=1e-6)


def test_mismatched_shapes_raise(pair):
    a, _ = pair
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(a, a[:-1])
    with pytest.raises(ValueError, match="shapes differ"):
        ssim(a, a[:, :-1])
