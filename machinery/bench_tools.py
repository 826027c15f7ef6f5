"""What benchmark.py and the runs beside it (cache_study, machine_check) share: synthetic images, timing, the table.

Each prints a table a row at a time, each row as soon as it is measured (a full run takes
minutes), then every figure as one JSON line (benchmark.py: where --json says); SIGTERM unwinds
the stack as Ctrl-C does, so their temporary folders and child processes go with it.
"""
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dataset import device_batch
from losses import WeightedLoss
from training import DEFAULT_RECIPE, RECIPES, make_optimizer, recipe_how, train_step

from .fast import build_fast_network
from .precision import choose_precision, cpu_bf16_instructions, grad_scaler

BATCH, LR_PATCH, SCALE = 16, 48, 4  # the training step measured: 16 patches of 48x48 LR pixels at x4
TWO_K = (2040, 1356)  # width, height of the synthetic images


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int, warmup: int = 1) -> float:
    """Seconds per call, best of `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def stepper(device, model_args: dict, loss: WeightedLoss, precision: str, recipe: str):
    """train.py's step on a fresh network (channels_last, seeded) with `recipe`'s optimizer, built as
    train.py builds them: a function of one loader batch (lr, hr, flips), flipped on the device."""
    torch.manual_seed(0)
    model = build_fast_network(model_args).to(device, memory_format=torch.channels_last)
    how = recipe_how(recipe)
    optimizer = make_optimizer(model, how, lr=RECIPES[recipe]["lr"])
    scaler = grad_scaler(device, precision)
    return lambda lr8, hr8, flips: train_step(model, *device_batch(lr8, hr8, flips, device), optimizer, scaler,
                                              precision, loss, clip_grad_norm=how["clip_grad_norm"])


def step_seconds(device, model_args: dict, loss: WeightedLoss, precision: str, lr8, hr8, flips, steps: int,
                 recipe: str = DEFAULT_RECIPE) -> float:
    """Seconds per step of train.py's step (`stepper`) in `precision` on one batch, best of `steps`."""
    step = stepper(device, model_args, loss, precision, recipe)
    return timed(lambda: step(lr8, hr8, flips), device, steps)


def fed_step_seconds(device, model_args: dict, loss: WeightedLoss, precision: str, loader, steps: int,
                     recipe: str = DEFAULT_RECIPE) -> float:
    """Seconds per step of train.py's step fed by `loader` (its threads cutting, and degrading, the
    next batches meanwhile, on the same cores), over `steps` steps after one."""
    step, batches = stepper(device, model_args, loss, precision, recipe), iter(loader)
    for i in range(steps + 1):
        if i == 1:
            sync(device)
            start = time.perf_counter()
        step(*next(batches))
    sync(device)
    return (time.perf_counter() - start) / steps


def random_batch(batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A loader batch of random pixels: lr, hr (uint8 NHWC, 48px LR patches at x4) and flips."""
    lr8 = torch.randint(0, 256, (batch, LR_PATCH, LR_PATCH, 3), dtype=torch.uint8)
    hr8 = torch.randint(0, 256, (batch, LR_PATCH * SCALE, LR_PATCH * SCALE, 3), dtype=torch.uint8)
    return lr8, hr8, torch.rand(batch, 3) < 0.5


def loader_rate(loader, batches: int) -> float:
    """Patches/s over `batches` batches, after the first (worker start-up) is drawn."""
    it = iter(loader)
    next(it)
    start, n = time.perf_counter(), 0
    for _ in range(batches):
        n += next(it)[0].shape[0]
    return n / (time.perf_counter() - start)


def make_2k_images(folder: Path, count: int) -> None:
    """Photo-like 2040x1356 PNGs: smooth colour fields, edges and fine noise."""
    rng = np.random.default_rng(0)
    w, h = TWO_K
    y, x = np.mgrid[0:h, 0:w].astype(np.float32) / w
    for i in range(count):
        img = np.zeros((h, w, 3), np.float32)
        for c in range(3):
            for _ in range(6):
                fx, fy, phase = rng.uniform(0.5, 40), rng.uniform(0.5, 40), rng.uniform(0, 6.3)
                img[..., c] += np.sin(2 * np.pi * (fx * x + fy * y) + phase)
        img = 127.5 + 20 * img + rng.normal(0, 6, (h, w, 3)).astype(np.float32)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"{i:04d}.png")


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    """The largest difference of two uint8 images, in levels."""
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def reduced_precision(flag: str, device) -> str:
    """The precision measured beside fp32 for --precision `flag`: what it picks on `device`, bf16
    where auto picks fp32."""
    precision = choose_precision(flag, device)[0]
    return "bf16" if precision == "fp32" and flag == "auto" else precision


def run_figures(device, precision: str, arch: str, loss: str, quick: bool, data_cache: bool) -> dict:
    """The JSON line's first figures: what was measured, where and when."""
    return {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d"), "precision": precision, "arch": arch, "loss": loss,
            "cpu_bf16": cpu_bf16_instructions() if device.type == "cpu" else None, "quick": quick,
            "data_cache": data_cache}


def header(f: dict, what: str, columns: tuple[str, str, str]) -> None:
    """The table's title (`what`, then run_figures' `f`) and its column names, printed before the
    first row is measured."""
    cpu = f" ({f['cpu_bf16'] or 'no bf16 instructions'})" if f["cpu_bf16"] is not None or f["device"] == "cpu" else ""
    quick = ", --quick (fewer repeats, smaller inputs)" if f["quick"] else ""
    print(f"{what}, {f['date']}, device {f['device']}{cpu}, torch {f['torch']}, {f['threads']} threads{quick}")
    row("", *columns)


def row(what: str, ours: str, plain: str = "", ratio: str = "") -> None:
    """One row of the table, printed (and flushed) as soon as its figure is measured: a full run takes minutes."""
    print(f"{what:<46} {ours:>12} {plain:>12} {ratio:>8}", flush=True)


def stopped_by_sigterm(signum: int = signal.SIGTERM) -> SystemExit:
    """SIGTERM (or SIGHUP) unwinds the stack (utils.sigterm_raises), so the temporary folders are
    removed and the child processes (infer.py, evaluate.py, train.py) killed on the way out. Exit
    status 128 + signum."""
    print(f"{Path(sys.argv[0]).name}: stopped by {signal.Signals(signum).name}; removing its temporary files",
          file=sys.stderr, flush=True)
    return SystemExit(128 + signum)
