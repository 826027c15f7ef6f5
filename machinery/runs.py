"""A training run: its folder (one run, one process at a time), log.csv, checkpoint format, and stop signals."""
import csv
import math
import shutil
import signal
import sys
from pathlib import Path

from metrics import METRICS
from model import DEFAULT_ARCH
from utils import STOP_SIGNALS, UserError, shown, warn

from .files import atomic_path, check_output_dir, lock_folder, make_dir, remove_stale_temporaries

RUN_FILES = ("last.pt", "best.pt", "log.csv")  # a folder holding any of them holds a run
RUN_OUTPUTS = RUN_FILES + ("curves.png",)      # what a run writes there
RUN_MADE = ("curves.png", "tensorboard")        # and what only a run's files say it made

# What a run checkpoint (train.Run.checkpoint) holds and means; raise it when that changes, and
# teach upgrade_run_checkpoint the step. 1: every file written before the number was kept in them.
RUN_FORMAT = 2


def upgrade_run_checkpoint(checkpoint: dict, path, device_type: str) -> dict:
    """A run checkpoint of any format this code knows, brought to RUN_FORMAT: what older files
    lack is filled in with what it meant when they were written. `device_type` is where the run
    resumes: a run saved before --precision trained in fp32 on a CPU and in autocast on a GPU."""
    found = checkpoint.get("format", 1)
    if not isinstance(found, int) or not 1 <= found <= RUN_FORMAT:
        raise UserError(f"{path}: a run checkpoint of format {found!r}, which this code does not know "
                        f"(it reads formats 1 to {RUN_FORMAT}); update ResShuffle to resume it")
    if found == 1:
        checkpoint = upgrade_format_1(checkpoint, device_type)
    return checkpoint


def upgrade_format_1(checkpoint: dict, device_type: str) -> dict:
    """Format 1 (runs of 2026-11-24 to 2026-12-07) grew field by field; each missing one is filled in.
    A resume takes the run's flags from `args`, but its precision from `precision`, what it trains in."""
    c, args = dict(checkpoint), dict(checkpoint["args"])
    c["model_args"] = {"arch": DEFAULT_ARCH} | c["model_args"]  # saved before --arch: ResShuffle
    args.setdefault("loss", "l1")  # before --loss: L1
    args.setdefault("arch", c["model_args"]["arch"])
    args.setdefault("degradation", c.get("degradation") or "pil")  # before --degradation: PIL bicubic
    c.setdefault("precision", "fp32" if device_type == "cpu" else "auto")  # before --precision
    defaults = {"step": 0, "loss_sum": 0.0, "seconds": 0.0, "best_psnr": -math.inf, "best_epoch": 0,
                "world_size": 1, "scaler": None, "ema": None, "epoch_precision": ""}
    c |= {k: v for k, v in defaults.items() if k not in c}
    if c.get("term_sums") is None:  # before --loss: an L1 run, whose one term is its loss
        c["term_sums"] = [c["loss_sum"]]
    c.setdefault("steps_per_epoch", None)  # not recorded: the resume takes the epoch's length as unchanged
    c["rng"] = {"cuda": None} | c["rng"]
    return c | {"args": args, "format": 2}


def csv_fields() -> list[str]:
    """log.csv's columns, every metric of metrics.METRICS included. Each --loss term's mean
    (loss_l1, ...) follows them, as a column of the rows (write_log)."""
    return (["epoch", "loss", "lr"] + [f"val_{m}" for m in METRICS] + ["seconds", "precision"]
            + [f"bicubic_{m}" for m in METRICS])


def holds_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in RUN_FILES)


def check_run_folder(folder: Path, new_run: bool, overwrite: bool, lock: bool, tensorboard: bool = False):
    """Before any work: a new run's folder holds no run (unless `overwrite`), the run's files are
    files, the folder can be written. With `lock` (rank 0), an existing folder is locked now,
    so that a second process is refused before it decodes anything; the lock file, or None."""
    for name in RUN_FILES:
        if (folder / name).exists() and not (folder / name).is_file():
            raise UserError(f"{folder / name}: is not a regular file, where the run keeps one; move it away")
    if tensorboard and (folder / "tensorboard").exists() and not (folder / "tensorboard").is_dir():
        raise UserError(f"{folder / 'tensorboard'}: is not a folder, where the run keeps its TensorBoard events; "
                        f"move it away")
    if new_run and not overwrite and holds_run(folder) and not (folder / "last.pt").exists():
        raise UserError(f"{folder}: holds a run that saved no last.pt to resume (it stopped in its first epoch); "
                        f"choose another --run_name, or pass --overwrite to start it again")
    if new_run and not overwrite and holds_run(folder):
        raise UserError(f"{folder}: holds a run already; continue it with --resume {folder / 'last.pt'}, "
                        f"choose another --run_name, or pass --overwrite to replace it")
    theirs = [name for name in RUN_MADE if (folder / name).exists()]
    if new_run and theirs and not holds_run(folder):  # not a run's: a user's files, never replaced
        raise UserError(f"{folder / theirs[0]}: a new run would write there, and no run made it; move it away "
                        f"or choose another --run_name")
    check_output_dir(folder)
    return lock_folder(folder) if lock and folder.is_dir() else None


