"""How LR images are made, by name: bicubic downsampling with PIL, a port of MATLAB's imresize, and
random degradations drawn for every training patch (blur, resize, noise, JPEG: --degradation real).

Images are HWC uint8 RGB numpy arrays.
"""
import io
import math

import numpy as np
from PIL import Image


def resize_bicubic(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """PIL bicubic resize (antialiased when shrinking): the default degradation, and the baseline upscaler."""
    return np.asarray(Image.fromarray(img).resize((width, height), Image.BICUBIC))


def pil_bicubic(img: np.ndarray, scale: int) -> np.ndarray:
    """PIL bicubic, antialiased (a = -0.5), to exactly (H // scale, W // scale)."""
    return resize_bicubic(img, img.shape[1] // scale, img.shape[0] // scale)


def matlab_bicubic(img: np.ndarray, scale: int) -> np.ndarray:
    """MATLAB imresize bicubic, as `imresize(img, 1/scale, 'bicubic')`: what published SR tables use."""
    return imresize_matlab(img, 1 / scale)


# How LR images are made, by name (--degradation): each maps an HWC uint8 HR image whose sides
# are multiples of the scale to its (H // scale, W // scale) LR image. Add one here and
# train.py, evaluate.py and the checkpoints' `degradation` take it.
DEGRADATIONS = {"pil": pil_bicubic, "matlab": matlab_bicubic}


def degradation_label(name: str) -> str:
    """How tables name a degradation: its function's docstring up to the first comma ("PIL bicubic")."""
    doc = (DEGRADATIONS[name].__doc__ or "").strip()
    return doc.split(",")[0].split(".")[0] if doc else name


def downsample(img: np.ndarray, scale: int, degradation: str = "pil") -> np.ndarray:
    """The LR image of `img` by the named degradation (DEGRADATIONS)."""
    if degradation not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {degradation!r}: use one of {', '.join(DEGRADATIONS)}")
    return DEGRADATIONS[degradation](img, scale)


def modcrop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop H and W down to multiples of `scale`, keeping the top-left corner."""
    h, w = img.shape[0] - img.shape[0] % scale, img.shape[1] - img.shape[1] % scale
    return img[:h, :w]


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


# ---------------------------------------------------------------- random degradations, drawn per patch
#
# The LR inputs people have are not clean bicubic downscales: they are phone and web JPEGs, often
# noisy and a little blurred. A random degradation makes each training patch's LR from its cached
# HR patch with a fresh draw, in the spirit of BSRGAN (Zhang et al. 2021) and Real-ESRGAN's
# second-order model (Wang et al. 2021), milder than theirs: the checkpoint it trains is
# PSNR-oriented (no GAN) and meant for photos, not for heavily damaged images. A draw is a pure
# function of its numpy Generator, which the loader seeds with (seed, epoch, sample): the same
# patches whatever the thread count, and after a resume. Every stage ends on uint8, as a real
# pipeline's files do.

# Every parameter of `real`, in one place (docs/real-inputs.md gives them in words). Ranges are
# (low, high), drawn uniformly; sigmas are in pixels of the image they blur, noise in levels of 255.
REAL = {
    "blur_kernels": {"isotropic": 0.45, "anisotropic": 0.35, "generalized": 0.20},
    "kernel_size": (7, 21),            # odd sides: about 6 sigma, within these
    "blur_sigma": (0.2, 3.0),          # first blur, at HR resolution
    "generalized_beta": (0.5, 4.0),    # shape of the generalized Gaussian exp(-(d/sigma)^beta / 2)
    "resize_methods": (Image.BICUBIC, Image.BILINEAR, Image.BOX),
    "resize_down": (0.3, 1.0),         # first resize's factor, with p 0.7; up with p 0.2; kept with p 0.1
    "resize_up": (1.0, 1.5),
    "gaussian_noise_p": 0.5,           # else Poisson
    "gaussian_sigma": (1.0, 15.0),
    "poisson_scale": (0.05, 1.0),      # x the shot noise of a 255-level image: 1.0 is 11 levels at mid grey
    "grey_noise_p": 0.4,               # the same noise in all three channels
    "jpeg_quality": (40, 95),
    "second_order_p": 0.5,             # a second blur, resize and noise before the final resize and JPEG
    "second_blur_p": 0.8,
    "second_blur_sigma": (0.2, 1.5),
    "second_resize": (0.5, 1.2),
    "second_gaussian_sigma": (1.0, 10.0),
    "second_poisson_scale": (0.05, 0.5),
}


def blur_kernel(rng: np.random.Generator, sigma_range: tuple[float, float]) -> np.ndarray:
    """A random (K, K) blur kernel summing to 1: isotropic, anisotropic (rotated) or generalized
    Gaussian, K odd and about 6 of its larger sigma (within kernel_size)."""
    kinds = REAL["blur_kernels"]
    kind = rng.choice(list(kinds), p=list(kinds.values()))
    sx = rng.uniform(*sigma_range)
    sy = sx if kind == "isotropic" else rng.uniform(*sigma_range)
    theta = rng.uniform(0, math.pi)
    beta = rng.uniform(*REAL["generalized_beta"]) if kind == "generalized" else 2.0
    low, high = REAL["kernel_size"]
    radius = min(max(math.ceil(3 * max(sx, sy)), low // 2), high // 2)
    r = np.arange(-radius, radius + 1)
    y, x = np.meshgrid(r, r, indexing="ij")
    u, v = x * math.cos(theta) + y * math.sin(theta), -x * math.sin(theta) + y * math.cos(theta)
    d2 = (u / sx) ** 2 + (v / sy) ** 2  # squared Mahalanobis distance
    kernel = np.exp(-0.5 * d2 ** (beta / 2))
    return kernel / kernel.sum()


def blur(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """`img` convolved with `kernel` (edges mirrored), as uint8: by FFT in float32, several times
    cheaper here than a direct 21x21 convolution. numpy's FFT, single-threaded: torch's would
    take its threads from the training step it feeds (benchmark.py's real rows)."""
    k = kernel.shape[0] // 2
    x = np.pad(img.astype(np.float32), ((k, k), (k, k), (0, 0)), mode="symmetric")
    size = x.shape[:2]
    spectrum = np.fft.rfft2(x, axes=(0, 1)) * np.fft.rfft2(kernel.astype(np.float32), s=size)[:, :, None]
    out = np.fft.irfft2(spectrum, s=size, axes=(0, 1))  # circular: the valid part starts at 2k
    return to_uint8(out[2 * k:2 * k + img.shape[0], 2 * k:2 * k + img.shape[1]])


def to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def resize(img: np.ndarray, width: int, height: int, method) -> np.ndarray:
    """PIL's resize (antialiased when shrinking) to (width, height), at least 1x1."""
    return np.asarray(Image.fromarray(img).resize((max(1, width), max(1, height)), method))


def random_resize(img: np.ndarray, rng: np.random.Generator, factor_range: tuple[float, float] | None) -> np.ndarray:
    """Resized by a random method and factor: the first-order mix of down, up and kept
    (factor_range None), or a factor from factor_range."""
    if factor_range is None:
        way = rng.choice(3, p=[0.7, 0.2, 0.1])
        factor = (rng.uniform(*REAL["resize_down"]), rng.uniform(*REAL["resize_up"]), 1.0)[way]
    else:
        factor = rng.uniform(*factor_range)
    method = REAL["resize_methods"][rng.integers(len(REAL["resize_methods"]))]
    h, w = img.shape[:2]
    return resize(img, round(w * factor), round(h * factor), method)


def random_noise(img: np.ndarray, rng: np.random.Generator, sigma_range, poisson_range) -> np.ndarray:
    """Gaussian or Poisson (shot) noise, in colour or grey."""
    grey = rng.random() < REAL["grey_noise_p"]
    shape = img.shape[:2] + (1,) if grey else img.shape
    x = img.astype(np.float32)
    if rng.random() < REAL["gaussian_noise_p"]:
        noise = rng.standard_normal(size=shape, dtype=np.float32) * rng.uniform(*sigma_range)
    else:
        level = x.mean(axis=2, keepdims=True) if grey else x
        noise = (rng.poisson(level) - level) * rng.uniform(*poisson_range)
    return to_uint8(x + noise)


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """`img` saved as a JPEG at `quality` (PIL's libjpeg, 4:2:0 chroma) and read back."""
    buffer = io.BytesIO()
    Image.fromarray(img).save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    return np.asarray(Image.open(buffer, formats=["JPEG"]).convert("RGB"))


def real(hr: np.ndarray, scale: int, rng: np.random.Generator) -> np.ndarray:
    """The (H // scale, W // scale) LR patch of an RGB HR patch, through random blur, resize, noise
    and JPEG, then with probability second_order_p a second blur, resize and noise, then the final
    resize (random method) and JPEG."""
    h, w = hr.shape[0] // scale, hr.shape[1] // scale
    x = blur(hr, blur_kernel(rng, REAL["blur_sigma"]))
    x = random_resize(x, rng, None)
    x = random_noise(x, rng, REAL["gaussian_sigma"], REAL["poisson_scale"])
    x = jpeg(x, rng.integers(REAL["jpeg_quality"][0], REAL["jpeg_quality"][1] + 1))
    if rng.random() < REAL["second_order_p"]:
        if rng.random() < REAL["second_blur_p"]:
            x = blur(x, blur_kernel(rng, REAL["second_blur_sigma"]))
        x = random_resize(x, rng, REAL["second_resize"])
        x = random_noise(x, rng, REAL["second_gaussian_sigma"], REAL["second_poisson_scale"])
    x = resize(x, w, h, REAL["resize_methods"][rng.integers(len(REAL["resize_methods"]))])
    return jpeg(x, rng.integers(REAL["jpeg_quality"][0], REAL["jpeg_quality"][1] + 1))


# Random degradations by name (train.py --degradation): each maps an HR patch, its scale and a
# seeded Generator to the patch's LR. Training caches the HR images as for "pil" and draws each
# patch's LR anew; evaluation measures on fixed inputs instead (`worsen`).
RANDOM_DEGRADATIONS = {"real": real}
assert not set(RANDOM_DEGRADATIONS) & set(DEGRADATIONS), "one name, one degradation"
# What a run under a random degradation is validated on, and its best epoch picked by: the val
# photos' PIL bicubic LR saved as JPEG at this quality, inputs like those the checkpoint is for.
REAL_VALIDATION = {"degradation": "pil", "jpeg_quality": 75}


def worsen(lr: np.ndarray, *, jpeg_quality: int | None = None, noise_sigma: float = 0.0, seed: int = 0) -> np.ndarray:
    """A clean RGB LR image as people's photos come: Gaussian noise of `noise_sigma` levels (colour,
    seeded), then saved as a JPEG at `jpeg_quality` (None: not). For evaluation: anyone can rerun it."""
    if noise_sigma > 0:
        noise = np.random.default_rng(seed).normal(0.0, noise_sigma, size=lr.shape)
        lr = to_uint8(lr.astype(np.float32) + noise)
    return lr if jpeg_quality is None else jpeg(lr, jpeg_quality)
