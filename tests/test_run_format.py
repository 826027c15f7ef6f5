"""Run checkpoints carry a format number; files of every earlier format still resume, export and load."""
import shutil

import numpy as np
import pytest
import torch

import train
from conftest import ROOT, assert_one_line_error, read_log, run_main
from machinery.checkpoint import load_checkpoint, load_model, save_checkpoint
from machinery.runs import RUN_FORMAT, upgrade_run_checkpoint

FORMAT_1 = ROOT / "tests" / "fixtures" / "format1"


@pytest.fixture
def format_1_run(tmp_path, image_dir):
    """A copy of a run folder written before run checkpoints had a format number, and its images."""
    def copy(name: str):
        folder = tmp_path / name
        shutil.copytree(FORMAT_1 / name, folder)
        return folder / "last.pt"
    return copy


def resume(last, image_dir, *flags):
    return run_main(train, "--resume", last, "--train_dir", image_dir, "--val_dir", image_dir, "--num_epochs", "2",
                    "--data_cache", "none", *flags)


@pytest.mark.parametrize("name, loss", [("plain", "l1"), ("ema_loss", "l1+0.1*fft")])
def test_a_format_1_run_resumes_and_is_saved_in_the_current_format(format_1_run, image_dir, name, loss):
    last = format_1_run(name)
    assert "format" not in load_checkpoint(last)
    code, out, err = resume(last, image_dir)
    assert code == 0, err
    saved = load_checkpoint(last)
    assert saved["format"] == RUN_FORMAT and saved["epoch"] == 2 and saved["args"]["loss"] == loss
    assert saved["precision"] == "fp32" and "(the run's; --precision" in out
    assert (saved["ema"] is not None) == (name == "ema_loss")
    assert [row["epoch"] for row in read_log(last.parent)] == ["1", "2"]


def test_a_format_1_run_still_refuses_a_changed_run_flag(format_1_run, image_dir):
    code, _, err = resume(format_1_run("plain"), image_dir, "--lr", "1e-3")
    assert_one_line_error(code, err, "started with --lr 0.0002", "can't change on resume")


@pytest.mark.parametrize("name, weights", [("plain_x4.safetensors", "raw"), ("ema_loss_x4.pt", "ema")])
def test_format_1_exports_load_and_upscale(name, weights):
    model, info = load_model(FORMAT_1 / name, torch.device("cpu"))
    assert info["weights"] == weights and info["model_args"]["num_features"] == 8
    with torch.no_grad():
        assert model(torch.rand(1, 3, 5, 6)).shape == (1, 3, 20, 24)


def test_a_format_1_run_exports(tmp_path):
    code, _, err = run_main(train, "--export", FORMAT_1 / "plain" / "last.pt", tmp_path / "x4.safetensors")
    assert code == 0, err
    model, _ = load_model(tmp_path / "x4.safetensors", torch.device("cpu"))
    original = load_checkpoint(FORMAT_1 / "plain" / "last.pt")["model"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in original.items())


def oldest(checkpoint: dict) -> dict:
    """A format 1 run checkpoint as the first runs wrote it: before --arch, --loss, --precision,
    mid-epoch saves, torchrun, loss scaling and --ema were kept in it."""
    c = {k: v for k, v in checkpoint.items() if k not in (
        "precision", "epoch_precision", "term_sums", "steps_per_epoch", "step", "loss_sum", "seconds",
        "world_size", "scaler", "ema", "format")}
    c["args"] = {k: v for k, v in checkpoint["args"].items() if k not in ("arch", "loss", "precision", "degradation")}
    c["model_args"] = {k: v for k, v in checkpoint["model_args"].items() if k != "arch"}
    c["rng"] = {"torch": checkpoint["rng"]["torch"]}
    return c


@pytest.mark.parametrize("device_type, precision", [("cpu", "fp32"), ("cuda", "auto")])
def test_the_upgrade_fills_what_the_oldest_runs_lack_with_what_it_meant_then(device_type, precision):
    c = upgrade_run_checkpoint(oldest(load_checkpoint(FORMAT_1 / "plain" / "last.pt")), "last.pt", device_type)
    assert c["format"] == RUN_FORMAT and c["model_args"]["arch"] == c["args"]["arch"] == "resshuffle"
    assert c["args"]["loss"] == "l1" and c["args"]["degradation"] == "pil" and c["precision"] == precision
    assert (c["step"], c["world_size"], c["scaler"], c["ema"], c["rng"]["cuda"]) == (0, 1, None, None, None)
    assert c["term_sums"] == [0.0] and c["steps_per_epoch"] is None and c["epoch_precision"] == ""


def test_a_run_of_the_first_format_1_files_resumes(format_1_run, image_dir):
    last = format_1_run("plain")
    save_checkpoint(oldest(load_checkpoint(last)), last)
    code, _, err = resume(last, image_dir, "--degradation", "matlab")  # the run's: PIL bicubic, then
    assert_one_line_error(code, err, "started with --degradation pil")
    code, out, err = resume(last, image_dir)
    assert code == 0 and "precision fp32 (the run's" in out, err
    assert load_checkpoint(last)["args"]["arch"] == "resshuffle"


def test_a_mid_epoch_format_1_file_without_its_epoch_length_goes_on_from_its_step(format_1_run, image_dir):
    last = format_1_run("plain")
    c = load_checkpoint(last)
    c |= {"epoch": 0, "step": 2, "loss_sum": 0.5, "term_sums": [0.5], "seconds": 3.0}
    del c["steps_per_epoch"]
    save_checkpoint(c, last)
    code, out, err = resume(last, image_dir, "--num_epochs", "1")
    assert code == 0 and "resumed from" in out and "in epoch 1 after step 2" in out, err
    assert "starts over" not in err and load_checkpoint(last)["steps_per_epoch"] == 3


def test_a_run_checkpoint_of_an_unknown_format_is_one_line(format_1_run, image_dir):
    last = format_1_run("plain")
    save_checkpoint(load_checkpoint(last) | {"format": RUN_FORMAT + 1}, last)
    code, out, err = resume(last, image_dir)
    assert_one_line_error(code, err, f"format {RUN_FORMAT + 1}", "update ResShuffle")
    assert np.isfinite(load_checkpoint(last)["best_psnr"])  # left as it was
