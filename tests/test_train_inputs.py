"""Hostile input to training, losses, checkpoints, benchmark.py, plot.py and the hub:
each is refused in one line, or read exactly as meant."""
import contextlib
import io
import json
import re
import shutil
import sys
from pathlib import Path

import matplotlib.pyplot
import numpy as np
import pytest
import torch
from PIL import Image

import benchmark
import hubconf
import plot
import train
import utils
from conftest import TINY_RUN, Terminal, assert_one_line_error, make_images, run_main, smooth_image
from losses import WeightedLoss, loss_spec, parse_loss
from machinery import bench_tools, curves
from machinery.checkpoint import load_checkpoint, load_model, save_checkpoint, shipped_checkpoint
from model import build_network, network_options
from utils import UserError

# ---------------------------------------------------------------- --loss weights


@pytest.mark.parametrize("weight", [1e6, 2e7, 0.1234567, 1234567.5, 1e300, 3e-300])
def test_a_loss_weight_is_kept_exactly_whatever_its_size(weight):
    spec = loss_spec(f"l1+{weight!r}*fft")
    assert WeightedLoss(spec).weights == [1.0, weight]
    assert loss_spec(spec) == spec  # the stored spelling reads back as itself


def test_a_weight_written_with_an_exponent_sign_is_a_number_not_two_terms():
    assert parse_loss("l1+2e+07*fft") == [(1.0, "l1"), (2e7, "fft")]
    assert parse_loss("1E-3*l2+l1") == [(1e-3, "l2"), (1.0, "l1")]


def test_a_subnormal_loss_weight_is_one_line(image_dir, tmp_path):
    code, _, err = run_main(train, "--train_dir", image_dir, "--val_dir", image_dir, "--checkpoint_dir", tmp_path,
                            "--loss", "l1+1e-310*fft")
    assert code == 2 and "Traceback" not in err
    assert "argument --loss: the weight of fft, 1e-310, is subnormal" in err


def test_benchmark_takes_a_large_loss_weight_as_train_does(monkeypatch):
    seen = []
    monkeypatch.setattr(benchmark, "measure_all", lambda device, plan, precision, model_args, loss, memory:
                        seen.append(loss) or {})
    code, out, err = run_main(benchmark, "--loss", "l1+2e7*fft", "--device", "cpu", "--quick", "--precision", "fp32")
    assert code == 0 and "Traceback" not in err, err
    assert seen[0].weights == [1.0, 2e7] and seen[0].names == ["l1", "fft"]


def test_benchmark_refuses_a_bad_loss_in_one_line(monkeypatch):
    monkeypatch.setattr(benchmark, "measure_all", lambda *args, **kwargs: pytest.fail("measured"))
    code, _, err = run_main(benchmark, "--loss", "l1+1e-310*fft", "--device", "cpu")
    assert code == 2 and "Traceback" not in err and "subnormal" in err


# ---------------------------------------------------------------- a hand-edited last.pt


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    """A 1-epoch run's folder."""
    root = tmp_path_factory.mktemp("one_epoch")
    images = make_images(root / "images")
    code, _, err = run_main(train, "--train_dir", images, "--val_dir", images, "--checkpoint_dir", root / "runs",
                            "--run_name", "r", *TINY_RUN, "--num_epochs", "1")
    assert code == 0, err
    return root / "runs" / "r"


def edited_run(one_epoch, tmp_path, edit) -> Path:
    """A copy of the run whose last.pt went through `edit(checkpoint)`."""
    folder = tmp_path / "edited"
    shutil.copytree(one_epoch, folder)
    checkpoint = load_checkpoint(folder / "last.pt")
    edit(checkpoint)
    save_checkpoint(checkpoint, folder / "last.pt")
    return folder / "last.pt"


@pytest.mark.parametrize("flag, value, message", [
    ("loss", 5, "'5' is not a loss"), ("lr", "fast", "invalid positive_float value: 'fast'"),
    ("batch_size", 0, "must be >= 1, got 0"), ("seed", -5, "must be in 0 to"),
    ("ema", "yes", "invalid ema_decay value: 'yes'"), ("num_workers", -2, "must be >= 0, got -2"),
    ("degradation", "removed_one", "invalid choice: 'removed_one'"), ("mean_shift", "no", "true or false"),
    ("batch_size", 4.5, "invalid positive_int value: '4.5'"), ("patch_size", [32], "not a value a flag takes")])