def open_run_folder(folder: Path, lock, new_run: bool, overwrite: bool, keep_through: int):
    """Rank 0, when the run starts writing: the folder made and locked (if it was not there
    before), a new run's folder checked again under the lock (a run started at the same moment)
    and emptied of an `overwrite`n run, a killed run's temporaries removed, the log cut back to
    epoch `keep_through`. The lock file."""
    make_dir(folder)
    lock = lock or lock_folder(folder)
    if new_run:
        if holds_run(folder) and not overwrite:
            raise UserError(f"{folder}: another run started there meanwhile; choose another --run_name")
        if holds_run(folder):  # --overwrite: the replaced run's files and events
            for name in RUN_OUTPUTS:
                (folder / name).unlink(missing_ok=True)
            shutil.rmtree(folder / "tensorboard", ignore_errors=True)
    for stale in remove_stale_temporaries(folder):
        warn(f"removed {stale}, left by a run killed while writing it")
    trim_log(folder / "log.csv", keep_through=keep_through)
    return lock


# ---------------------------------------------------------------- log.csv

def trim_log(path: Path, keep_through: int) -> None:
    """Drop log rows after the resumed checkpoint's epoch (they will be trained again), and torn rows."""
    if path.exists():
        write_log(path, [r for r in read_log(path) if int(r["epoch"]) <= keep_through])


def append_log(path: Path, row: dict) -> list[dict]:
    """Add a row by writing the whole log anew (atomically: a full disk leaves the old log whole); all its rows."""
    rows = (read_log(path) if path.exists() else []) + [row]
    write_log(path, rows)
    return rows


def read_log(path: Path) -> list[dict]:
    """The rows of a run's log.csv, without torn ones (a row missing fields, from an old kill)."""
    try:
        with open(path, newline="") as f:
            return [r for r in csv.DictReader(f)  # a torn row lacks fields: None
                    if None not in r.values() and None not in r and (r.get("epoch") or "").isdigit()]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path}: can't be read ({getattr(e, 'strerror', None) or e})") from None


def write_log(path: Path, rows: list[dict]) -> None:
    """The rows, with the columns a user added to the file kept after ours."""
    fields = csv_fields()
    extra = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in fields]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields + extra, restval="")
        writer.writeheader()
        writer.writerows(rows)


def training_summary(checkpoint: dict, log: Path) -> dict:
    """What an export keeps of the run that made it: its epochs, optimizer steps, precision, and
    seconds (the log's epoch times up to the checkpoint's epoch, validation included; None without the log)."""
    epoch = checkpoint.get("epoch", 0)
    seconds = sum(float(r["seconds"]) for r in read_log(log) if int(r["epoch"]) <= epoch) if log.is_file() else None
    return {"epochs": epoch, "steps": epoch * checkpoint.get("steps_per_epoch", 0),
            "seconds": None if seconds is None else round(seconds, 1), "precision": checkpoint.get("precision")}


class StopSignal:
    """SIGINT (Ctrl-C), SIGTERM and SIGHUP (the terminal closed) ask the training loop to save
    last.pt and stop after this step.

    A second signal stops at once, without saving (last.pt then holds the previous save). After a
    SIGHUP the terminal may be gone, and printing to it fails: the messages are then dropped.
    """

    def __init__(self, quiet: bool = False):
        self.signum, self.previous, self.quiet = None, {}, quiet

    def __enter__(self):
        for s in (signal.SIGINT, *STOP_SIGNALS):
            self.previous[s] = signal.signal(s, self.handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        if not self.quiet:
            say(f"\n{signal.Signals(signum).name}: saving and stopping after this step "
                f"(send it again to quit at once, without saving)", file=sys.stderr)

    def exit(self, where: str, path: Path, world_size: int = 1) -> None:
        signum = self.signum or signal.SIGTERM  # under torchrun, another process may have had it
        launcher = f"torchrun --nproc_per_node {world_size}" if world_size > 1 else "python"
        if not self.quiet:
            say(f"stopped by {signal.Signals(signum).name} {where}; saved {shown(path)}\n"
                f"resume with: {launcher} {sys.argv[0]} --resume {shown(path)}")
        sys.exit(128 + signum)


def say(message: str, file=None) -> None:
    """print, except where the terminal has gone (a SIGHUP, a closed pipe): nothing to tell then."""
    try:
        print(message, file=file or sys.stdout, flush=True)
    except OSError:
        pass
