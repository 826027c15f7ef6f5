"""A training run: its folder (one run, one process at a time), log.csv, checkpoint format, and stop signals."""
import csv
import math
import reprlib
import shutil
import signal
import sys
import textwrap
from pathlib import Path

import torch

from losses import parse_loss
from metrics import METRICS
from model import DEFAULT_ARCH
from resize import DEGRADATIONS, RANDOM_DEGRADATIONS
from training import DEFAULT_RECIPE, how_fault, recipe_how
from utils import STOP_SIGNALS, UserError, plural, shown, warn

from .files import atomic_path, check_output_dir, lock_folder, make_dir, remove_stale_temporaries

RUN_FILES = ("last.pt", "best.pt", "log.csv")  # a folder holding any of them holds a run
RUN_OUTPUTS = RUN_FILES + ("curves.png",)      # what a run writes there
RUN_MADE = ("curves.png", "tensorboard")        # and what only a run's files say it made

# What a run checkpoint (train.Run.checkpoint) holds and means; raise it when that changes, and
# teach upgrade_run_checkpoint the step. 1: every file written before the number was kept in them;
# 3 added the recipe (training.RECIPES): its name in args, how it builds the optimizer in "recipe";
# 4 added the recipe's clip_grad_norm.
RUN_FORMAT = 4


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
    if checkpoint["format"] == 2:
        checkpoint = upgrade_format_2(checkpoint)
    if checkpoint["format"] == 3:
        checkpoint = upgrade_format_3(checkpoint)
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


def upgrade_format_2(checkpoint: dict) -> dict:
    """Format 2 (2026-12-07) trained as the seed recipe builds it: Adam, StepLR, PyTorch's init."""
    args = {"recipe": DEFAULT_RECIPE} | checkpoint["args"]
    how = {key: value for key, value in recipe_how(DEFAULT_RECIPE).items() if key != "clip_grad_norm"}
    return checkpoint | {"args": args, "recipe": how, "format": 3}


def upgrade_format_3(checkpoint: dict) -> dict:
    """Format 3 (2026-12-07) never clipped gradients."""
    recipe = checkpoint["recipe"]
    if isinstance(recipe, dict):  # anything else is refused by check_run_state, in words
        recipe = {"clip_grad_norm": 0.0} | recipe
    return checkpoint | {"recipe": recipe, "format": 4}


# ---------------------------------------------------------------- a run's state, checked on resume

DAMAGED = "the run's checkpoint was edited or damaged"


class Missing:
    def __repr__(self):
        return "missing"


def short(value) -> str:
    """`value` as an error shows it: reprlib's repr, cut short (a tensor or a long list is not printed whole)."""
    r = reprlib.Repr()
    r.maxlist = r.maxtuple = 6
    r.maxdict, r.maxlevel, r.maxstring, r.maxother = 4, 1, 40, 24
    return r.repr(dict(value) if isinstance(value, dict) else value)  # a state dict is an OrderedDict


def bad_state(path, field: str, value, must: str) -> UserError:
    return UserError(f"{shown(path)}: its {field} is {shown(short(value))}: {must}; {DAMAGED}")