def test_a_hand_edited_run_flag_is_checked_as_if_typed(one_epoch, tmp_path, flag, value, message):
    last = edited_run(one_epoch, tmp_path, lambda c: c["args"].update({flag: value}))
    before = last.read_bytes()
    code, out, err = run_main(train, "--resume", last, "--num_epochs", "2")
    assert_one_line_error(code, err, str(last), f"--{flag}", message)
    assert out == "" and last.read_bytes() == before


def test_a_flag_typed_again_on_resume_replaces_a_bad_session_value(one_epoch, tmp_path):
    last = edited_run(one_epoch, tmp_path, lambda c: c["args"].update(num_workers=-2))
    code, _, err = run_main(train, "--resume", last, "--num_epochs", "1", "--num_workers", "0")
    assert code == 0 and "nothing to do" in _, err


# ---------------------------------------------------------------- model_args by type


@pytest.mark.parametrize("key, value, expected", [("mean_shift", "no", "true or false"),
                                                  ("image_skip", 1, "true or false"),
                                                  ("num_features", 8.0, "an integer"),
                                                  ("num_residuals", "1", "an integer"),
                                                  ("scale", True, "an integer")])
def test_a_model_arg_of_the_wrong_type_is_one_line_naming_it(tiny_checkpoint, tmp_path, key, value, expected):
    checkpoint = load_checkpoint(tiny_checkpoint)
    checkpoint["model_args"][key] = value
    save_checkpoint(checkpoint, tiny_checkpoint)
    with pytest.raises(UserError, match=f"model_args {key} is {re.escape(repr(value))}: .*{expected}"):
        load_model(tiny_checkpoint, torch.device("cpu"))


def test_a_resumed_run_with_a_model_arg_of_the_wrong_type_is_one_line(one_epoch, tmp_path):
    last = edited_run(one_epoch, tmp_path, lambda c: c["model_args"].update(mean_shift="no"))
    code, out, err = run_main(train, "--resume", last, "--num_epochs", "2")
    assert_one_line_error(code, err, str(last), "model_args mean_shift is 'no'", "true or false")


# ---------------------------------------------------------------- messages that fit the script


def out_of_memory_in(script):
    """A stand-in for `script` whose main() runs out of memory as torch's CPU allocator says it."""
    class Fake:
        build_parser = staticmethod(script.build_parser)

        @staticmethod
        def main(args):
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: "
                               "can't allocate memory: you tried to allocate 99999999999 bytes.\nmore")

    Fake.__name__ = script.__name__
    return Fake


def test_running_out_of_memory_in_training_suggests_trainings_flags():
    code, _, err = run_main(out_of_memory_in(train))
    assert_one_line_error(code, err, "out of memory", "--batch_size", "--patch_size")
    assert "--tile" not in err


def test_running_out_of_memory_in_the_benchmark_suggests_no_flag_it_lacks():
    code, _, err = run_main(out_of_memory_in(benchmark))
    assert_one_line_error(code, err, "out of memory", "--quick")
    assert "--tile" not in err and "--batch_size" not in err


def test_the_meta_device_is_named_as_one_no_script_computes_on(image_dir, tmp_path):
    code, _, err = run_main(train, "--train_dir", image_dir, "--val_dir", image_dir, "--checkpoint_dir", tmp_path,
                            *TINY_RUN, "--device", "meta")
    assert_one_line_error(code, err, "'meta'", "without data", "no script can compute on it",
                          "use auto, cpu, cuda or cuda:N")
    assert "this machine has no such device" not in err
    assert list(tmp_path.iterdir()) == [image_dir]


# ---------------------------------------------------------------- torch.hub's outputs


def overshooting_input() -> torch.Tensor:
    """Black and white pixels at random: sharp edges every way, which the networks overshoot."""
    return (torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(0)) > 0.5).float()


@pytest.mark.parametrize("arch, scale", [("resshuffle", 4), ("resshuffle", 2), ("espcn", 4)])
def test_a_hub_network_gives_outputs_in_0_1_on_an_input_it_overshoots(arch, scale):
    net = hubconf.network(arch, scale=scale)
    plain = build_network(dict(arch=arch, scale=scale, **network_options(arch)) | net_args(net)).eval()
    plain.load_state_dict(net.state_dict())  # the same keys and weights, without the clamp
    x = overshooting_input()
    with torch.no_grad():
        raw, out = plain(x), net(x)
    assert raw.min() < 0 and raw.max() > 1  # the network itself overshoots here
    assert out.min() >= 0 and out.max() <= 1 and torch.allclose(out, raw.clamp(0, 1), atol=1e-5)


