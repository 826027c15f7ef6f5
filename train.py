"""Train ResShuffle on a folder of HR images (DIV2K_train_HR by default).

usage: python train.py [--upscale_factor 4] [--num_epochs 400] [--batch_size 32] [--lr 2e-4]
           [--train_dir data/DIV2K_train_HR] [--val_dir data/DIV2K_valid_HR] [--run_name NAME]
       python train.py --resume checkpoints/NAME/last.pt
       python train.py --export checkpoints/NAME/best.pt checkpoints/resshuffle_x4.pt

A run writes checkpoints/<run_name>/: last.pt (every epoch), best.pt (best validation PSNR)
and log.csv, each written atomically. Ctrl-C or SIGTERM saves last.pt where the run is, mid-epoch
too, and --resume goes on from there with the run's own flags, to the same weights as a run
never stopped. A NaN/inf loss stops the run, naming the iteration; the checkpoints are kept.
Adam + StepLR + L1 loss, as the original. On CUDA: mixed precision (bf16 where supported, else
fp16 with loss scaling), patches cut straight into pinned memory; on every device the network
runs channels_last, and the patches are flipped on the device.
"""
import argparse
import copy
import csv
import inspect
import math
import os
import signal
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from dataset import EpochSampler, PatchLoader, TrainDataset, augment, eval_pairs
from evaluate import bicubic_rows, evaluate, mean
from model import UPSAMPLE_STAGES, ResShuffle
from utils import (DEGRADATIONS, UserError, atomic_path, list_images, load_checkpoint, make_dir, non_negative_int,
                   positive_float, positive_int, remove_stale_temporaries, run_cli, save_checkpoint, seed_everything,
                   select_device, warn)

CSV_FIELDS = ["epoch", "loss", "lr", "val_psnr", "val_ssim", "seconds"]


def load_val_pairs(val_dir: str, scale: int, max_images: int, degradation: str) -> list:
    """Validation images decoded once for the whole run (HR modcropped, LR bicubic)."""
    paths = list_images(val_dir)
    if max_images:
        paths = paths[:max_images]
    if not paths:
        raise UserError(f"{val_dir}: no validation images found")
    return list(eval_pairs(paths, scale, degradation))


def amp_dtype(device: torch.device):
    """The autocast dtype for this device, or None for fp32 (CPU: bf16 measured slower here)."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def export_weights(src: str, dst: str) -> None:
    """Write a run's checkpoint as weights and model_args only: what infer.py and evaluate.py need."""
    checkpoint = load_checkpoint(src)
    keep = {k: checkpoint[k] for k in ("model", "ema", "model_args", "degradation") if checkpoint.get(k) is not None}
    save_checkpoint(keep, dst)
    print(f"{src} (epoch {checkpoint.get('epoch')}, val PSNR {checkpoint.get('best_psnr', float('nan')):.4f} dB)"
          f" -> {dst}: {', '.join(keep)}; model_args {checkpoint['model_args']}")


# Flags a resumed run may change; every other one is part of the run and comes from its checkpoint.
RESUME_MAY_CHANGE = ("num_epochs", "num_workers", "device", "val_every", "patience", "max_val_images",
                     "train_dir", "val_dir", "ema")


def resume_args(args, checkpoint: dict) -> None:
    """Take the run's own flags from its checkpoint; refuse typed flags that would change the run."""
    saved = {k: v for k, v in checkpoint["args"].items() if k not in ("resume", "export", "given")}
    for name in args.given:
        if name in saved and name not in RESUME_MAY_CHANGE and getattr(args, name) != saved[name]:
            raise UserError(f"{args.resume}: the run was started with --{name} {saved[name]} "
                            f"({describe_run(checkpoint)}); it can't change on resume "
                            f"(these can: {', '.join('--' + n for n in RESUME_MAY_CHANGE)})")
    for name, value in saved.items():
        if name not in args.given:
            setattr(args, name, value)


