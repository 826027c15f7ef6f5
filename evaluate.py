"""Measure a checkpoint on folders of HR images, against bicubic upsampling.

usage: python evaluate.py --data_dir data/DIV2K_valid_HR [more folders] [--scale 4 [more scales]]
           [--arch resshuffle [more networks]] [--checkpoint FILE] [--precision fp32 [bf16]]
       python evaluate.py --benchmark benchmarks/ --paper       # Set5, Set14, B100, Urban100, DIV2K_valid_HR
           [--y_channel] [--crop_border N] [--degradation pil|matlab] [--self_ensemble] [--raw_weights]
           [--jpeg Q] [--noise SIGMA] [--real] [--smoothest N]
           [--csv results.csv] [-o sr/] [--compare_dir panels/] [--overwrite] [--per_image] [--tile 256] [--markdown]

Protocol (BasicSR's): each HR image is cropped to a multiple of the scale and downsampled
(PIL bicubic by default; MATLAB's imresize with --degradation matlab), super-resolved; the
uint8-rounded output is compared with the HR image after removing `crop_border` (default: the
scale) pixels at each edge. PSNR on [0, 255], SSIM with an 11x11 Gaussian window (sigma 1.5);
per-image values, then their mean per set. Bicubic upsampling with PIL gives the baseline.
The set table shows RGB and Y (BT.601 luma) for both; --y_channel makes Y the channel of the
per-image table and the gain line. --paper is the protocol of published tables (EDSR, RCAN,
SwinIR): MATLAB degradation, Y channel, crop border = scale. --jpeg and --noise measure on inputs
as photos come (the LR with seeded noise, saved as JPEG); --real picks the checkpoint for them.

Every input and output is checked before any work: image sizes (SSIM's window must fit after
the crop), output folders (made when written), existing outputs (kept unless --overwrite).
"""
import argparse
import csv
import itertools
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from dataset import check_measurable_images, eval_pairs
from machinery.checkpoint import load_chosen
from machinery.cli import add_inference_flags
from machinery.files import (
    atomic_path,
    check_distinct,
    check_output_file,
    check_output_files,
    check_outside,
    file_ids,
    folder_for,
    output_stems,
)
from machinery.images import list_images, load_rgb, save_image
from machinery.precision import DTYPES, choose_precision
from machinery.upscale import DEFAULT_TILE, describe_tiling, upscale
from metrics import METRICS, mean, means, measure, metric_labels, paired_difference, smooth_share
from model import count_parameters
from resize import DEGRADATIONS, RANDOM_DEGRADATIONS, degradation_label, resize_bicubic
from utils import (
    REPO,
    UserError,
    make_parser,
    noise_level,
    non_negative_int,
    plural,
    positive_int,
    quality,
    run_cli,
    select_device,
    shown,
    warn,
)

BENCHMARK_SETS = ("Set5", "Set14", "B100", "Urban100", "DIV2K_valid_HR")


def protocol(scale: int, crop_border: int, y_channel: bool, degradation: str = "pil",
             self_ensemble: bool = False, jpeg_quality: int | None = None, noise_sigma: float = 0.0) -> str:
    worse = (f" with Gaussian noise sigma {noise_sigma:g} (seeded by file name)" if noise_sigma else "") + (
        f" saved as JPEG q{jpeg_quality}" if jpeg_quality else "")
    return (f"x{scale}, LR = {degradation_label(degradation)} of the modcropped HR{worse}, "
            f"{'Y (BT.601)' if y_channel else 'RGB'}, crop border {crop_border}, uint8 output, "
            f"SSIM 11x11 Gaussian sigma 1.5, mean over images"
            f"{', self-ensemble x8' if self_ensemble else ''}")


