"""Check a new machine, a GPU above all: train.py in fp32, bf16 and fp16 with a resume, tiled against untiled upscaling.

    python benchmark.py --check --device cuda

Run first on a new machine: the test suite runs on the CPU, and a GPU's paths can't be tested
without one. In each of fp32, bf16 and fp16, on --device: train.py for two epochs straight, and
for one epoch then --resume to two, on small synthetic images in a temporary folder; then the x4
ResShuffle upscaling one image in 64-pixel tiles against untiled. One line for each, then
whether the check passed. The exit status is 1 if a run fails, the resumed run lost its
precision or, on a CPU, differs from the straight one, or a tiled output differs from the
untiled one. fp16 on a CPU is emulated: that run takes most of the check's minutes there.
"""
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from utils import REPO, UserError

from .bench_tools import SCALE, max_diff
from .checkpoint import load_checkpoint
from .fast import build_fast_network
from .images import list_images, load_rgb
from .upscale import upscale


def check(device) -> None:
    """A few training steps with train.py in each precision, a resume, tiled against untiled
    upscaling. A UserError (exit status 1) naming what failed, if a run fails or a tiled output
    differs from the untiled one."""
    print(f"checking train.py and upscaling in fp32, bf16, fp16 on {device}, torch {torch.__version__}", flush=True)
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_small_images(tmp / "images", 4)
        failed += [f"train.py {name}" for name in ("fp32", "bf16", "fp16") if not check_training(device, name, tmp)]
        torch.manual_seed(0)
        model = build_fast_network({"arch": "resshuffle", "scale": SCALE})
        model = model.to(device, memory_format=torch.channels_last).eval()
        lr = load_rgb(list_images(tmp / "images")[0])[:150, :170]
        exact = upscale(model, lr, tile=0)
        for name in ("fp32", "bf16", "fp16"):
            whole = upscale(model, lr, tile=0, precision=name)
            tiled = max_diff(whole, upscale(model, lr, tile=64, precision=name))
            print(f"upscale {name}: tiled (64) vs untiled max diff {tiled}, vs fp32 max diff "
                  f"{max_diff(whole, exact)} levels", flush=True)
            failed += [f"tiled upscaling in {name}"] if tiled else []
    if failed:
        raise UserError(f"--check failed: {', '.join(failed)}")
    print("--check passed")


def make_small_images(folder: Path, count: int) -> None:
    """`count` 240x200 PNGs of stripes and noise in `folder`, made here: train.py's training and validation set."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        y, x = np.mgrid[0:200, 0:240] / 240
        img = 127 + 60 * np.sin(2 * np.pi * (rng.uniform(1, 8) * x + rng.uniform(1, 8) * y))[..., None] \
            + rng.normal(0, 8, (200, 240, 3))
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.png")


def check_training(device, precision: str, tmp: Path) -> bool:
    """Two epochs straight, and one epoch then --resume to two: the time, the losses, whether
    the resumed run's weights equal the straight run's (bit for bit on a CPU; on CUDA,
    cudnn.benchmark may choose other algorithms after the restart). Whether all three ran, the
    resumed run kept its precision and, on a CPU, equals the straight run bit for bit."""
    common = ["--train_dir", str(tmp / "images"), "--val_dir", str(tmp / "images"), "--checkpoint_dir", str(tmp),
              "--batch_size", "4", "--patch_size", "96", "--patches_per_image", "4", "--num_workers", "1",
              "--device", str(device), "--precision", precision]
    start = time.perf_counter()
    results = [train_py(common + ["--run_name", f"{precision}_straight", "--num_epochs", "2"]),
               train_py(common + ["--run_name", f"{precision}_resumed", "--num_epochs", "1"]),
               train_py(["--resume", str(tmp / f"{precision}_resumed" / "last.pt"), "--num_epochs", "2"])]
    failed = next((r for r in results if r.returncode != 0), None)
    if failed is not None:
        why = (failed.stderr.strip().splitlines() or ["?"])[-1]
        print(f"train.py {precision}: failed (exit {failed.returncode}): {why}")
        return False
    straight, resumed = (load_checkpoint(tmp / f"{precision}_{kind}" / "last.pt") for kind in ("straight", "resumed"))
    diff = max((straight["model"][k].float() - v.float()).abs().max().item() for k, v in resumed["model"].items())
    kept = resumed.get("precision") == precision
    epochs = [line for line in results[0].stdout.splitlines() if line.startswith("epoch ")]
    print(f"train.py {precision}: 2 epochs of 4 steps in {time.perf_counter() - start:.1f} s (3 runs); "
          f"{epochs[-1].split(', val')[0] if epochs else '?'}; resumed == straight: "
          f"{'yes, bit for bit' if diff == 0 else f'no, max weight diff {diff:.2e}'}"
          f"{'' if kept else '; the resumed run is in ' + str(resumed.get('precision'))}", flush=True)
    return kept and (diff == 0 or device.type != "cpu")


def train_py(flags: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *flags], capture_output=True, text=True, cwd=REPO, check=False)
