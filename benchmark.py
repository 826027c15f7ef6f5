"""Measure ResShuffle's training step, data loader, inference and evaluation against the plain way.

usage: python benchmark.py [--device auto] [--steps 3] [--skip_memory]

Every figure comes from this run, on this machine, both sides measured in the same run. It
prints a table and then one JSON line with every figure. Synthetic 2K images (2040x1356, photo-
like content) are written to a temporary folder, so no data set is needed.

1. training step, batch 16 of 48x48 LR patches at x4: train.py's step (channels_last, AMP on
   CUDA) against a plain NCHW fp32 step; GFLOP/s from the FLOPs PyTorch's FlopCounterMode
   counts, against one large 64->64 3x3 convolution forward+backward (the practical ceiling).
2. data: patches/s from dataset.py's loader (PatchLoader: cut patches, their flips left to the
   device, which the training step above includes) with 1 and 2 worker threads against a
   DataLoader worker process that decodes the image file for every patch.
3. inference: output megapixels/s of infer.py's path (upscale.upscale) on a 510x339 input, untiled
   against the plain model call, and tiled (infer.py's default) against untiled; peak resident
   memory and speed of infer.py on a 2040x1360 input (8160x5440 output), tiled and untiled.
4. evaluate.py: seconds per 2K image.
"""
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from checkpoint import save_checkpoint
from dataset import EpochSampler, PatchLoader, TrainDataset, device_batch
from images import list_images, load_rgb
from model import ResShuffle
from resize import downsample
from training import amp_dtype, train_step
from upscale import upscale
from utils import make_parser, positive_int, run_cli, select_device

BATCH, LR_PATCH, SCALE = 16, 48, 4


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


def plain_network() -> ResShuffle:
    """The default network computed as written, layer after layer: the 9x9 tail after the last PixelShuffle."""
    model = ResShuffle()
    model.fast_tail = False
    return model


def training_step_flops() -> int:
    """FLOPs of one forward+backward of the default x4 network on one batch, as PyTorch counts them.

    Counted on the network as written: ResShuffle runs its tail as an equivalent conv with more
    FLOPs (ResShuffle.upsample_and_tail), which would otherwise count as useful work.
    """
    model = plain_network()
    lr, hr = torch.rand(BATCH, 3, LR_PATCH, LR_PATCH), torch.rand(BATCH, 3, LR_PATCH * SCALE, LR_PATCH * SCALE)
    with FlopCounterMode(display=False) as counter:
        F.l1_loss(model(lr), hr).backward()
    return counter.get_total_flops()


def bench_training(device, steps: int) -> dict:
    flops = training_step_flops()
    lr8 = torch.randint(0, 256, (BATCH, LR_PATCH, LR_PATCH, 3), dtype=torch.uint8)
    hr8 = torch.randint(0, 256, (BATCH, LR_PATCH * SCALE, LR_PATCH * SCALE, 3), dtype=torch.uint8)
    flips = torch.rand(BATCH, 3) < 0.5

    torch.manual_seed(0)
    model = ResShuffle().to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    dtype = amp_dtype(device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    ours = timed(lambda: train_step(model, *device_batch(lr8, hr8, flips, device), optimizer, scaler, dtype),
                 device, steps)

    torch.manual_seed(0)
    plain_model = plain_network().to(device)
    plain_opt = torch.optim.Adam(plain_model.parameters(), lr=2e-4)
    lr, hr = (t.permute(0, 3, 1, 2).float().div(255).contiguous().to(device) for t in (lr8, hr8))

    def plain_step():
        loss = F.l1_loss(plain_model(lr), hr)
        plain_opt.zero_grad()
        loss.backward()
        plain_opt.step()

    plain = timed(plain_step, device, steps)

    # The ceiling: one 64->64 3x3 conv, forward and backward (input and weight gradients), the
    # best of two sizes (the step's own trunk, 16x48x48, and a larger one) and both layouts.
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).to(device)
    best = 0.0
    for n, size in ((BATCH, LR_PATCH), (32, 128) if device.type == "cuda" else (8, 96)):
        for fmt in (torch.contiguous_format, torch.channels_last):
            c = conv.to(memory_format=fmt)
            x = torch.rand(n, 64, size, size, device=device).contiguous(memory_format=fmt).requires_grad_()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                seconds = timed(lambda: c(x).sum().backward(), device, max(steps, 3))
            best = max(best, 3 * 2 * n * size * size * 64 * 64 * 9 / seconds)
    return {"train_flops_per_step": flops, "train_step_s": ours, "plain_step_s": plain,
            "train_patches_s": BATCH / ours, "plain_patches_s": BATCH / plain, "train_speedup": plain / ours,
            "train_gflops": flops / ours / 1e9, "plain_gflops": flops / plain / 1e9,
            "ceiling_gflops": best / 1e9, "train_fraction_of_ceiling": flops / ours / best}


