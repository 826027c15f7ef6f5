"""Measure ResShuffle's training step, data loader, inference and evaluation against the plain way.

usage: python benchmark.py [--device auto] [--precision auto] [--steps 3] [--skip_memory] [--arch resshuffle] [--loss l1]
       python benchmark.py --check --device cuda      # train, resume, tile in every precision

Every figure comes from this run, on this machine, both sides measured in the same run. It
prints a table and then one JSON line with every figure. Synthetic 2K images (2040x1356, photo-
like content) are written to a temporary folder, so no data set is needed. Each of the rows
for the training step and inference is measured in fp32 and in --precision (default: what
--precision auto picks on this device, bf16 where that is fp32).

1. training step, batch 16 of 48x48 LR patches at x4: train.py's step (channels_last) against
   a plain NCHW fp32 step; GFLOP/s from the FLOPs PyTorch's FlopCounterMode counts, against
   one 64->64 3x3 convolution forward+backward in the same precision (the practical ceiling).
2. data: patches/s from dataset.py's loader (PatchLoader: cut patches, their flips left to the
   device, which the training step above includes) with 1 and 2 worker threads against a
   DataLoader worker process that decodes the image file for every patch.
3. inference: output megapixels/s of infer.py's path (upscale.upscale) on a 510x339 input, untiled
   against the plain model call, and tiled (infer.py's default) against untiled; the largest
   difference from fp32; the same network exported to ONNX under onnxruntime (where installed:
   requirements-optional.txt); peak resident memory and speed of infer.py on a 2040x1360 input
   (8160x5440 output) in fp32, tiled and untiled.
4. evaluate.py: seconds per 2K image.
"""
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from dataset import EpochSampler, PatchLoader, TrainDataset, device_batch
from images import list_images, load_rgb
from losses import WeightedLoss, loss_spec
from model import NETWORKS, build_network
from resize import downsample
import metrics
from checkpoint import load_checkpoint, save_checkpoint
from precision import PRECISIONS, autocast, choose_precision, cpu_bf16_instructions, grad_scaler
from training import train_step
from onnx_export import export_onnx, onnx_session
from upscale import tensor_to_image, tiling, upscale
from utils import UserError, make_parser, positive_int, run_cli, select_device

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


def plain_network(model_args: dict) -> torch.nn.Module:
    """The network computed as written, layer after layer (ResShuffle: the 9x9 tail after the last PixelShuffle)."""
    model = build_network(model_args)
    if hasattr(model, "fast_tail"):
        model.fast_tail = False
    return model


def training_step_flops(model_args: dict, loss: WeightedLoss) -> int:
    """FLOPs of one forward+backward of the x4 network and `loss` on one batch, as PyTorch counts them.

    Counted on the network as written: ResShuffle runs its tail as an equivalent conv with more
    FLOPs (ResShuffle.upsample_and_tail), which would otherwise count as useful work.
    """
    model = plain_network(model_args)
    lr, hr = torch.rand(BATCH, 3, LR_PATCH, LR_PATCH), torch.rand(BATCH, 3, LR_PATCH * SCALE, LR_PATCH * SCALE)
    with FlopCounterMode(display=False) as counter:
        loss.total(loss.terms(model(lr), hr)).backward()
    return counter.get_total_flops()


def bench_training(device, steps: int, precision: str, model_args: dict, loss: WeightedLoss) -> dict:
    """train.py's step (network `model_args`, `loss`) in fp32 and in `precision`, the plain NCHW fp32
    step, and the conv ceiling in each."""
    flops = training_step_flops(model_args, loss)
    lr8 = torch.randint(0, 256, (BATCH, LR_PATCH, LR_PATCH, 3), dtype=torch.uint8)
    hr8 = torch.randint(0, 256, (BATCH, LR_PATCH * SCALE, LR_PATCH * SCALE, 3), dtype=torch.uint8)
    flips = torch.rand(BATCH, 3) < 0.5
    out = {"train_flops_per_step": flops}
    for name in precisions(precision):
        torch.manual_seed(0)
        model = build_network(model_args).to(device, memory_format=torch.channels_last)
        optimizer, scaler = torch.optim.Adam(model.parameters(), lr=2e-4), grad_scaler(device, name)
        seconds = timed(lambda: train_step(model, *device_batch(lr8, hr8, flips, device), optimizer, scaler, name, loss),
                        device, steps)
        ceiling = conv_ceiling(device, name, steps)
        out |= {f"train_patches_s_{name}": BATCH / seconds, f"train_gflops_{name}": flops / seconds / 1e9,
                f"ceiling_gflops_{name}": ceiling / 1e9, f"train_fraction_of_ceiling_{name}": flops / seconds / ceiling}

    torch.manual_seed(0)
    plain_model = plain_network(model_args).to(device)
    plain_opt = torch.optim.Adam(plain_model.parameters(), lr=2e-4)
    lr, hr = (t.permute(0, 3, 1, 2).float().div(255).contiguous().to(device) for t in (lr8, hr8))

    def plain_step():
        total = loss.total(loss.terms(plain_model(lr), hr))
        plain_opt.zero_grad()
        total.backward()
        plain_opt.step()

    plain = timed(plain_step, device, steps)
    out |= {"plain_patches_s": BATCH / plain, "plain_gflops": flops / plain / 1e9}
    return out


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