def net_args(net) -> dict:
    """The shipped network's own model_args (mean_shift, image_skip, ...)."""
    return load_checkpoint(shipped_checkpoint(net.scale, type(net).__name__.lower()))["model_args"]


def test_a_hub_network_loads_and_gives_state_dicts_as_the_checkpoints_hold_them(tiny_checkpoint):
    net = hubconf.from_checkpoint(str(tiny_checkpoint))
    weights = load_checkpoint(tiny_checkpoint)["model"]
    assert net.state_dict().keys() == weights.keys()
    fresh = hubconf.resshuffle(scale=4, pretrained=False, num_features=8, num_residuals=1, mean_shift=True,
                               image_skip=True)
    fresh.load_state_dict(net.state_dict())
    fresh.eval()
    with torch.no_grad():
        assert torch.allclose(fresh(overshooting_input()), net(overshooting_input()), atol=1e-5)
        assert net(overshooting_input()).max() <= 1


# ---------------------------------------------------------------- plot.py's curves


def three_epochs() -> list[dict]:
    """log.csv rows of 3 epochs of an l1+fft run, the network beating bicubic more each epoch."""
    return [{"epoch": str(e), "loss": f"{0.1 / e}", "loss_l1": f"{0.08 / e}", "loss_fft": f"{0.02 / e}",
             "lr": "0.0002", "val_psnr": f"{27 + e}", "val_ssim": f"{0.7 + e / 100}", "bicubic_psnr": "27.5",
             "bicubic_ssim": "0.71"} for e in (1, 2, 3)]


def test_curves_have_whole_epoch_ticks_and_legends_off_the_curves():
    fig = curves.curves_figure(three_epochs(), title="r")
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        for ax in fig.axes:
            lo, hi = sorted(ax.get_xlim())
            ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
            assert ticks and all(float(t).is_integer() for t in ticks), (ax.get_title(), ticks)
            legend = ax.get_legend()
            if legend is not None:  # beside the panel, not over its curves' last points
                assert not legend.get_window_extent(renderer).overlaps(ax.bbox), ax.get_title()
    finally:
        matplotlib.pyplot.close(fig)


# ---------------------------------------------------------------- benchmark.py's output


def fake_measure_all(device, plan, precision, model_args, loss, memory):
    """Two rows, and a warning between them, as a measurement may give."""
    bench_tools.row("first row", "1.00", "2.00", "0.50x")
    utils.warn("something looked odd")
    bench_tools.row("second row", "3.00")
    return {"figure": 1.5}


def run_benchmark(monkeypatch, *argv, terminal: bool) -> tuple[str, str]:
    """benchmark.py's main with measure_all faked: (stdout, stderr), into one terminal where
    `terminal` (as a user sees them, interleaved), else into two logs."""
    monkeypatch.setattr(benchmark, "measure_all", fake_measure_all)
    monkeypatch.setattr(sys, "argv", ["benchmark.py"])
    out, err = (Terminal(),) * 2 if terminal else (io.StringIO(), io.StringIO())
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        benchmark.main(benchmark.build_parser().parse_args(["--device", "cpu", "--precision", "fp32", *map(str, argv)]))
    return out.getvalue(), err.getvalue()


def test_the_benchmark_table_says_what_plain_is_and_warnings_come_under_it(monkeypatch):
    out, _ = run_benchmark(monkeypatch, terminal=True)
    lines = out.splitlines()
    assert lines[1].split() == ["resshuffle", "plain", "ratio"]
    assert lines[2].lstrip().startswith("plain:") and "NCHW" in lines[2]
    assert lines[3].startswith("first row") and lines[4].startswith("second row")
    assert lines[5] == "benchmark.py: warning: something looked odd"


def test_the_benchmark_prints_no_json_on_a_terminal_and_writes_it_where_asked(monkeypatch, tmp_path):
    out, _ = run_benchmark(monkeypatch, terminal=True)
    assert "{" not in out and "--json" in out.splitlines()[-1]
    out, _ = run_benchmark(monkeypatch, "--json", tmp_path / "figures.json", terminal=True)
    figures = json.loads((tmp_path / "figures.json").read_text())
    assert figures["figure"] == 1.5 and figures["device"] == "cpu" and "{" not in out
    out, _ = run_benchmark(monkeypatch, "--json", "-", terminal=True)
    assert json.loads(out.splitlines()[-1])["figure"] == 1.5
    out, _ = run_benchmark(monkeypatch, terminal=False)  # into a file or a pipe: the line as before
    assert json.loads(out.splitlines()[-1])["figure"] == 1.5


