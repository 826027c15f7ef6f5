"""benchmark.py shows each row as soon as it is measured, and a kill leaves no temporary files or processes;
the data cache's study (benchmark.py --data_cache: machinery/cache_study.py) measures the mapped set against
the decoded one and leaves nothing behind; the new machine's check (benchmark.py --check: machinery/machine_check.py)
runs train.py from the repository wherever it is started."""
import contextlib
import io
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import benchmark
from conftest import ROOT, make_images
from losses import WeightedLoss
from machinery import bench_tools, cache_study, machine_check


class Terminal(io.StringIO):
    """stdout as a user watching it sees it: what has been flushed."""

    def __init__(self):
        super().__init__()
        self.seen = ""

    def flush(self):
        self.seen = self.getvalue()


def shown_at_each_measurement(monkeypatch, terminal: Terminal) -> list[str]:
    """Replace timed (benchmark.py's and machinery/bench_tools.py's, where the training step is
    timed) with a fake measurement (0.5 s a call) that notes what the terminal shows when each
    measurement starts."""
    shown = []

    def fake_timed(fn, device, repeats, warmup=1):
        shown.append(terminal.seen)
        return 0.5

    monkeypatch.setattr(benchmark, "timed", fake_timed)
    monkeypatch.setattr(bench_tools, "timed", fake_timed)
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
        figures = benchmark.bench_inference(torch.device("cpu"), folder, benchmark.QUICK, precision="bf16",
                                            model_args={"arch": "espcn", "scale": 4})
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
    _, err = proc.communicate(timeout=120)
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
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert list((tmp_path / "tmp").iterdir()) == []
        assert not os.path.exists(f"/proc/{child}"), "train.py still runs"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


@pytest.mark.slow
def test_the_data_cache_rows_show_one_copy_for_two_processes_and_leave_nothing_behind(tmp_path, monkeypatch, capsys):
    """--data_cache's rows on 4 images: every row printed, the figures they name, and nothing left
    behind: no temporary folder, no cgroup, nothing in the user's cache folder. Started from another
    folder: its child processes (train.py, the children holding the set) run from the repository."""
    for name in ("tmp", "home", "xdg", "elsewhere"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    plan = cache_study.CachePlan(distinct=1, images=4, loader_batches=3, step_batch=2, step_repeats=1)
    figures = cache_study.bench_data_cache(torch.device("cpu"), plan, {"arch": "espcn", "scale": 4}, WeightedLoss("l1"))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("start-up, s (4 2K images, 0.04 GB): mapped") and "first run: cache built" in lines[1]
    assert lines[2].startswith("loader: the same patches from both, bit for bit") and lines[2].split()[-1] == "yes"
    assert lines[3].startswith("loader, patches/s (16x192px HR), 1 thread") and "2 threads" in lines[4]
    assert "train step (batch 2)" in lines[5] and lines[6].startswith("memory, GB (4 2K images, 0.04 GB): 1 process")
    # One copy of the mapped set, whatever the processes; one per process decoded into memory.
    assert 0.95 < figures["cache_pss_2p_over_1p_mapped"] < 1.05 and figures["cache_pss_2p_over_1p_memory"] > 1.8
    assert abs(figures["cache_pss_gb_1p_mapped"] - figures["cache_set_gb"]) < 0.01
    assert len(lines) == (15 if "cache_limit_mapped" in figures else 12)
    if "cache_limit_skipped" in figures:  # no memory cgroup here (not root): the row says why
        assert lines[11].startswith("train.py under a memory limit") and "skipped" in lines[11]
    else:
        assert lines[11].startswith(f"train.py, {figures['cache_limit_mechanism']} limit")
        assert figures["cache_limit_mapped"] == "finished" and figures["cache_limit_mapped_patches_s"] > 0
    assert not list(Path("/sys/fs/cgroup/memory").glob("resshuffle-bench-*"))
    assert not list(Path("/sys/fs/cgroup").glob("resshuffle-bench-*"))
    # torch's Adam makes its own torchinductor_<user> folder in the temporary folder, for later runs too
    assert [p for p in (tmp_path / "tmp").iterdir() if not p.name.startswith("torchinductor")] == []
    assert list((tmp_path / "home").iterdir()) == list((tmp_path / "xdg").iterdir()) == []
    assert list((tmp_path / "elsewhere").iterdir()) == []


# ---------------------------------------------------------------- --data_cache and --check: the studies beside it

def test_data_cache_and_check_forward_to_the_studies(monkeypatch, capsys):
    """benchmark.py --data_cache and --check run the study and the check, with its flags, and measure nothing else."""
    calls = []
    monkeypatch.setattr(cache_study, "measure", lambda *args: calls.append(("data_cache", *args)) or {"study": 1})
    monkeypatch.setattr(machine_check, "check", lambda *args: calls.append(("check", *args)))
    monkeypatch.setattr(benchmark, "measure_all", lambda *args, **kwargs: pytest.fail("a speed row measured"))
    parser = benchmark.build_parser()
    benchmark.main(parser.parse_args(["--data_cache", "--quick", "--device", "cpu", "--arch", "espcn",
                                      "--precision", "fp32"]))
    benchmark.main(parser.parse_args(["--check", "--device", "cpu"]))
    (_, device, quick, model_args, loss, precision), check = calls
    assert (device.type, quick, model_args, loss.spec, precision) == ("cpu", True, {"arch": "espcn", "scale": 4},
                                                                      "l1", "fp32")
    assert check == ("check", torch.device("cpu"))
    # no table of benchmark's own: the study prints its own; its figures go where --json says (a pipe here)
    assert capsys.readouterr().out == '{"study": 1}\n'


@pytest.mark.slow
def test_the_check_runs_train_py_from_the_repository_wherever_it_starts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = machine_check.train_py(["--help"])
    assert result.returncode == 0 and "usage:" in result.stdout, result.stderr
