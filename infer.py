"""Upscale an image, every image in a folder, or a video, with a ResShuffle checkpoint (or another network's).

usage: python infer.py INPUT [-o OUTPUT] [--scale 4] [--arch resshuffle] [--checkpoint FILE] [--recursive]
           [--ext png] [--quality 95] [--overwrite | --skip_existing] [--tile 256] [--tile_pad N] [--self_ensemble]
           [--crf 17] [--frames START:STOP]

INPUT is an image file or a folder of them (--recursive: and of its subfolders). Each image
becomes <name>_x<scale>.png (--ext: another format, as .jpg): beside a file INPUT, in the folder
<INPUT>_x<scale>/ for a folder, or in the folder -o names. `-o` with an image extension (.png .jpg .jpeg .webp .bmp
.tif .tiff) names the output file of a single image; without one it names a folder, made
if missing. Outputs never replace an input or an existing file (--overwrite replaces the
latter, --skip_existing leaves its input out); every output is checked before any work and
written whole or not at all.

The output is exactly scale x the input size. Grayscale stays grayscale; an alpha channel
is upscaled with bicubic and kept; the EXIF orientation is applied; the ICC colour profile
and EXIF are kept where the format carries them; CMYK becomes RGB; 16-bit images are read and
written as 8-bit (the network works on 8-bit images) and infer says so. In a folder, a file
that can't be read is reported and skipped, and the exit status is 1. The network comes
from the checkpoint (--arch and --scale pick a shipped one). The image is processed in LR
tiles of --tile pixels (faster on CPU than whole images, a fraction of the memory, and with
the default --tile_pad the same result), in bf16 where the processor runs it natively
(--precision fp32 for the exact result).

A video INPUT (.mp4 .m4v .mov .mkv .webm .avi .ts .mts .m2ts .flv .mpg .mpeg .wmv .ogv .3gp;
given as the INPUT file: a folder run takes images only) becomes <name>_x<scale>.mp4, .m4v,
.mov or .mkv as its own extension, .mkv for the others (they can't carry H.264, or carry it
badly), beside it or where -o says, under the same rules. Each frame is upscaled as an image
is, one at a time, and encoded as H.264 (yuv420p, --crf); the frame times, rate, rotation and
colour tags are kept, and audio and subtitles are copied as they are (PyAV: requirements-optional.txt).
--frames START:STOP upscales only those frames (indices from 0, STOP not included), to try a
few first; the output then has no audio or subtitles. Ctrl-C, SIGTERM, an error, or a file
shorter than its container states (truncated: MP4, MOV, Matroska; an MPEG-TS file states no
length) leaves no output. H.264 in 4:2:0 needs an even width and height: x3 of an odd size is
refused.
"""
import argparse
import contextlib
import os
import sys
from pathlib import Path

from tqdm import tqdm

from machinery.checkpoint import load_chosen
from machinery.cli import add_inference_flags
from machinery.files import (
    check_distinct,
    check_output_files,
    check_outputs_outside_inputs,
    check_outside,
    file_ids,
    folder_for,
    output_stems,
)
from machinery.images import (
    IMAGE_EXTENSIONS,
    WRITE_EXTENSIONS,
    image_metadata,
    list_images,
    read_image,
    save_image,
    write_format,
)
from machinery.precision import choose_precision
from machinery.upscale import describe_tiling, upscale_image
from machinery.video import (
    DEFAULT_CRF,
    VIDEO_EXTENSIONS,
    Interrupted,
    check_encodable,
    frame_span,
    is_video,
    output_path,
    probe,
    rehearse,
    upscale_video,
)
from utils import UserError, make_parser, plural, quality, run_cli, select_device, shown, warn


