"""Train ResShuffle on a folder of HR images (DIV2K_train_HR by default).

usage: python train.py [--upscale_factor 4] [--num_epochs 400] [--batch_size 32] [--lr 2e-4]
           [--train_dir data/DIV2K_train_HR] [--val_dir data/DIV2K_valid_HR] [--run_name NAME]
       python train.py --resume checkpoints/NAME/last.pt
       python train.py --export checkpoints/NAME/best.pt my_x4.safetensors     # or .pt, .onnx

A run writes checkpoints/<run_name>/: last.pt (every epoch), best.pt (best validation PSNR)
and log.csv, each written atomically. A new run never writes into a folder that holds a run
(--overwrite replaces it), and one process at a time uses a run folder. Ctrl-C or SIGTERM
saves last.pt where the run is, mid-epoch too, and --resume goes on from there with the run's
own flags, to the same weights as a run never stopped. A NaN/inf loss stops the run, naming the
iteration; the checkpoints are kept. A full disk stops it with one line; last.pt stays whole.
Adam + StepLR + L1 loss (--loss), as the original, by default (--recipe: training.RECIPES).
--precision auto trains in bf16 autocast where the device runs it natively (a GPU of compute
capability 8.0 or newer; a CPU with AVX512-BF16 or AMX),
fp16 with loss scaling on older GPUs, else fp32; the log says which and why. On CUDA the patches
are cut straight into pinned memory; on every device the network runs channels_last, and the
patches are flipped on the device.

Where things are: the loop is `train` below; the step and its loss are training.train_step;
the network is model.py; the patches are dataset.py.
"""
import argparse
import contextlib
import copy
import math
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from dataset import (
    EpochSampler,
    PatchLoader,
    TrainDataset,
    check_measurable_images,
    count_patchable,
    device_batch,
    eval_pairs,
    validation_inputs,
)
from losses import LOSSES, WeightedLoss, loss_spec
from machinery import distributed
from machinery.checkpoint import check_model_args, export_weights, load_checkpoint, save_checkpoint
from machinery.curves import crop_panel, log_to_tensorboard, open_tensorboard, tensorboard_writer, write_curves
from machinery.datacache import default_cache_dir
from machinery.fast import build_fast_network
from machinery.images import list_images
from machinery.precision import PRECISIONS, choose_precision, grad_scaler, load_scaler_state
from machinery.runs import (
    RUN_FORMAT,
    StopSignal,
    append_log,
    check_run_folder,
    check_run_state,
    load_optimizer,
    load_run_state,
    load_scheduler,
    open_run_folder,
    read_log,
    training_summary,
    upgrade_run_checkpoint,
)
from machinery.upscale import exact_cuda, upscale
from metrics import METRICS, format_scores, means, measure, measure_on_device, metric_labels
from model import DEFAULT_ARCH, NETWORKS, PADDINGS, UPSAMPLE_STAGES, count_parameters, network_options
from resize import DEGRADATIONS, RANDOM_DEGRADATIONS, REAL_VALIDATION, resize_bicubic
from training import (
    HOW_KEYS,
    LR_PATCH_KEY,
    RECIPE_FLAGS,
    RECIPES,
    ema_decay_at,
    how_fault,
    initialise,
    make_optimizer,
    make_schedule,
    recipe_how,
    stepped_every_batch,
    train_step,
    update_ema,
)
from utils import (
    REPO,
    UserError,
    make_parser,
    non_negative_int,
    plural,
    positive_float,
    positive_int,
    run_cli,
    seed_everything,
    seed_int,
    select_device,
    shown,
    warn,
)

# What each flag is to a run. "run": defines it; kept in its checkpoint, and a resume refuses another
# value. "session": kept too, and a resume takes the run's value unless the flag is typed again.
# "command": this invocation's alone (what to do now; --data_cache names this machine's folder).
FLAGS = {
    "upscale_factor": "run", "arch": "run", "num_features": "run", "num_residuals": "run", "mean_shift": "run",
    "image_skip": "run", "luminance": "run", "padding": "run", "batch_size": "run", "lr": "run", "step_size": "run",
    "gamma": "run", "loss": "run",
    "patch_size": "run", "patches_per_image": "run", "degradation": "run", "seed": "run",
    "checkpoint_dir": "run", "run_name": "run", "recipe": "run",
    "num_epochs": "session", "num_workers": "session", "train_dir": "session",
    "val_dir": "session",
    "ema": "session", "max_val_images": "session", "val_every": "session", "patience": "session",
    "tensorboard": "session", "device": "session", "precision": "session",
    "target_psnr": "command", "resume": "command", "export": "command", "overwrite": "command", "data_cache": "command",
}
SESSION_FLAGS = tuple(name for name, kind in FLAGS.items() if kind == "session")


