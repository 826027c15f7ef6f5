"""Image files in and out: found in folders, decoded as HWC uint8 RGB, written whole.

Images are numpy arrays, HWC uint8 RGB in [0, 255], unless a docstring says otherwise.
"""
import contextlib
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from utils import UserError, atomic_path, warn

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")

# The format each suffix is written in; any other suffix is an error, never a PNG under a wrong name.
WRITE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP",
                 ".tif": "TIFF", ".tiff": "TIFF"}
WRITE_EXTENSIONS = tuple(WRITE_FORMATS)

# The metadata each format carries. BMP has no place for either. TIFF gets no EXIF: PIL merges
# EXIF tags into the TIFF's own image directory, where a camera's ImageWidth or Compression
# would replace the written image's and break the file.
METADATA_KEYS = {"PNG": ("icc_profile", "exif"), "JPEG": ("icc_profile", "exif"),
                 "WEBP": ("icc_profile", "exif"), "TIFF": ("icc_profile",), "BMP": ()}
LOSSY_FORMATS = ("JPEG", "WEBP")

# EXIF orientations that turn the image by 90 degrees, swapping width and height.
QUARTER_TURNS = (5, 6, 7, 8)


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        hint = (f"; get DIV2K with: python download.py --root {folder.parent}"
                if folder.name.startswith("DIV2K_") else "")
        raise UserError(f"{folder}: no such folder{hint}")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


@contextlib.contextmanager
def readable(path: Path):
    """PIL's many exceptions for a file it can't (or won't) decode, as one line naming the file."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        yield
    except Image.DecompressionBombError as e:
        raise UserError(f"{path}: refused, too many pixels to decode safely ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{path}: not a readable image ({e})") from None


def output_stems(paths: list[Path]) -> dict[Path, str]:
    """Each image's output stem: its own, or with its extension added (a_jpg, a_png) where two
    images in one folder share a stem, so that neither output replaces the other."""
    shared = Counter((p.parent, p.stem) for p in paths)
    return {p: p.stem if shared[p.parent, p.stem] == 1 else f"{p.stem}_{p.suffix.lstrip('.')}" for p in paths}


def check_distinct(pairs: list[tuple[Path, Path]]) -> None:
    """No two inputs may have one output (a.png and a.jpg beside a_png.png): refused, not overwritten."""
    seen = {}
    for src, dst in pairs:
        if dst in seen:
            raise UserError(f"{seen[dst]} and {src} would both be written as {dst}; rename one of them")
        seen[dst] = src


def open_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image, with its EXIF orientation applied.

    An animation or a multi-page file gives its first frame, and an image between PIL's
    decompression-bomb limit and twice it is decoded anyway: each says so in one line,
    instead of nothing or PIL's two-line warning.
    """
    path = Path(path)
    with readable(path), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            # An MPO's second frame is the camera's preview of the first, not more content.
            frames = 1 if img.format == "MPO" else getattr(img, "n_frames", 1)
            img.load()
            upright = ImageOps.exif_transpose(img)
    if frames > 1:
        warn(f"{path}: has {frames} frames; only the first is used")
    report_warnings(path, upright.size, caught)
    return upright


def report_warnings(path: Path, size: tuple[int, int], caught: list[warnings.WarningMessage]) -> None:
    """PIL's decompression-bomb warnings (a GIF gives one per frame) as one line naming the file;
    other warnings are shown as they would have been."""
    bombs = [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    if bombs:
        width, height = size
        warn(f"{path}: {width}x{height} ({width * height / 1e6:.1f} megapixels) is above PIL's "
             f"decompression-bomb limit of {Image.MAX_IMAGE_PIXELS / 1e6:.1f}; decoding it anyway")
    for w in caught:
        if w not in bombs:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of the image open_image would return, read from the file's header only,
    so callers can check every input's size before any work."""
    path = Path(path)
    with readable(path), warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # open_image says it, once
        with Image.open(path) as img:
            width, height = img.size
            turned = header_orientation(img) in QUARTER_TURNS
    return (height, width) if turned else (width, height)


def header_orientation(img: Image.Image) -> int:
    """The EXIF orientation of an opened, undecoded image; 1 when it has none.

    PIL's PNG getexif() decodes the whole image to look for EXIF after the pixels; the PNG
    spec puts it before them, where Image.open has already read it.
    """
    if img.format == "PNG" and "exif" not in img.info:
        return 1
    return img.getexif().get(ExifTags.Base.Orientation, 1)


def image_metadata(img: Image.Image) -> dict:
    """What an upscale should carry from its input, as save_image's keyword arguments.

    The ICC profile, without which wide-gamut colours shift; EXIF with its orientation 1,
    because open_image has already turned the pixels upright and a viewer must not turn them
    again. None for what `img` lacks.
    """
    exif = img.info.get("exif") or None
    if exif is not None:
        tags = Image.Exif()
        tags.load(exif)
        if tags.get(ExifTags.Base.Orientation, 1) != 1:
            tags[ExifTags.Base.Orientation] = 1
            exif = tags.tobytes()
    return {"icc_profile": img.info.get("icc_profile") or None, "exif": exif}


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


def save_image(img: np.ndarray | Image.Image, path: str | Path, *, quality: int = 95,
               icc_profile: bytes | None = None, exif: bytes | None = None) -> None:
    """Write an image atomically, in the format its suffix names (one of WRITE_EXTENSIONS).

    Args:
        quality: JPEG and WebP quality, 1-100; 95 rather than PIL's 75, which blurs away
            the detail an upscale is made for. Other formats are lossless.
        icc_profile, exif: written where the format has a place for them (see METADATA_KEYS),
            silently left out where it has none.
    """
    path = Path(path)
    fmt = WRITE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"{path}: unknown image extension {path.suffix!r}: use one of {' '.join(WRITE_EXTENSIONS)}")
    given = {"icc_profile": icc_profile, "exif": exif}
    # PIL's JPEG, WebP and TIFF writers fail on a None, so absent metadata is not passed at all.
    options = {key: given[key] for key in METADATA_KEYS[fmt] if given[key] is not None}
    if fmt == "JPEG" and len(options.get("exif", b"")) > 65533:  # one JPEG segment; PIL raises beyond it
        warn(f"{path}: the input's EXIF ({len(exif):,} bytes) is too long for a JPEG and is left out")
        del options["exif"]
    if fmt in LOSSY_FORMATS:
        options["quality"] = quality
    img = img if isinstance(img, Image.Image) else Image.fromarray(img)
    with atomic_path(path) as tmp:
        img.save(tmp, format=fmt, **options)
