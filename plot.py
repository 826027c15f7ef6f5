"""Draw a training run's log.csv as a PNG: each validation metric against bicubic's, loss, learning rate.

usage: python plot.py checkpoints/NAME[/log.csv] [-o curves.png] [--bicubic 27.672] [--overwrite]

train.py draws <run>/curves.png itself at every validation; this redraws one from any log,
e.g. the shipped checkpoint's: python plot.py checkpoints/resshuffle_x4.log.csv -o show/resshuffle_x4_curves.png
"""
from pathlib import Path

from machinery.curves import write_curves
from machinery.files import check_output_file, folder_for
from machinery.runs import read_log
from utils import UserError, make_parser, plural, run_cli, shown


def main(args):
    log = Path(args.log)
    if log.is_dir():  # a run's folder: its log
        log = log / "log.csv"
    if not log.is_file():
        raise UserError(f"{log}: no such log file")
    rows = read_log(log)
    if not rows:
        raise UserError(f"{log}: holds no epoch rows (a train.py log.csv has epoch, loss, lr, val_psnr, ...)")
    out = Path(args.output or default_output(log))
    if out.suffix.lower() != ".png":  # also: never over the log, a checkpoint or an image of another kind
        raise UserError(f"{out}: plot.py writes a PNG; name the output .png")
    check_output_file(out, overwrite=args.overwrite)
    try:
        with folder_for(out):
            write_curves(rows, out, title=log.parent.name if log.name == "log.csv" else log.stem,
                         bicubic_psnr=args.bicubic)
    except ValueError as e:  # a value that is not a number
        raise UserError(f"{log}: {e}") from None
    print(f"{shown(log)} ({plural(len(rows), 'epoch')}) -> {shown(out)}")


def default_output(log: Path) -> Path:
    """<log name>_curves.png beside the log: never a name a run writes (its curves.png), so
    plot.py runs after train.py without --overwrite."""
    return log.with_name(f"{log.name.removesuffix('.csv')}_curves.png")


def build_parser():
    parser = make_parser(__doc__)
    parser.add_argument("log", help="a run's log.csv, or its folder")
    parser.add_argument("-o", "--output", default=None,
                        help="the PNG to write; None: <log name>_curves.png beside the log "
                             "(log_curves.png for a run's)")
    parser.add_argument("--bicubic", type=float, default=None,
                        help="bicubic's validation PSNR, drawn as a line; None: the log's bicubic_psnr column")
    parser.add_argument("--overwrite", action="store_true", help="replace the PNG if it exists")
    return parser


if __name__ == "__main__":
    run_cli(main, build_parser().parse_args())
