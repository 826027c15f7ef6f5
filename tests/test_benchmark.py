"""benchmark.py shows each row as soon as it is measured, and a kill leaves no temporary files or processes."""
import contextlib
import io
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import benchmark
from conftest import ROOT, make_images
from losses import WeightedLoss


class Terminal(io.StringIO):
    """stdout as a user watching it sees it: what has been flushed."""

    def __init__(self):
        super().__init__()
        self.seen = ""

    def flush(self):
        self.seen = self.getvalue()


def shown_at_each_measurement(monkeypatch, terminal: Terminal) -> list[str]:
    """Replace benchmark.timed with a fake measurement (0.5 s a call) that notes what the terminal
    shows when each measurement starts."""
    shown = []

    def fake_timed(fn, device, repeats, warmup=1):
        shown.append(terminal.seen)
        return 0.5

    monkeypatch.setattr(benchmark, "timed", fake_timed)
    return shown


def test_each_training_row_is_shown_before_the_next_measurement_starts(monkeypatch):
    terminal = Terminal()
    shown = shown_at_each_measurement(monkeypatch, terminal)
    monkeypatch.setattr(benchmark, "training_step_flops", lambda *args: 10 ** 9)
    with contextlib.redirect_stdout(terminal):
        benchmark.bench_training(torch.device("cpu"), benchmark.QUICK, "bf16", {"arch": "espcn", "scale": 4},
                                 WeightedLoss("l1"))
    # The calls: the plain step, the fp32 step, the fp32 conv ceiling (4), the bf16 step, its ceiling (4).
    assert len(shown) == 11
    assert shown[1] == ""  # the plain step is measured first: every row's ratio needs it
    step, gflops = (line.split() for line in shown[2].splitlines())  # the fp32 step, shown before its ceiling
    assert step[:3] == ["train", "step", "fp32,"] and step[-3:] == ["8.00", "8.00", "1.00x"]  # 4 patches / 0.5 s
    assert gflops == ["GFLOP/s", "(counted)", "2.0", "2.0"]
    assert "in fp32" not in shown[5] and "in fp32, GFLOP/s" in shown[6] and "share of it" in shown[6]
    assert "train step bf16" not in shown[6] and "train step bf16" in shown[7] and "in bf16" not in shown[10]
    assert terminal.seen == terminal.getvalue() and terminal.seen.count("\n") == 8  # the last row flushed too


def test_each_inference_row_is_shown_before_the_next_measurement_starts(monkeypatch, tmp_path):
    terminal = Terminal()
    shown = shown_at_each_measurement(monkeypatch, terminal)
    monkeypatch.setattr(benchmark, "bench_onnxruntime", lambda *args: {})  # an export takes seconds
    folder = make_images(tmp_path / "images")
    with contextlib.redirect_stdout(terminal):
        figures = benchmark.bench_inference(torch.device("cpu"), folder, benchmark.QUICK, memory=False,
                                            precision="bf16", model_args={"arch": "espcn", "scale": 4})
    lines = terminal.seen.splitlines()
    # The calls: the plain model, then untiled and tiled in fp32, then in bf16.
    assert shown == ["", ""] + ["\n".join(lines[:n]) + "\n" for n in (1, 3, 4)]
    assert lines[0].startswith(f"inference {figures['infer_input']} fp32 untiled") and lines[3].startswith(
        f"inference {figures['infer_input']} bf16 untiled")
    assert len(lines) == 7 and "bf16 vs fp32" in lines[6] and terminal.seen == terminal.getvalue()


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def start_benchmark(tmp_path, *flags) -> subprocess.Popen:
    """benchmark.py with its temporary files in `tmp_path`/tmp."""
    (tmp_path / "tmp").mkdir()
    return subprocess.Popen([sys.executable, "benchmark.py", "--device", "cpu", *flags], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "TMPDIR": str(tmp_path / "tmp")})


def wait_until(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"benchmark.py exited early:\n{proc.communicate()}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.slow
def test_sigterm_removes_the_temporary_images(tmp_path):
    proc = start_benchmark(tmp_path)
    wait_until(lambda: any((tmp_path / "tmp").glob("*/0000.png")), proc)  # writing the synthetic images
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    assert list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.slow
def test_sigterm_while_a_child_process_runs_ends_it_and_removes_its_files(tmp_path):
    proc = start_benchmark(tmp_path, "--check")  # its first train.py starts within seconds
    # train.py writes its run in benchmark.py's temporary folder
    wait_until(lambda: children(proc.pid) and any((tmp_path / "tmp").glob("*/fp32_straight")), proc)
    child = children(proc.pid)[0]
    try:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert list((tmp_path / "tmp").iterdir()) == []
        assert not os.path.exists(f"/proc/{child}"), "train.py still runs"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
