"""Measure ResShuffle's training step, data loader, inference and evaluation against the plain way.

usage: python benchmark.py [--device auto] [--precision auto] [--steps 3] [--skip_memory] [--quick] [--arch resshuffle] [--loss l1]
       python benchmark.py --data_cache [--quick]     # only section 5: a 2 GB set, decoded or mapped
       python benchmark.py --check --device cuda      # train, resume, tile in every precision

Every figure comes from this run, on this machine, both sides measured in the same run. It
prints a table a row at a time, each row as soon as it is measured, then one JSON line with
every figure; --quick measures the same rows with fewer repeats and smaller inputs. Synthetic
2K images (2040x1356, photo-like content) are written to a temporary folder, so no data set
is needed; it is removed on Ctrl-C and on SIGTERM too. Each of the rows for the training step
and inference is measured in fp32 and in --precision (default: what --precision auto picks on
this device, bf16 where that is fp32).

1. training step, batch 16 of 48x48 LR patches at x4: train.py's step (channels_last) against
   a plain NCHW fp32 step; GFLOP/s from the FLOPs PyTorch's FlopCounterMode counts, against
   one 64->64 3x3 convolution forward+backward in the same precision (the practical ceiling).
2. data: patches/s from dataset.py's loader (PatchLoader: cut patches, their flips left to the
   device, which the training step above includes) with 1 and 2 worker threads against a
   DataLoader worker process that decodes the image file for every patch.
3. inference: output megapixels/s of infer.py's path (upscale.upscale) on a 510x339 input, untiled
   against the plain model call, and tiled (infer.py's default) against untiled; the largest
   difference from fp32; the same network exported to ONNX under onnxruntime (where installed:
   requirements-optional.txt); frames/s of infer.py's video path (video.py: decode, upscale,
   H.264 encode) on a 640x360 clip of 4 frames (--quick: 320x180, 2) with the shipped x2 and x4
   checkpoints (where PyAV is installed); peak resident memory and speed of infer.py on a 2040x1360 input
   (8160x5440 output) in fp32, tiled and untiled.
4. evaluate.py: seconds per 2K image.
5. --data_cache, only this section (it makes a 2 GB set, and takes minutes): the training set
   decoded into one file that every process maps (datacache.py) against decoded into each
   process's memory (TrainDataset's cache_dir=None). The set: 230 names linked to 8 distinct 2K
   PNGs, 2.0 GB decoded with its x4 LR (--quick: 35 names, 0.3 GB), the cache beside it in the
   temporary folder. Seconds to construct TrainDataset: decoding, building the cache, mapping
   it. PatchLoader's patches/s from each, the same batches, with 1 and 2 threads, beside what
   the fp32 training step takes. PSS and USS of the set in 1 child process and in 2 at once
   (/proc/<pid>/smaps_rollup, less after the imports). train.py from the cache, then with
   --data_cache none, each in a memory cgroup (v1 or v2, as root) limited to train.py's own
   peak plus half the set: the first should finish, the second be killed.
"""
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from dataset import EpochSampler, PatchLoader, TrainDataset, device_batch
from machinery.images import list_images, load_rgb
from losses import WeightedLoss, loss_spec
from model import NETWORKS, build_network
from resize import downsample
import metrics
from machinery.checkpoint import load_checkpoint, load_chosen, save_checkpoint
from machinery.precision import PRECISIONS, autocast, choose_precision, cpu_bf16_instructions, grad_scaler
from training import train_step
from machinery.onnx_export import export_onnx, onnx_session
from machinery.upscale import tensor_to_image, tiling, upscale
from machinery import video
from utils import UserError, make_parser, plural, positive_int, run_cli, select_device, sigterm_raises

BATCH, LR_PATCH, SCALE = 16, 48, 4
TWO_K = (2040, 1356)  # width, height of the synthetic images


class Plan(NamedTuple):
    """How long each measurement runs. --quick measures the same rows with fewer repeats, smaller
    batches and smaller inputs, which the rows name."""
    steps: int  # timed training steps per measurement (--steps)
    batch: int  # patches in a training step and in a loader's batch
    repeats: int  # timed calls per inference measurement
    loader_batches: int  # batches timed from PatchLoader
    decode_batches: int  # batches timed from the DataLoader that decodes a file per patch
    infer_lr: tuple[int, int]  # width, height of the LR image inference is timed on
    big_lr: tuple[int, int]  # width, height of infer.py's input in the memory runs
    images: int  # synthetic 2K images made
    eval_images: int  # of them, measured by evaluate.py
    eval_size: tuple[int, int]  # width, height of the crop of each that evaluate.py measures
    video_lr: tuple[int, int]  # width, height of the clip timed through video.py
    video_frames: int  # its frames


FULL = Plan(steps=3, batch=BATCH, repeats=2, loader_batches=1000, decode_batches=3, infer_lr=(510, 339),
            big_lr=(2040, 1360), images=4, eval_images=2, eval_size=TWO_K, video_lr=(640, 360), video_frames=4)
QUICK = Plan(steps=1, batch=4, repeats=1, loader_batches=100, decode_batches=1, infer_lr=(264, 128),
             big_lr=(264, 128), images=2, eval_images=1, eval_size=(512, 340), video_lr=(320, 180), video_frames=2)


def dims(size: tuple[int, int]) -> str:
    """'300x170' for (300, 170): width x height."""
    return f"{size[0]}x{size[1]}"


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


def plain_network(model_args: dict) -> torch.nn.Module:
    """The network computed as written, layer after layer (ResShuffle: the 9x9 tail after the last PixelShuffle)."""
    model = build_network(model_args)
    if hasattr(model, "fast_tail"):
        model.fast_tail = False
    return model


