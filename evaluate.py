"""Measure a checkpoint on folders of HR images, against bicubic upsampling.

usage: python evaluate.py --data_dir data/DIV2K_valid_HR [more folders] [--scale 4 [more scales]] [--checkpoint FILE]
       python evaluate.py --benchmark benchmarks/ --paper       # Set5, Set14, B100, Urban100, DIV2K_valid_HR
           [--y_channel] [--crop_border N] [--degradation pil|matlab] [--self_ensemble] [--raw_weights]
           [--csv results.csv] [-o sr/] [--compare_dir panels/] [--overwrite] [--per_image] [--tile 256] [--markdown]

Protocol (BasicSR's): each HR image is cropped to a multiple of the scale and downsampled
(PIL bicubic by default; MATLAB's imresize with --degradation matlab), super-resolved; the
uint8-rounded output is compared with the HR image after removing `crop_border` (default: the
scale) pixels at each edge. PSNR on [0, 255], SSIM with an 11x11 Gaussian window (sigma 1.5);
per-image values, then their mean per set. Bicubic upsampling with PIL gives the baseline.
The set table shows RGB and Y (BT.601 luma) for both; --y_channel makes Y the channel of the
per-image table and the gain line. --paper is the protocol of published tables (EDSR, RCAN,
SwinIR): MATLAB degradation, Y channel, crop border = scale.

Every input and output is checked before any work: image sizes (SSIM's window must fit after
the crop), output folders (made when written), existing outputs (kept unless --overwrite).
"""
import argparse
import csv
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from checkpoint import load_chosen, shipped_names
from dataset import check_measurable_images, eval_pairs
from files import atomic_path, check_distinct, check_outside, check_output_file, check_output_files, file_ids, folder_for, output_stems
from images import list_images, save_image
from metrics import mean, measure
from model import UPSAMPLE_STAGES
from resize import DEGRADATIONS, resize_bicubic
from precision import PRECISIONS, choose_precision
from upscale import DEFAULT_TILE, upscale
from utils import REPO, UserError, make_parser, non_negative_int, plural, positive_int, run_cli, select_device, warn

BENCHMARK_SETS = ("Set5", "Set14", "B100", "Urban100", "DIV2K_valid_HR")


def protocol(scale: int, crop_border: int, y_channel: bool, degradation: str = "pil",
             self_ensemble: bool = False) -> str:
    lr = "MATLAB imresize" if degradation == "matlab" else "PIL"
    return (f"x{scale}, LR = {lr} bicubic of the modcropped HR, {'Y (BT.601)' if y_channel else 'RGB'}, "
            f"crop border {crop_border}, uint8 output, SSIM 11x11 Gaussian sigma 1.5, mean over images"
            f"{', self-ensemble x8' if self_ensemble else ''}")


def evaluate(model, pairs, crop_border: int, channels=("rgb",), tile: int = DEFAULT_TILE, tile_pad=None,
             self_ensemble: bool = False, outputs: dict | None = None, compare_size: int = 192,
             count: int | None = None, precision: str = "fp32") -> list[dict]:
    """Super-resolve every (name, hr, lr) pair, measure it and bicubic upsampling; the per-image rows.

    Each row: name, width, height, the model's metrics (metrics.measure) and the same for
    bicubic with the prefix bicubic_. `outputs`: name -> (SR image path, comparison panel
    path), either None where not wanted (`output_plan`).
    """
    rows = []
    # A context manager: an error (an unreadable image) clears the bar before it is printed.
    with tqdm(pairs, desc="evaluating", unit="img", leave=False, total=count) as bar:
        for name, hr, lr in bar:
            sr = upscale(model, lr, tile=tile, tile_pad=tile_pad, self_ensemble=self_ensemble, precision=precision)
            bicubic = resize_bicubic(lr, hr.shape[1], hr.shape[0])
            row = ({"name": name, "width": hr.shape[1], "height": hr.shape[0]} | measure(sr, hr, crop_border, channels)
                   | measure(bicubic, hr, crop_border, channels, prefix="bicubic_"))
            sr_path, compare_path = (outputs or {}).get(name, (None, None))
            if sr_path is not None:
                with folder_for(sr_path):
                    save_image(sr, sr_path)
            if compare_path is not None:
                with folder_for(compare_path):
                    save_image(comparison(hr, lr, sr, bicubic, model.scale, compare_size), compare_path)
            rows.append(row)
    return rows