def count(value) -> bool:
    """A whole number, 0 or more (a bool is not one, though Python counts it an int)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def byte_tensor(value) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1


def check_run_state(checkpoint: dict, path) -> None:
    """Every field of a run checkpoint (of RUN_FORMAT, its args read) that a resume reads, by type
    and range: a hand-edited or damaged last.pt is refused in one line naming the field, before
    any work, not met as a traceback (or a silent wrong value) mid-run. The optimizer's, scheduler's,
    scaler's and weights' states are checked as they load (load_run_state)."""
    for field, ok, must in run_state_rules(checkpoint):
        value = checkpoint.get(field, Missing())
        if not ok(value):
            raise bad_state(path, field, value, must)


def run_state_rules(c: dict) -> list[tuple]:
    """(field, test, what it must be), in an order where each test may rely on the fields before it."""
    loss = c["args"]["loss"]
    terms = len(parse_loss(loss))
    per_epoch = c.get("steps_per_epoch")
    within = f", fewer than its steps_per_epoch, {per_epoch}" if count(per_epoch) else ""
    state = "a state dict"
    return [
        ("epoch", count, "a whole number of epochs done, 0 or more"),
        ("steps_per_epoch", lambda v: v is None or count(v) and v > 0,
         "a whole number of steps, 1 or more (None: not recorded)"),
        ("step", lambda v: count(v) and (per_epoch is None or v < per_epoch),
         f"the steps done of the epoch it stopped in: a whole number, 0 or more{within}"),
        ("loss_sum", finite, "the sum of those steps' losses, a number"),
        ("term_sums", lambda v: isinstance(v, list) and len(v) == terms and all(map(finite, v)),
         f"a list of {plural(terms, 'number')}, one per term of its --loss {loss}"),
        ("seconds", lambda v: finite(v) and v >= 0, "a number of seconds, 0 or more"),
        # -inf: not validated yet; +inf: a perfect score (metrics.psnr of identical images)
        ("best_psnr", lambda v: finite(v) or isinstance(v, float) and math.isinf(v),
         "a number of dB (-inf: not validated yet)"),
        ("best_epoch", count, "the epoch of best_psnr, a whole number (0: not validated yet)"),
        ("world_size", lambda v: count(v) and v > 0, "the number of processes that trained it, 1 or more"),
        ("precision", lambda v: isinstance(v, str), "the name of the precision it trained in"),
        ("epoch_precision", lambda v: isinstance(v, str), "the precisions of the epoch it stopped in, text"),
        ("rng", lambda v: isinstance(v, dict) and byte_tensor(v.get("torch")) and (
            v.get("cuda") is None or byte_tensor(v["cuda"])),
         "the random generators' states: {'torch': a byte tensor, 'cuda': a byte tensor or None}"),
        ("model", lambda v: isinstance(v, dict), state),
        ("optimizer", lambda v: isinstance(v, dict), state),
        ("scheduler", lambda v: isinstance(v, dict), state),
        ("scaler", lambda v: v is None or isinstance(v, dict), f"{state} or None"),
        ("ema", lambda v: v is None or isinstance(v, dict), f"{state} or None"),
        ("degradation", lambda v: v is None or isinstance(v, str) and v in [*DEGRADATIONS, *RANDOM_DEGRADATIONS],
         f"a registered degradation: {', '.join([*DEGRADATIONS, *RANDOM_DEGRADATIONS])}"),
        ("recipe", lambda v: how_fault(v) is None,
         f"how the recipe builds the optimizer and schedule ({how_fault(c.get('recipe'))})"),
    ]


# What each state of a run checkpoint is, as an error names it.
STATES = {"model": "the network's weights", "optimizer": "the optimizer's state for the network's parameters",
          "scheduler": "the learning-rate schedule's state", "scaler": "the loss scaler's state",
          "ema": "the averaged weights (--ema)", "rng": "the random generators' states"}


def load_run_state(path, field: str, state, load) -> None:
    """`load(state)`; a state that does not load (torch's load_state_dict raises whatever it meets)
    is one line naming the field."""
    try:
        load(state)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        # torch's message names the keys or sizes that differ on its later lines: all of it, cut short
        reason = f"it lacks {e}" if isinstance(e, KeyError) else textwrap.shorten(str(e), width=200)
        raise bad_state(path, field, state, f"{STATES[field]} ({shown(reason)})") from None


def load_optimizer(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """load_state_dict, and what it takes on trust: each group's numbers (lr, betas, eps, ...), and
    each parameter's state, tensors of its shape (the step: a scalar)."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for key, default in optimizer.defaults.items():
            value = group.get(key)
            if isinstance(default, tuple):  # betas: as many numbers
                ok = isinstance(value, tuple | list) and len(value) == len(default) and all(
                    finite(v) and v >= 0 for v in value)
            else:  # a switch or a choice (amsgrad, foreach) is not read here
                ok = not finite(default) or finite(value) and value >= 0
            if not ok:
                raise ValueError(f"its {key} is {short(value)}, not a number")
    for p, param_state in optimizer.state.items():
        for key, value in param_state.items():
            if not isinstance(value, torch.Tensor) or value.dim() and value.shape != p.shape:
                found = f"of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else short(value)
                raise ValueError(f"its {key} is {found}, not a tensor of its parameter's shape {tuple(p.shape)}")


def load_scheduler(scheduler: torch.optim.lr_scheduler.LRScheduler, state: dict) -> None:
    """load_state_dict (which takes any dict), and the numbers the schedule reads (StepLR's, or
    LambdaLR's, whose function is the recipe's, not the file's)."""
    scheduler.load_state_dict(state)
    groups = len(scheduler.optimizer.param_groups)
    rules = {"last_epoch": count(scheduler.last_epoch)}
    if isinstance(scheduler, torch.optim.lr_scheduler.StepLR):
        rules |= {"step_size": count(scheduler.step_size) and scheduler.step_size > 0,
                  "gamma": finite(scheduler.gamma) and scheduler.gamma > 0}
    for name in ("base_lrs", "_last_lr"):
        lrs = getattr(scheduler, name)
        rules[name] = isinstance(lrs, list) and len(lrs) == groups and all(finite(lr) and lr >= 0 for lr in lrs)
    for name, ok in rules.items():
        if not ok:
            raise ValueError(f"its {name} is {short(getattr(scheduler, name))}")


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
            "seconds": None if seconds is None else round(seconds, 1), "precision": checkpoint.get("precision"),
            "recipe": checkpoint.get("args", {}).get("recipe", DEFAULT_RECIPE)}


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