def training_step_flops(model_args: dict, loss: WeightedLoss, batch: int) -> int:
    """FLOPs of one forward+backward of the x4 network and `loss` on one batch, as PyTorch counts them.

    Counted on the network as written: ResShuffle runs its tail as an equivalent conv with more
    FLOPs (ResShuffle.upsample_and_tail), which would otherwise count as useful work. Counted on
    the meta device, from shapes alone, in no time; on the CPU for a loss that can't run there.
    """
    def count(device) -> int:
        with torch.device(device):
            model = plain_network(model_args)
            lr, hr = torch.rand(batch, 3, LR_PATCH, LR_PATCH), torch.rand(batch, 3, LR_PATCH * SCALE, LR_PATCH * SCALE)
        with FlopCounterMode(display=False) as counter:
            loss.total(loss.terms(model(lr), hr)).backward()
        return counter.get_total_flops()

    try:
        return count("meta")
    except (NotImplementedError, RuntimeError):  # e.g. a loss that reads a value (.item())
        return count("cpu")


def bench_training(device, plan: Plan, precision: str, model_args: dict, loss: WeightedLoss) -> dict:
    """train.py's step (network `model_args`, `loss`) in fp32 and in `precision` against the plain
    NCHW fp32 step (measured first: each row's ratio needs it), and the conv ceiling in each."""
    steps, batch, flops = plan.steps, plan.batch, training_step_flops(model_args, loss, plan.batch)
    lr8, hr8, flips = random_batch(batch)
    plain = plain_step_seconds(device, steps, model_args, loss, lr8, hr8)
    out = {"train_batch": batch, "train_flops_per_step": flops, "plain_patches_s": batch / plain,
           "plain_gflops": flops / plain / 1e9}
    for name in precisions(precision):
        seconds = step_seconds(device, model_args, loss, name, lr8, hr8, flips, steps=steps)
        row(f"train step {name}, patches/s (batch {batch}, 48px LR)", f"{batch / seconds:.2f}",
            f"{batch / plain:.2f}", f"{plain / seconds:.2f}x")
        row("  GFLOP/s (counted)", f"{flops / seconds / 1e9:.1f}", f"{flops / plain / 1e9:.1f}")
        ceiling = conv_ceiling(device, name, steps)
        row(f"  one 64->64 3x3 conv fwd+bwd in {name}, GFLOP/s", f"{ceiling / 1e9:.1f}")
        row("  train step's GFLOP/s as a share of it", f"{100 * flops / seconds / ceiling:.0f}%")
        out |= {f"train_patches_s_{name}": batch / seconds, f"train_gflops_{name}": flops / seconds / 1e9,
                f"ceiling_gflops_{name}": ceiling / 1e9, f"train_fraction_of_ceiling_{name}": flops / seconds / ceiling}
    return out


def random_batch(batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A loader batch of random pixels: lr, hr (uint8 NHWC, 48px LR patches at x4) and flips."""
    lr8 = torch.randint(0, 256, (batch, LR_PATCH, LR_PATCH, 3), dtype=torch.uint8)
    hr8 = torch.randint(0, 256, (batch, LR_PATCH * SCALE, LR_PATCH * SCALE, 3), dtype=torch.uint8)
    return lr8, hr8, torch.rand(batch, 3) < 0.5


def step_seconds(device, model_args: dict, loss: WeightedLoss, precision: str, lr8, hr8, flips, steps: int) -> float:
    """Seconds per step of train.py's step (channels_last, flipped on the device) in `precision`."""
    torch.manual_seed(0)
    model = build_network(model_args).to(device, memory_format=torch.channels_last)
    optimizer, scaler = torch.optim.Adam(model.parameters(), lr=2e-4), grad_scaler(device, precision)
    return timed(lambda: train_step(model, *device_batch(lr8, hr8, flips, device), optimizer, scaler, precision, loss),
                 device, steps)


def plain_step_seconds(device, steps: int, model_args: dict, loss: WeightedLoss, lr8, hr8) -> float:
    """Seconds per step of the plain way: the network as written, NCHW, fp32."""
    torch.manual_seed(0)
    plain_model = plain_network(model_args).to(device)
    plain_opt = torch.optim.Adam(plain_model.parameters(), lr=2e-4)
    lr, hr = (t.permute(0, 3, 1, 2).float().div(255).contiguous().to(device) for t in (lr8, hr8))

    def plain_step():
        total = loss.total(loss.terms(plain_model(lr), hr))
        plain_opt.zero_grad()
        total.backward()
        plain_opt.step()

    return timed(plain_step, device, steps)


def conv_ceiling(device, precision: str, steps: int) -> float:
    """FLOP/s of one 64->64 3x3 conv, forward and backward (input and weight gradients), in
    `precision`: the best of two sizes (the step's own trunk, 16x48x48, and a larger one) and both
    layouts. Most of the network's FLOPs are such convs: the step can't run much faster than this."""
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).to(device)
    best = 0.0
    for n, size in ((BATCH, LR_PATCH), (32, 128) if device.type == "cuda" else (8, 96)):
        for fmt in (torch.contiguous_format, torch.channels_last):
            c = conv.to(memory_format=fmt)
            x = torch.rand(n, 64, size, size, device=device).contiguous(memory_format=fmt).requires_grad_()

            def step():
                with autocast(device, precision):
                    y = c(x)
                y.float().sum().backward()

            best = max(best, 3 * 2 * n * size * size * 64 * 64 * 9 / timed(step, device, max(steps, 3)))
    return best


def precisions(precision: str) -> list[str]:
    """fp32, and the reduced precision measured beside it."""
    return ["fp32"] + ([precision] if precision != "fp32" else [])


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