@dataclass
class Run:
    """One training run: what trains, with what, on what data, and how far it has come.

    `checkpoint()` is the one dict that last.pt and best.pt hold; `restore()` reads it back.
    """
    args: argparse.Namespace
    model_args: dict
    folder: Path
    device: torch.device
    rank: int                     # 0 validates, prints and writes; under torchrun there are others
    world_size: int
    model: torch.nn.Module        # the network whose weights are saved (model.NETWORKS)
    net: torch.nn.Module          # what trains: `model`, or DDP around it under torchrun
    ema: torch.nn.Module | None   # --ema: the average of the weights, validated and saved beside them
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    precision: str                # fp32, bf16 or fp16 (autocast): precision.choose_precision
    precision_why: str            # why: "asked for", or what --precision auto found
    loader: PatchLoader
    steps_per_epoch: int
    val_pairs: list               # (index, name, hr, lr) of this process's share, decoded once
    val_count: int                # validation images, all processes' shares together
    bicubic: dict = None          # bicubic upsampling's val scores, metrics.METRICS: the scores to beat
    epoch: int = 0                # whole epochs done
    step: int = 0                 # steps done of the next epoch (a run stopped mid-epoch)
    how: dict = None              # the recipe's optimizer, schedule and init (training.HOW_KEYS)
    loss: WeightedLoss = None     # --loss
    loss_sum: float = 0.0         # the sum of those steps' losses
    term_sums: list = None        # and of each --loss term's (unweighted)
    seconds: float = 0.0          # and the time they took
    best_psnr: float = -math.inf
    best_epoch: int = 0
    saved_at: str = ""            # where last.pt is ("after epoch 3", `where`); "" before the first save
    epoch_precision: str = ""     # the precisions the current epoch ran in, when it changed on a resume
    lock: object = None           # rank 0: the open lock file of `folder` (machinery.files.lock_folder)
    board: object = None          # rank 0 with --tensorboard: its SummaryWriter

    @property
    def lead(self) -> bool:
        return self.rank == 0

    @property
    def last_path(self) -> Path:
        return self.folder / "last.pt"

    def checkpoint(self) -> dict:
        cuda = self.device.type == "cuda"
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "epoch": self.epoch, "step": self.step, "loss_sum": self.loss_sum, "term_sums": self.term_sums,
            "seconds": self.seconds,
            "steps_per_epoch": self.steps_per_epoch,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "degradation": self.args.degradation, "best_psnr": self.best_psnr, "best_epoch": self.best_epoch,
            "world_size": self.world_size, "precision": self.precision, "epoch_precision": self.epoch_precision,
            "model_args": self.model_args, "args": vars(self.args), "recipe": self.how,
            "format": RUN_FORMAT,
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if cuda else None},
        }

    def restore(self, checkpoint: dict) -> None:
        """Go on from `checkpoint`, of RUN_FORMAT (resumed_checkpoint upgrades older ones and checks
        its fields); a state that does not fit what it loads into is one line (load_run_state)."""
        loads = {"model": self.model.load_state_dict, "optimizer": partial(load_optimizer, self.optimizer),
                 "scheduler": partial(load_scheduler, self.scheduler),
                 "scaler": partial(load_scaler_state, self.scaler), "rng": self.restore_rng}
        if self.ema is not None:  # --ema added to a run starts from its weights
            loads["ema"] = lambda state: self.ema.load_state_dict(state or checkpoint["model"])
        for field, load in loads.items():
            load_run_state(self.args.resume, field, checkpoint[field], load)
        for name in ("epoch", "step", "loss_sum", "term_sums", "seconds", "best_psnr", "best_epoch"):
            setattr(self, name, checkpoint[name])
        before = checkpoint["epoch_precision"] or checkpoint["precision"]
        if self.step and before.split("+")[-1] != self.precision:  # stopped mid-epoch in another
            self.epoch_precision = f"{before}+{self.precision}"

    def restore_rng(self, rng: dict) -> None:
        torch.set_rng_state(rng["torch"])
        if self.device.type == "cuda" and rng.get("cuda") is not None:  # None: a CPU run's
            torch.cuda.set_rng_state(rng["cuda"])


def main(args):
    if args.export:
        return export_weights(*args.export, overwrite=args.overwrite, summary=training_summary)
    try:
        train(args)
        distributed.barrier()  # all processes finish together
    finally:
        distributed.leave()


def train(args):
    run = start_run(args)
    if run is None:
        return
    with StopSignal(quiet=not run.lead) as stop, run.lock or contextlib.nullcontext():
        for epoch in range(run.epoch + 1, args.num_epochs + 1):
            started, lr_now = time.time() - run.seconds, epoch_start_lr(run)
            train_epoch(run, epoch, stop)
            if run.step < run.steps_per_epoch:  # a stop signal, mid-epoch: save where it is
                run.seconds = time.time() - started
                if run.lead:
                    with naming_what_is_kept(run):
                        save_checkpoint(run.checkpoint(), run.last_path)
                stop_all(run, stop, f"in epoch {epoch} after step {run.step} of {run.steps_per_epoch}")
            loss = end_epoch(run, epoch)
            due = epoch % args.val_every == 0 or epoch == args.num_epochs
            val = validate(run) if due else None
            record(run, epoch, loss, lr_now, val, seconds=time.time() - started)
            early_stop = ((early_stop_reason(run, epoch) or target_reached_reason(run, epoch, val))
                          if run.lead and val is not None else None)
            # Decided by rank 0 (early stopping) or by any process (a signal), obeyed by all.
            if distributed.any_process(early_stop is not None, run.device):
                if run.lead:
                    print(early_stop)
                break
            if distributed.any_process(stop.signum is not None, run.device) and epoch < args.num_epochs:
                stop_all(run, stop, f"after epoch {epoch}")
    if run.lead:
        print(f"done: best val PSNR {run.best_psnr:.4f} dB at epoch {run.best_epoch}; "
              f"checkpoints in {shown(run.folder)}")


def epoch_start_lr(run: Run) -> float:
    """The learning rate the current epoch started with (log.csv's lr), on a resume mid-epoch too: a
    schedule stepped every step has moved on by the steps done since."""
    if not stepped_every_batch(run.how):
        return run.scheduler.get_last_lr()[0]
    return run.scheduler.base_lrs[0] * run.scheduler.lr_lambdas[0](run.scheduler.last_epoch - run.step)


def stop_all(run: Run, stop: StopSignal, where_text: str) -> None:
    """Every process stops here, together (rank 0 has saved last.pt), as at a normal end."""
    distributed.barrier()
    stop.exit(where_text, run.last_path, run.world_size)


# ---------------------------------------------------------------- set-up

