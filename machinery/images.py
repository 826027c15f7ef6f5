"""Image files in and out: found in folders, decoded as HWC uint8 RGB, written whole.

Images are numpy arrays, HWC uint8 RGB in [0, 255], unless a docstring says otherwise.
"""
import contextlib
import io
import os
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageCms, ImageOps, UnidentifiedImageError

from utils import UserError, plural, shown, warn

from .files import atomic_path, not_a_file

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")

# The only formats PIL is let identify a file as, whatever its name: raster formats decoded in
# this process. PIL alone would also take EPS (handed to Ghostscript, which runs the file's
# PostScript: a loop holds the process for good), and dozens of rarely audited decoders.
# JPEG takes MPO too (a camera's JPEG with a preview after it), which PIL opens as a JPEG.
READ_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF")

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


def list_images(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Image files directly inside `folder` (and in its subfolders, if `recursive`), sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        hint = (f"; get DIV2K with: python download.py --root {shown(folder.parent)}"
                if folder.name.startswith("DIV2K_") else "")
        raise UserError(f"{shown(folder)}: no such folder{hint}")
    found = sorted(p for p in (walk(folder) if recursive else folder.iterdir())
                   if p.suffix.lower() in IMAGE_EXTENSIONS)
    say_left_out(folder, [(p, kind) for p in found if not p.is_dir() and (kind := not_a_file(p))])
    return [p for p in found if p.is_file()]


# The folders whose left-out entries this process has named: train.py lists its folder twice.
LEFT_OUT_SAID = set()


def say_left_out(folder: Path, left_out: list[tuple[Path, str]], named: int = 3) -> None:
    """One warning for the entries of `folder` named as images that are not files (FIFOs, links
    to devices: `not_a_file`'s kind), naming the first `named`. Subfolders are said by those
    who search them or not."""
    if not left_out or os.path.realpath(folder) in LEFT_OUT_SAID:
        return
    LEFT_OUT_SAID.add(os.path.realpath(folder))
    names = [f"{shown(p.relative_to(folder))} {kind}" for p, kind in left_out[:named]]
    more = f"; and {len(left_out) - named} more" if len(left_out) > named else ""
    warn(f"{shown(folder)}: {plural(len(left_out), 'entry', 'entries')} named as images are not regular files, "
         f"left out: {'; '.join(names)}{more}")


def walk(folder: Path):
    """Every file under `folder`, through linked subfolders (each real folder once: a link loop
    ends), hidden folders (.git, ...) left out."""
    seen = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        dirs[:] = [] if real in seen else sorted(d for d in dirs if not d.startswith("."))
        if real not in seen:
            seen.add(real)
            yield from (Path(root) / f for f in files)


@contextlib.contextmanager
def readable(path: Path):
    """PIL's many exceptions for a file it can't (or won't) decode, as one line naming the file."""
    kind = not_a_file(path)
    if kind:  # never opened: a FIFO would wait for a writer for ever
        raise UserError(f"{shown(path)}: {kind}, not a regular file: an image is read from a file")
    if not path.is_file():
        raise UserError(f"{shown(path)}: no such file")
    try:
        yield
    except Image.DecompressionBombError as e:
        raise UserError(f"{shown(path)}: refused, too many pixels to decode safely ({e})") from None
    except UnidentifiedImageError:
        raise UserError(f"{shown(path)}: not a readable image: not one of the formats read here "
                        f"({', '.join(READ_FORMATS)}), or damaged") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{shown(path)}: not a readable image ({shown(e)})") from None


@contextlib.contextmanager
def opened(path: Path):
    """The image file `path`, opened (not decoded) as one of READ_FORMATS only, whatever its name
    or content; PIL's errors as `readable`'s one line. Every image this repository reads is opened here."""
    with readable(path), Image.open(path, formats=READ_FORMATS) as img:
        yield img


def open_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image, with its EXIF orientation applied (`read_image`'s image)."""
    return read_image(path)[0]


def read_image(path: str | Path) -> tuple[Image.Image, bool]:
    """An image, opened and fully decoded with its EXIF orientation applied, and whether its file
    holds more than 8 bits a sample (16-bit, float), which the 8-bit network reads as 8-bit.

    An animation or a multi-page file gives its first frame, and an image between PIL's
    decompression-bomb limit and twice it is decoded anyway: each says so in one line,
    instead of nothing or PIL's two-line warning.
    """
    path = Path(path)
    quiet_bomb_warnings()
    with opened(path) as img:
        # An MPO's second frame is the camera's preview of the first, not more content.
        frames = 1 if img.format == "MPO" else getattr(img, "n_frames", 1)
        if Image.MAX_IMAGE_PIXELS and img.width * img.height > Image.MAX_IMAGE_PIXELS:
            warn(f"{shown(path)}: {img.width}x{img.height} ({img.width * img.height / 1e6:.1f} megapixels) is "
                 f"above PIL's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS / 1e6:.1f}; decoding it anyway")
        rawmode = decoder_mode(img)
        img.load()
        upright = ImageOps.exif_transpose(img)
    if rawmode.startswith("LA;16"):  # PIL decodes 16-bit gray with alpha as RGBA: gray it stays, as 8-bit LA
        upright = upright.convert("LA")
    if frames > 1:
        warn(f"{shown(path)}: has {frames} frames; only the first is used")
    return upright, upright.mode.startswith("I") or upright.mode == "F" or bool(re.search(";(16|32)", rawmode))


def decoder_mode(img: Image.Image) -> str:
    """The layout of an opened, undecoded image's samples in its file ("RGB;16B": 16-bit RGB),
    where PIL's mode alone hides it (PIL decodes 16-bit RGB, RGBA, and gray with alpha to 8 bits);
    "" where PIL does not say."""
    args = img.tile[0].args if img.tile else None
    rawmode = args if isinstance(args, str) else args[0] if isinstance(args, tuple) and args else ""
    return rawmode if isinstance(rawmode, str) else ""


def quiet_bomb_warnings() -> None:
    """Silence PIL's two-line DecompressionBombWarning: open_image says it in one line.

    A process-wide filter, not warnings.catch_warnings, which is not thread-safe: images are
    decoded in threads (dataset.py). Added only when missing: the first decode (image_size, in
    the main thread, before any) adds it, and later calls leave the filter list alone.
    """
    if not any(f[0] == "ignore" and f[2] is Image.DecompressionBombWarning for f in warnings.filters):
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of the image open_image would return, read from the file's header only,
    so callers can check every input's size before any work."""
    path = Path(path)
    quiet_bomb_warnings()
    with opened(path) as img:
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
        try:
            tags.load(exif)
        except Exception:  # PIL raises SyntaxError, ValueError, struct.error... for malformed EXIF
            return {"icc_profile": img.info.get("icc_profile") or None, "exif": None}
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


def profile_fits(icc_profile: bytes, mode: str) -> bool:
    """Whether an ICC profile describes images of `mode`: a CMYK input's profile on its RGB
    upscale would make colour-managed viewers misrender it."""
    try:
        space = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile)).profile.xcolor_space.strip()
    except (OSError, ImageCms.PyCMSError, AttributeError):
        return False
    return space == ("GRAY" if mode in ("L", "LA") else "RGB")


