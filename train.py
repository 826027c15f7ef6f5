"""Train ResShuffle on a folder of HR images (DIV2K_train_HR by default).

usage: python train.py [--upscale_factor 4] [--num_epochs 400] [--batch_size 32] [--lr 2e-4]
           [--train_dir data/DIV2K_train_HR] [--val_dir data/DIV2K_valid_HR] [--run_name NAME]
       python train.py --resume checkpoints/NAME/last.pt
       python train.py --export checkpoints/NAME/best.pt checkpoints/resshuffle_x4.pt

A run writes checkpoints/<run_name>/: last.pt (every epoch), best.pt (best validation PSNR)
and log.csv. Adam + StepLR + L1 loss, as the original. On CUDA: mixed precision (bf16 where
supported, else fp16 with loss scaling), pinned memory, persistent workers; on every device
the network runs channels_last.
"""
import argparse
import csv
import math
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataset import EpochSampler, TrainDataset, eval_pairs
from evaluate import bicubic_rows, evaluate, mean
from model import UPSAMPLE_STAGES, ResShuffle
from utils import (UserError, list_images, load_checkpoint, non_negative_int, positive_float, positive_int, run_cli,
                   save_checkpoint, seed_everything, select_device)

CSV_FIELDS = ["epoch", "loss", "lr", "val_psnr", "val_ssim", "seconds"]


def load_val_pairs(val_dir: str, scale: int, max_images: int) -> list:
    """Validation images decoded once for the whole run (HR modcropped, LR bicubic)."""
    paths = list_images(val_dir)
    if max_images:
        paths = paths[:max_images]
    if not paths:
        raise UserError(f"{val_dir}: no validation images found")
    return list(eval_pairs(paths, scale))


def amp_dtype(device: torch.device):
    """The autocast dtype for this device, or None for fp32 (CPU: bf16 measured slower here)."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def export_weights(src: str, dst: str) -> None:
    """Write a run's checkpoint as weights and model_args only: what infer.py and evaluate.py need."""
    checkpoint = load_checkpoint(src)
    save_checkpoint({"model": checkpoint["model"], "model_args": checkpoint["model_args"]}, dst)
    print(f"{src} (epoch {checkpoint.get('epoch')}, val PSNR {checkpoint.get('best_psnr', float('nan')):.4f} dB)"
          f" -> {dst}: weights and model_args {checkpoint['model_args']}")


