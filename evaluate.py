"""Measure a checkpoint on a folder of HR images, against bicubic upsampling.

usage: python evaluate.py --data_dir data/DIV2K_valid_HR --checkpoint checkpoints/resshuffle_x4.pt
           [--y_channel] [--crop_border N] [--csv results.csv] [--save_dir sr/] [--tile 256]

Protocol (BasicSR's): each HR image is cropped to a multiple of the scale, downsampled with
PIL bicubic, super-resolved; the uint8-rounded output is compared with the HR image after
removing `crop_border` (default: the scale) pixels at each edge. PSNR on [0, 255], SSIM with
an 11x11 Gaussian window (sigma 1.5), RGB by default or BT.601 luma with --y_channel;
per-image values, then their mean. Bicubic upsampling with PIL gives the baseline.
"""
import argparse
import csv
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dataset import eval_pairs
from utils import (DEFAULT_TILE, UserError, atomic_path, list_images, load_model, make_dir, non_negative_int, psnr,
                   resize_bicubic, run_cli, save_image, select_device, ssim, upscale)

DEFAULT_CHECKPOINT = "checkpoints/resshuffle_x4.pt"


def protocol(scale: int, crop_border: int, y_channel: bool) -> str:
    return (f"x{scale}, LR = PIL bicubic of the modcropped HR, {'Y (BT.601)' if y_channel else 'RGB'}, "
            f"crop border {crop_border}, uint8 output, SSIM 11x11 Gaussian sigma 1.5, mean over images")


def measure(img: np.ndarray, hr: np.ndarray, crop_border: int, y_channel: bool = False) -> tuple[float, float]:
    """(PSNR, SSIM) of one uint8 RGB image against its HR reference, by the protocol above."""
    return psnr(img, hr, crop_border, y_channel), ssim(img, hr, crop_border, y_channel)


def bicubic_rows(pairs, crop_border: int, y_channel: bool = False) -> list[dict]:
    """The baseline: PIL bicubic upsampling of each LR image, measured like the model."""
    rows = []
    for name, hr, lr in pairs:
        p, s = measure(resize_bicubic(lr, hr.shape[1], hr.shape[0]), hr, crop_border, y_channel)
        rows.append({"name": name, "bicubic_psnr": p, "bicubic_ssim": s})
    return rows


def evaluate(model, pairs, crop_border: int, y_channel: bool = False, tile: int = DEFAULT_TILE, tile_pad=None,
             baseline: bool = True, save_dir: Path | None = None, progress: bool = True) -> list[dict]:
    """Super-resolve every (name, hr, lr) pair and measure it; the per-image rows.

    Each row: name, width, height, psnr, ssim (the model) and, with `baseline`,
    bicubic_psnr, bicubic_ssim. train.py validates with this function too.
    """
    rows = []
    for name, hr, lr in tqdm(pairs, desc="evaluating", unit="img", leave=False, disable=not progress):
        sr = upscale(model, lr, tile=tile, tile_pad=tile_pad)
        row = {"name": name, "width": hr.shape[1], "height": hr.shape[0]}
        row["psnr"], row["ssim"] = measure(sr, hr, crop_border, y_channel)
        if baseline:
            row |= bicubic_rows([(name, hr, lr)], crop_border, y_channel)[0]
        if save_dir is not None:
            save_image(sr, save_dir / f"{Path(name).stem}.png")
        rows.append(row)
    return rows


def mean(rows: list[dict], key: str) -> float:
    return float(np.mean([r[key] for r in rows]))


def main(args):
    device = select_device(args.device)
    model = load_model(args.checkpoint, device)
    scale = model.scale
    crop_border = scale if args.crop_border is None else args.crop_border
    paths = list_images(args.data_dir)
    if args.max_images:
        paths = paths[:args.max_images]
    if not paths:
        raise UserError(f"{args.data_dir}: no images found")
    save_dir = make_dir(args.save_dir) if args.save_dir else None

    print(f"checkpoint {args.checkpoint}: {model.scale}x, {sum(p.numel() for p in model.parameters()):,} parameters")
    print(f"protocol: {protocol(scale, crop_border, args.y_channel)}")
    start = time.time()
    rows = evaluate(model, eval_pairs(paths, scale), crop_border, args.y_channel,
                    tile=args.tile, tile_pad=args.tile_pad,
                    save_dir=save_dir)
    seconds = time.time() - start

    header = f"{'image':<28} {'size':>11}  {'bicubic PSNR/SSIM':>18}  {'ResShuffle PSNR/SSIM':>20}"
    print(header)
    for r in rows:
        print(f"{r['name']:<28} {r['width']:>5}x{r['height']:<5}  {r['bicubic_psnr']:9.4f} {r['bicubic_ssim']:.4f}"
              f"  {r['psnr']:11.4f} {r['ssim']:.4f}")
    print(f"{'mean of ' + str(len(rows)) + ' images':<40}  {mean(rows, 'bicubic_psnr'):9.4f} "
          f"{mean(rows, 'bicubic_ssim'):.4f}  {mean(rows, 'psnr'):11.4f} {mean(rows, 'ssim'):.4f}")
    print(f"gain over bicubic: {mean(rows, 'psnr') - mean(rows, 'bicubic_psnr'):+.4f} dB PSNR, "
          f"{mean(rows, 'ssim') - mean(rows, 'bicubic_ssim'):+.4f} SSIM  ({seconds / len(rows):.2f} s per image)")

    if args.csv:
        with atomic_path(Path(args.csv)) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"per-image table written to {args.csv}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="data/DIV2K_valid_HR", help="folder of HR images")
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="checkpoint to evaluate")
    parser.add_argument("--crop_border", type=non_negative_int, default=None, help="default: the scale")
    parser.add_argument("--y_channel", action="store_true", help="measure BT.601 luma instead of RGB")
    parser.add_argument("--csv", default=None, help="write the per-image table to this CSV file")
    parser.add_argument("--save_dir", default=None, help="write the SR images to this folder")
    parser.add_argument("--max_images", type=non_negative_int, default=0, help="first N images only (0: all)")
    parser.add_argument("--tile", type=non_negative_int, default=DEFAULT_TILE, help="LR tile size (0: whole image)")
    parser.add_argument("--tile_pad", type=non_negative_int, default=None,
                        help="LR context around each tile (default: the receptive-field radius)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    return parser


if __name__ == "__main__":
    run_cli(main, build_parser().parse_args())
