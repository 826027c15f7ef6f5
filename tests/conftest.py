"""Shared fixtures and helpers. The suite runs on the CPU, even where a GPU exists."""
import contextlib
import csv
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported: --device auto then means CPU
# train.py's default --data_cache is the per-user cache folder: the suite's, and its subprocesses', go here.
TEST_CACHE = tempfile.mkdtemp(prefix="resshuffle-tests-cache-")
os.environ["XDG_CACHE_HOME"] = TEST_CACHE

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machinery.checkpoint import save_checkpoint  # noqa: E402
from model import ResShuffle  # noqa: E402
from utils import run_cli  # noqa: E402

TINY = dict(scale=4, num_features=8, num_residuals=1)

# train.py flags for a run of seconds: the TINY network, 3 images x 4 patches, batch 4; fp32,
# so that the suite computes the same on every CPU (auto: bf16 on some, fp32 on others).
TINY_RUN = ["--num_features", "8", "--num_residuals", "1", "--patch_size", "32", "--batch_size", "4",
            "--patches_per_image", "4", "--num_workers", "0", "--mean_shift", "--image_skip", "--precision", "fp32"]


def smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A photo-like uint8 RGB image: low-frequency colour fields plus a little noise."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    channels = [np.sin(2 * np.pi * (f * x + g * y) + p) for f, g, p in rng.uniform(0.5, 4, (3, 3))]
    img = 127.5 + 100 * np.stack(channels, -1) + rng.normal(0, 4, (height, width, 3))
    return img.clip(0, 255).astype(np.uint8)


def make_images(folder: Path) -> Path:
    """Three small RGB PNGs in `folder`, odd sizes included."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i, (h, w) in enumerate([(64, 80), (70, 66), (96, 96)]):
        Image.fromarray(smooth_image(rng, h, w)).save(folder / f"img{i}.png")
    return folder


@pytest.fixture
def image_dir(tmp_path):
    return make_images(tmp_path / "images")


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A checkpoint of a small x4 network with trained-looking (random) weights."""
    torch.manual_seed(0)
    model = ResShuffle(**TINY, mean_shift=True, image_skip=True)
    path = tmp_path / "tiny.pt"
    save_checkpoint({"model": model.state_dict(), "model_args": dict(TINY, mean_shift=True, image_skip=True)}, path)
    return path


def read_log(run_dir: Path) -> list[dict]:
    """A run's log.csv, one dict per row."""
    with open(run_dir / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def run_script(*args, cwd=ROOT, check=True):
    """Run one of the repository's scripts as a user would; the CompletedProcess."""
    result = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


class Terminal(io.StringIO):
    """A captured stream that says it is a terminal, where progress bars are drawn."""

    def isatty(self) -> bool:
        return True


def run_train_stopped_at_step(monkeypatch, step: int, *argv):
    """train.py's main() run as `run_main` does, with Ctrl-C (SIGINT) raised during its step `step`
    (1-based): (exit status, stdout, stderr)."""
    import train
    calls, real_step = [], train.train_step

    def step_then_stop(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            signal.raise_signal(signal.SIGINT)
        return real_step(*args, **kwargs)
    with monkeypatch.context() as m:
        m.setattr(train, "train_step", step_then_stop)
        return run_main(train, *argv)


def run_main(module, *argv, terminal: bool = False):
    """Run a script's main() in this process, as its command line would: (exit status, stdout, stderr).

    Fast (no interpreter start, no torch import); run_script checks the same path end to end.
    `terminal`: stderr is a terminal (else a log, as under pytest).
    """
    out, err = io.StringIO(), Terminal() if terminal else io.StringIO()
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


def terminal_lines(err: str) -> list[str]:
    """stderr's lines as a terminal shows them: progress bars (cleared with \\r when done) are not lines."""
    lines = [line.rsplit("\r", 1)[-1] for line in err.strip().split("\n")]
    return [line for line in lines if line.strip() and not re.search(r"\d+%\|.*\| \d+/\d+ \[", line)]


def assert_one_line_error(code, err, *needles):
    """Exit status 1 and one line of stderr, no traceback, holding each of `needles`."""
    lines = terminal_lines(err)
    assert code == 1, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])


@pytest.fixture
def unwritable_dir(tmp_path):
    """A folder this process cannot create files in (root ignores permission bits: then /sys)."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        open(folder / "probe", "w").close()
    except PermissionError:
        yield folder
    else:
        os.unlink(folder / "probe")
        if os.access("/sys", os.W_OK) and not _cannot_create_in("/sys"):
            pytest.skip("no unwritable folder here (running as root, /sys writable)")
        yield "/sys"
    folder.chmod(0o755)


def _cannot_create_in(folder) -> bool:
    try:
        with tempfile.NamedTemporaryFile(dir=folder):
            return False
    except OSError:
        return True


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(TEST_CACHE, ignore_errors=True)