def start_run(args) -> Run | None:
    """A new run, or the one --resume names, with its data, network, optimizer and progress;
    None when a resumed run has no epochs left to train."""
    checkpoint = resumed_checkpoint(args)
    board = args.tensorboard and tensorboard_here(args)
    # Absolute in the checkpoint's args: a resume from another folder finds the same data.
    args.train_dir, args.val_dir = str(Path(args.train_dir).resolve()), str(Path(args.val_dir).resolve())
    if checkpoint and checkpoint["epoch"] >= args.num_epochs:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{shown(args.resume)}: trained {checkpoint['epoch']} of --num_epochs {args.num_epochs} already; "
                  f"nothing to do (a higher --num_epochs goes on)")
        return None
    rank, world_size, device = distributed.setup(args.device)
    if checkpoint and checkpoint["step"] and checkpoint["world_size"] != world_size:
        raise UserError(f"{args.resume}: stopped mid-epoch with "
                        f"{plural(checkpoint['world_size'], 'process', 'processes')}; "
                        f"resume it with as many (this is {world_size})")
    seed_everything(args.seed)
    model_args, folder = run_identity(args, checkpoint)
    lock = check_run_folder(folder, new_run=not args.resume, overwrite=args.overwrite, lock=rank == 0,
                            tensorboard=args.tensorboard)
    val_paths = check_data(args, model_args["scale"], world_size)
    how = checkpoint["recipe"] if checkpoint else recipe_how(args.recipe)
    run = build_run(args, model_args, folder, rank, world_size, device, val_paths, how)
    if checkpoint:
        run.restore(checkpoint)
        run.saved_at = where(run)
        note_process_count(run, checkpoint)
        restart_epoch_if_data_changed(run, checkpoint)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    run.bicubic = bicubic_scores(run.val_pairs, crop_border=model_args["scale"])
    if run.lead:
        run.lock = open_run_folder(folder, lock, new_run=not args.resume, overwrite=args.overwrite,
                                   keep_through=run.epoch)
        run.board = open_tensorboard(folder) if board else None
        announce(run)
    return run


def tensorboard_here(args) -> bool:
    """--tensorboard needs the package, asked now, before any work. A resumed run that logged to
    TensorBoard goes on without it where it is missing (its log.csv and curves.png hold the same),
    and stays a --tensorboard run: a later resume where it is installed logs again."""
    try:
        tensorboard_writer()
    except UserError:
        if "tensorboard" in args.given or not args.resume:
            raise
        if int(os.environ.get("RANK", "0")) == 0:
            warn(f"{args.resume}: the run logged to TensorBoard, but the tensorboard package is not installed "
                 f"here: going on without it (log.csv and curves.png as before; pip install tensorboard, and the "
                 f"next resume logs again)")
        return False
    return True


def run_identity(args, checkpoint: dict | None) -> tuple[dict, Path]:
    """The network's model_args and the run's folder: the checkpoint's, or from the flags."""
    if checkpoint:
        check_model_args(checkpoint["model_args"], args.resume)
        return checkpoint["model_args"], Path(args.resume).parent
    model_args = network_args(args)
    run_name = args.run_name or f"x{args.upscale_factor}_{datetime.now():%Y%m%d-%H%M%S}"
    return model_args, Path(args.checkpoint_dir) / run_name


# The flags that are network options; each goes into model_args where the --arch network takes it.
NETWORK_FLAGS = ("num_features", "num_residuals", "mean_shift", "image_skip", "luminance", "padding")


def network_args(args) -> dict:
    """model_args from the flags: --arch, the scale, and every option of the network, at its own
    default unless its flag was typed. A network option typed for a network without it is refused."""
    options = network_options(args.arch)
    for name in NETWORK_FLAGS:
        if name in args.given and name not in options:
            raise UserError(f"--{name}: the {args.arch} network has no such option (its options: "
                            f"{', '.join('--' + n for n in NETWORK_FLAGS if n in options) or 'none'})")
    typed = {name: getattr(args, name) for name in NETWORK_FLAGS
             if name in args.given or (name in args.from_recipe and name in options)}
    return {"arch": args.arch, "scale": args.upscale_factor, **options, **typed}


def build_run(args, model_args: dict, folder: Path, rank: int, world_size: int, device: torch.device,
              val_paths: list[Path], how: dict) -> Run:
    """The data decoded, the network, its optimizer and schedule (the recipe's: `how`): a run at its start."""
    scale = model_args["scale"]
    loader, steps_per_epoch = make_loader(args, scale, rank, world_size, device)
    # Each process validates every world_size-th image: the scores are gathered (validate).
    share = eval_pairs(val_paths[rank::world_size], scale, **validation_inputs(args.degradation))
    val_pairs = [(i, *pair) for i, pair in zip(range(rank, len(val_paths), world_size), share)]
    try:  # a resumed run's network or loss may no longer be registered
        model = build_fast_network(model_args).to(device, memory_format=torch.channels_last)
        loss = WeightedLoss(args.loss)
    except ValueError as e:
        raise UserError(f"{args.resume or 'train.py'}: {e}") from None
    # A cosine schedule spans the run's first --num_epochs, kept: a resume with more goes on at its floor.
    how = {"total_steps": args.num_epochs * steps_per_epoch} | how
    try:
        initialise(model, how)  # a resume then loads the run's weights over it
    except ValueError as e:
        raise UserError(f"--recipe {args.recipe}: {e}") from None
    optimizer = make_optimizer(model, how, lr=args.lr)
    scheduler = make_schedule(optimizer, how, step_size=args.step_size, gamma=args.gamma)
    kept = args.resume and "precision" not in args.given
    precision, why = (choose_precision(args.precision, device, source="this run's precision" if kept else "--precision")
                      if rank == 0 else (None, ""))
    if kept:
        why = "the run's; --precision changes it"
    precision = distributed.same_as_rank_0(precision)  # machines of a multi-node run may differ
    return Run(args=args, model_args=model_args, folder=folder, device=device, rank=rank, world_size=world_size,
               model=model, net=distributed.wrap(model, device),
               ema=copy.deepcopy(model).requires_grad_(False).eval() if args.ema else None,
               optimizer=optimizer, scheduler=scheduler, how=how,
               scaler=grad_scaler(device, precision), precision=precision, precision_why=why,
               loader=loader, steps_per_epoch=steps_per_epoch, val_pairs=val_pairs, val_count=len(val_paths),
               loss=loss, term_sums=[0.0] * len(loss.names))