def evaluate(model, pairs, crop_border: int, channels=("rgb",), tile: int = DEFAULT_TILE, tile_pad=None,
             self_ensemble: bool = False, outputs: dict | None = None, compare_size: int = 192,
             count: int | None = None, precision: str = "fp32") -> list[dict]:
    """Super-resolve every (name, hr, lr) pair, measure it and bicubic upsampling; the per-image rows.

    Each row: name, width, height, sr_seconds (the network's time), the model's metrics
    (metrics.measure) and the same for bicubic with the prefix bicubic_. `outputs`: name -> (SR
    image path, comparison panel path), either None where not wanted (`output_plan`).
    """
    rows = []
    # A context manager: an error (an unreadable image) clears the bar before it is printed.
    # disable=None: a bar on a terminal only.
    with tqdm(pairs, desc="evaluating", unit="img", leave=False, total=count, disable=None) as bar:
        for name, hr, lr in bar:
            start = time.perf_counter()
            sr = upscale(model, lr, tile=tile, tile_pad=tile_pad, self_ensemble=self_ensemble, precision=precision)
            seconds = time.perf_counter() - start
            bicubic = resize_bicubic(lr, hr.shape[1], hr.shape[0])
            row = ({"name": name, "width": hr.shape[1], "height": hr.shape[0], "sr_seconds": seconds}
                   | measure(sr, hr, crop_border, channels)
                   | measure(bicubic, hr, crop_border, channels, prefix="bicubic_"))
            sr_path, compare_path = (outputs or {}).get(name, (None, None))
            if sr_path is not None:
                with folder_for(sr_path):
                    save_image(sr, sr_path)
            if compare_path is not None:
                with folder_for(compare_path):
                    save_image(comparison(hr, lr, sr, bicubic, model.scale, compare_size, type(model).__name__),
                               compare_path)
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
               size: int, label: str = "ResShuffle") -> Image.Image:
    """One panel, as the original README's table: original | low-resolution input | bicubic |
    the network (`label`), on the same detailed crop; the LR crop is shown with nearest-neighbour pixels."""
    size = min(size, hr.shape[0], hr.shape[1]) // scale * scale
    y, x = detail_crop(hr, size, scale)
    crop = (slice(y, y + size), slice(x, x + size))
    lr_crop = lr[y // scale:(y + size) // scale, x // scale:(x + size) // scale]
    tiles = [hr[crop], np.asarray(Image.fromarray(lr_crop).resize((size, size), Image.NEAREST)),
             bicubic[crop], sr[crop]]
    labels = ["original", f"input (1/{scale})", "bicubic", label]
    gap, text = 4, 16
    panel = Image.new("RGB", (4 * size + 3 * gap, size + text), "white")
    draw = ImageDraw.Draw(panel)
    for i, (tile, caption) in enumerate(zip(tiles, labels)):
        panel.paste(Image.fromarray(tile), (i * (size + gap), 0))
        draw.text((i * (size + gap) + 2, size + 2), caption, fill="black")
    return panel


def find_sets(args) -> list[tuple[str, Path, list[Path]]]:
    """(name, folder, images) of each set: the --benchmark subfolders that exist, or --data_dir.
    Two folders of the same name (a/val, b/val) become val and val_2."""
    if args.benchmark:
        if args.data_dir != build_parser().get_default("data_dir"):
            warn("--benchmark evaluates its own sets; --data_dir is not used")
        root = Path(args.benchmark)
        if not root.is_dir():
            raise UserError(f"{shown(root)}: no such folder")
        folders = [root / name for name in BENCHMARK_SETS if (root / name).is_dir()]
        if not folders:
            raise UserError(f"{shown(root)}: holds none of {', '.join(BENCHMARK_SETS)} (folders of HR images)")
    else:
        folders = [Path(d) for d in args.data_dir]
    sets, names = [], set()
    for folder in folders:
        paths = list_images(folder)[:args.max_images or None]
        if not paths:
            raise UserError(f"{shown(folder)}: no images found")
        if args.smoothest:
            paths = smoothest(paths, args.smoothest)
        name = base = folder.resolve().name or "root"  # `.` and `..` have no name of their own
        for k in range(2, len(folders) + 2):
            if name not in names:
                break
            name = f"{base}_{k}"
        names.add(name)
        sets.append((name, folder, paths))
    return sets


def smoothest(paths: list[Path], count: int) -> list[Path]:
    """The `count` images with the largest smooth share (metrics.smooth_share), in their own order:
    where a network that paints texture into sky or a blurred background shows it."""
    shares = {p: smooth_share(load_rgb(p)) for p in tqdm(paths, desc="smooth areas", unit="img", leave=False,
                                                          disable=None)}
    kept = sorted(paths, key=lambda p: -shares[p])[:count]
    print("smoothest: " + ", ".join(f"{shown(p.name)} {shares[p]:.0%}" for p in paths if p in kept))
    return [p for p in paths if p in kept]


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


def print_images(rows: list[dict], y: str, seconds: float, label: str) -> None:
    """The per-image table of one set, its means and the gain over bicubic; `y` is "_y" for luma."""
    heads = metric_labels()
    print(f"{'image':<28} {'size':>11}  {'bicubic ' + heads:>22}  {label + ' ' + heads:>22}")
    for r in rows:
        print(f"{shown(r['name']):<28} {r['width']:>5}x{r['height']:<5}  {cells(r, 'bicubic_', y):>22}  "
              f"{cells(r, '', y):>22}")
    print(f"{'mean of ' + plural(len(rows), 'image'):<40}  {cells(means(rows, 'bicubic_', y)):>22}  "
          f"{cells(means(rows, '', y)):>22}")
    gains = ", ".join(f"{mean(rows, name + y) - mean(rows, 'bicubic_' + name + y):+.4f}{' ' + m.unit if m.unit else ''}"
                      f" {m.label}" for name, m in METRICS.items())
    print(f"gain over bicubic{' (Y)' if y else ''}: {gains}  ({seconds:.2f} s per image)")


def cells(row: dict, prefix: str = "", suffix: str = "") -> str:
    """'29.8578/0.8365': every metric of a row (or of `means`), from the keys prefix + name + suffix."""
    return "/".join(f"{row[prefix + name + suffix]:.4f}" for name in METRICS)


def main(args):
    if args.paper:
        if args.jpeg is not None or args.noise:
            raise UserError("--paper is the published protocol, on clean LR: leave out --jpeg and --noise")
        if args.crop_border is not None or args.degradation != "pil":
            warn("--paper sets --degradation matlab and crop border = scale; the given ones are not used")
        args.degradation, args.y_channel = "matlab", True
    picks = [(a, s) for a in dict.fromkeys(args.arch or [None]) for s in dict.fromkeys(args.scale or [None])]
    checkpoints = list(dict.fromkeys(args.checkpoint or [None]))
    if len(picks) > 1 and (args.checkpoint or args.save_dir or args.compare_dir):
        raise UserError("several --scale or --arch values take the shipped checkpoints and write no images: "
                        "--checkpoint, -o and --compare_dir go with one of each")
    if (len(set(args.precision)) > 1 or len(checkpoints) > 1) and (args.save_dir or args.compare_dir):
        raise UserError("several --checkpoint or --precision values write no images: -o and --compare_dir go with one")
    sets = find_sets(args)
    device = select_device(args.device)
    models = [load_chosen(c, s, device, raw_weights=args.raw_weights, arch=a, real=args.real)
              for c in checkpoints for a, s in picks]
    for _, info, path in models:  # checked once: describe_checkpoint and the table read it
        info["training"] = sound_training(info.get("training"), path)
    plan = output_plan(args, sets)
    for model, _, path in models:
        check_work(args, sets, plan, model.scale, crop_border_for(args, model.scale), path)
    precisions = [choose_precision(p, device) for p in dict.fromkeys(args.precision)]
    table, all_rows = [], []
    for (model, info, path), (precision, why) in itertools.product(models, precisions):
        print(f"checkpoint {shown(path)}: {describe_checkpoint(model, info)}; precision {precision}"
              f"{f' ({why})' if 'auto' in args.precision else ''}; {describe_tiling(model, args.tile, args.tile_pad)}")
        rows, set_means = evaluate_sets(args, model, info, sets, plan, precision)
        all_rows += [{"checkpoint": str(path)} | r for r in rows]
        table += set_means
    print_table(table, markdown=args.markdown)
    print_differences(all_rows, y_channel=args.y_channel)
    if args.csv:
        # A name that is not UTF-8 (its bytes held as surrogates) goes into the table as those bytes.
        with (folder_for(Path(args.csv)), atomic_path(Path(args.csv)) as tmp,
              open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f):
            writer = csv.DictWriter(f, fieldnames=list(all_rows[0]))
            writer.writeheader()
            writer.writerows(all_rows)
        print(f"per-image table written to {shown(args.csv)}")


def print_differences(rows: list[dict], y_channel: bool) -> None:
    """Each network (checkpoint, precision) against the first on the same images: the mean of the
    per-image differences of every metric, its 95% t-interval and on how many images it is ahead
    (metrics.paired_difference). Only between entries of the first one's scale: others see other images."""
    y = "_y" if y_channel else ""

    def entry(r):
        return r["checkpoint"], r["precision"]
    entries = list(dict.fromkeys(entry(r) for r in rows if r["scale"] == rows[0]["scale"]))
    if len(entries) < 2:
        return
    several = {"checkpoint": len({c for c, _ in entries}) > 1, "precision": len({p for _, p in entries}) > 1}

    def label(e):
        return " ".join(shown(v) for v, vary in zip(e, several.values()) if vary)
    by_image = {e: {(r["set"], r["name"]): r for r in rows if entry(r) == e} for e in entries}
    first = by_image[entries[0]]
    print(f"\npaired differences against {label(entries[0])}, per image{' (Y)' if y else ''}: the mean, "
          f"its 95% t-interval over the images, and the images where it is ahead")
    for e in entries[1:]:
        keys = [k for k in by_image[e] if k in first]
        parts = []
        for name, m in METRICS.items():
            d = paired_difference([by_image[e][k][name + y] for k in keys], [first[k][name + y] for k in keys])
            unit = f" {m.unit}" if m.unit else ""
            parts.append(f"{m.label} {d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]{unit}, "
                         f"ahead on {d['ahead']} of {d['images']}")
        print(f"{label(e)}: " + "; ".join(parts))


def describe_checkpoint(model, info: dict) -> str:
    """'espcn x4, 24,752 parameters, raw weights, trained on pil LR (6,300 steps, 0.08 h in bf16)'."""
    t = info.get("training") or {}
    trained = (f" ({t['steps']:,} steps" + (f", {t['seconds'] / 3600:.2f} h" if t.get("seconds") is not None else "")
               + (f" in {t['precision']}" if t.get("precision") else "") + ")") if t.get("steps") else ""
    return (f"{info['arch']} x{model.scale}, {count_parameters(model):,} parameters, "
            f"{'EMA' if info['weights'] == 'ema' else 'raw'} weights, trained on {info['degradation'] or 'unrecorded'} "
            f"LR{trained}")


# What a checkpoint's `training` record (runs.training_summary, written by --export) may hold:
# counts and seconds up to what a run could take (a century), so a cell of the table stays a cell.
TRAINING_LIMITS = {"epochs": 10 ** 12, "steps": 10 ** 15, "seconds": 3.2e9}


def sound_training(training, path) -> dict:
    """A checkpoint's `training` record as evaluate.py shows it; a record that is not one --export
    writes (any file can hold anything) is left out in one line, not a traceback, as infer.py and
    app.py, which never read it, run regardless. {} where there is none."""
    if training is None:
        return {}
    why = training_fault(training)
    if why:
        warn(f"{shown(path)}: its training record is not one evaluate.py reads ({why}); left out")
        return {}
    return training


def training_fault(training) -> str | None:
    """What is wrong with a `training` record, in words; None where nothing is."""
    if not isinstance(training, dict):
        return f"a {type(training).__name__}, not a table of names and values"
    for key, limit in TRAINING_LIMITS.items():
        value = training.get(key)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if value is not None and not (number and 0 <= value <= limit):  # NaN fails both comparisons
            return f"{key} {brief(value)}: not a number a run could record"
    precision = training.get("precision")
    if precision is not None and not (isinstance(precision, str) and precision in DTYPES):
        return f"precision {brief(precision)}: not one of {', '.join(DTYPES)}"
    return None


def brief(value) -> str:
    """A value from a file, printable and cut short: a 60-digit number stays on the line."""
    text = shown(repr(value))
    return text if len(text) <= 24 else text[:20] + "..."


def crop_border_for(args, scale: int) -> int:
    return scale if args.crop_border is None or args.paper else args.crop_border


def evaluate_sets(args, model, info: dict, sets: list, plan: dict, precision: str) -> tuple[list, list]:
    """One checkpoint on every set: its per-image rows and, per set, a row of the table of means."""
    scale, crop_border = model.scale, crop_border_for(args, model.scale)
    if info["degradation"] and info["degradation"] not in (args.degradation, *RANDOM_DEGRADATIONS):
        warn(f"the checkpoint was trained on {info['degradation']} LR images and is evaluated on {args.degradation}")
    how = protocol(scale, crop_border, args.y_channel, args.degradation, args.self_ensemble, args.jpeg, args.noise)
    print(f"protocol{' (--paper)' if args.paper else ''}: {how}")
    y = "_y" if args.y_channel else ""
    all_rows, table = [], []
    for name, _, paths in sets:
        start = time.time()
        pairs = eval_pairs(paths, scale, args.degradation, jpeg_quality=args.jpeg, noise_sigma=args.noise)
        rows = evaluate(model, pairs, crop_border, channels=("rgb", "y"),
                        tile=args.tile, tile_pad=args.tile_pad, self_ensemble=args.self_ensemble,
                        outputs=plan[name], compare_size=args.compare_size, count=len(paths), precision=precision)
        seconds = (time.time() - start) / len(rows)
        all_rows += [{"set": name, "arch": info["arch"], "scale": scale, "precision": precision} | r for r in rows]
        if len(sets) == 1 or args.per_image:
            print_images(rows, y, seconds, label=info["arch"])
        megapixels = sum(r["width"] * r["height"] for r in rows) / 1e6
        seconds = (info.get("training") or {}).get("seconds")
        table.append({"set": name, "network": info["arch"], "scale": f"x{scale}", "precision": precision,
                      "images": len(rows), "bicubic RGB": cells(means(rows, "bicubic_")), "RGB": cells(means(rows)),
                      "bicubic Y": cells(means(rows, "bicubic_", "_y")), "Y": cells(means(rows, "", "_y")),
                      "parameters": f"{count_parameters(model):,}",
                      "train h": f"{seconds / 3600:.2f}" if seconds is not None else "-",
                      "MP/s": f"{megapixels / sum(r['sr_seconds'] for r in rows):.3f}"})
    return all_rows, table


def print_table(table: list[dict], markdown: bool) -> None:
    """The means of every set (and network, scale, precision, where they vary): bicubic and the
    network, RGB and Y, each cell every metric (metrics.METRICS); the network's size, training
    hours, and output megapixels a second."""
    print()
    varying = [k for k in ("network", "scale", "precision") if len({row[k] for row in table}) > 1]
    keys = [k for k in table[0] if k in varying or k not in ("network", "scale", "precision")]
    heads = {k: f"{k} {metric_labels()}" if k.endswith(("RGB", "Y")) else k for k in keys}
    heads |= {k: f"network {heads[k]}" for k in ("RGB", "Y")}
    if markdown:
        print("| " + " | ".join(heads.values()) + " |\n|" + "---|" * len(keys))
        for row in table:
            print("| " + " | ".join(shown(row[k]) for k in keys) + " |")
        return
    widths = {k: max(len(heads[k]), *(len(shown(row[k])) for row in table)) for k in keys}
    print("  ".join(heads[k].ljust(widths[k]) for k in keys))
    for row in table:
        print("  ".join(shown(row[k]).ljust(widths[k]) for k in keys))


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument("--data_dir", nargs="+", default=[str(REPO / "data/DIV2K_valid_HR")],
                        help="folders of HR images")
    parser.add_argument("--benchmark", default=None,
                        help=f"a folder holding any of {', '.join(BENCHMARK_SETS)}: evaluate those instead")
    parser.add_argument("--paper", action="store_true",
                        help="the published protocol: --degradation matlab, --y_channel, crop border = scale")
    add_inference_flags(parser, several=True, precision="fp32")
    parser.add_argument("--markdown", action="store_true", help="print the table of means as a Markdown table")
    parser.add_argument("--degradation", choices=DEGRADATIONS, default="pil", help="how LR images are made")
    parser.add_argument("--jpeg", type=quality, default=None, metavar="Q",
                        help="inputs as people's photos come: the LR images saved as JPEG at quality Q (1-100)")
    parser.add_argument("--noise", type=noise_level, default=0.0, metavar="SIGMA",
                        help="Gaussian noise of SIGMA levels of 255 added to the LR images before --jpeg, seeded "
                             "by each file's name: the same inputs on every run")
    parser.add_argument("--crop_border", type=non_negative_int, default=None,
                        help="pixels not measured at each edge; None: the scale")
    parser.add_argument("--y_channel", action="store_true", help="per-image table and gain in BT.601 luma")
    parser.add_argument("--per_image", action="store_true", help="per-image tables for several sets too")
    parser.add_argument("--csv", default=None, help="write the per-image table to this CSV file")
    parser.add_argument("-o", "--output", "--save_dir", dest="save_dir", default=None,
                        help="write the SR images (<name>.png) to this folder; a subfolder per set if several")
    parser.add_argument("--compare_dir", default=None,
                        help="write <name>_compare.png panels (original | input | bicubic | network) here")
    parser.add_argument("--compare_size", type=positive_int, default=192, help="HR side of the panels' crops")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs that exist (never an input)")
    parser.add_argument("--smoothest", type=positive_int, default=None, metavar="N",
                        help="only the N images of each set with the largest smooth area (share of 8x8 tiles whose "
                             "luma varies by under 2 levels): sky and blurred backgrounds, where painted texture shows")
    parser.add_argument("--max_images", "--max_val_images", dest="max_images", type=non_negative_int, default=0,
                        help="first N images of each set only (0: all)")
    return parser


if __name__ == "__main__":
    run_cli(main, build_parser().parse_args())
