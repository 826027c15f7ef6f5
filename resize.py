"""How LR images are made, by name: bicubic downsampling with PIL, or a port of MATLAB's imresize.

Images are HWC uint8 RGB numpy arrays.
"""
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
