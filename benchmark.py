"""Measure the speed of ResShuffle's training step, data loader, inference and evaluation against the plain way.

usage: python benchmark.py [--device auto] [--precision auto] [--steps 3] [--skip_memory] [--quick]
           [--arch resshuffle] [--loss l1]
       python benchmark.py --data_cache [--quick]     # instead: the data cache's memory study
       python benchmark.py --check --device cuda      # instead: train, resume, tile in every precision

Every figure comes from this run, on this machine, both sides measured in the same run. It
prints a table a row at a time, each row as soon as it is measured, and any warnings under it;
--quick measures the same rows with fewer repeats and smaller inputs. Every figure also goes
into one JSON line: --json FILE writes it there, --json - prints it; without --json it is
printed where stdout is a file or a pipe (a log keeps it), and not on a terminal. Synthetic
2K images (2040x1356, photo-like content) are written to a temporary folder, so no data set
is needed; it is removed on Ctrl-C and on SIGTERM too. Each of the rows for the training step
and inference is measured in fp32 and in --precision (default: what --precision auto picks on
this device, bf16 where that is fp32).

1. training step, batch 16 of 48x48 LR patches at x4: train.py's step (channels_last) against
   a plain NCHW fp32 step; GFLOP/s from the FLOPs PyTorch's FlopCounterMode counts, against
   one 64->64 3x3 convolution forward+backward in the same precision (the practical ceiling).
2. data: patches/s from dataset.py's loader (PatchLoader: cut patches, their flips left to the
   device, which the training step above includes) with 1 and 2 worker threads against a
   DataLoader worker process that decodes the image file for every patch. Then --degradation real
   (resize.py: blur, resize, noise and JPEG drawn for every patch in the loader's threads): its
   patches/s with 1 and 2 threads, and the training step in --precision fed by one loader thread of
   real patches against one of PIL bicubic patches, on the same cores.
3. inference: output megapixels/s of infer.py's path (machinery.upscale.upscale) on a 510x339 input, untiled
   against the plain model call, and tiled (infer.py's default) against untiled; the largest
   difference from fp32; the same network exported to ONNX under onnxruntime (where installed:
   requirements-optional.txt); frames/s of infer.py's video path (machinery/video.py: decode, upscale,
   H.264 encode) on a 640x360 clip of 4 frames (--quick: 320x180, 2) with the shipped x2 and x4
   checkpoints (where PyAV is installed).
4. evaluate.py: seconds per 2K image.
5. memory (not with --skip_memory), last, under a header of its own: peak resident memory and speed
   of infer.py in its own process on a 2040x1360 input (8160x5440 output) in fp32, tiled and untiled.

Two other runs start from here, each instead of these; their code is in machinery/:
- --data_cache: memory more than speed, the training set mapped from one file (machinery/datacache.py)
  against decoded into each process, on a 2 GB set (machinery/cache_study.py says what it measures).
- --check: train.py in every precision with a resume, and tiled upscaling, on a new machine or
  a GPU (machinery/machine_check.py).
"""
import argparse
import importlib.util
import json
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

import metrics
from dataset import EpochSampler, PatchLoader, TrainDataset
from losses import WeightedLoss, loss_spec
from machinery import cache_study, machine_check, video
from machinery.bench_tools import (
    BATCH,
    LR_PATCH,
    SCALE,
    TWO_K,
    fed_step_seconds,
    header,
    loader_rate,
    make_2k_images,
    max_diff,
    random_batch,
    reduced_precision,
    row,
    run_figures,
    step_seconds,
    stopped_by_sigterm,
    timed,
)
from machinery.checkpoint import load_chosen, save_checkpoint
from machinery.fast import build_fast_network
from machinery.files import atomic_path, check_output_file, folder_for
from machinery.images import list_images, load_rgb
from machinery.onnx_export import export_onnx, onnx_session
from machinery.precision import PRECISIONS, autocast
from machinery.upscale import tensor_to_image, tiling, upscale
from model import NETWORKS, build_network
from resize import downsample
from utils import make_parser, positive_int, run_cli, select_device, shown, sigterm_raises, warnings_held


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
    video_lr: tuple[int, int]  # width, height of the clip timed through machinery/video.py
    video_frames: int  # its frames