def main(args):
    if args.export:
        return export_weights(*args.export)
    device = select_device(args.device)
    checkpoint = load_checkpoint(args.resume) if args.resume else None
    if checkpoint:
        if "optimizer" not in checkpoint or "args" not in checkpoint:
            raise UserError(f"{args.resume}: holds weights only; --resume needs a run's last.pt")
        # The same run: its patches are drawn from its own seed.
        args.seed = checkpoint["args"]["seed"]
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
    if patch_size % scale:
        raise UserError(f"--patch_size {patch_size} is not a multiple of the scale {scale}")

    train_set = TrainDataset(args.train_dir, scale=scale, patch_size=patch_size,
                             patches_per_image=args.patches_per_image, seed=args.seed)
    val_pairs = load_val_pairs(args.val_dir, scale, args.max_val_images)
    sampler = EpochSampler(train_set, seed=args.seed)
    cuda = device.type == "cuda"
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                        num_workers=args.num_workers, pin_memory=cuda,
                        persistent_workers=args.num_workers > 0)
    if len(loader) == 0:
        raise UserError(f"{len(train_set)} patches per epoch is less than one batch of {args.batch_size}: "
                        f"raise --patches_per_image or lower --batch_size")

    model = ResShuffle(**model_args).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.step_size, gamma=args.gamma)
    dtype = amp_dtype(device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    start_epoch, best_psnr, best_epoch = 1, -math.inf, 0
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        start_epoch = checkpoint["epoch"] + 1
        best_psnr, best_epoch = checkpoint["best_psnr"], checkpoint["best_epoch"]
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if cuda and checkpoint["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"])
    if cuda:
        torch.backends.cudnn.benchmark = True

    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "log.csv"
    trim_log(log_path, keep_through=start_epoch - 1)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"run {run_dir}: {model_args}, {n_params:,} parameters, device {device}"
          f"{', amp ' + str(dtype).split('.')[-1] if dtype else ''}")
    print(f"train: {len(train_set.hr)} images, {len(train_set)} patches of {patch_size}px per epoch, "
          f"{len(loader)} steps of {args.batch_size}; val: {len(val_pairs)} images")
    bicubic = bicubic_rows(val_pairs, crop_border=scale)
    print(f"val bicubic: {mean(bicubic, 'bicubic_psnr'):.4f} dB / {mean(bicubic, 'bicubic_ssim'):.4f}")
    if checkpoint:
        print(f"resumed from {args.resume} at epoch {start_epoch}, lr {scheduler.get_last_lr()[0]:.3g}, "
              f"best PSNR {best_psnr:.4f} dB")

    for epoch in range(start_epoch, args.num_epochs + 1):
        start = time.time()
        sampler.set_epoch(epoch)
        lr_now = scheduler.get_last_lr()[0]
        loss = train_one_epoch(model, loader, optimizer, scaler, dtype, device,
                               desc=f"epoch {epoch}/{args.num_epochs}", lr_now=lr_now)
        scheduler.step()
        row = {"epoch": epoch, "loss": f"{loss:.6f}", "lr": f"{lr_now:.6g}", "val_psnr": "", "val_ssim": ""}
        stop_reason, improved = None, False
        if epoch % args.val_every == 0 or epoch == args.num_epochs:
            model.eval()
            rows = evaluate(model, val_pairs, crop_border=scale, baseline=False, progress=False)
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
        state = {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "epoch": epoch, "best_psnr": best_psnr, "best_epoch": best_epoch,
            "model_args": model_args, "args": vars(args),
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if cuda else None},
        }
        if improved:
            save_checkpoint(state, run_dir / "best.pt")
        save_checkpoint(state, run_dir / "last.pt")
        append_log(log_path, row)
        if row["val_psnr"]:
            print(f"epoch {epoch}: loss {loss:.5f}, lr {lr_now:.3g}, val PSNR/SSIM {val_psnr:.4f} dB / "
                  f"{val_ssim:.4f} ({val_psnr - mean(bicubic, 'bicubic_psnr'):+.2f} dB vs bicubic)"
                  f"{' best' if improved else ''}, {row['seconds']} s")
        if stop_reason:
            print(stop_reason)
            break
    print(f"done: best val PSNR {best_psnr:.4f} dB at epoch {best_epoch}; checkpoints in {run_dir}")


def train_step(model, lr, hr, optimizer, scaler, dtype, device) -> torch.Tensor:
    """One optimisation step on a batch of NHWC uint8 (lr, hr) patches; the loss, left on the device."""
    # Permuted to NCHW, an NHWC batch is channels_last already: no layout conversion.
    lr = lr.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
    hr = hr.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        loss = F.l1_loss(model(lr), hr)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def train_one_epoch(model, loader, optimizer, scaler, dtype, device, desc: str, lr_now: float) -> float:
    """One pass over the loader; the mean L1 loss."""
    model.train()
    total, start = torch.zeros((), device=device), time.time()
    bar = tqdm(loader, desc=desc, unit="step", leave=False, mininterval=1.0)
    for step, (lr, hr) in enumerate(bar, 1):
        total += train_step(model, lr, hr, optimizer, scaler, dtype, device)
        if device.type != "cuda" or step % 10 == 0:  # reading the loss waits for the GPU
            bar.set_postfix(loss=f"{total.item() / step:.4f}", lr=f"{lr_now:.3g}",
                            patches_s=f"{step * lr.shape[0] / (time.time() - start):.1f}", refresh=False)
    loss = total.item() / len(loader)
    if not math.isfinite(loss):
        raise UserError(f"{desc}: the loss is {loss}; the last good checkpoint is kept")
    return loss


def trim_log(path: Path, keep_through: int) -> None:
    """Drop log rows after the resumed checkpoint's epoch (they will be trained again)."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= keep_through]
    with open(path, "w", newline="") as f:
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
    p.add_argument("--num_workers", type=non_negative_int, default=4)
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


if __name__ == "__main__":
    run_cli(main, build_parser().parse_args())