def test_the_benchmarks_json_file_is_checked_before_any_measurement(monkeypatch, tmp_path):
    monkeypatch.setattr(benchmark, "measure_all", lambda *args, **kwargs: pytest.fail("measured"))
    (tmp_path / "figures.json").mkdir()
    code, _, err = run_main(benchmark, "--device", "cpu", "--json", tmp_path / "figures.json")
    assert_one_line_error(code, err, "figures.json: is a folder")
    code, _, err = run_main(benchmark, "--device", "cpu", "--json", tmp_path / "figures.txt")
    assert code == 2 and "figures.txt: name a .json file" in err


def test_the_benchmarks_memory_rows_come_last_under_their_own_header(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(benchmark, "run_infer", lambda args: (1.25, 2.0, False))
    sections = ("bench_training", "bench_data", "bench_real_data", "bench_inference", "bench_video", "bench_evaluate")
    for name in sections:
        monkeypatch.setattr(benchmark, name, lambda *args, name=name, **kwargs: print(name) or {})
    monkeypatch.setattr(benchmark, "make_2k_images", lambda folder, count: make_images(folder))
    benchmark.measure_all(torch.device("cpu"), benchmark.QUICK._replace(big_lr=(16, 16)), "fp32",
                          {"arch": "espcn", "scale": 4}, WeightedLoss("l1"), memory=True)
    lines = capsys.readouterr().out.splitlines()
    assert lines[:len(sections)] == list(sections)
    lines = lines[len(sections):]
    assert lines[0].split()[-2:] == ["peak", "MP/s"] and "memory" in lines[0]
    assert len(lines) == 3 and lines[1].split()[-4:] == ["1.25", "GB", "0.002", "MP/s"]  # 16x16 x16 / 2 s


def test_the_benchmarks_data_rows_show_no_temporary_name(monkeypatch, tmp_path):
    folder = tmp_path / "tmpq8x7zz2k"  # as tempfile names them
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(smooth_image(rng, 200, 200)).save(folder / f"{i:04d}.png")
    terminal = Terminal()
    with contextlib.redirect_stdout(terminal), contextlib.redirect_stderr(terminal):
        benchmark.bench_data(folder, benchmark.QUICK._replace(loader_batches=1, decode_batches=1))
    assert "tmpq8x7zz2k" not in terminal.getvalue() and "data, patches/s" in terminal.getvalue()


def test_the_benchmark_times_real_patches_and_the_step_they_feed(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(smooth_image(np.random.default_rng(i), 200, 200)).save(folder / f"{i}.png")
    out = benchmark.bench_real_data(torch.device("cpu"), folder, benchmark.QUICK._replace(decode_batches=1), "fp32",
                                    {"arch": "espcn", "scale": 4}, WeightedLoss("l1"))
    rows = capsys.readouterr().out
    assert "data, --degradation real, patches/s, 1 worker" in rows and "fed by 1 loader thread" in rows
    assert out["data_real_patches_s_1w"] > 0 and out["train_fed_real_patches_s_fp32"] > 0
    assert out["train_fed_pil_patches_s_fp32"] > 0


# ---------------------------------------------------------------- names as printed


def test_a_name_with_control_characters_is_printed_escaped_in_errors_and_warnings(tmp_path, capsys):
    name = "run\x1b]0;pwned\x07\n.csv"  # would set the terminal's title, and start a line of its own
    code, _, err = run_main(plot, tmp_path / name)
    assert_one_line_error(code, err, "run\\x1b]0;pwned\\x07\\x0a.csv: no such log file")
    assert "\x1b" not in err and "\x07" not in err
    utils.warn(f"{name}: odd")
    assert capsys.readouterr().err.endswith(": warning: run\\x1b]0;pwned\\x07\\x0a.csv: odd\n")


def test_a_run_in_a_folder_with_control_characters_names_it_escaped(one_epoch, tmp_path):
    folder = tmp_path / "r\x1b[2J"
    shutil.copytree(one_epoch, folder)
    code, out, err = run_main(train, "--resume", folder / "last.pt", "--num_epochs", "1")
    assert code == 0 and "r\\x1b[2J/last.pt: trained 1 of --num_epochs 1 already" in out, err
    assert "\x1b" not in out + err