def bench_inference(device, folder: Path, repeats: int, memory: bool, precision: str, model_args: dict) -> dict:
    torch.manual_seed(0)
    model = build_network(model_args).to(device, memory_format=torch.channels_last).eval()
    hr = load_rgb(list_images(folder)[0])[:1356, :2040]
    lr = downsample(hr, SCALE)  # 510x339, a DIV2K-size LR image
    out_mp = lr.shape[0] * lr.shape[1] * SCALE ** 2 / 1e6
    out = {"infer_input": f"{lr.shape[1]}x{lr.shape[0]}", "receptive_radius": tiling(model, 256, None)[1]}
    for name in precisions(precision):
        whole = upscale(model, lr, tile=0, precision=name)
        seconds = timed(lambda: upscale(model, lr, tile=0, precision=name), device, repeats, warmup=0)
        tiled = upscale(model, lr, tile=256, precision=name)  # infer.py's default: --tile 256, pad = radius
        tiled_s = timed(lambda: upscale(model, lr, tile=256, precision=name), device, repeats, warmup=0)
        out |= {f"infer_mp_s_{name}": out_mp / seconds, f"infer_tiled256_mp_s_{name}": out_mp / tiled_s,
                f"tiled_max_abs_diff_{name}": max_diff(whole, tiled)}
        if name == "fp32":  # the first
            exact = whole
        else:
            out |= {f"max_abs_diff_from_fp32_{name}": max_diff(whole, exact), f"psnr_vs_fp32_{name}": metrics.psnr(whole, exact)}

    plain_model = plain_network(model_args).to(device).eval()
    plain_model.load_state_dict(model.state_dict())

    def plain():
        with torch.no_grad():
            x = torch.from_numpy(lr.copy()).permute(2, 0, 1).unsqueeze(0).float().div(255).to(device)
            return plain_model(x).clamp(0, 1).mul(255).round().byte().cpu()

    out["plain_infer_mp_s"] = out_mp / timed(plain, device, repeats)
    if device.type == "cpu":
        out |= bench_onnxruntime(model, lr, out_mp, repeats, exact)
    if memory:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            big = np.asarray(Image.fromarray(hr).resize((2040, 1360), Image.BICUBIC))
            Image.fromarray(big).save(tmp / "big.png")
            ckpt = tmp / "model.pt"
            save_checkpoint({"model": model.state_dict(), "model_args": model_args}, ckpt)
            common = [str(tmp / "big.png"), "--checkpoint", str(ckpt), "--device", device.type, "--precision", "fp32"]
            big_mp = 8160 * 5440 / 1e6
            for name, extra in (("tile256", ["--tile", "256"]), ("untiled", ["--tile", "0"])):
                peak, seconds, auto_tiled = run_infer(common + ["-o", str(tmp / f"{name}.png"), *extra])
                out[f"infer_8160x5440_{name}_peak_gb"], out[f"infer_8160x5440_{name}_mp_s"] = peak, big_mp / seconds
                out[f"infer_8160x5440_{name}_auto_tiled"] = auto_tiled
    return out


def bench_onnxruntime(model: torch.nn.Module, lr: np.ndarray, out_mp: float, repeats: int, exact: np.ndarray) -> dict:
    """The same network exported to ONNX (train.py --export x.onnx), untiled under onnxruntime on the
    CPU, against infer.py's fp32 path above; {} without onnxscript and onnxruntime."""
    if not all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript", "onnxruntime")):
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x4.onnx"
        export_onnx(model, path, {})
        session, name = onnx_session(path)
    x = torch.from_numpy(lr.copy()).permute(2, 0, 1)[None].float().div(255).numpy()
    seconds = timed(lambda: session.run(None, {name: x}), torch.device("cpu"), repeats)
    sr = tensor_to_image(torch.from_numpy(session.run(None, {name: x})[0]))
    return {"onnxruntime_mp_s": out_mp / seconds, "onnxruntime_max_abs_diff_fp32": max_diff(sr, exact),
            "onnxruntime_threads": session.get_session_options().intra_op_num_threads}


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    """The largest difference of two uint8 images, in levels."""
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def bench_evaluate(folder: Path, device, model_args: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "model.pt"
        save_checkpoint({"model": build_network(model_args).state_dict(), "model_args": model_args}, ckpt)
        start = time.perf_counter()
        subprocess.run([sys.executable, "evaluate.py", "--data_dir", str(folder), "--checkpoint", str(ckpt),
                        "--device", device.type, "--max_images", "2"], check=True, capture_output=True,
                       cwd=Path(__file__).parent)
        return {"evaluate_s_per_2k_image": (time.perf_counter() - start) / 2}  # includes start-up


def main(args):
    device = select_device(args.device)
    if args.check:
        return check(device)
    precision = choose_precision(args.precision, device)[0]
    precision = "bf16" if precision == "fp32" and args.precision == "auto" else precision
    model_args, loss = {"arch": args.arch, "scale": SCALE}, WeightedLoss(args.loss)
    figures = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "date": time.strftime("%Y-%m-%d"), "precision": precision, "arch": args.arch, "loss": loss.spec,
               "cpu_bf16": cpu_bf16_instructions() if device.type == "cpu" else None}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_2k_images(folder, 4)
        print("training step ...", flush=True)
        figures |= bench_training(device, args.steps, precision, model_args, loss)
        print("data loader ...", flush=True)
        figures |= bench_data(folder)
        print("inference ...", flush=True)
        figures |= bench_inference(device, folder, repeats=2, memory=not args.skip_memory, precision=precision,
                                   model_args=model_args)
        print("evaluate.py ...", flush=True)
        figures |= bench_evaluate(folder, device, model_args)
    report(figures)