FULL = Plan(steps=3, batch=BATCH, repeats=2, loader_batches=1000, decode_batches=3, infer_lr=(510, 339),
            big_lr=(2040, 1360), images=4, eval_images=2, eval_size=TWO_K, video_lr=(640, 360), video_frames=4)
QUICK = Plan(steps=1, batch=4, repeats=1, loader_batches=100, decode_batches=1, infer_lr=(264, 128),
             big_lr=(264, 128), images=2, eval_images=1, eval_size=(512, 340), video_lr=(320, 180), video_frames=2)


def dims(size: tuple[int, int]) -> str:
    """'300x170' for (300, 170): width x height."""
    return f"{size[0]}x{size[1]}"


def training_step_flops(model_args: dict, loss: WeightedLoss, batch: int) -> int:
    """FLOPs of one forward+backward of the x4 network and `loss` on one batch, as PyTorch counts them.

    Counted on the network as model.py draws it: machinery/fast.py runs ResShuffle's tail as an
    equivalent conv with more FLOPs, which would otherwise count as useful work. Counted on
    the meta device, from shapes alone, in no time; on the CPU for a loss that can't run there.
    """
    def count(device) -> int:
        with torch.device(device):
            model = build_network(model_args)
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


def plain_step_seconds(device, steps: int, model_args: dict, loss: WeightedLoss, lr8, hr8) -> float:
    """Seconds per step of the plain way: the network as model.py draws it, NCHW, fp32."""
    torch.manual_seed(0)
    plain_model = build_network(model_args).to(device)
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

            def step(c=c, x=x):  # this iteration's conv and input
                with autocast(device, precision):
                    y = c(x)
                y.float().sum().backward()

            best = max(best, 3 * 2 * n * size * size * 64 * 64 * 9 / timed(step, device, max(steps, 3)))
    return best


def precisions(precision: str) -> list[str]:
    """fp32, and the reduced precision measured beside it."""
    return ["fp32"] + ([precision] if precision != "fp32" else [])


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


def bench_data(folder: Path, plan: Plan) -> dict:
    """PatchLoader with 1 and 2 threads against decoding the file for every patch (measured first:
    the first row's ratio needs it)."""
    paths = list_images(folder)
    start = time.perf_counter()
    data = TrainDataset(folder, scale=SCALE, patch_size=LR_PATCH * SCALE, patches_per_image=5000,
                        quiet=True)  # no bar: it would show the temporary folder's name, and is timed
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


