"""Image files in and out: found in folders, decoded as HWC uint8 RGB, written whole.

Images are numpy arrays, HWC uint8 RGB in [0, 255], unless a docstring says otherwise.
"""
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from utils import UserError, atomic_path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        hint = (f"; get DIV2K with: python download.py --root {folder.parent}"
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
    """Write an image atomically, in the format its suffix names (PNG if unknown)."""
    path = Path(path)
    img = img if isinstance(img, Image.Image) else Image.fromarray(img)
    with atomic_path(path) as tmp:
        img.save(tmp, format=Image.registered_extensions().get(path.suffix.lower(), "PNG"))