def report(f: dict) -> None:
    def row(what, ours, plain="", ratio=""):
        print(f"{what:<46} {ours:>12} {plain:>12} {ratio:>8}")

    cpu = f" ({f['cpu_bf16'] or 'no bf16 instructions'})" if f["cpu_bf16"] is not None or f["device"] == "cpu" else ""
    print(f"\n{f['arch']} benchmark (loss {f['loss']}), {f['date']}, device {f['device']}{cpu}, torch {f['torch']}, "
          f"{f['threads']} threads")
    row("", f["arch"], "plain", "ratio")
    for name in precisions(f["precision"]):
        row(f"train step {name}, patches/s (batch 16, 48px LR)", f"{f[f'train_patches_s_{name}']:.2f}",
            f"{f['plain_patches_s']:.2f}", f"{f[f'train_patches_s_{name}'] / f['plain_patches_s']:.2f}x")
        row("  GFLOP/s (counted)", f"{f[f'train_gflops_{name}']:.1f}", f"{f['plain_gflops']:.1f}")
        row(f"  one 64->64 3x3 conv fwd+bwd in {name}, GFLOP/s", f"{f[f'ceiling_gflops_{name}']:.1f}")
        row("  train step's GFLOP/s as a share of it", f"{100 * f[f'train_fraction_of_ceiling_{name}']:.0f}%")
    row("data, patches/s, 1 worker", f"{f['data_patches_s_1w']:.0f}",
        f"{f['data_decode_per_patch_patches_s_1w']:.1f}", f"{f['data_speedup_1w']:.0f}x")
    row("data, patches/s, 2 workers", f"{f['data_patches_s_2w']:.0f}")
    for name in precisions(f["precision"]):
        row(f"inference {f['infer_input']} {name} untiled, output MP/s", f"{f[f'infer_mp_s_{name}']:.3f}",
            f"{f['plain_infer_mp_s']:.3f}", f"{f[f'infer_mp_s_{name}'] / f['plain_infer_mp_s']:.2f}x")
        row("  tiled (256, pad = radius), output MP/s", f"{f[f'infer_tiled256_mp_s_{name}']:.3f}")
        row(f"  tiled vs untiled, radius {f['receptive_radius']} LR px", f"max diff {f[f'tiled_max_abs_diff_{name}']}")
        if name != "fp32":
            row(f"  {name} vs fp32 output (uint8)", f"max diff {f[f'max_abs_diff_from_fp32_{name}']}",
                f"{f[f'psnr_vs_fp32_{name}']:.1f} dB")
    if "onnxruntime_mp_s" in f:
        row(f"inference {f['infer_input']} onnxruntime fp32 untiled, MP/s", f"{f['onnxruntime_mp_s']:.3f}",
            f"{f['infer_mp_s_fp32']:.3f}", f"{f['onnxruntime_mp_s'] / f['infer_mp_s_fp32']:.2f}x")
        row("  onnxruntime vs infer.py's fp32 output (uint8)", f"max diff {f['onnxruntime_max_abs_diff_fp32']}")
    if "infer_8160x5440_tile256_peak_gb" in f:
        for name in ("tile256", "untiled"):
            peak = f[f"infer_8160x5440_{name}_peak_gb"]
            label = name + (" (infer.py tiled it: memory short)" if f[f"infer_8160x5440_{name}_auto_tiled"] else "")
            row(f"infer.py fp32 2040x1360 -> 8160x5440, {label}", "failed" if peak is None else f"{peak:.2f} GB",
                f"{f[f'infer_8160x5440_{name}_mp_s']:.3f} MP/s")
    row("evaluate.py (fp32), s per 2K image", f"{f['evaluate_s_per_2k_image']:.1f}")
    print(json.dumps(f))


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
    parser.add_argument("--steps", type=positive_int, default=3, help="timed repeats per measurement")
    parser.add_argument("--skip_memory", action="store_true", help="skip the 8160x5440 memory runs")
    parser.add_argument("--check", action="store_true",
                        help="instead: train.py in fp32, bf16 and fp16 (all three; --precision is not used) with a "
                             "resume, and tiled against untiled upscaling in each, on --device (a new machine's "
                             "first run, a GPU's above all); exit status 1 if any fails")
    return parser


if __name__ == "__main__":
    run_cli(main, build_parser().parse_args())