def describe_run(checkpoint: dict) -> str:
    m = checkpoint["model_args"]
    options = [o for o in ("mean_shift", "image_skip") if m.get(o)]
    return (f"x{m['scale']}, {m['num_features']} features, {m['num_residuals']} residual blocks"
            f"{', ' + ', '.join(options) if options else ''}")


class NonFiniteLoss(Exception):
    def __init__(self, step: int, value: float):
        super().__init__(f"iteration {step}: the loss is {value}")
        self.step, self.value = step, value


class StopSignal:
    """SIGINT (Ctrl-C) and SIGTERM ask the training loop to save last.pt and stop after this step.

    A second signal stops at once, without saving (last.pt then holds the previous save).
    """

    def __init__(self, quiet: bool = False):
        self.signum, self.previous, self.quiet = None, {}, quiet

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
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
            print(f"\n{signal.Signals(signum).name}: saving and stopping after this step "
                  f"(send it again to quit at once, without saving)", file=sys.stderr, flush=True)

    def exit(self, where: str, path: Path, world_size: int = 1) -> None:
        signum = self.signum or signal.SIGTERM  # under torchrun, another process may have had it
        launcher = f"torchrun --nproc_per_node {world_size}" if world_size > 1 else "python"
        if not self.quiet:
            print(f"stopped by {signal.Signals(signum).name} {where}; saved {path}\n"
                  f"resume with: {launcher} train.py --resume {path}", flush=True)
        sys.exit(128 + signum)


# DDP need not broadcast the model's one buffer (the constant RGB mean) each step; torch 2.14
# renamed the flag, and deprecates the old name.
NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                  if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                  else {"broadcast_buffers": False})


def setup_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Under torchrun (WORLD_SIZE > 1) join the process group:
    NCCL with one GPU per process (LOCAL_RANK) on CUDA, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = select_device(device_name)
    if world_size == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    # Rank 0 validates while the others wait: give that an hour.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=1))
    return dist.get_rank(), world_size, device


def agree(flag: bool, device: torch.device) -> bool:
    """True on every process if it is true on any (a no-op without torchrun)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def weights_in_sync(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether every process holds the same weights (a fingerprint's max equals its min)."""
    fingerprint = torch.stack([sum(p.detach().double().sum() for p in model.parameters()),
                               sum(p.detach().double().square().sum() for p in model.parameters())]).to(device)
    high, low = fingerprint.clone(), -fingerprint
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MAX)
    return torch.equal(high, -low)