def find_inputs(input_path: Path, recursive: bool) -> list[Path]:
    """The images INPUT names: itself, or those in the folder (and its subfolders, if `recursive`)."""
    if not input_path.exists():
        raise UserError(f"{shown(input_path)}: no such file or folder")
    if not input_path.is_dir():
        return [input_path]
    inputs = list_images(input_path, recursive=recursive)
    subfolders = [p for p in input_path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if subfolders and not recursive:
        warn(f"{shown(input_path)}: {plural(len(subfolders), 'subfolder')} not searched (--recursive searches them)")
    videos = [p for p in input_path.iterdir() if is_video(p)]
    if videos:  # a folder run takes images only
        warn(f"{shown(input_path)}: {plural(len(videos), 'video')} not upscaled: give each video as INPUT")
    if not inputs:
        raise UserError(f"{shown(input_path)}: no images found (extensions: {' '.join(IMAGE_EXTENSIONS)})")
    return inputs


def output_paths(input_path: Path, inputs: list[Path], output: str | None, scale: int, overwrite: bool = False,
                 skip_existing: bool = False, ext: str | None = None) -> list[tuple[Path, Path]]:
    """(input, output) pairs, every output checked before any work (see the module docstring).
    With `skip_existing`, inputs whose output exists are left out (a folder run finished).
    `ext`: the suffix of the outputs infer names (--ext); None: .png."""
    out_file = output_file(output, input_path)
    if out_file is not None and ext is not None:
        raise UserError(f"--ext: -o {shown(output)} names the output file, whose extension is its format; "
                        f"leave out --ext, or give -o a folder")
    if out_file is not None:
        pairs = [(input_path, out_file)]
    else:
        out_dir, root, stems = output_folder(input_path, output, scale), input_path.parent, output_stems(inputs)
        if input_path.is_dir():
            check_outside(out_dir, input_path)
            root = input_path
        pairs = [(p, out_dir / p.parent.relative_to(root) / f"{stems[p]}_x{scale}{ext or '.png'}") for p in inputs]
        if input_path.is_dir():
            check_outputs_outside_inputs(pairs)
    check_distinct(pairs)
    ids = file_ids(inputs)
    if skip_existing:  # outputs there already (never an input) keep theirs
        done = [(src, dst) for src, dst in pairs if dst.is_file() and not file_ids([dst]) & ids]
        if done:
            print(f"skipped {plural(len(done), 'input')} of {len(pairs)}: their outputs are there already")
        pairs = [p for p in pairs if p not in done]
    check_output_files([dst for _, dst in pairs], overwrite=overwrite, inputs=ids)
    return pairs


def output_file(output: str | None, input_path: Path) -> Path | None:
    """The file -o names (it has an image extension), or None where -o names a folder or is not given."""
    if not output or Path(output).is_dir() or output.endswith(("/", os.sep)) or not Path(output).suffix:
        return None
    write_format(output)  # an unknown extension: an error now
    if input_path.is_dir():
        raise UserError(f"{shown(output)}: names a file, but {shown(input_path)} is a folder: give -o a folder name")
    return Path(output)


def output_folder(input_path: Path, output: str | None, scale: int) -> Path:
    """Where each image's <name>_x<scale>.png goes: -o, else beside a file, else <INPUT>_x<scale>/."""
    if output:
        return Path(output)
    if not input_path.is_dir():
        return input_path.parent
    named = input_path.resolve()  # `.` and `..` have no name of their own
    return named.with_name(f"{named.name}_x{scale}")


def main(args):
    input_path = Path(args.input)
    if is_video(input_path):
        return main_video(args, input_path)
    if args.frames is not None:
        raise UserError(f"--frames: {shown(input_path)} is not a video (extensions: {' '.join(VIDEO_EXTENSIONS)})")
    inputs = find_inputs(input_path, args.recursive)  # the input first: a missing one is named as such
    device = select_device(args.device)
    model, info, path = load_chosen(args.checkpoint, args.scale, device, raw_weights=args.raw_weights, arch=args.arch,
                                    real=args.real)
    pairs = output_paths(input_path, inputs, args.output, model.scale, overwrite=args.overwrite,
                         skip_existing=args.skip_existing, ext=args.ext)
    if not pairs:
        return print(f"{shown(input_path)}: every output exists already; nothing to do")
    precision, _ = choose_precision(args.precision, device)
    print(describe_network(model, info, path, args))
    options = {"tile": args.tile, "tile_pad": args.tile_pad, "self_ensemble": args.self_ensemble,
               "quality": args.quality, "precision": precision}
    if len(pairs) == 1:
        return upscale_file(model, *pairs[0], **options)
    failed = []
    # A bar on a terminal only: in a log, the per-image lines are the progress, and a bar would be mixed into them.
    for src, dst in tqdm(pairs, desc="upscaling", unit="img", disable=None):
        try:
            upscale_file(model, src, dst, **options)
        except UserError as e:  # one bad file in a folder: say so, do the others
            tqdm.write(f"infer.py: skipped: {e}", file=sys.stderr)
            failed.append(shown(src.relative_to(input_path)))
    if failed:
        done = len(pairs) - len(failed)
        written = f"the other {done} {'was' if done == 1 else 'were'} written" if done else "none was written"
        raise UserError(f"{len(failed)} of {plural(len(pairs), 'image')} failed, {written}: {', '.join(failed)}")


def describe_network(model, info: dict, path, args) -> str:
    """The first line of a run: which checkpoint, which weights, how images are tiled."""
    return (f"checkpoint {shown(path)} ({info['arch']} x{model.scale}, {'EMA' if info['weights'] == 'ema' else 'raw'} "
            f"weights; {describe_tiling(model, args.tile, args.tile_pad)})")


def main_video(args, src: Path) -> None:
    """A video INPUT: the checks an image has, all before any work; machinery/video.py does the work."""
    if args.ext is not None:
        raise UserError(f"--ext: {shown(src)} is a video; its output's format follows its own extension")
    info = probe(src)  # the input first: a file that is not a video is named as such
    device = select_device(args.device)
    model, weights, path = load_chosen(args.checkpoint, args.scale, device, raw_weights=args.raw_weights,
                                       arch=args.arch, real=args.real)
    dst = output_path(src, args.output, model.scale)
    if args.skip_existing and dst.is_file() and not file_ids([dst]) & file_ids([src]):
        return print(f"{shown(src)}: its output {shown(dst)} exists already; nothing to do")
    check_output_files([dst], overwrite=args.overwrite, inputs=file_ids([src]))
    check_encodable(info, model.scale, src)
    rehearse(src, dst, info, scale=model.scale, crf=args.crf, copy=args.frames is None)
    precision, _ = choose_precision(args.precision, device)
    print(describe_network(model, weights, path, args))
    try:
        written = upscale_video(model, src, dst, info, crf=args.crf, frames=args.frames, tile=args.tile,
                                tile_pad=args.tile_pad, self_ensemble=args.self_ensemble, precision=precision)
    except Interrupted as e:  # Ctrl-C's, SIGTERM's or SIGHUP's exit status, with the frame it stopped at
        with contextlib.suppress(OSError):  # after a SIGHUP the terminal may be gone
            print(f"{Path(sys.argv[0]).name}: {e}", file=sys.stderr)
        sys.exit(128 + e.signum)
    exact = "" if precision == "fp32" else f", {precision}"
    cut = "; --frames: audio and subtitles left out" if args.frames else ""
    print(f"{shown(src)} ({info.width}x{info.height}, {plural(written, 'frame')}) -> {shown(dst)} "
          f"({info.width * model.scale}x{info.height * model.scale}, H.264 crf {args.crf}{exact}{cut})")


def upscale_file(model, src: Path, dst: Path, tile: int, tile_pad: int | None, self_ensemble: bool = False,
                 quality: int = 95, precision: str = "fp32") -> None:
    img, deep = read_image(src)
    sr = upscale_image(model, img, tile=tile, tile_pad=tile_pad, self_ensemble=self_ensemble, precision=precision)
    note = ", read and written as 8-bit" if deep else ""
    if dst.suffix.lower() in (".jpg", ".jpeg") and sr.mode in ("RGBA", "LA"):
        sr, note = sr.convert(sr.mode[:-1]), note + ", alpha dropped: JPEG has none"
    elif dst.suffix.lower() == ".bmp" and sr.mode == "LA":  # BMP holds RGBA, not gray with alpha
        sr = sr.convert("RGBA")
    with folder_for(dst):
        save_image(sr, dst, quality=quality, **image_metadata(img))
    exact = "" if precision == "fp32" else f", {precision}"  # not the exact fp32 result: say so
    tqdm.write(f"{shown(src)} ({img.width}x{img.height}{note}) -> {shown(dst)} ({sr.width}x{sr.height}{exact})")


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument("input", help="an image file, a folder of images, or a video file")
    parser.add_argument("-o", "--output", "--save_dir", default=None,
                        help="output file (with an image extension; a video's: .mp4 .m4v .mov .mkv) or folder "
                             "(without); "
                             "None: beside the input file, or <INPUT>_x<scale>/ for a folder")
    add_inference_flags(parser, precision="auto")
    parser.add_argument("--recursive", action="store_true", help="a folder INPUT: its subfolders too, mirrored")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace outputs that exist (never an input)")
    existing.add_argument("--skip_existing", action="store_true",
                        help="leave out inputs whose output exists (finish a folder run that was stopped)")
    parser.add_argument("--ext", type=extension, choices=WRITE_EXTENSIONS, default=None,
                        help="the format of the outputs infer names (<name>_x<scale>.EXT: a folder run's, or "
                             "beside a file); not with -o FILE, whose extension is its format; None: png")
    parser.add_argument("--quality", type=quality, default=95, help="JPEG and WebP quality, 1-100")
    parser.add_argument("--crf", type=crf, default=DEFAULT_CRF,
                        help="a video's H.264 quality, 0-51, lower is better (x264's CRF); 17: visually lossless")
    parser.add_argument("--frames", type=frames, default=None, metavar="START:STOP",
                        help="a video: only these frames (indices from 0, STOP not included: 0:48 is the first "
                             "48), without its audio and subtitles; None: all, with them")
    return parser


def extension(text: str) -> str:
    """'jpg', '.JPG' -> '.jpg': --ext as WRITE_EXTENSIONS spells it."""
    return "." + text.lower().removeprefix(".")


def crf(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 51:
        raise argparse.ArgumentTypeError(f"must be 0 to 51, got {value}")
    return value


def frames(text: str) -> tuple[int, int | None]:
    try:
        return frame_span(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


if __name__ == "__main__":
    run_cli(main, build_parser().parse_args())
