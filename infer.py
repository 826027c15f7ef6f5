"""Upscale an image, or every image in a folder, with a ResShuffle checkpoint.

usage: python infer.py INPUT [-o OUTPUT] [--checkpoint checkpoints/resshuffle_x4.pt]
           [--tile 256] [--tile_pad N] [--self_ensemble] [--raw_weights] [--device auto]

INPUT is an image file or a folder of them. OUTPUT defaults to <name>_x<scale>.png beside a
file, or to the folder <INPUT>_x<scale>/ for a folder. The output is exactly scale x the
input size, written whole or not at all. Grayscale stays grayscale; an alpha channel is
upscaled with bicubic and kept; the EXIF orientation is applied; CMYK becomes RGB; 16-bit
images are read and written as 8-bit (the network works on 8-bit images) and infer says so.
In a folder, a file that can't be read is reported and skipped, and the exit status is 1. The architecture comes from
the checkpoint. The image is processed in LR tiles of --tile pixels (default 256; 0: whole):
faster on CPU than whole images and a fraction of the memory, and with --tile_pad at least
the network's receptive-field radius (the default) the same result.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from checkpoint import load_model
from images import IMAGE_EXTENSIONS, list_images, open_image, save_image, to_rgb8
from upscale import DEFAULT_TILE, upscale
from utils import UserError, make_dir, non_negative_int, run_cli, select_device

DEFAULT_CHECKPOINT = Path("checkpoints/resshuffle_x4.pt")


def upscale_image(model, img: Image.Image, tile: int = DEFAULT_TILE, tile_pad: int | None = None,
                  self_ensemble: bool = False) -> Image.Image:
    """Upscale a PIL image of any mode; grayscale stays grayscale, alpha is kept (bicubic)."""
    scale = model.scale
    size = (img.width * scale, img.height * scale)
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    gray = img.mode in ("L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F", "1")
    alpha = img.convert("RGBA").getchannel("A").resize(size, Image.BICUBIC) if has_alpha else None
    sr = Image.fromarray(upscale(model, np.asarray(to_rgb8(img)), tile=tile, tile_pad=tile_pad,
                                 self_ensemble=self_ensemble))
    if gray:
        sr = sr.convert("L")
    if alpha is not None:
        sr.putalpha(alpha)
    return sr


def output_paths(input_path: Path, output: str | None, scale: int) -> list[tuple[Path, Path]]:
    """(input, output) pairs for a file or a folder INPUT."""
    if input_path.is_dir():
        inputs = list_images(input_path)
        if not inputs:
            raise UserError(f"{input_path}: no images found (extensions: {' '.join(IMAGE_EXTENSIONS)})")
        out_dir = make_dir(Path(output) if output else input_path.with_name(f"{input_path.name}_x{scale}"))
        stems = [p.stem for p in inputs]
        # a.jpg and a.png would both become a.png: those keep their extension in the name.
        return [(p, out_dir / (f"{p.stem}.png" if stems.count(p.stem) == 1 else f"{p.name}.png")) for p in inputs]
    if not input_path.exists():
        raise UserError(f"{input_path}: no such file or folder")
    out = Path(output) if output else input_path.with_name(f"{input_path.stem}_x{scale}.png")
    if out.is_dir():
        out = out / f"{input_path.stem}_x{scale}.png"
    return [(input_path, out)]


def main(args):
    checkpoint = Path(args.checkpoint)
    if not checkpoint.exists() and checkpoint == DEFAULT_CHECKPOINT:
        raise UserError(f"no checkpoint at {DEFAULT_CHECKPOINT}: restore the shipped one with "
                        f"`git checkout -- {DEFAULT_CHECKPOINT}`, or pass one of yours with --checkpoint")
    device = select_device(args.device)
    model, _ = load_model(checkpoint, device, raw_weights=args.raw_weights)
    pairs = output_paths(Path(args.input), args.output, model.scale)
    if len(pairs) == 1:
        return upscale_file(model, *pairs[0], tile=args.tile, tile_pad=args.tile_pad, self_ensemble=args.self_ensemble)
    failed = []
    for src, dst in tqdm(pairs, desc="upscaling", unit="img"):
        try:
            upscale_file(model, src, dst, tile=args.tile, tile_pad=args.tile_pad, self_ensemble=args.self_ensemble)
        except UserError as e:  # one bad file in a folder: say so, do the others
            tqdm.write(f"infer.py: skipped: {e}", file=sys.stderr)
            failed.append(src.name)
    if failed:
        raise UserError(f"{len(failed)} of {len(pairs)} images failed, the others were written: {', '.join(failed)}")


def upscale_file(model, src: Path, dst: Path, tile: int, tile_pad: int | None, self_ensemble: bool = False) -> None:
    img = open_image(src)
    sr = upscale_image(model, img, tile=tile, tile_pad=tile_pad, self_ensemble=self_ensemble)
    note = ", read and written as 8-bit" if img.mode.startswith("I") or img.mode == "F" else ""
    if dst.suffix.lower() in (".jpg", ".jpeg") and sr.mode in ("RGBA", "LA"):
        sr, note = sr.convert(sr.mode[:-1]), note + ", alpha dropped: JPEG has none"
    save_image(sr, dst)
    tqdm.write(f"{src} ({img.width}x{img.height}{note}) -> {dst} ({sr.width}x{sr.height})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="an image file or a folder of images")
    parser.add_argument("-o", "--output", default=None, help="output file (or folder, for a folder INPUT)")
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--raw_weights", action="store_true", help="use the raw weights of an --ema checkpoint")
    parser.add_argument("--self_ensemble", action="store_true",
                        help="average the outputs for the 8 flips/rotations (EDSR's x8; 8 times slower)")
    parser.add_argument("--tile", type=non_negative_int, default=DEFAULT_TILE, help="LR tile size (0: whole image)")
    parser.add_argument("--tile_pad", type=non_negative_int, default=None,
                        help="LR context around each tile (default: the receptive-field radius)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    return parser


if __name__ == "__main__":
    run_cli(main, build_parser().parse_args())