def main(args):
    try:
        train(args)
        if dist.is_initialized():
            # All processes tear down together: a rank that destroyed its group while another
            # was still finishing (rank 0 saves, prints) aborted at exit, now and then, with
            # "terminate called without an active exception".
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(args):
    if args.export:
        return export_weights(*args.export)
    checkpoint = load_checkpoint(args.resume) if args.resume else None
    if checkpoint:
        if "optimizer" not in checkpoint or "args" not in checkpoint:
            raise UserError(f"{args.resume}: holds weights only; --resume needs a run's last.pt")
        resume_args(args, checkpoint)
    rank, world_size, device = setup_distributed(args.device)
    lead = rank == 0  # the process that validates, prints and writes
    if checkpoint and checkpoint.get("step") and checkpoint.get("world_size", 1) != world_size:
        raise UserError(f"{args.resume}: stopped mid-epoch with {checkpoint.get('world_size', 1)} process(es); "
                        f"resume it with as many (this is {world_size})")
    seed_everything(args.seed)

    if checkpoint:
        model_args = checkpoint["model_args"]
        run_dir = Path(args.resume).parent
    else:
        model_args = dict(scale=args.upscale_factor, num_features=args.num_features,
                          num_residuals=args.num_residuals, mean_shift=args.mean_shift,
                          image_skip=args.image_skip)
        run_name = args.run_name or f"x{args.upscale_factor}_{datetime.now():%Y%m%d-%H%M%S}"
        run_dir = Path(args.checkpoint_dir) / run_name
    scale = model_args["scale"]
    patch_size = args.patch_size or 48 * scale

    train_set = TrainDataset(args.train_dir, scale=scale, patch_size=patch_size,
                             patches_per_image=args.patches_per_image, seed=args.seed, degradation=args.degradation)
    val_pairs = load_val_pairs(args.val_dir, scale, args.max_val_images, args.degradation) if lead else []
    sampler = EpochSampler(train_set, seed=args.seed, rank=rank, world_size=world_size)
    cuda = device.type == "cuda"
    loader = PatchLoader(train_set, sampler, batch_size=args.batch_size, num_workers=args.num_workers, pin_memory=cuda)
    steps_per_epoch = len(train_set) // world_size // args.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"{len(train_set)} patches per epoch is less than one batch of {args.batch_size}"
                        f"{f' for each of {world_size} processes' if world_size > 1 else ''}: "
                        f"raise --patches_per_image or lower --batch_size")

    model = ResShuffle(**model_args).to(device, memory_format=torch.channels_last)
    # DDP averages the gradients across processes; `model` stays the unwrapped network whose
    # weights are saved, so infer.py and evaluate.py load a torchrun checkpoint unchanged.
    net = (DistributedDataParallel(model, device_ids=[device.index] if cuda else None, **NO_BUFFER_SYNC)
           if world_size > 1 else model)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.step_size, gamma=args.gamma)
    dtype = amp_dtype(device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    # EMA of the weights (--ema): a copy of the network whose parameters are the average,
    # updated after every step (in place), validated and saved beside the weights.
    ema_model = copy.deepcopy(model).eval() if args.ema else None
    ema = [p.detach() for p in ema_model.parameters()] if ema_model else None
    start_epoch, best_psnr, best_epoch = 1, -math.inf, 0
    # Where the interrupted epoch stopped (a run stopped by a signal saves mid-epoch).
    first_step, loss_sum, seconds = 0, 0.0, 0.0
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        start_epoch = checkpoint["epoch"] + 1
        best_psnr, best_epoch = checkpoint["best_psnr"], checkpoint["best_epoch"]
        first_step, loss_sum = checkpoint.get("step", 0), checkpoint.get("loss_sum", 0.0)
        seconds = checkpoint.get("seconds", 0.0)
        if ema:
            saved = checkpoint.get("ema") or checkpoint["model"]  # --ema added to a run: start from its weights
            for e, (name, _) in zip(ema, model.named_parameters()):
                e.copy_(saved[name])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if cuda and checkpoint["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"])
    if cuda:
        torch.backends.cudnn.benchmark = True

    log_path, last_path = run_dir / "log.csv", run_dir / "last.pt"
    say = print if lead else (lambda *a, **k: None)
    if lead:
        make_dir(run_dir)
        for stale in remove_stale_temporaries(run_dir):
            warn(f"removed {stale}, left by a run killed while writing it")
        trim_log(log_path, keep_through=start_epoch - 1)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"run {run_dir}: {model_args}, {n_params:,} parameters, device {device}"
        f"{', amp ' + str(dtype).split('.')[-1] if dtype else ''}")
    if world_size > 1:
        say(f"distributed: {world_size} processes ({dist.get_backend()}), batch {args.batch_size} per process, "
            f"{args.batch_size * world_size} per step")
    say(f"train: {len(train_set.hr)} images, {len(train_set)} patches of {patch_size}px per epoch, "
        f"{steps_per_epoch} steps of {args.batch_size}{f' x {world_size}' if world_size > 1 else ''}; "
        f"val: {len(val_pairs)} images")
    bicubic = bicubic_rows(val_pairs, crop_border=scale) if lead else []
    if lead:
        print(f"val bicubic: {mean(bicubic, 'bicubic_psnr'):.4f} dB / {mean(bicubic, 'bicubic_ssim'):.4f}")
    if checkpoint:
        say(f"resumed from {args.resume} at epoch {start_epoch}"
            f"{f', step {first_step}' if first_step else ''}, lr {scheduler.get_last_lr()[0]:.3g}, "
            f"best PSNR {best_psnr:.4f} dB")

    def state(epoch: int, step: int = 0, loss_sum: float = 0.0, seconds: float = 0.0) -> dict:
        """The checkpoint after `epoch` whole epochs and `step` steps of the next one."""
        return {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "epoch": epoch, "step": step, "loss_sum": loss_sum, "seconds": seconds,
            "ema": dict(zip([n for n, _ in model.named_parameters()], ema)) if ema else None,
            "degradation": args.degradation,
            "best_psnr": best_psnr, "best_epoch": best_epoch, "world_size": world_size,
            "model_args": model_args, "args": vars(args),
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if cuda else None},
        }

    with StopSignal(quiet=not lead) as stop:
        for epoch in range(start_epoch, args.num_epochs + 1):
            start = time.time() - seconds
            sampler.set_epoch(epoch, start=first_step * args.batch_size * world_size)
            lr_now = scheduler.get_last_lr()[0]
            try:
                loss_sum, step = train_one_epoch(net, loader, optimizer, scaler, dtype, device,
                                                 desc=f"epoch {epoch}/{args.num_epochs}", lr_now=lr_now,
                                                 first_step=first_step, steps_per_epoch=steps_per_epoch,
                                                 loss_sum=loss_sum, stop=stop, progress=lead,
                                                 ema=ema, ema_decay=args.ema,
                                                 steps_before=(epoch - 1) * steps_per_epoch)
            except NonFiniteLoss as e:
                if not lead:
                    sys.exit(1)
                kept = (f"the last good checkpoint is {last_path} (epoch {load_checkpoint(last_path)['epoch']})"
                        if last_path.exists() else "no checkpoint was saved before it")
                raise UserError(f"epoch {epoch}, {e}: training stopped, {kept}; lower --lr or check the data"
                                ) from None
            if step < steps_per_epoch:
                if lead:
                    save_checkpoint(state(epoch - 1, step, loss_sum, time.time() - start), last_path)
                stop.exit(f"in epoch {epoch} after step {step} of {steps_per_epoch}", last_path, world_size)
            first_step, seconds = 0, 0.0
            loss, loss_sum = loss_sum / steps_per_epoch, 0.0
            scheduler.step()
            in_sync = weights_in_sync(model, device) if world_size > 1 else True
            if not in_sync:
                raise UserError(f"epoch {epoch}: the {world_size} processes hold different weights")
            row = {"epoch": epoch, "loss": f"{loss:.6f}", "lr": f"{lr_now:.6g}", "val_psnr": "", "val_ssim": ""}
            stop_reason, improved = None, False
            if lead and (epoch % args.val_every == 0 or epoch == args.num_epochs):
                validated = ema_model or model
                validated.eval()
                rows = evaluate(validated, val_pairs, crop_border=scale, baseline=False, progress=False)
                model.train()
                val_psnr, val_ssim = mean(rows, "psnr"), mean(rows, "ssim")
                row.update(val_psnr=f"{val_psnr:.4f}", val_ssim=f"{val_ssim:.4f}")
                improved = val_psnr > best_psnr
                if improved:
                    best_psnr, best_epoch = val_psnr, epoch
                if args.patience and epoch - best_epoch >= args.patience:
                    stop_reason = (f"early stopping: no validation PSNR gain for {epoch - best_epoch} epochs "
                                   f"(best {best_psnr:.4f} dB at epoch {best_epoch}, --patience {args.patience})")
            row["seconds"] = f"{time.time() - start:.1f}"
            if lead:
                # The log row first: a kill before the checkpoint is saved leaves a row that resume trims.
                append_log(log_path, row)
                if improved:
                    save_checkpoint(state(epoch), run_dir / "best.pt")
                save_checkpoint(state(epoch), last_path)
            if row["val_psnr"]:
                print(f"epoch {epoch}: loss {loss:.5f}, lr {lr_now:.3g}, val{' (EMA)' if ema else ''} "
                      f"PSNR/SSIM {val_psnr:.4f} dB / "
                      f"{val_ssim:.4f} ({val_psnr - mean(bicubic, 'bicubic_psnr'):+.2f} dB vs bicubic)"
                      f"{' best' if improved else ''}, {row['seconds']} s"
                      f"{f', weights identical on {world_size} processes' if world_size > 1 else ''}")
            # Decided by rank 0 (early stopping) or by any process (a signal), obeyed by all.
            if agree(stop_reason is not None, device):
                say(stop_reason)
                break
            if agree(stop.signum is not None, device) and epoch < args.num_epochs:
                stop.exit(f"after epoch {epoch}", last_path, world_size)
    say(f"done: best val PSNR {best_psnr:.4f} dB at epoch {best_epoch}; checkpoints in {run_dir}")


