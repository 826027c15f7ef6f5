import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import ResShuffle  # noqa: E402
from utils import save_checkpoint  # noqa: E402

TINY = dict(scale=4, num_features=8, num_residuals=1)


def smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A photo-like uint8 RGB image: low-frequency colour fields plus a little noise."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    channels = [np.sin(2 * np.pi * (f * x + g * y) + p) for f, g, p in rng.uniform(0.5, 4, (3, 3))]
    img = 127.5 + 100 * np.stack(channels, -1) + rng.normal(0, 4, (height, width, 3))
    return img.clip(0, 255).astype(np.uint8)


@pytest.fixture
def image_dir(tmp_path):
    """Three small RGB PNGs, odd sizes included."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, (h, w) in enumerate([(64, 80), (70, 66), (96, 96)]):
        Image.fromarray(smooth_image(rng, h, w)).save(folder / f"img{i}.png")
    return folder


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A checkpoint of a small x4 network with trained-looking (random) weights."""
    torch.manual_seed(0)
    model = ResShuffle(**TINY, mean_shift=True, image_skip=True)
    path = tmp_path / "tiny.pt"
    save_checkpoint({"model": model.state_dict(), "model_args": model_args(model)}, path)
    return path


def model_args(model: ResShuffle) -> dict:
    return dict(TINY, mean_shift=bool(model.rgb_mean.abs().sum() > 0), image_skip=model.image_skip)


def run_script(*args, cwd=ROOT, check=True):
    """Run one of the repository's scripts as a user would; the CompletedProcess."""
    result = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def run_main(module, *argv):
    """Run a script's main() in this process, as its command line would: (exit status, stdout, stderr).

    Fast (no interpreter start, no torch import) for the many bad-input cases; run_script
    checks the same path end to end.
    """
    import contextlib
    import io

    from utils import run_cli

    out, err = io.StringIO(), io.StringIO()
    parse = module.parse_args if hasattr(module, "parse_args") else module.build_parser().parse_args
    old_argv = sys.argv
    sys.argv = [f"{module.__name__}.py", *map(str, argv)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                run_cli(module.main, parse([str(a) for a in argv]))
                code = 0
            except SystemExit as e:
                code = e.code
    finally:
        sys.argv = old_argv
    return code, out.getvalue(), err.getvalue()