def write_format(path: str | Path) -> str:
    """The PIL format an output path's suffix names; a one-line error for any other suffix."""
    fmt = WRITE_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise UserError(f"{shown(path)}: unknown image extension {shown(repr(Path(path).suffix))}: use one of "
                        f"{' '.join(WRITE_EXTENSIONS)} (for a folder, end the name with /)")
    return fmt


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
    fmt = write_format(path)
    img = img if isinstance(img, Image.Image) else Image.fromarray(img)
    if icc_profile is not None and not profile_fits(icc_profile, img.mode):
        warn(f"{shown(path)}: the input's colour profile is not one for {img.mode} images (a CMYK one?); left out")
        icc_profile = None
    if fmt == "JPEG" and exif is not None and len(exif) > 65533:  # one JPEG segment; PIL raises beyond it
        warn(f"{shown(path)}: the input's EXIF ({len(exif):,} bytes) is too long for a JPEG; left out")
        exif = None
    given = {"icc_profile": icc_profile, "exif": exif}
    # PIL's JPEG, WebP and TIFF writers fail on a None, so absent metadata is not passed at all.
    options = {key: given[key] for key in METADATA_KEYS[fmt] if given[key] is not None}
    if fmt in LOSSY_FORMATS:
        options["quality"] = quality
    with atomic_path(path) as tmp:
        img.save(tmp, format=fmt, **options)