def train_step(model, lr, hr, flips, optimizer, scaler, dtype, device) -> torch.Tensor:
    """One optimisation step on a batch of NHWC uint8 (lr, hr) patches and their flips (dataset.batch).

    Returns the loss, left on the device.
    """
    # Permuted to NCHW, an NHWC batch is channels_last already: no layout conversion. The flips
    # are applied to the uint8 batch, on the device.
    flips = flips.to(device, non_blocking=True)  # once, for both
    lr = augment(lr.to(device, non_blocking=True).permute(0, 3, 1, 2), flips).float().div_(255)
    hr = augment(hr.to(device, non_blocking=True).permute(0, 3, 1, 2), flips).float().div_(255)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        loss = F.l1_loss(model(lr), hr)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def train_one_epoch(net, loader, optimizer, scaler, dtype, device, desc: str, lr_now: float, first_step: int,
                    steps_per_epoch: int, loss_sum: float, stop: StopSignal, progress: bool = True,
                    ema: list | None = None, ema_decay: float = 0.0, steps_before: int = 0) -> tuple[float, int]:
    """Run the epoch's steps from `first_step` on, until its end or a stop signal.

    Returns (sum of the step losses, steps done). Raises NonFiniteLoss naming the first step
    whose loss was NaN or inf. The losses are read every step on CPU and every 10 on CUDA
    (reading waits for the GPU); under torchrun every process reads at the same steps, with
    the losses (averaged) and stop requests of all, so all stop together. With `ema`, each
    step moves those tensors part of the way to the new weights (`ema_decay_at`).
    """
    net.train()
    params = [p.detach() for p in net.parameters()]
    distributed = dist.is_initialized()
    unchecked, step, start = [], first_step, time.time()
    bar = tqdm(loader, desc=desc, unit="step", total=steps_per_epoch, initial=first_step, leave=False,
               mininterval=1.0, disable=not progress)
    for lr, hr, flips in bar:
        unchecked.append(train_step(net, lr, hr, flips, optimizer, scaler, dtype, device))
        if ema is not None:
            torch._foreach_lerp_(ema, params, 1 - ema_decay_at(ema_decay, steps_before + step))
        step += 1
        if device.type == "cuda" and step % 10 and step < steps_per_epoch and not (stop.signum and not distributed):
            continue
        checked = torch.stack(unchecked + [torch.tensor(float(stop.signum is not None), device=device)])
        if distributed:
            dist.all_reduce(checked)
            checked[:-1] /= dist.get_world_size()
        *losses, stopping = checked.tolist()
        bad = [i for i, v in enumerate(losses) if not math.isfinite(v)]
        if bad:
            raise NonFiniteLoss(step - len(losses) + bad[0] + 1, losses[bad[0]])
        loss_sum += sum(losses)
        unchecked.clear()
        bar.set_postfix(loss=f"{loss_sum / step:.4f}", lr=f"{lr_now:.3g}",
                        patches_s=f"{(step - first_step) * lr.shape[0] / (time.time() - start):.1f}", refresh=False)
        if stopping:
            break
    bar.close()
    return loss_sum, step