def check_data(args, scale: int, world_size: int) -> list[Path]:
    """The data, checked from file headers before any image is decoded (DIV2K takes minutes):
    enough training images big enough for a patch to fill a batch; validation images big
    enough to measure (SSIM's window, after the crop border). The validation images."""
    train = list_images(args.train_dir)
    if not train:
        raise UserError(f"{args.train_dir}: no training images found")
    patch = hr_patch_size(args, scale)
    usable = count_patchable(train, patch)
    if not usable:
        raise UserError(f"{args.train_dir}: none of its {plural(len(train), 'image')} is readable and at least "
                        f"{patch}x{patch}: lower --patch_size")
    check_batches(usable * args.patches_per_image, args.batch_size, world_size)
    paths = list_images(args.val_dir)[:args.max_val_images or None]
    if not paths:
        raise UserError(f"{args.val_dir}: no validation images found")
    check_measurable_images(paths, scale=scale, crop_border=scale)
    return paths


def resumed_checkpoint(args) -> dict | None:
    """The checkpoint --resume names, with the run's own flags taken into `args`; None for a new run."""
    if not args.resume:
        return None
    checkpoint = load_checkpoint(args.resume)
    if "optimizer" not in checkpoint or "args" not in checkpoint:
        raise UserError(f"{args.resume}: holds weights only; --resume needs a run's last.pt")
    if Path(args.resume).name != "last.pt":
        raise UserError(f"{args.resume}: --resume continues a run from its last.pt; resuming this file would "
                        f"rewind the run (replacing its last.pt and log rows); to branch off it, copy it into a "
                        f"new folder as last.pt and resume that")
    retyped = [name for name in args.given if FLAGS[name] == "session"]  # the run's value is not used
    checkpoint["args"] = saved_flags(checkpoint["args"], args.resume, skip=retyped)
    device = args.device if "device" in args.given else checkpoint["args"].get("device", "auto")
    checkpoint = upgrade_run_checkpoint(checkpoint, args.resume, device_type=select_device(device).type)
    check_run_state(checkpoint, args.resume)
    # The run's flags; its precision is the one it trains in (args may hold the "auto" it was asked).
    saved = checkpoint["args"] | {"precision": checkpoint["precision"]}
    for name in args.given:
        if FLAGS[name] == "run" and name in saved and getattr(args, name) != saved[name]:
            raise UserError(f"{args.resume}: the run was started with --{name} {saved[name]} "
                            f"({describe_run(checkpoint)}); it can't change on resume "
                            f"(these can: {', '.join('--' + n for n in SESSION_FLAGS)}, and --data_cache)")
    for name, kind in FLAGS.items():
        if kind != "command" and name in saved and name not in args.given:
            setattr(args, name, saved[name])
    if args.precision not in PRECISIONS:
        raise UserError(f"{args.resume}: holds precision {args.precision!r}, none of {', '.join(PRECISIONS)}; "
                        f"pass --precision")
    return checkpoint


def saved_flags(saved, path, skip: list[str]) -> dict:
    """A run checkpoint's flags, each read as if typed on the command line: through its flag's type
    and choices, so that a hand-edited last.pt (`lr: "fast"`, `batch_size: 0`) is refused in one line
    naming the flag, as the typed value would be, not met as a traceback mid-run. Those in `skip`
    (typed again) are not read. The recipe's name need not be registered still: the run keeps how
    the recipe builds its optimizer and schedule."""
    if not isinstance(saved, dict):
        raise UserError(f"{shown(path)}: its args are a {type(saved).__name__}, not the run's flags")
    if not isinstance(saved.get("recipe", ""), str):
        raise UserError(f"{shown(path)}: the run's --recipe is {shown(repr(saved['recipe']))}, not a name")
    parser = build_parser()
    return saved | {name: flag_as_typed(parser, name, value, path) for name, value in saved.items()
                    if FLAGS.get(name, "command") not in ("command",) and name not in (*skip, "recipe")}


def flag_as_typed(parser: argparse.ArgumentParser, name: str, value, path):
    """`value`, from the checkpoint `path`, as `--name value` would have given it."""
    def refuse(message: str):
        raise UserError(f"{shown(path)}: the run's --{name} is {shown(repr(value))}, which train.py refuses: "
                        f"{shown(message)}")

    parser.error = refuse  # argparse's error() prints the usage and exits; here one line says it
    default = parser.get_default(name)
    if isinstance(default, bool):  # a switch: --mean_shift, --tensorboard
        if not isinstance(value, bool):
            refuse("it is a switch, true or false")
        return value
    if value is None and default is None:  # not given when the run started (--patch_size, --run_name)
        return None
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        refuse("not a value a flag takes")
    return getattr(parser.parse_args([f"--{name}={value}"]), name)  # a float's str is exact (repr)


def note_process_count(run: Run, checkpoint: dict) -> None:
    """Say so when a run goes on under another process count: the patches per step change."""
    before = checkpoint["world_size"]
    if before != run.world_size and run.lead:
        b = run.args.batch_size
        print(f"note: the run had {plural(before, 'process', 'processes')} ({b * before} patches per step), this has "
              f"{run.world_size} ({b * run.world_size} per step, {plural(run.steps_per_epoch, 'step')} per epoch)")


def restart_epoch_if_data_changed(run: Run, checkpoint: dict) -> None:
    """A run stopped mid-epoch whose training set has since changed size starts that epoch over:
    its step count no longer says where in the new epoch it was."""
    if not run.step:
        return
    changed = checkpoint["steps_per_epoch"] not in (None, run.steps_per_epoch)  # None: not recorded
    if changed or run.step >= run.steps_per_epoch:
        if run.lead:
            warn(f"the training set has changed since the run stopped in epoch {run.epoch + 1} at step {run.step}: "
                 f"that epoch starts over, with {plural(run.steps_per_epoch, 'step')}")
        run.step, run.loss_sum, run.seconds, run.epoch_precision = 0, 0.0, 0.0, ""
        run.term_sums = [0.0] * len(run.loss.names)