def bench_real_data(device, folder: Path, plan: Plan, precision: str, model_args: dict, loss: WeightedLoss) -> dict:
    """--degradation real (resize.py, drawn for every patch in the loader's threads): its loader's
    patches/s with 1 and 2 threads, and train.py's step in `precision` fed by a 1-thread loader of
    real patches against one of PIL bicubic patches (measured first: the ratio needs it)."""
    out, fed = {}, {}
    for degradation in ("pil", "real"):
        data = TrainDataset(folder, scale=SCALE, patch_size=LR_PATCH * SCALE, patches_per_image=5000,
                            degradation=degradation, quiet=True)
        if degradation == "real":
            for workers in (1, 2):
                loader = PatchLoader(data, EpochSampler(data, seed=0), batch_size=plan.batch, num_workers=workers)
                rate = out[f"data_real_patches_s_{workers}w"] = loader_rate(loader, batches=plan.decode_batches * 10)
                row(f"data, --degradation real, patches/s, {workers} worker{'s' if workers > 1 else ''}", f"{rate:.0f}")
        loader = PatchLoader(data, EpochSampler(data, seed=0), batch_size=plan.batch, num_workers=1)
        seconds = fed_step_seconds(device, model_args, loss, precision, loader, steps=plan.steps * 4)
        fed[degradation] = out[f"train_fed_{degradation}_patches_s_{precision}"] = plan.batch / seconds
    row(f"train step {precision} fed by 1 loader thread, patches/s: real against pil", f"{fed['real']:.2f}",
        f"{fed['pil']:.2f}", f"{fed['real'] / fed['pil']:.2f}x")
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
                            cwd=Path(__file__).parent, check=False)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        print(f"  infer.py {' '.join(args)} failed (exit {result.returncode}): "
              f"{result.stderr.strip().splitlines()[-1] if result.stderr.strip() else 'killed'}", flush=True)
        return None, seconds, False
    peak_kb = next(int(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("VmHWM"))
    return peak_kb * 1024 / 1e9, seconds, "tiling it by" in result.stderr


def bench_inference(device, folder: Path, plan: Plan, precision: str, model_args: dict) -> dict:
    """infer.py's path in fp32 and `precision` against the plain model call (measured first: each
    row's ratio needs it), tiled against untiled; onnxruntime."""
    torch.manual_seed(0)
    model = build_fast_network(model_args).to(device, memory_format=torch.channels_last).eval()
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
    return out


def plain_infer_seconds(model: torch.nn.Module, model_args: dict, lr: np.ndarray, repeats: int) -> float:
    """Seconds per call of the plain way: `model`'s weights in the network as written, NCHW, fp32."""
    device = next(model.parameters()).device
    plain_model = build_network(model_args).to(device).eval()
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


def bench_memory(device, folder: Path, model_args: dict, size: tuple[int, int]) -> dict:
    """Peak memory and speed of infer.py in a fresh process on the first image of `folder` resized
    to `size` (width, height), fp32, tiled and untiled."""
    (width, height), out = size, {}
    big_out = dims((width * SCALE, height * SCALE))
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        Image.fromarray(load_rgb(list_images(folder)[0])).resize(size, Image.BICUBIC).save(tmp / "big.png")
        ckpt = tmp / "model.pt"
        save_checkpoint({"model": build_network(model_args).state_dict(), "model_args": model_args}, ckpt)
        common = [str(tmp / "big.png"), "--checkpoint", str(ckpt), "--device", device.type, "--precision", "fp32"]
        row("infer.py in its own process: memory, speed", "peak", "MP/s")  # not the columns above
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


def main(args):
    with sigterm_raises(stopped_by_sigterm):
        device = select_device(args.device)
        if args.check:
            return machine_check.check(device)
        measure(device, args)


def measure(device, args) -> None:
    """Every row, each printed as soon as it is measured, the warnings under them, then the figures
    as JSON where --json says (`write_figures`)."""
    if args.json not in (None, "-"):  # before any work
        check_output_file(args.json, overwrite=True)
    precision = reduced_precision(args.precision, device)
    model_args, loss = {"arch": args.arch, "scale": SCALE}, WeightedLoss(args.loss)
    if args.data_cache:
        return write_figures(cache_study.measure(device, args.quick, model_args, loss, precision), args.json)
    plan = QUICK if args.quick else FULL._replace(steps=args.steps)
    figures = run_figures(device, precision, args.arch, loss.spec, args.quick, data_cache=False)
    header(figures, f"{args.arch} benchmark (loss {loss.spec})", (args.arch, "plain", "ratio"))
    print(PLAIN, flush=True)
    with warnings_held():
        figures |= measure_all(device, plan, precision, model_args, loss, memory=not args.skip_memory)
    write_figures(figures, args.json)


# Under the columns' names: what the "plain" column measures (docs/speed.md says more).
PLAIN = ("  plain: model.py's network as drawn, NCHW, fp32, a plain call; data: a DataLoader process "
         "decoding the file per patch")


def write_figures(figures: dict, target: str | None) -> None:
    """Every figure as one JSON line: into the file `target` (--json FILE), on stdout with --json -
    or where stdout is a file or a pipe; a terminal gets a line saying how to keep them instead."""
    text = json.dumps(figures)
    if target not in (None, "-"):
        with folder_for(Path(target)), atomic_path(Path(target)) as tmp:
            Path(tmp).write_text(text + "\n")
        print(f"every figure as JSON: {shown(target)}", flush=True)
    elif target == "-" or not sys.stdout.isatty():
        print(text, flush=True)
    else:
        print("every figure as JSON: --json FILE (or --json - here)", flush=True)


def json_output(text: str) -> str:
    """--json: '-' or a file name ending in .json."""
    if text != "-" and not text.lower().endswith(".json"):
        raise argparse.ArgumentTypeError(f"{text}: name a .json file (or - for stdout)")
    return text


def measure_all(device, plan: Plan, precision: str, model_args: dict, loss: WeightedLoss, memory: bool) -> dict:
    """Sections 1 to 5, on synthetic 2K images in a temporary folder."""
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_2k_images(folder, plan.images)
        figures |= bench_training(device, plan, precision, model_args, loss)
        figures |= bench_data(folder, plan)
        figures |= bench_real_data(device, folder, plan, precision, model_args, loss)
        figures |= bench_inference(device, folder, plan, precision=precision, model_args=model_args)
        figures |= bench_video(device, folder, plan, precision)
        figures |= bench_evaluate(folder, device, model_args, plan)
        if memory:  # last: its rows have columns of their own
            figures |= bench_memory(device, folder, model_args, plan.big_lr)
    return figures


def build_parser():
    parser = make_parser(__doc__)
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="the reduced precision measured beside fp32; auto: the one the device runs "
                             "natively (bf16 where it has none)")
    parser.add_argument("--arch", choices=NETWORKS, default="resshuffle", help="the network measured (x4)")
    parser.add_argument("--loss", type=loss_spec, default="l1",
                        help="the training loss the step runs, as train.py --loss")
    parser.add_argument("--json", type=json_output, default=None, metavar="FILE",
                        help="write every figure as one JSON line to FILE (.json, replaced if it exists), or to "
                             "stdout with -; None: to stdout where it is a file or a pipe, not on a terminal "
                             "(--data_cache prints its own line)")
    parser.add_argument("--steps", type=positive_int, default=3, help="timed repeats per training measurement")
    parser.add_argument("--skip_memory", action="store_true",
                        help=f"skip the two memory runs ({dims((FULL.big_lr[0] * SCALE, FULL.big_lr[1] * SCALE))} "
                             f"output; with --quick {dims((QUICK.big_lr[0] * SCALE, QUICK.big_lr[1] * SCALE))})")
    parser.add_argument("--quick", action="store_true",
                        help="the same rows in about a minute on a 2-core CPU (51 s on 2026-12-03, where "
                             "--skip_memory took 4 minutes and the memory runs add a few): one timed repeat "
                             f"(--steps is not used), batches of {QUICK.batch}, inference on {dims(QUICK.infer_lr)}, "
                             f"the memory runs on {dims(QUICK.big_lr)}, evaluate.py on one {dims(QUICK.eval_size)} "
                             "image; each row names its size")
    parser.add_argument("--data_cache", action="store_true",
                        help="instead: the data cache's memory study (machinery/cache_study.py), on a "
                             f"synthetic set of {cache_study.sizes()} in a temporary folder, the cache there too: "
                             "start-up, loader speed, memory of 1 and 2 processes, and train.py under a memory limit "
                             "(a cgroup: needs root, else that row says skipped); about 2 minutes on a 2-core CPU "
                             "(--quick: under 1); --device and --arch are the training step's")
    parser.add_argument("--check", action="store_true",
                        help="instead (machinery/machine_check.py): train.py in fp32, bf16 and fp16 (all "
                             "three; --precision is not used) with a resume, and tiled against untiled upscaling in "
                             "each, on --device (a new machine's first run, a GPU's above all); exit status 1 if any "
                             "fails")
    return parser


if __name__ == "__main__":
    run_cli(main, build_parser().parse_args())