def trim_log(path: Path, keep_through: int) -> None:
    """Drop log rows after the resumed checkpoint's epoch (they will be trained again), and torn rows."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f)  # a torn row lacks fields: None
                if None not in r.values() and None not in r and r["epoch"].isdigit()
                and int(r["epoch"]) <= keep_through]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def append_log(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # The original's flags and defaults.
    p.add_argument("--num_epochs", type=positive_int, default=400)
    p.add_argument("--batch_size", type=positive_int, default=32)
    p.add_argument("--lr", type=positive_float, default=2e-4)
    p.add_argument("--upscale_factor", type=int, default=4, choices=sorted(UPSAMPLE_STAGES))
    p.add_argument("--num_features", type=positive_int, default=64)
    p.add_argument("--num_residuals", type=non_negative_int, default=16)
    p.add_argument("--num_workers", type=non_negative_int, default=4,
                   help="threads cutting training patches ahead of the step (0: the main thread)")
    p.add_argument("--step_size", type=positive_int, default=50, help="StepLR period, in epochs")
    p.add_argument("--gamma", type=positive_float, default=0.5, help="StepLR factor")
    # Model options beyond the original (README: they matter for short CPU runs).
    p.add_argument("--mean_shift", action="store_true", help="subtract/add DIV2K's mean RGB (EDSR's MeanShift)")
    p.add_argument("--image_skip", action="store_true", help="add the bicubic-upsampled input to the output")
    # Data.
    p.add_argument("--train_dir", default="data/DIV2K_train_HR")
    p.add_argument("--val_dir", default="data/DIV2K_valid_HR")
    p.add_argument("--patch_size", type=positive_int, default=None, help="HR patch side (default: 48 x scale)")
    p.add_argument("--patches_per_image", type=positive_int, default=20, help="patches per image per epoch")
    p.add_argument("--degradation", choices=DEGRADATIONS, default="pil",
                   help="how LR images are made: PIL bicubic, or MATLAB's imresize (published tables)")
    p.add_argument("--ema", type=ema_decay, default=0.0, metavar="DECAY",
                   help="keep an exponential moving average of the weights (e.g. 0.999), validate and save it")
    p.add_argument("--max_val_images", type=non_negative_int, default=0, help="validate on the first N (0: all)")
    # Run.
    p.add_argument("--val_every", type=positive_int, default=1, help="validate every N epochs")
    p.add_argument("--patience", type=non_negative_int, default=50,
                   help="stop after N epochs without a better validation PSNR (0: never)")
    p.add_argument("--checkpoint_dir", default="checkpoints")
    p.add_argument("--run_name", default=None, help="run folder under --checkpoint_dir (default: x<scale>_<time>)")
    p.add_argument("--resume", default=None, help="a run's last.pt: continue that run")
    p.add_argument("--export", nargs=2, metavar=("RUN_CHECKPOINT", "OUT"), default=None,
                   help="write RUN_CHECKPOINT's weights and model_args (no optimizer state) to OUT, and exit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    return p


def ema_decay_at(decay: float, t: int) -> float:
    """The EMA decay for update t (0-based): min(decay, (1 + t) / (10 + t)).

    Without the warm-up, the random initial weights keep decay ** t of the average (0.995:
    20% after 315 steps); with it, early updates follow the weights closely and the full
    decay applies once (1 + t) / (10 + t) exceeds it.
    """
    return min(decay, (1 + t) / (10 + t))


def ema_decay(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1) (0: off), got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed flags, plus `given`: the names of those typed (on --resume, the rest come from the run)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    typed = build_parser()
    for action in typed._actions:
        action.default = argparse.SUPPRESS
    args.given = sorted(vars(typed.parse_args(argv)))
    if args.patch_size and not args.resume and args.patch_size % args.upscale_factor:
        parser.error(f"argument --patch_size: {args.patch_size} is not a multiple of the scale {args.upscale_factor}")
    return args


if __name__ == "__main__":
    run_cli(main, parse_args())