def make_2k_images(folder: Path, count: int) -> None:
    """Photo-like 2040x1356 PNGs: smooth colour fields, edges and fine noise."""
    rng = np.random.default_rng(0)
    h, w = 1356, 2040
    y, x = np.mgrid[0:h, 0:w].astype(np.float32) / w
    for i in range(count):
        img = np.zeros((h, w, 3), np.float32)
        for c in range(3):
            for _ in range(6):
                fx, fy, phase = rng.uniform(0.5, 40), rng.uniform(0.5, 40), rng.uniform(0, 6.3)
                img[..., c] += np.sin(2 * np.pi * (fx * x + fy * y) + phase)
        img = 127.5 + 20 * img + rng.normal(0, 6, (h, w, 3)).astype(np.float32)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"{i:04d}.png")


class DecodePerPatch(Dataset):
    """What many repositories do: open and decode the image file for every patch."""

    def __init__(self, paths, patches_per_image: int, patch_size: int = LR_PATCH * SCALE):
        self.paths, self.ppi, self.p = paths, patches_per_image, patch_size

    def __len__(self):
        return len(self.paths) * self.ppi

    def __getitem__(self, i):
        img = load_rgb(self.paths[i // self.ppi])
        rng = np.random.default_rng(i)
        y, x = rng.integers(0, img.shape[0] - self.p + 1), rng.integers(0, img.shape[1] - self.p + 1)
        hr = np.ascontiguousarray(img[y:y + self.p, x:x + self.p])
        return torch.from_numpy(downsample(hr, SCALE).copy()), torch.from_numpy(hr)


def loader_rate(loader, batches: int) -> float:
    """Patches/s over `batches` batches, after the first (worker start-up) is drawn."""
    it = iter(loader)
    next(it)
    start, n = time.perf_counter(), 0
    for _ in range(batches):
        n += next(it)[0].shape[0]
    return n / (time.perf_counter() - start)


def bench_data(folder: Path) -> dict:
    paths = list_images(folder)
    start = time.perf_counter()
    data = TrainDataset(folder, scale=SCALE, patch_size=LR_PATCH * SCALE, patches_per_image=5000)
    decode_s = time.perf_counter() - start
    out = {"data_decode_all_s": decode_s, "data_images": len(paths)}
    for workers in (1, 2):
        loader = PatchLoader(data, EpochSampler(data, seed=0), batch_size=BATCH, num_workers=workers)
        out[f"data_patches_s_{workers}w"] = loader_rate(loader, batches=1000)
    naive = DataLoader(DecodePerPatch(paths, 50), batch_size=BATCH, shuffle=True, num_workers=1,
                       generator=torch.Generator().manual_seed(0))
    out["data_decode_per_patch_patches_s_1w"] = loader_rate(naive, batches=3)
    out["data_speedup_1w"] = out["data_patches_s_1w"] / out["data_decode_per_patch_patches_s_1w"]
    return out


def run_infer(args: list[str]) -> tuple[float | None, float, bool]:
    """Run infer.py in a fresh process: (peak resident memory in GB or None if it failed, seconds,
    whether it tiled an image it was asked to run whole because memory was short).

    The peak is VmHWM of the process's own memory: getrusage's ru_maxrss would also count
    this (large) benchmark process, which the child is forked from.
    """
    code = ("import runpy, sys; sys.argv = ['infer.py'] + sys.argv[1:]\n"
            "try:\n    runpy.run_path('infer.py', run_name='__main__')\n"
            "finally:\n    print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')))")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                            cwd=Path(__file__).parent)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        print(f"  infer.py {' '.join(args)} failed (exit {result.returncode}): "
              f"{result.stderr.strip().splitlines()[-1] if result.stderr.strip() else 'killed'}")
        return None, seconds, False
    peak_kb = next(int(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("VmHWM"))
    return peak_kb * 1024 / 1e9, seconds, "tiling it by" in result.stderr


def bench_inference(device, folder: Path, repeats: int, memory: bool) -> dict:
    torch.manual_seed(0)
    model = ResShuffle().to(device, memory_format=torch.channels_last).eval()
    hr = load_rgb(list_images(folder)[0])[:1356, :2040]
    lr = downsample(hr, SCALE)  # 510x339, a DIV2K-size LR image
    out_mp = lr.shape[0] * lr.shape[1] * SCALE ** 2 / 1e6
    radius = model.receptive_radius()
    whole = upscale(model, lr, tile=0)
    ours = timed(lambda: upscale(model, lr, tile=0), device, repeats, warmup=0)
    tiled_out = upscale(model, lr, tile=256)  # infer.py's default: --tile 256, --tile_pad = radius
    tiled = timed(lambda: upscale(model, lr, tile=256), device, repeats, warmup=0)

    plain_model = plain_network().to(device).eval()
    plain_model.load_state_dict(model.state_dict())

    def plain():
        with torch.no_grad():
            x = torch.from_numpy(lr.copy()).permute(2, 0, 1).unsqueeze(0).float().div(255).to(device)
            return plain_model(x).clamp(0, 1).mul(255).round().byte().cpu()

    plain_s = timed(plain, device, repeats)
    out = {"infer_input": f"{lr.shape[1]}x{lr.shape[0]}", "infer_mp_s": out_mp / ours,
           "infer_tiled256_mp_s": out_mp / tiled, "plain_infer_mp_s": out_mp / plain_s,
           "infer_speedup": plain_s / ours, "tiled_over_untiled_time": tiled / ours,
           "receptive_radius": radius, "tiled_equals_untiled_uint8": bool(np.array_equal(whole, tiled_out)),
           "tiled_max_abs_diff": int(np.abs(whole.astype(int) - tiled_out.astype(int)).max())}
    if memory:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            big = np.asarray(Image.fromarray(hr).resize((2040, 1360), Image.BICUBIC))
            Image.fromarray(big).save(tmp / "big.png")
            ckpt = tmp / "model.pt"
            save_checkpoint({"model": model.state_dict(), "model_args": dict(scale=SCALE)}, ckpt)
            common = [str(tmp / "big.png"), "--checkpoint", str(ckpt), "--device", device.type]
            big_mp = 8160 * 5440 / 1e6
            for name, extra in (("tile256", ["--tile", "256"]), ("untiled", ["--tile", "0"])):
                peak, seconds, auto_tiled = run_infer(common + ["-o", str(tmp / f"{name}.png"), *extra])
                out[f"infer_8160x5440_{name}_peak_gb"], out[f"infer_8160x5440_{name}_mp_s"] = peak, big_mp / seconds
                out[f"infer_8160x5440_{name}_auto_tiled"] = auto_tiled
    return out


def bench_evaluate(folder: Path, device) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "model.pt"
        save_checkpoint({"model": ResShuffle().state_dict(), "model_args": dict(scale=SCALE)}, ckpt)
        start = time.perf_counter()
        subprocess.run([sys.executable, "evaluate.py", "--data_dir", str(folder), "--checkpoint", str(ckpt),
                        "--device", device.type, "--max_images", "2"], check=True, capture_output=True,
                       cwd=Path(__file__).parent)
        return {"evaluate_s_per_2k_image": (time.perf_counter() - start) / 2}  # includes start-up


def main(args):
    device = select_device(args.device)
    figures = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_2k_images(folder, 4)
        print("training step ...", flush=True)
        figures |= bench_training(device, args.steps)
        print(f"  {figures['train_patches_s']:.2f} vs plain {figures['plain_patches_s']:.2f} patches/s", flush=True)
        print("data loader ...", flush=True)
        figures |= bench_data(folder)
        print("inference ...", flush=True)
        figures |= bench_inference(device, folder, repeats=2, memory=not args.skip_memory)
        print("evaluate.py ...", flush=True)
        figures |= bench_evaluate(folder, device)
    report(figures)


def report(f: dict) -> None:
    def row(what, ours, plain="", ratio=""):
        print(f"{what:<44} {ours:>14} {plain:>14} {ratio:>8}")

    print(f"\nResShuffle benchmark, {f['date']}, device {f['device']}, torch {f['torch']}, {f['threads']} threads")
    row("", "ResShuffle", "plain", "ratio")
    row("train step, patches/s (batch 16, 48px LR, x4)", f"{f['train_patches_s']:.2f}",
        f"{f['plain_patches_s']:.2f}", f"{f['train_speedup']:.2f}x")
    row("train step, GFLOP/s (counted)", f"{f['train_gflops']:.1f}", f"{f['plain_gflops']:.1f}")
    row("one 64->64 3x3 conv fwd+bwd, GFLOP/s", f"{f['ceiling_gflops']:.1f}")
    row("  train step's GFLOP/s as a share of it", f"{100 * f['train_fraction_of_ceiling']:.0f}%")
    row("data, patches/s, 1 worker", f"{f['data_patches_s_1w']:.0f}",
        f"{f['data_decode_per_patch_patches_s_1w']:.1f}", f"{f['data_speedup_1w']:.0f}x")
    row("data, patches/s, 2 workers", f"{f['data_patches_s_2w']:.0f}")
    row(f"inference {f['infer_input']} untiled, output MP/s", f"{f['infer_mp_s']:.3f}", f"{f['plain_infer_mp_s']:.3f}",
        f"{f['infer_speedup']:.2f}x")
    row("  tiled (256, pad = radius), output MP/s", f"{f['infer_tiled256_mp_s']:.3f}", "",
        f"{f['tiled_over_untiled_time']:.2f}x t")
    row(f"  tiled == untiled (uint8), radius {f['receptive_radius']} LR px", str(f["tiled_equals_untiled_uint8"]),
        f"max diff {f['tiled_max_abs_diff']}")
    if "infer_8160x5440_tile256_peak_gb" in f:
        for name in ("tile256", "untiled"):
            peak = f[f"infer_8160x5440_{name}_peak_gb"]
            label = name + (" (infer.py tiled it: memory short)" if f[f"infer_8160x5440_{name}_auto_tiled"] else "")
            row(f"infer.py 2040x1360 -> 8160x5440, {label}", "failed" if peak is None else f"{peak:.2f} GB",
                f"{f[f'infer_8160x5440_{name}_mp_s']:.3f} MP/s")
    row("evaluate.py, s per 2K image", f"{f['evaluate_s_per_2k_image']:.1f}")
    print(json.dumps(f))


def build_parser():
    parser = make_parser(__doc__)
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    parser.add_argument("--steps", type=positive_int, default=3, help="timed repeats per measurement")
    parser.add_argument("--skip_memory", action="store_true", help="skip the 8160x5440 memory runs")
    return parser


if __name__ == "__main__":
    run_cli(main, build_parser().parse_args())