def where(run: Run) -> str:
    """Where the run is: 'after epoch 3', or 'in epoch 4 after step 2'."""
    return f"in epoch {run.epoch + 1} after step {run.step}" if run.step else f"after epoch {run.epoch}"


def describe_run(checkpoint: dict) -> str:
    """'resshuffle x4, num_features 64, num_residuals 16, mean_shift': the run's network."""
    m = dict(checkpoint["model_args"])
    arch, scale = m.pop("arch"), m.pop("scale")
    options = [k if v is True else f"{k} {v}" for k, v in m.items() if v is not False]
    return ", ".join([f"{arch} x{scale}"] + options)


def make_loader(args, scale: int, rank: int, world_size: int, device: torch.device) -> tuple[PatchLoader, int]:
    """The training patches, in batches for this process; and the steps in an epoch."""
    train_set = TrainDataset(args.train_dir, scale=scale, patch_size=hr_patch_size(args, scale),
                             patches_per_image=args.patches_per_image, seed=args.seed, degradation=args.degradation,
                             cache_dir=data_cache_dir(args.data_cache), quiet=rank != 0)
    sampler = EpochSampler(train_set, seed=args.seed, rank=rank, world_size=world_size)
    loader = PatchLoader(train_set, sampler, batch_size=args.batch_size, num_workers=args.num_workers,
                         pin_memory=device.type == "cuda")
    check_batches(len(train_set), args.batch_size, world_size)
    return loader, len(train_set) // world_size // args.batch_size