def bench_data(folder: Path, plan: Plan) -> dict:
    """PatchLoader with 1 and 2 threads against decoding the file for every patch (measured first:
    the first row's ratio needs it)."""
    paths = list_images(folder)
    start = time.perf_counter()
    data = TrainDataset(folder, scale=SCALE, patch_size=LR_PATCH * SCALE, patches_per_image=5000)
    out = {"data_decode_all_s": time.perf_counter() - start, "data_images": len(paths)}
    naive = DataLoader(DecodePerPatch(paths, 50), batch_size=plan.batch, shuffle=True, num_workers=1,
                       generator=torch.Generator().manual_seed(0))
    naive_rate = out["data_decode_per_patch_patches_s_1w"] = loader_rate(naive, batches=plan.decode_batches)
    for workers in (1, 2):
        loader = PatchLoader(data, EpochSampler(data, seed=0), batch_size=plan.batch, num_workers=workers)
        rate = out[f"data_patches_s_{workers}w"] = loader_rate(loader, batches=plan.loader_batches)
        if workers == 1:
            row("data, patches/s, 1 worker", f"{rate:.0f}", f"{naive_rate:.1f}", f"{rate / naive_rate:.0f}x")
        else:
            row(f"data, patches/s, {workers} workers", f"{rate:.0f}")
    out["data_speedup_1w"] = out["data_patches_s_1w"] / naive_rate
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
              f"{result.stderr.strip().splitlines()[-1] if result.stderr.strip() else 'killed'}", flush=True)
        return None, seconds, False
    peak_kb = next(int(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("VmHWM"))
    return peak_kb * 1024 / 1e9, seconds, "tiling it by" in result.stderr


def bench_inference(device, folder: Path, plan: Plan, memory: bool, precision: str, model_args: dict) -> dict:
    """infer.py's path in fp32 and `precision` against the plain model call (measured first: each
    row's ratio needs it), tiled against untiled; onnxruntime; infer.py's memory on a large input."""
    torch.manual_seed(0)
    model = build_network(model_args).to(device, memory_format=torch.channels_last).eval()
    width, height = plan.infer_lr
    hr = load_rgb(list_images(folder)[0])[:height * SCALE, :width * SCALE]
    lr = downsample(hr, SCALE)  # 510x339, a DIV2K-size LR image (--quick: 264x128, still two tiles)
    out_mp = lr.shape[0] * lr.shape[1] * SCALE ** 2 / 1e6
    out = {"infer_input": f"{lr.shape[1]}x{lr.shape[0]}", "receptive_radius": tiling(model, 256, None)[1]}
    out["plain_infer_mp_s"] = out_mp / plain_infer_seconds(model, model_args, lr, plan.repeats)
    sr = {}
    for name in precisions(precision):
        figures, sr[name] = bench_upscale(model, lr, name, plan.repeats, out)
        out |= figures
        if name != "fp32":  # fp32 is the first
            diff, psnr = max_diff(sr[name], sr["fp32"]), metrics.psnr(sr[name], sr["fp32"])
            row(f"  {name} vs fp32 output (uint8)", f"max diff {diff}", f"{psnr:.1f} dB")
            out |= {f"max_abs_diff_from_fp32_{name}": diff, f"psnr_vs_fp32_{name}": psnr}
    if device.type == "cpu":
        out |= bench_onnxruntime(model, lr, out_mp, plan.repeats, sr["fp32"], out)
    if memory:
        out |= bench_memory(model, hr, device, model_args, plan.big_lr)
    return out


def plain_infer_seconds(model: torch.nn.Module, model_args: dict, lr: np.ndarray, repeats: int) -> float:
    """Seconds per call of the plain way: `model`'s weights in the network as written, NCHW, fp32."""
    device = next(model.parameters()).device
    plain_model = plain_network(model_args).to(device).eval()
    plain_model.load_state_dict(model.state_dict())

    def plain():
        with torch.no_grad():
            x = torch.from_numpy(lr.copy()).permute(2, 0, 1).unsqueeze(0).float().div(255).to(device)
            return plain_model(x).clamp(0, 1).mul(255).round().byte().cpu()

    return timed(plain, device, repeats)


def bench_upscale(model: torch.nn.Module, lr: np.ndarray, name: str, repeats: int, f: dict) -> tuple[dict, np.ndarray]:
    """upscale.upscale in precision `name`, untiled and tiled as infer.py does by default (`f`: the
    figures so far); the figures and the untiled output."""
    device = next(model.parameters()).device
    out_mp = lr.shape[0] * lr.shape[1] * SCALE ** 2 / 1e6
    whole = upscale(model, lr, tile=0, precision=name)
    seconds = timed(lambda: upscale(model, lr, tile=0, precision=name), device, repeats, warmup=0)
    row(f"inference {f['infer_input']} {name} untiled, output MP/s", f"{out_mp / seconds:.3f}",
        f"{f['plain_infer_mp_s']:.3f}", f"{out_mp / seconds / f['plain_infer_mp_s']:.2f}x")
    tiled = upscale(model, lr, tile=256, precision=name)  # infer.py's default: --tile 256, pad = radius
    tiled_s = timed(lambda: upscale(model, lr, tile=256, precision=name), device, repeats, warmup=0)
    row("  tiled (256, pad = radius), output MP/s", f"{out_mp / tiled_s:.3f}")
    row(f"  tiled vs untiled, radius {f['receptive_radius']} LR px", f"max diff {max_diff(whole, tiled)}")
    return {f"infer_mp_s_{name}": out_mp / seconds, f"infer_tiled256_mp_s_{name}": out_mp / tiled_s,
            f"tiled_max_abs_diff_{name}": max_diff(whole, tiled)}, whole


def bench_memory(model: torch.nn.Module, hr: np.ndarray, device, model_args: dict, size: tuple[int, int]) -> dict:
    """Peak memory and speed of infer.py in a fresh process on a `size` (width, height) input,
    fp32, tiled and untiled."""
    (width, height), out = size, {}
    big_out = dims((width * SCALE, height * SCALE))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        Image.fromarray(hr).resize(size, Image.BICUBIC).save(tmp / "big.png")
        ckpt = tmp / "model.pt"
        save_checkpoint({"model": model.state_dict(), "model_args": model_args}, ckpt)
        common = [str(tmp / "big.png"), "--checkpoint", str(ckpt), "--device", device.type, "--precision", "fp32"]
        for name, extra in (("tile256", ["--tile", "256"]), ("untiled", ["--tile", "0"])):
            peak, seconds, auto_tiled = run_infer(common + ["-o", str(tmp / f"{name}.png"), *extra])
            mp_s = width * height * SCALE ** 2 / 1e6 / seconds
            label = name + (" (infer.py tiled it: memory short)" if auto_tiled else "")
            row(f"infer.py fp32 {dims(size)} -> {big_out}, {label}", "failed" if peak is None else f"{peak:.2f} GB",
                f"{mp_s:.3f} MP/s")
            out |= {f"infer_{big_out}_{name}_peak_gb": peak, f"infer_{big_out}_{name}_mp_s": mp_s,
                    f"infer_{big_out}_{name}_auto_tiled": auto_tiled}
    return out


def bench_onnxruntime(model: torch.nn.Module, lr: np.ndarray, out_mp: float, repeats: int, exact: np.ndarray,
                      f: dict) -> dict:
    """The same network exported to ONNX (train.py --export x.onnx), untiled under onnxruntime on the
    CPU, against infer.py's fp32 path above (`exact`, and its speed in `f`); {} without onnxscript
    and onnxruntime."""
    if not all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript", "onnxruntime")):
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x4.onnx"
        export_onnx(model, path, {})
        session, name = onnx_session(path)
    x = torch.from_numpy(lr.copy()).permute(2, 0, 1)[None].float().div(255).numpy()
    diff = max_diff(tensor_to_image(torch.from_numpy(session.run(None, {name: x})[0])), exact)  # the warm-up call
    mp_s = out_mp / timed(lambda: session.run(None, {name: x}), torch.device("cpu"), repeats, warmup=0)
    row(f"inference {f['infer_input']} onnxruntime fp32 untiled, MP/s", f"{mp_s:.3f}",
        f"{f['infer_mp_s_fp32']:.3f}", f"{mp_s / f['infer_mp_s_fp32']:.2f}x")
    row("  onnxruntime vs infer.py's fp32 output (uint8)", f"max diff {diff}")
    return {"onnxruntime_mp_s": mp_s, "onnxruntime_max_abs_diff_fp32": diff,
            "onnxruntime_threads": session.get_session_options().intra_op_num_threads}


def bench_video(device, folder: Path, plan: Plan, precision: str) -> dict:
    """Frames/s of video.upscale_video (infer.py's video path) with the shipped x2 and x4 networks,
    on an H.264 clip panned across the first synthetic image; {} without PyAV."""
    if video.av is None:
        return {}
    out, size = {}, dims(plan.video_lr)
    with tempfile.TemporaryDirectory() as tmp:
        clip = make_clip(Path(tmp) / "clip.mp4", load_rgb(list_images(folder)[0]), plan.video_lr, plan.video_frames)
        info = video.probe(clip)
        for scale in (2, 4):
            model = load_chosen(None, scale, device)[0]
            for name in precisions(precision):
                start = time.perf_counter()
                video.upscale_video(model, clip, Path(tmp) / f"x{scale}_{name}.mp4", info, precision=name)
                fps = plan.video_frames / (time.perf_counter() - start)
                row(f"video {size} -> x{scale} {name}, frames/s", f"{fps:.3f}")
                out[f"video_{size}_x{scale}_fps_{name}"] = fps
    return out


def make_clip(path: Path, img: np.ndarray, size: tuple[int, int], frames: int) -> Path:
    """An H.264 clip of `frames` `size` crops of `img`, panning 8 pixels a frame, at 24 fps."""
    with video.av.open(str(path), "w") as c:
        stream = c.add_stream("libx264", rate=24, options={"crf": "17"})
        stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
        for i in range(frames):
            crop = np.ascontiguousarray(img[i * 8:i * 8 + size[1], i * 8:i * 8 + size[0]])
            frame = video.av.VideoFrame.from_ndarray(crop, format="rgb24")
            frame.pts = i
            c.mux(stream.encode(frame))
        c.mux(stream.encode(None))
    return path


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    """The largest difference of two uint8 images, in levels."""
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def bench_evaluate(folder: Path, device, model_args: dict, plan: Plan) -> dict:
    """evaluate.py on the first `plan.eval_images` images, cropped to `plan.eval_size`; start-up included."""
    width, height = plan.eval_size
    size = "2K" if plan.eval_size == TWO_K else dims(plan.eval_size)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt, images = tmp / "model.pt", tmp / "images"
        save_checkpoint({"model": build_network(model_args).state_dict(), "model_args": model_args}, ckpt)
        images.mkdir()
        for path in list_images(folder)[:plan.eval_images]:
            Image.fromarray(load_rgb(path)[:height, :width]).save(images / path.name)
        start = time.perf_counter()
        subprocess.run([sys.executable, "evaluate.py", "--data_dir", str(images), "--checkpoint", str(ckpt),
                        "--device", device.type], check=True, capture_output=True, cwd=Path(__file__).parent)
        seconds = (time.perf_counter() - start) / plan.eval_images
    row(f"evaluate.py (fp32), s per {size} image", f"{seconds:.1f}")
    return {f"evaluate_s_per_{size.lower()}_image": seconds}


# ---------------------------------------------------------------- --data_cache: the decoded set, mapped

class CachePlan(NamedTuple):
    """The --data_cache section's sizes; --quick: a smaller set, fewer batches."""
    distinct: int  # distinct synthetic 2K images written
    images: int  # names they are linked under: the set's images
    loader_batches: int  # batches timed per loader measurement
    step_batch: int  # the training step the loader feeds, patches
    step_repeats: int  # its timed steps


CACHE_FULL = CachePlan(distinct=8, images=230, loader_batches=1000, step_batch=BATCH, step_repeats=2)
CACHE_QUICK = CachePlan(distinct=2, images=35, loader_batches=250, step_batch=BATCH, step_repeats=1)

# A child that holds the set, for the parent to read its memory: it imports, says "ready" and
# waits; on "go" it constructs the set, reads every page of it and says "done", then waits to
# be killed, so that all children are alive when the parent reads their /proc/<pid>/smaps_rollup.
# Not a module of this repository: no module may import an entry script.
HOLD_SET = """
import sys
from dataset import TrainDataset
print("ready", flush=True)
sys.stdin.readline()
data = TrainDataset(sys.argv[1], scale=4, patch_size=192, patches_per_image=1, quiet=True,
                    cache_dir=None if sys.argv[2] == "none" else sys.argv[2])
sum(int(a.reshape(-1)[::4096].sum()) for a in data.hr + data.lr)  # one byte of every page
print("done", flush=True)
sys.stdin.read()
"""


def set_bytes(plan: CachePlan) -> int:
    """The set decoded: each 2K image and its x4 LR, uint8 RGB."""
    w, h = TWO_K
    return plan.images * 3 * (w * h + (w // SCALE) * (h // SCALE))


def make_cache_set(tmp: Path, plan: CachePlan) -> Path:
    """`plan.distinct` photo-like 2K PNGs in tmp/distinct, linked under `plan.images` names in
    tmp/set: a large set made in seconds (decoding 230 distinct images costs the same as 8 copies)."""
    (tmp / "distinct").mkdir()
    (tmp / "set").mkdir()
    make_2k_images(tmp / "distinct", plan.distinct)
    distinct = list_images(tmp / "distinct")
    for i in range(plan.images):
        os.link(distinct[i % len(distinct)], tmp / "set" / f"{i:04d}.png")
    return tmp / "set"


def bench_data_cache(device, plan: CachePlan, model_args: dict, loss: WeightedLoss) -> dict:
    """Section 5: start-up, the loader's speed, memory with 1 and 2 processes, and train.py under
    a memory limit, from the mapped cache against the set decoded into memory."""
    with tempfile.TemporaryDirectory() as tmp:  # the cache too: never the user's own cache folder
        tmp = Path(tmp)
        folder, cache = make_cache_set(tmp, plan), tmp / "cache"
        size = f"{plan.images} 2K images, {set_bytes(plan) / 1e9:.2f} GB"  # named in each section's first row
        out = {"cache_images": plan.images, "cache_set_gb": set_bytes(plan) / 1e9}
        sets = cache_startup(folder, cache, plan, size, out)
        out |= cache_loader(sets, plan, device, model_args, loss)
        del sets  # the children below must be the only processes mapping the cache
        out |= cache_memory(folder, cache, size)
        out |= cache_limit(device, tmp, cache, plan)
    return out


def cache_startup(folder: Path, cache: Path, plan: CachePlan, size: str, out: dict) -> dict:
    """Seconds to construct TrainDataset decoding into memory, building the cache, and mapping
    it (into `out`); the in-memory and the mapped sets, for the loader."""
    sets, seconds = {}, {}
    per_image = -(-(plan.loader_batches + 1) * BATCH // plan.images)  # an epoch holds the batches timed
    for name, cache_dir in (("decode", None), ("build", cache), ("reuse", cache)):
        start = time.perf_counter()
        sets[name] = TrainDataset(folder, scale=SCALE, patch_size=LR_PATCH * SCALE, patches_per_image=per_image,
                                  cache_dir=cache_dir, quiet=True)
        seconds[name] = out[f"cache_startup_{name}_s"] = time.perf_counter() - start
    row(f"start-up, s ({size}): mapped", f"{seconds['reuse']:.2f}", f"{seconds['decode']:.1f}",
        f"{seconds['decode'] / seconds['reuse']:.0f}x")
    row("  first run: cache built, s", f"{seconds['build']:.1f}")
    out["cache_startup_decode_over_reuse"] = seconds["decode"] / seconds["reuse"]
    del sets["build"]
    return sets


def cache_loader(sets: dict, plan: CachePlan, device, model_args: dict, loss: WeightedLoss) -> dict:
    """PatchLoader's patches/s from the mapped set against the in-memory one, the same batches,
    after a pass over every page of both; and what the fp32 training step takes."""
    mapped, memory = sets["reuse"], sets["decode"]
    same = all(torch.equal(a, b) for a, b in zip(mapped.batch(0, range(BATCH)), memory.batch(0, range(BATCH))))
    for data in (mapped, memory):
        sum(int(a.reshape(-1)[::4096].sum()) for a in data.hr + data.lr)  # warm: every page read once
    row("loader: the same patches from both, bit for bit", "yes" if same else "NO")
    out = {"cache_same_patches": same}
    for workers in (1, 2):
        rate = {"memory": 0.0, "mapped": 0.0}
        for _ in range(3):  # the best of 3, in turns: another load on the machine slows both alike
            for name, data in (("memory", memory), ("mapped", mapped)):
                loader = PatchLoader(data, EpochSampler(data, seed=0), batch_size=BATCH, num_workers=workers)
                rate[name] = max(rate[name], loader_rate(loader, batches=plan.loader_batches))
        row(f"loader, patches/s ({BATCH}x{LR_PATCH * SCALE}px HR), {plural(workers, 'thread')}",
            f"{rate['mapped']:.0f}", f"{rate['memory']:.0f}", f"{rate['mapped'] / rate['memory']:.2f}x")
        out |= {f"cache_loader_patches_s_{workers}w_{name}": r for name, r in rate.items()}
    batch = plan.step_batch
    step = batch / step_seconds(device, model_args, loss, "fp32", *random_batch(batch), steps=plan.step_repeats)
    row(f"  fp32 {model_args['arch']} train step (batch {batch}) takes, patches/s", f"{step:.1f}")
    return out | {"cache_train_step_patches_s_fp32": step, "cache_train_step_batch": batch}


def cache_memory(folder: Path, cache: Path, size: str) -> dict:
    """PSS and USS of the set in 1 process and in 2 at once, mapped against decoded into memory
    (measured first: each row's ratio needs it)."""
    if not Path("/proc/self/smaps_rollup").exists():
        row("memory of 1 and 2 processes", "skipped", "no smaps_rollup (Linux 4.14+)")
        return {}
    gb = {(mode, n): held_memory(folder, cache_dir, processes=n)
          for n in (1, 2) for mode, cache_dir in (("memory", "none"), ("mapped", cache))}
    out = {f"cache_{kind}_gb_{n}p_{mode}": gb[mode, n][kind] for mode, n in gb for kind in ("pss", "uss")}
    row(f"memory, GB ({size}): 1 process, PSS", *(f"{gb[m, 1]['pss']:.2f}" for m in ("mapped", "memory")))
    row("  1 process, USS (private)", *(f"{gb[m, 1]['uss']:.2f}" for m in ("mapped", "memory")))
    row("  2 processes at once, PSS summed", *(f"{gb[m, 2]['pss']:.2f}" for m in ("mapped", "memory")))
    row("  2 processes at once, USS summed", *(f"{gb[m, 2]['uss']:.2f}" for m in ("mapped", "memory")))
    for mode in ("mapped", "memory"):
        out[f"cache_pss_2p_over_1p_{mode}"] = gb[mode, 2]["pss"] / gb[mode, 1]["pss"]
    row("  2 processes / 1 (PSS)", *(f"{out[f'cache_pss_2p_over_1p_{m}']:.2f}x" for m in ("mapped", "memory")))
    return out


def held_memory(folder: Path, cache_dir, processes: int) -> dict:
    """PSS and USS (GB) of the set in `processes` children holding it at once, summed: their
    memory with the set, less after their imports, both read while all of them are alive (the
    libraries they share count the same in both)."""
    procs = [subprocess.Popen([sys.executable, "-c", HOLD_SET, str(folder), str(cache_dir)], text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=Path(__file__).parent)
             for _ in range(processes)]
    try:
        before = memory_when(procs, "ready")
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        after = memory_when(procs, "done")
    finally:
        for p in procs:
            p.kill()
            p.wait()
    return {kind: (after[kind] - before[kind]) / 1e9 for kind in before}


def memory_when(procs: list[subprocess.Popen], word: str) -> dict:
    """Once every child has said `word`: their PSS and USS (bytes), summed."""
    for p in procs:
        if p.stdout.readline().strip() != word:
            raise RuntimeError(f"a child holding the set failed (exit {p.wait()})")
    total = {"pss": 0, "uss": 0}
    for p in procs:
        with open(f"/proc/{p.pid}/smaps_rollup") as f:
            kb = {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in f) if v.strip().endswith("kB")}
        total["pss"] += kb["Pss"] * 1024
        total["uss"] += (kb["Private_Clean"] + kb["Private_Dirty"]) * 1024
    return total


# Per memory cgroup version: its root, the limit, the swap limit (set too, so that a process over the
# limit is killed, not swapped), the peak charged, the file that counts OOM kills.
CGROUP_FILES = {"cgroup v2": ("/sys/fs/cgroup", "memory.max", "memory.swap.max", "memory.peak", "memory.events"),
                "cgroup v1": ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.memsw.limit_in_bytes",
                              "memory.max_usage_in_bytes", "memory.oom_control")}


class LimitedRun(NamedTuple):
    result: subprocess.CompletedProcess
    peak: int | None  # bytes charged at most, where the kernel says
    oom_kills: int


def cgroup_version() -> str:
    """The memory cgroup version here, 'cgroup v2' or 'cgroup v1'; OSError saying why there is none."""
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        if "memory" not in Path("/sys/fs/cgroup/cgroup.subtree_control").read_text().split():
            raise OSError("cgroup v2 without the memory controller for child groups")
        return "cgroup v2"
    if Path("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists():
        return "cgroup v1"
    raise OSError("no memory cgroup (/sys/fs/cgroup)")


def run_limited(command: list[str], version: str, limit: int | None, env: dict) -> LimitedRun:
    """`command` in a memory cgroup of its own, limited to `limit` bytes (None: no limit), removed
    after; OSError where the cgroup can't be made (not root, a read-only /sys)."""
    root, limit_file, swap_file, peak_file, events_file = CGROUP_FILES[version]
    group = Path(root) / f"resshuffle-bench-{os.getpid()}"
    group.mkdir()
    try:
        if limit is not None:
            (group / limit_file).write_text(str(limit))
            if (group / swap_file).exists():
                (group / swap_file).write_text("0" if version == "cgroup v2" else str(limit))
        # The shell moves itself into the group, then becomes the command: only it is limited.
        result = subprocess.run(["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(group), *command],
                                capture_output=True, text=True, cwd=Path(__file__).parent, env=env)
        peak = int((group / peak_file).read_text()) if (group / peak_file).exists() else None
        kills = [int(line.split()[1]) for line in (group / events_file).read_text().splitlines()
                 if line.startswith("oom_kill ")]
    finally:
        remove_cgroup(group)
    return LimitedRun(result, peak, sum(kills))


def remove_cgroup(group: Path) -> None:
    """rmdir, once the kernel has let go of the process that ran in it."""
    for _ in range(50):
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)
    print(f"benchmark.py: could not remove the cgroup {group}", file=sys.stderr, flush=True)


def cache_limit(device, tmp: Path, cache: Path, plan: CachePlan) -> dict:
    """train.py from the mapped cache, then with --data_cache none, each in a memory cgroup limited
    to train.py's own peak (on the distinct images alone) plus half the set: the first should
    finish, the second be killed. Skipped, saying why, where no memory cgroup can be made."""
    (tmp / "val").mkdir()
    Image.fromarray(load_rgb(list_images(tmp / "distinct")[0])[:256, :256]).save(tmp / "val" / "0.png")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp / "home"), "MPLCONFIGDIR": str(tmp / "home")}  # not the user's
    try:
        version = cgroup_version()
        own = run_limited(train_command(device, tmp, tmp / "distinct", "none", "own", images=plan.distinct), version,
                          limit=None, env=env)
        if own.result.returncode:
            raise OSError(f"train.py failed (exit {own.result.returncode}): {last_line(own.result.stderr)}")
    except OSError as e:
        row("train.py under a memory limit", "skipped", str(e))
        return {"cache_limit_skipped": str(e)}
    allowance = own.peak or 10 ** 9  # v2 before Linux 5.19 has no memory.peak: allow 1 GB
    limit = allowance + set_bytes(plan) // 2
    evict(cache)  # the set is read from disk inside the limit, as a set larger than memory is
    runs = {name: run_limited(train_command(device, tmp, tmp / "set", data_cache, name, images=plan.images), version,
                              limit, env) for name, data_cache in (("mapped", cache), ("memory", "none"))}
    return limit_rows(runs, limit, allowance, version, plan)


def limit_rows(runs: dict, limit: int, allowance: int, version: str, plan: CachePlan) -> dict:
    """The rows of cache_limit and its figures."""
    what = {name: limited_outcome(run) for name, run in runs.items()}
    row(f"train.py, {version} limit {limit / 1e9:.2f} GB ({plan.images} 2K images)", what["mapped"], what["memory"])
    row(f"  the limit: train.py's own peak {allowance / 1e9:.2f} GB + half the set", "")
    rate, peak = train_rate(runs["mapped"].result.stdout), runs["mapped"].peak
    row("  mapped: train.py's patches/s, read from disk", f"{rate:.0f}" if rate else "?")
    row("  mapped: its peak charged to the cgroup, GB", f"{peak / 1e9:.2f}" if peak else "?")
    return {"cache_limit_gb": limit / 1e9, "cache_limit_mechanism": version, "cache_limit_mapped": what["mapped"],
            "cache_limit_memory": what["memory"], "cache_limit_mapped_patches_s": rate,
            "cache_limit_mapped_peak_gb": peak / 1e9 if peak else None}


def limited_outcome(run: LimitedRun) -> str:
    """'finished', 'killed (SIGKILL) by the limit', 'exit 1'."""
    code = run.result.returncode
    if code == 0:
        return "finished"
    if code < 0:
        return f"killed ({signal.Signals(-code).name}){' by the limit' if run.oom_kills else ''}"
    return f"exit {code}: {last_line(run.result.stderr)}"


def train_command(device, tmp: Path, folder: Path, data_cache, name: str, images: int) -> list[str]:
    """train.py for one epoch of at least 4 steps, every image read, on the smallest network: the
    run is about the data's memory, and ResShuffle's steps would take minutes on a CPU."""
    per_image = -(-4 * BATCH // images)
    return [sys.executable, "train.py", "--train_dir", str(folder), "--val_dir", str(tmp / "val"),
            "--checkpoint_dir", str(tmp / "runs"), "--run_name", name, "--data_cache", str(data_cache),
            "--arch", "espcn", "--num_epochs", "1", "--patches_per_image", str(per_image), "--batch_size", str(BATCH),
            "--device", str(device), "--precision", "fp32", "--num_workers", "2", "--patience", "0"]


def train_rate(stdout: str) -> float | None:
    """Patches/s of train.py's epoch, from its lines 'train: ..., 14 steps of 16' and 'epoch 1: ..., 1.2 s'
    (validation of one small image included)."""
    steps = re.search(r"(\d+) steps of (\d+)", stdout)
    seconds = re.search(r"^epoch 1: .*, ([\d.]+) s$", stdout, re.M)
    if not steps or not seconds or float(seconds[1]) == 0:
        return None
    return int(steps[1]) * int(steps[2]) / float(seconds[1])


def evict(cache: Path) -> None:
    """Drop the cache files' pages from the page cache (no process maps them now)."""
    for path in cache.glob("*.cache"):
        with open(path, "rb") as f:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def last_line(text: str) -> str:
    return (text.strip().splitlines() or ["?"])[-1]


def main(args):
    with sigterm_raises(stopped_by_sigterm):
        device = select_device(args.device)
        if args.check:
            return check(device)
        measure(device, args)


def measure(device, args) -> None:
    """Every row, each printed as soon as it is measured, then one JSON line with every figure."""
    precision = choose_precision(args.precision, device)[0]
    precision = "bf16" if precision == "fp32" and args.precision == "auto" else precision
    model_args, loss = {"arch": args.arch, "scale": SCALE}, WeightedLoss(args.loss)
    plan = QUICK if args.quick else FULL._replace(steps=args.steps)
    figures = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "date": time.strftime("%Y-%m-%d"), "precision": precision, "arch": args.arch, "loss": loss.spec,
               "cpu_bf16": cpu_bf16_instructions() if device.type == "cpu" else None, "quick": args.quick,
               "data_cache": args.data_cache}
    header(figures)
    if args.data_cache:
        figures |= bench_data_cache(device, CACHE_QUICK if args.quick else CACHE_FULL, model_args, loss)
    else:
        figures |= measure_all(device, plan, precision, model_args, loss, memory=not args.skip_memory)
    print(json.dumps(figures), flush=True)


def measure_all(device, plan: Plan, precision: str, model_args: dict, loss: WeightedLoss, memory: bool) -> dict:
    """Sections 1 to 4, on synthetic 2K images in a temporary folder."""
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_2k_images(folder, plan.images)
        figures |= bench_training(device, plan, precision, model_args, loss)
        figures |= bench_data(folder, plan)
        figures |= bench_inference(device, folder, plan, memory=memory, precision=precision, model_args=model_args)
        figures |= bench_video(device, folder, plan, precision)
        figures |= bench_evaluate(folder, device, model_args, plan)
    return figures


def header(f: dict) -> None:
    """The table's title and column names, printed before the first row is measured."""
    cpu = f" ({f['cpu_bf16'] or 'no bf16 instructions'})" if f["cpu_bf16"] is not None or f["device"] == "cpu" else ""
    quick = ", --quick (fewer repeats, smaller inputs)" if f["quick"] else ""
    what = "data cache" if f["data_cache"] else f"{f['arch']} benchmark (loss {f['loss']})"
    print(f"{what}, {f['date']}, device {f['device']}{cpu}, torch {f['torch']}, {f['threads']} threads{quick}")
    row("", *(("mapped", "in memory", "ratio") if f["data_cache"] else (f["arch"], "plain", "ratio")))


def row(what: str, ours: str, plain: str = "", ratio: str = "") -> None:
    """One row of the table, printed (and flushed) as soon as its figure is measured: a full run takes minutes."""
    print(f"{what:<46} {ours:>12} {plain:>12} {ratio:>8}", flush=True)


def stopped_by_sigterm() -> SystemExit:
    """SIGTERM unwinds the stack (sigterm_raises), so the temporary folders are removed and the
    child processes (infer.py, evaluate.py, train.py) killed on the way out. Exit status 143."""
    print(f"{Path(sys.argv[0]).name}: stopped by SIGTERM; removing its temporary files", file=sys.stderr, flush=True)
    return SystemExit(128 + signal.SIGTERM)


# ---------------------------------------------------------------- --check: a new machine, a GPU

def check(device) -> None:
    """A few training steps with train.py in each precision, a resume, tiled against untiled
    upscaling: what to run first on a new machine (a GPU's paths can't be tested without one).
    Exits 1 if a run fails or a tiled output differs from the untiled one."""
    print(f"checking train.py and upscaling in fp32, bf16, fp16 on {device}, torch {torch.__version__}", flush=True)
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_small_images(tmp / "images", 4)
        failed += [f"train.py {name}" for name in ("fp32", "bf16", "fp16") if not check_training(device, name, tmp)]
        torch.manual_seed(0)
        model = build_network({"arch": "resshuffle", "scale": SCALE}).to(device, memory_format=torch.channels_last).eval()
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
        print(f"train.py {precision}: failed (exit {failed.returncode}): {(failed.stderr.strip().splitlines() or ['?'])[-1]}")
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
    return subprocess.run([sys.executable, "train.py", *flags], capture_output=True, text=True,
                          cwd=Path(__file__).parent)


def build_parser():
    parser = make_parser(__doc__)
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="the reduced precision measured beside fp32; auto: the one the device runs "
                             "natively (bf16 where it has none)")
    parser.add_argument("--arch", choices=NETWORKS, default="resshuffle", help="the network measured (x4)")
    parser.add_argument("--loss", type=loss_spec, default="l1", help="the training loss the step runs, as train.py --loss")
    parser.add_argument("--steps", type=positive_int, default=3, help="timed repeats per training measurement")
    parser.add_argument("--skip_memory", action="store_true",
                        help=f"skip the two memory runs ({dims((FULL.big_lr[0] * SCALE, FULL.big_lr[1] * SCALE))} "
                             f"output; with --quick {dims((QUICK.big_lr[0] * SCALE, QUICK.big_lr[1] * SCALE))})")
    parser.add_argument("--quick", action="store_true",
                        help="the same rows in about a minute on a 2-core CPU (51 s on 2026-12-03, where "
                             "--skip_memory took 4 minutes and the memory runs add a few): one timed repeat (--steps is not used), batches of "
                             f"{QUICK.batch}, inference on {dims(QUICK.infer_lr)}, the memory runs on {dims(QUICK.big_lr)}, "
                             f"evaluate.py on one {dims(QUICK.eval_size)} image; each row names its size")
    parser.add_argument("--data_cache", action="store_true",
                        help=f"instead: only section 5, the data cache, on a synthetic set of {CACHE_FULL.images} 2K "
                             f"images ({set_bytes(CACHE_FULL) / 1e9:.1f} GB decoded; with --quick {CACHE_QUICK.images}, "
                             f"{set_bytes(CACHE_QUICK) / 1e9:.1f} GB) in a temporary folder, the cache there too: "
                             "start-up, loader speed, memory of 1 and 2 processes, and train.py under a memory limit "
                             "(a cgroup: needs root, else that row says skipped); about 2 minutes on a 2-core CPU "
                             "(--quick: under 1); --device and --arch are the training step's")
    parser.add_argument("--check", action="store_true",
                        help="instead: train.py in fp32, bf16 and fp16 (all three; --precision is not used) with a "
                             "resume, and tiled against untiled upscaling in each, on --device (a new machine's "
                             "first run, a GPU's above all); exit status 1 if any fails")
    return parser


if __name__ == "__main__":
    run_cli(main, build_parser().parse_args())