def detail_crop(hr: np.ndarray, size: int, scale: int) -> tuple[int, int]:
    """Top-left (y, x) of the size x size HR window with the most fine detail (gradient energy),
    on a grid aligned to the scale, so that the same window cuts the LR image exactly."""
    gray = hr.astype(np.float64).mean(axis=2)
    energy = np.abs(np.diff(gray, axis=0))[:, :-1] + np.abs(np.diff(gray, axis=1))[:-1, :]
    step = max(scale, size // 4 // scale * scale)
    best, where = -1.0, (0, 0)
    for y in range(0, hr.shape[0] - size + 1, step):
        for x in range(0, hr.shape[1] - size + 1, step):
            e = energy[y:y + size - 1, x:x + size - 1].mean()
            if e > best:
                best, where = e, (y, x)
    return where


def comparison(hr: np.ndarray, lr: np.ndarray, sr: np.ndarray, bicubic: np.ndarray, scale: int,
               size: int) -> Image.Image:
    """One panel, as the original README's table: original | low-resolution input | bicubic |
    ResShuffle, on the same detailed crop; the LR crop is shown with nearest-neighbour pixels."""
    size = min(size, hr.shape[0], hr.shape[1]) // scale * scale
    y, x = detail_crop(hr, size, scale)
    crop = (slice(y, y + size), slice(x, x + size))
    lr_crop = lr[y // scale:(y + size) // scale, x // scale:(x + size) // scale]
    tiles = [hr[crop], np.asarray(Image.fromarray(lr_crop).resize((size, size), Image.NEAREST)),
             bicubic[crop], sr[crop]]
    labels = ["original", f"input (1/{scale})", "bicubic", "ResShuffle"]
    gap, text = 4, 16
    panel = Image.new("RGB", (4 * size + 3 * gap, size + text), "white")
    draw = ImageDraw.Draw(panel)
    for i, (tile, label) in enumerate(zip(tiles, labels)):
        panel.paste(Image.fromarray(tile), (i * (size + gap), 0))
        draw.text((i * (size + gap) + 2, size + 2), label, fill="black")
    return panel


def find_sets(args) -> list[tuple[str, Path, list[Path]]]:
    """(name, folder, images) of each set: the --benchmark subfolders that exist, or --data_dir.
    Two folders of the same name (a/val, b/val) become val and val_2."""
    if args.benchmark:
        if args.data_dir != build_parser().get_default("data_dir"):
            warn("--benchmark evaluates its own sets; --data_dir is not used")
        root = Path(args.benchmark)
        if not root.is_dir():
            raise UserError(f"{root}: no such folder")
        folders = [root / name for name in BENCHMARK_SETS if (root / name).is_dir()]
        if not folders:
            raise UserError(f"{root}: holds none of {', '.join(BENCHMARK_SETS)} (folders of HR images)")
    else:
        folders = [Path(d) for d in args.data_dir]
    sets, names = [], set()
    for folder in folders:
        paths = list_images(folder)[:args.max_images or None]
        if not paths:
            raise UserError(f"{folder}: no images found")
        name = base = folder.resolve().name or "root"  # `.` and `..` have no name of their own
        for k in range(2, len(folders) + 2):
            if name not in names:
                break
            name = f"{base}_{k}"
        names.add(name)
        sets.append((name, folder, paths))
    return sets


def output_plan(args, sets: list) -> dict[str, dict[str, tuple]]:
    """set name -> image name -> (SR image path, comparison panel path), None where not asked for.
    With several sets, each writes into a subfolder of its name."""
    plan = {}
    for name, _, paths in sets:
        stems = output_stems(paths)
        folders = [Path(d) / name if d and len(sets) > 1 else Path(d) if d else None
                   for d in (args.save_dir, args.compare_dir)]
        plan[name] = {p.name: (folders[0] / f"{stems[p]}.png" if folders[0] else None,
                               folders[1] / f"{stems[p]}_compare.png" if folders[1] else None) for p in paths}
    return plan


def check_work(args, sets: list, plan: dict, scale: int, crop_border: int, checkpoint: Path) -> None:
    """Before any work: every image measurable at this scale and border; every output writable,
    distinct, outside the data folders, and none of them an input (an image or the checkpoint)."""
    images = [p for _, _, paths in sets for p in paths]
    check_measurable_images(images, scale=scale, crop_border=crop_border)
    inputs = file_ids(images + [checkpoint])
    if args.csv:
        check_output_file(args.csv, overwrite=args.overwrite, inputs=inputs)
    pairs = [(path, out) for name, _, paths in sets for path in paths
             for out in plan[name][path.name] if out is not None]
    for folder in {out.parent for _, out in pairs}:
        for _, data_dir, _ in sets:
            check_outside(folder, data_dir)
    check_output_files([out for _, out in pairs], overwrite=args.overwrite, inputs=inputs)
    check_distinct(pairs + ([("the --csv table", Path(args.csv))] if args.csv else []))


def print_images(rows: list[dict], y: str, seconds: float) -> None:
    """The per-image table of one set, its means and the gain over bicubic; `y` is "_y" for luma."""
    print(f"{'image':<28} {'size':>11}  {'bicubic PSNR/SSIM':>18}  {'ResShuffle PSNR/SSIM':>20}")
    for r in rows:
        print(f"{r['name']:<28} {r['width']:>5}x{r['height']:<5}  {r['bicubic_psnr' + y]:9.4f} "
              f"{r['bicubic_ssim' + y]:.4f}  {r['psnr' + y]:11.4f} {r['ssim' + y]:.4f}")
    print(f"{'mean of ' + plural(len(rows), 'image'):<40}  {mean(rows, 'bicubic_psnr' + y):9.4f} "
          f"{mean(rows, 'bicubic_ssim' + y):.4f}  {mean(rows, 'psnr' + y):11.4f} {mean(rows, 'ssim' + y):.4f}")
    print(f"gain over bicubic{' (Y)' if y else ''}: "
          f"{mean(rows, 'psnr' + y) - mean(rows, 'bicubic_psnr' + y):+.4f} dB PSNR, "
          f"{mean(rows, 'ssim' + y) - mean(rows, 'bicubic_ssim' + y):+.4f} SSIM  ({seconds:.2f} s per image)")


def main(args):
    if args.paper:
        if args.crop_border is not None or args.degradation != "pil":
            warn("--paper sets --degradation matlab and crop border = scale; the given ones are not used")
        args.degradation, args.y_channel = "matlab", True
    scales = list(dict.fromkeys(args.scale or [None]))  # --scale 4 4 is one scale
    if len(scales) > 1 and (args.checkpoint or args.save_dir or args.compare_dir):
        raise UserError("several --scale values take the shipped checkpoints and write no images: "
                        "--checkpoint, -o and --compare_dir go with one scale")
    sets = find_sets(args)
    device = select_device(args.device)
    models = [load_chosen(args.checkpoint, s, device, raw_weights=args.raw_weights) for s in scales]
    plan = output_plan(args, sets)
    for model, _, path in models:
        check_work(args, sets, plan, model.scale, crop_border_for(args, model.scale), path)
    precision, why = choose_precision(args.precision, device)
    table, all_rows = [], []
    for model, info, path in models:
        print(f"checkpoint {path}: {model.scale}x, {sum(p.numel() for p in model.parameters()):,} parameters, "
              f"{'EMA' if info['weights'] == 'ema' else 'raw'} weights, trained on {info['degradation'] or 'unrecorded'}"
              f" LR; precision {precision}{f' ({why})' if args.precision == 'auto' else ''}")
        rows, means = evaluate_sets(args, model, info, sets, plan, precision)
        all_rows += rows
        table += means
    print_table(table, markdown=args.markdown, scales=len(models) > 1)
    if args.csv:
        with folder_for(Path(args.csv)), atomic_path(Path(args.csv)) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(all_rows[0]))
            writer.writeheader()
            writer.writerows(all_rows)
        print(f"per-image table written to {args.csv}")


def crop_border_for(args, scale: int) -> int:
    return scale if args.crop_border is None or args.paper else args.crop_border


def evaluate_sets(args, model, info: dict, sets: list, plan: dict, precision: str) -> tuple[list, list]:
    """One checkpoint on every set: its per-image rows and, per set, (set, scale, images, means)."""
    scale, crop_border = model.scale, crop_border_for(args, model.scale)
    if info["degradation"] and info["degradation"] != args.degradation:
        warn(f"the checkpoint was trained on {info['degradation']} LR images and is evaluated on {args.degradation}")
    print(f"protocol{' (--paper)' if args.paper else ''}: "
          f"{protocol(scale, crop_border, args.y_channel, args.degradation, args.self_ensemble)}")
    y = "_y" if args.y_channel else ""
    all_rows, means = [], []
    for name, folder, paths in sets:
        start = time.time()
        rows = evaluate(model, eval_pairs(paths, scale, args.degradation), crop_border, channels=("rgb", "y"),
                        tile=args.tile, tile_pad=args.tile_pad, self_ensemble=args.self_ensemble,
                        outputs=plan[name], compare_size=args.compare_size, count=len(paths), precision=precision)
        seconds = (time.time() - start) / len(rows)
        all_rows += [{"set": name, "scale": scale, "precision": precision} | r for r in rows]
        if len(sets) == 1 or args.per_image:
            print_images(rows, y, seconds)
        means.append((name, scale, len(rows), [mean(rows, k) for k in (
            "bicubic_psnr", "bicubic_ssim", "psnr", "ssim", "bicubic_psnr_y", "bicubic_ssim_y", "psnr_y", "ssim_y")]))
    return all_rows, means


def print_table(table: list, markdown: bool, scales: bool) -> None:
    """The means of every set (and scale): PSNR/SSIM of bicubic and ResShuffle, RGB and Y."""
    print()
    if markdown:
        heads = ["set"] + ["scale"] * scales + ["images", "bicubic RGB", "ResShuffle RGB", "bicubic Y", "ResShuffle Y"]
        print("| " + " | ".join(heads) + " |\n|" + "---|" * len(heads))
        for name, scale, n, v in table:
            print(f"| {name} | " + f"x{scale} | " * scales + f"{n} | "
                  + " | ".join(f"{v[i]:.4f} / {v[i + 1]:.4f}" for i in range(0, 8, 2)) + " |")
        return
    print(f"{'set':<16} " + f"{'scale':>5} " * scales + f"{'images':>6}  {'bicubic RGB':>16}  {'ResShuffle RGB':>16}  "
          f"{'bicubic Y':>16}  {'ResShuffle Y':>16}")
    for name, scale, n, v in table:
        print(f"{name:<16} " + f"{'x' + str(scale):>5} " * scales + f"{n:>6}  "
              + "  ".join(f"{v[i]:8.4f}/{v[i + 1]:.4f}" for i in range(0, 8, 2)))


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument("--data_dir", nargs="+", default=[str(REPO / "data/DIV2K_valid_HR")],
                        help="folders of HR images")
    parser.add_argument("--benchmark", default=None,
                        help=f"a folder holding any of {', '.join(BENCHMARK_SETS)}: evaluate those instead")
    parser.add_argument("--paper", action="store_true",
                        help="the published protocol: --degradation matlab, --y_channel, crop border = scale")
    parser.add_argument("--scale", type=int, nargs="+", action="extend", choices=sorted(UPSAMPLE_STAGES), default=None,
                        help="evaluate the shipped checkpoint of each scale given, one table row each (shipped: "
                             f"{shipped_names()}); None: x4; beside --checkpoint, one "
                             "scale, which the checkpoint's must be")
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint to evaluate; None: checkpoints/resshuffle_x<scale>.safetensors")
    parser.add_argument("--markdown", action="store_true", help="print the table of means as a Markdown table")
    parser.add_argument("--raw_weights", action="store_true", help="use the raw weights of an --ema checkpoint")
    parser.add_argument("--degradation", choices=DEGRADATIONS, default="pil", help="how LR images are made")
    parser.add_argument("--crop_border", type=non_negative_int, default=None,
                        help="pixels not measured at each edge; None: the scale")
    parser.add_argument("--y_channel", action="store_true", help="per-image table and gain in BT.601 luma")
    parser.add_argument("--self_ensemble", action="store_true", help="average the 8 flips/rotations (x8 time)")
    parser.add_argument("--per_image", action="store_true", help="per-image tables for several sets too")
    parser.add_argument("--csv", default=None, help="write the per-image table to this CSV file")
    parser.add_argument("-o", "--output", "--save_dir", dest="save_dir", default=None,
                        help="write the SR images (<name>.png) to this folder; a subfolder per set if several")
    parser.add_argument("--compare_dir", default=None,
                        help="write <name>_compare.png panels (original | input | bicubic | ResShuffle) here")
    parser.add_argument("--compare_size", type=positive_int, default=192, help="HR side of the panels' crops")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs that exist (never an input)")
    parser.add_argument("--max_images", "--max_val_images", dest="max_images", type=non_negative_int, default=0,
                        help="first N images of each set only (0: all)")
    parser.add_argument("--tile", type=non_negative_int, default=DEFAULT_TILE, help="LR tile size (0: whole image)")
    parser.add_argument("--tile_pad", type=non_negative_int, default=None,
                        help="LR context around each tile; None: the receptive-field radius, same result as whole")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="autocast precision; fp32 gives the same figures on every machine (auto: bf16 or fp16 "
                             "where the device runs it natively, as infer.py)")
    return parser


if __name__ == "__main__":
    run_cli(main, build_parser().parse_args())