def data_cache_flag(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("empty: give a folder, or none")
    return text


def data_cache_dir(flag: str | None) -> Path | None:
    """--data_cache: the per-user cache folder by default, None ('none') to decode into memory."""
    if flag is None:
        return default_cache_dir()
    return None if flag.lower() == "none" else Path(flag)


def hr_patch_size(args, scale: int) -> int:
    """--patch_size, or EDSR's 48x48 LR patches."""
    return args.patch_size or 48 * scale


def check_batches(patches: int, batch_size: int, world_size: int) -> None:
    """An epoch must hold at least one batch for each process."""
    if patches // world_size // batch_size == 0:
        raise UserError(f"{plural(patches, 'patch', 'patches')} per epoch is less than one batch of {batch_size}"
                        f"{f' for each of {world_size} processes' if world_size > 1 else ''}: "
                        f"raise --patches_per_image or lower --batch_size")


def bicubic_scores(pairs: list, crop_border: int) -> dict:
    """The mean of every metric of PIL bicubic upsampling on (index, name, hr, lr) pairs, measured as
    the model is; every process measures its share."""
    rows = [(i, measure(resize_bicubic(lr, hr.shape[1], hr.shape[0]), hr, crop_border)) for i, _, hr, lr in pairs]
    return means(distributed.in_order(rows))


def announce(run: Run) -> None:
    """Rank 0: what is trained on what, and bicubic's validation score to beat."""
    args, data, n = run.args, run.loader.dataset, run.world_size
    n_params = count_parameters(run.model)
    print(f"run {shown(run.folder)}: {run.model_args}, {n_params:,} parameters, device {run.device}, "
          f"precision {run.precision} ({run.precision_why})")
    if n > 1:
        print(f"distributed: {n} processes ({torch.distributed.get_backend()}), batch {args.batch_size} per process, "
              f"{args.batch_size * n} per step")
    print(f"train: {plural(len(data.hr), 'image')}, {plural(len(data), 'patch', 'patches')} of "
          f"{data.lr_patch * data.scale}px "
          f"per epoch, {plural(run.steps_per_epoch, 'step')} of {args.batch_size}{f' x {n}' if n > 1 else ''}; "
          f"val: {plural(run.val_count, 'image')}{f', split over the {n} processes' if n > 1 else ''}")
    if args.degradation in RANDOM_DEGRADATIONS:
        print(f"degradation {args.degradation}: drawn anew for every patch (resize.py); validated on the val "
              f"images' PIL bicubic LR saved as JPEG q{REAL_VALIDATION['jpeg_quality']}")
    print(f"val bicubic {metric_labels()}: {format_scores(run.bicubic)}")
    if args.resume:
        best = f"best PSNR {run.best_psnr:.4f} dB" if math.isfinite(run.best_psnr) else "not validated yet"
        print(f"resumed from {shown(args.resume)} {where(run)}, lr {run.scheduler.get_last_lr()[0]:.3g}, {best}")


# ---------------------------------------------------------------- one epoch

def train_epoch(run: Run, epoch: int, stop: StopSignal) -> None:
    """Train `epoch` from step `run.step` on, to its end or to a stop signal (`run.step` then says where)."""
    args = run.args
    run.loader.sampler.set_epoch(epoch, start=run.step * args.batch_size * run.world_size)
    run.net.train()
    first_step, started, pending = run.step, time.time(), []
    with tqdm(run.loader, desc=f"epoch {epoch}/{args.num_epochs}", unit="step", total=run.steps_per_epoch,
              initial=run.step, leave=False, mininterval=1.0, disable=not run.lead) as bar:
        for lr, hr, flips in bar:
            lr, hr = device_batch(lr, hr, flips, run.device)
            pending.append(train_step(run.net, lr, hr, run.optimizer, run.scaler, run.precision, run.loss,
                                      clip_grad_norm=run.how["clip_grad_norm"]))
            if stepped_every_batch(run.how):
                run.scheduler.step()
            if run.ema is not None:
                update_ema(run.ema, run.model, ema_decay_at(args.ema, (epoch - 1) * run.steps_per_epoch + run.step))
            run.step += 1
            if not losses_due(run, stop):
                continue
            stopping = add_losses(run, epoch, pending, stop)
            bar.set_postfix(loss=f"{run.loss_sum / run.step:.4f}", lr=f"{run.scheduler.get_last_lr()[0]:.3g}",
                            refresh=False,
                            patches_s=f"{(run.step - first_step) * lr.shape[0] / (time.time() - started):.1f}")
            if stopping:
                break


def losses_due(run: Run, stop: StopSignal) -> bool:
    """Whether to read the losses now: every step on CPU; on CUDA (where reading waits for the GPU)
    every 10 steps, at the epoch's end, and at a stop signal. Under torchrun all processes read at
    the same steps."""
    if run.device.type != "cuda":
        return True
    return run.step % 10 == 0 or run.step == run.steps_per_epoch or (stop.signum is not None and run.world_size == 1)


def add_losses(run: Run, epoch: int, pending: list, stop: StopSignal) -> bool:
    """Add the pending step losses (averaged over processes) to `run.loss_sum`; whether any process
    was asked to stop. A NaN or inf loss ends training, naming its epoch and iteration."""
    flag = torch.tensor([float(stop.signum is not None)], device=run.device)
    *values, stopping = distributed.mean_over_processes(torch.cat(pending + [flag])).tolist()
    width = len(run.term_sums) + 1  # each step: its total, then each term
    steps = [values[i:i + width] for i in range(0, len(values), width)]
    losses = [step[0] for step in steps]
    pending.clear()
    bad = [i for i, v in enumerate(losses) if not math.isfinite(v)]
    if bad:
        distributed.barrier()  # every process sees the same mean losses, and leaves together
        if not run.lead:
            sys.exit(1)
        kept = (f"the last good checkpoint is {run.last_path} ({run.saved_at})" if run.saved_at
                else "no checkpoint was saved before it")
        raise UserError(f"epoch {epoch}, iteration {run.step - len(losses) + bad[0] + 1}: the loss is "
                        f"{losses[bad[0]]}: training stopped, {kept}; lower --lr or check the data")
    run.loss_sum += sum(losses)
    run.term_sums = [total + sum(step[1 + j] for step in steps) for j, total in enumerate(run.term_sums)]
    return bool(stopping)


def end_epoch(run: Run, epoch: int) -> dict:
    """Count `epoch` as done and step the lr schedule; the epoch's mean loss, and of each term:
    {"loss": ..., "loss_l1": ...}."""
    loss = {"loss": run.loss_sum / run.steps_per_epoch} | {
        f"loss_{name}": total / run.steps_per_epoch for name, total in zip(run.loss.names, run.term_sums)}
    run.epoch, run.step, run.loss_sum, run.term_sums, run.seconds = epoch, 0, 0.0, [0.0] * len(run.loss.names), 0.0
    if not stepped_every_batch(run.how):
        run.scheduler.step()
    if not distributed.weights_in_sync(run.model, run.device):
        raise UserError(f"epoch {epoch}: the {run.world_size} processes hold different weights")
    return loss


def validate(run: Run) -> tuple[dict, list]:
    """The mean of every metric (RGB, crop border = scale, as evaluate.py) of the EMA weights, or the
    weights; and for TensorBoard, (name, bicubic | SR | HR crop) of the first 3 images.

    Every process scores its share; the per-image scores are gathered and averaged in the images'
    order, so the figures are those of one process, to the last bit."""
    model = run.ema if run.ema is not None else run.model
    model.eval()
    scores, panels = [], []
    for i, name, hr, lr in run.val_pairs:
        sr = upscale(model, lr)
        scores.append((i, score(sr, hr, run.model_args["scale"], run.device)))
        if run.args.tensorboard and i < 3:
            panels.append((i, (name, crop_panel(lr, sr, hr))))
    run.model.train()
    return means(distributed.in_order(scores)), distributed.in_order(panels)


def score(sr, hr, crop_border: int, device: torch.device) -> dict:
    """Every metric of uint8 arrays, as evaluate.py measures them: on a CPU with numpy and
    scikit-image (the faster there), on a GPU in torch where a metric has that form."""
    if device.type == "cpu":
        return measure(sr, hr, crop_border)
    with exact_cuda():  # no cudnn.benchmark: it would tune the blur anew for each image size
        return measure_on_device(torch.from_numpy(sr).to(device), torch.tensor(hr, device=device), crop_border)


def record(run: Run, epoch: int, loss: dict, lr_now: float, val: tuple | None, seconds: float) -> None:
    """Rank 0: keep the best (by PSNR), log the epoch, save best.pt and last.pt, print the validation line."""
    precision, run.epoch_precision = run.epoch_precision or run.precision, ""  # "bf16+fp32": changed mid-epoch
    if not run.lead:
        return
    scores = val[0] if val else None
    improved = val is not None and scores["psnr"] > run.best_psnr
    if improved:
        run.best_psnr, run.best_epoch = scores["psnr"], epoch
    row = {"epoch": epoch, "lr": f"{lr_now:.6g}", "seconds": f"{seconds:.1f}", "precision": precision}
    row |= {k: f"{v:.6f}" for k, v in loss.items()}
    for name in METRICS:
        row |= {f"val_{name}": f"{scores[name]:.4f}" if val else "",
                f"bicubic_{name}": f"{run.bicubic[name]:.4f}" if val else ""}
    # The log row first: a kill before the checkpoint is saved leaves a row that resume trims.
    with naming_what_is_kept(run):
        rows = append_log(run.folder / "log.csv", row)
        state = run.checkpoint()
        if improved:
            save_checkpoint(state, run.folder / "best.pt")
        save_checkpoint(state, run.last_path)
    run.saved_at = where(run)
    draw(run, epoch, rows, panels=val[1] if val else None)
    if val is not None:
        print(f"epoch {epoch}: loss {loss['loss']:.5f}, lr {lr_now:.3g}, val{' (EMA)' if run.ema is not None else ''} "
              f"{metric_labels()} {format_scores(scores)} ({scores['psnr'] - run.bicubic['psnr']:+.2f} dB vs bicubic)"
              f"{' best' if improved else ''}, {row['seconds']} s"
              f"{f', weights identical on {run.world_size} processes' if run.world_size > 1 else ''}")


def draw(run: Run, epoch: int, rows: list[dict], panels: list | None) -> None:
    """After the checkpoints (they matter more where space runs short): curves.png of the log's
    `rows` at a validation (`panels` not None), and the last row and panels for TensorBoard."""
    with naming_what_is_kept(run):
        if panels is not None:
            write_curves(rows, run.folder / "curves.png", title=f"{run.folder.name} ({run.args.loss})")
        if run.board is not None:
            log_to_tensorboard(run.board, epoch, rows[-1], panels or [])


def early_stop_reason(run: Run, epoch: int) -> str | None:
    """Why to stop after a validated `epoch` (--patience epochs without a better val PSNR), or None."""
    patience = run.args.patience
    if patience and epoch - run.best_epoch >= patience:
        return (f"early stopping: no validation PSNR gain for {plural(epoch - run.best_epoch, 'epoch')} "
                f"(best {run.best_psnr:.4f} dB at epoch {run.best_epoch}, --patience {patience})")
    return None


def target_reached_reason(run: Run, epoch: int, val: tuple) -> str | None:
    """--target_psnr: the line that says when the validation PSNR reached it, in steps and time."""
    target = run.args.target_psnr
    if target is None or val[0]["psnr"] < target:
        return None
    rows = read_log(run.folder / "log.csv")
    seconds = sum(float(r["seconds"]) for r in rows if int(r["epoch"]) <= epoch)
    return (f"reached --target_psnr {target} dB: val PSNR {val[0]['psnr']:.4f} dB after epoch {epoch}, "
            f"{plural(epoch * run.steps_per_epoch, 'step')} of {run.args.batch_size * run.world_size}, "
            f"{seconds:.0f} s "
            f"({seconds / 3600:.2f} h) of training and validation")


@contextlib.contextmanager
def naming_what_is_kept(run: Run):
    """A write that fails (a full disk: machinery.files.atomic_path's one line) also names the checkpoint
    that is still whole, and how to go on from it."""
    try:
        yield
    except UserError as e:
        kept = (f"{run.last_path} ({run.saved_at}) is intact: free space, then --resume {run.last_path}"
                if run.saved_at else "no checkpoint of this run was saved yet")
        raise UserError(f"{e}; {kept}") from None


# ---------------------------------------------------------------- flags

def build_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__)
    # The original's flags and defaults.
    p.add_argument("--num_epochs", type=positive_int, default=400, help="epochs to train, in all (with --resume too)")
    p.add_argument("--batch_size", type=positive_int, default=32, help="patches per step (per process)")
    p.add_argument("--lr", type=positive_float, default=2e-4,
                   help="the learning rate at the start (after any warmup: the recipe's)")
    p.add_argument("--upscale_factor", type=int, default=4, choices=sorted(UPSAMPLE_STAGES), help="the scale")
    p.add_argument("--arch", choices=NETWORKS, default=DEFAULT_ARCH,
                   help="the network (model.NETWORKS); the options below apply where it takes them")
    p.add_argument("--num_features", type=positive_int, default=64,
                   help="channels of the hidden convs (not typed: the network's own default; ResShuffle's is 64)")
    p.add_argument("--num_residuals", type=non_negative_int, default=16,
                   help="residual blocks (not typed: the network's own default; ResShuffle's is 16)")
    p.add_argument("--num_workers", type=non_negative_int, default=4,
                   help="threads cutting training patches ahead of the step (0: the main thread)")
    p.add_argument("--step_size", type=positive_int, default=50, help="StepLR period, in epochs (schedule steplr)")
    p.add_argument("--gamma", type=positive_float, default=0.5, help="StepLR factor (schedule steplr)")
    # Model options beyond the original (README: they matter for short CPU runs).
    p.add_argument("--mean_shift", action=argparse.BooleanOptionalAction, default=False,
                   help="subtract/add DIV2K's mean RGB (EDSR's MeanShift)")
    p.add_argument("--image_skip", action=argparse.BooleanOptionalAction, default=False,
                   help="add the bicubic-upsampled input to the output")
    p.add_argument("--luminance", action=argparse.BooleanOptionalAction, default=True,
                   help="ESPCN: super-resolve the luminance only, the chroma bicubic (its paper's; not typed: on)")
    p.add_argument("--padding", choices=PADDINGS, default="zeros",
                   help="EDSR-baseline and ESPCN: how the convs pad the image borders (replicate: a flat image "
                        "stays flat up to its edges; not typed: zeros, the papers')")
    # Data.
    p.add_argument("--train_dir", default=str(REPO / "data/DIV2K_train_HR"), help="folder of HR training images")
    p.add_argument("--val_dir", default=str(REPO / "data/DIV2K_valid_HR"), help="folder of HR validation images")
    p.add_argument("--patch_size", type=positive_int, default=None,
                   help="HR patch side; None: 48 x scale, or the recipe's lr_patch_size x scale")
    p.add_argument("--patches_per_image", type=positive_int, default=20, help="patches per image per epoch")
    p.add_argument("--data_cache", type=data_cache_flag, default=None, metavar="DIR",
                   help=f"folder of decoded training sets, each one file that every process maps, built once and "
                        f"reused while the images are unchanged; None: the per-user cache folder, here "
                        f"{default_cache_dir()}; none: decode into each process's memory at every start (not kept "
                        f"on resume: this machine's)")
    p.add_argument("--degradation", choices=[*DEGRADATIONS, *RANDOM_DEGRADATIONS], default="pil",
                   help="how LR images are made: PIL bicubic, MATLAB's imresize (published tables), or real: "
                        "blur, resize, noise and JPEG drawn anew for every patch (resize.py), validated on "
                        f"the val photos' PIL bicubic LR saved as JPEG q{REAL_VALIDATION['jpeg_quality']}")
    p.add_argument("--loss", type=loss_spec, default="l1",
                   help=f"the training loss: a name or a weighted sum, e.g. l1+0.05*fft (losses: {', '.join(LOSSES)}); "
                        "log.csv gets each term's mean")
    p.add_argument("--ema", type=ema_decay, default=0.0, metavar="DECAY",
                   help="keep an exponential moving average of the weights (e.g. 0.999), validate and save it")
    p.add_argument("--max_images", "--max_val_images", dest="max_val_images", type=non_negative_int, default=0,
                   help="validate on the first N images of --val_dir (0: all)")
    # Run.
    p.add_argument("--val_every", type=positive_int, default=1, help="validate every N epochs")
    p.add_argument("--patience", type=non_negative_int, default=50,
                   help="stop after N epochs without a better validation PSNR (0: never)")
    p.add_argument("--checkpoint_dir", default=str(REPO / "checkpoints"), help="where run folders are made")
    p.add_argument("--run_name", type=run_name, default=None,
                   help="run folder under --checkpoint_dir; None: x<scale>_<date>-<time>")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in a folder that holds one, deleting it; --export over an existing export")
    p.add_argument("--resume", default=None,
                   help="a run's last.pt: continue that run with its own flags; only these may change: "
                        + ", ".join("--" + n for n in SESSION_FLAGS) + " (and --data_cache, this machine's)")
    p.add_argument("--export", nargs=2, metavar=("RUN_CHECKPOINT", "OUT"), default=None,
                   help="write RUN_CHECKPOINT's weights and model_args (no optimizer state) to OUT, and exit; "
                        "the format by OUT's suffix: .safetensors, .pt (.pth) or .onnx")
    p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=False,
                   help="also log to <run>/tensorboard: the log.csv scalars and validation crops (bicubic | SR | "
                        "HR); needs `pip install tensorboard`. A resumed run keeps its own unless given; where "
                        "the package is missing, it goes on without, saying so")
    p.add_argument("--seed", type=seed_int, default=0, help="seeds the weights, the patches and their flips")
    p.add_argument("--recipe", choices=RECIPES, default="seed",
                   help="the training recipe (training.RECIPES): optimizer, lr schedule, init, EMA, batch and "
                        "patch plan; flags typed beside it override its values. seed: the original's flag "
                        "defaults; shipped: the one before fast; fast: the shipped x2, x3 and x4's, Muon for the "
                        "hidden convs and AdamW for the rest, warm-up and cosine decay from 1e-3 over 10 epochs, "
                        "zero-initialised residual blocks, gradients clipped at norm 0.5, 18 patches of 32x32 LR "
                        "a step; fast_adamw: the same with AdamW, 12 epochs (docs/recipes.md)")
    p.add_argument("--target_psnr", type=positive_float, default=None, metavar="DB",
                   help="stop at the first validation (--val_every) whose PSNR (of the EMA weights with --ema) "
                        "reaches DB, saying after how many steps and how long; this invocation's only")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="autocast precision of the network (weights stay fp32); auto: bf16 where the device runs "
                        "it natively (CUDA 8.0+, a CPU with AVX512-BF16 or AMX), fp16 with loss scaling on older "
                        "GPUs, else fp32; a resumed run keeps its own unless given")
    return p


def run_name(text: str) -> str:
    """A folder name, not a path: a run stays inside --checkpoint_dir."""
    if not text or text in (".", "..") or "/" in text or "\\" in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not a folder name (no / or \\, not . or ..)")
    return text


def ema_decay(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1) (0: off), got {text}")
    return value


# A flag's value until argparse has read the command line: one still holding it was not typed.
NOT_TYPED = object()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed flags, plus `given`: the names of those typed (on --resume, the rest come from the run)."""
    parser = build_parser()
    # argparse sets a default only where the namespace holds nothing, so untyped flags keep NOT_TYPED.
    # The defaults filled in after are not passed through `type=`: each is already the value meant
    # (tests/test_train.py compares them with argparse's own).
    args = parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(FLAGS, NOT_TYPED)))
    args.given = sorted(name for name in FLAGS if getattr(args, name) is not NOT_TYPED)
    try:
        recipe = recipe_flags(parser.get_default("recipe") if args.recipe is NOT_TYPED else args.recipe)
    except UserError as e:
        parser.error(str(e))
    args.from_recipe = sorted(name for name in recipe if name not in args.given)
    for name in FLAGS:
        if getattr(args, name) is NOT_TYPED:
            setattr(args, name, recipe.get(name, parser.get_default(name)))
    if args.patch_size is None and RECIPES[args.recipe].get(LR_PATCH_KEY):
        args.patch_size = RECIPES[args.recipe][LR_PATCH_KEY] * args.upscale_factor
        args.from_recipe = sorted({*args.from_recipe, "patch_size"})
    if args.patch_size and not args.resume and args.patch_size % args.upscale_factor:
        parser.error(f"argument --patch_size: {args.patch_size} is not a multiple of the scale {args.upscale_factor}")
    return args


def recipe_flags(name: str) -> dict:
    """The flags recipe `name` sets, each read as if typed (its flag's type and choices), after
    checking the recipe's keys and how it builds the optimizer; a one-line error for a bad entry."""
    recipe, where = RECIPES[name], f"training.RECIPES[{name!r}]"
    unknown = sorted(set(recipe) - set(HOW_KEYS) - set(RECIPE_FLAGS) - {LR_PATCH_KEY})
    why = f"{', '.join(unknown)}: not keys a recipe has" if unknown else how_fault({k: recipe.get(k) for k in HOW_KEYS})
    lr_patch = recipe.get(LR_PATCH_KEY, 1)
    if not why and (not isinstance(lr_patch, int) or isinstance(lr_patch, bool) or lr_patch < 1):
        why = f"its {LR_PATCH_KEY} is {lr_patch!r}, not a positive whole number"
    if not why and LR_PATCH_KEY in recipe and "patch_size" in recipe:
        why = f"it has both patch_size and {LR_PATCH_KEY}: give one"
    if why:
        raise UserError(f"{where}: {why} (docs/extending.md)")
    return {key: flag_as_typed(build_parser(), key, value, where) for key, value in recipe.items() if key in FLAGS}


if __name__ == "__main__":
    run_cli(main, parse_args())
