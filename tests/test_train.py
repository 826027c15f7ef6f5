import csv

import torch

from conftest import run_script
from utils import load_checkpoint

TINY_RUN = ["--num_features", "8", "--num_residuals", "1", "--patch_size", "32", "--batch_size", "4",
            "--patches_per_image", "4", "--num_workers", "0", "--step_size", "1", "--gamma", "0.5",
            "--mean_shift", "--image_skip"]


def train(image_dir, tmp_path, *extra, check=True):
    return run_script("train.py", "--train_dir", image_dir, "--val_dir", image_dir,
                      "--checkpoint_dir", tmp_path / "runs", "--run_name", "tiny", *TINY_RUN, *extra, check=check)


def read_log(run_dir):
    with open(run_dir / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_two_epochs_write_checkpoints_and_log_then_resume_continues(image_dir, tmp_path):
    result = train(image_dir, tmp_path, "--num_epochs", "2")
    run_dir = tmp_path / "runs" / "tiny"
    assert {"last.pt", "best.pt", "log.csv"} <= {p.name for p in run_dir.iterdir()}
    assert "val bicubic" in result.stdout and "epoch 2: loss" in result.stdout
    log = read_log(run_dir)
    assert [r["epoch"] for r in log] == ["1", "2"]
    assert [float(r["lr"]) for r in log] == [2e-4, 1e-4]
    assert all(float(r["val_psnr"]) > 10 and 0 < float(r["val_ssim"]) <= 1 for r in log)

    last = load_checkpoint(run_dir / "last.pt")
    assert last["epoch"] == 2 and last["model_args"]["num_features"] == 8
    assert {"model", "optimizer", "scheduler", "scaler", "best_psnr", "rng", "args"} <= last.keys()
    assert abs(last["best_psnr"] - max(float(r["val_psnr"]) for r in log)) < 1e-4  # the log rounds to 4 digits

    result = run_script("train.py", "--train_dir", image_dir, "--val_dir", image_dir, "--num_epochs", "3",
                        "--num_workers", "0", "--batch_size", "4", "--patches_per_image", "4",
                        "--patch_size", "32", "--resume", run_dir / "last.pt")
    assert "at epoch 3, lr 5e-05" in result.stdout
    log = read_log(run_dir)
    assert [r["epoch"] for r in log] == ["1", "2", "3"] and float(log[2]["lr"]) == 5e-5
    resumed = load_checkpoint(run_dir / "last.pt")
    assert resumed["epoch"] == 3
    # The optimizer's state went on from the checkpoint: Adam's step count is 3 epochs' worth.
    steps = [s["step"] for s in resumed["optimizer"]["state"].values()]
    assert all(float(s) == 3 * float(last["optimizer"]["state"][0]["step"]) / 2 for s in steps)
    assert not torch.equal(resumed["model"]["tail.weight"], last["model"]["tail.weight"])

    # A weights-only export loads in infer.py, and cannot be resumed.
    exported = tmp_path / "weights.pt"
    run_script("train.py", "--export", run_dir / "best.pt", exported)
    assert set(torch.load(exported, weights_only=True)) == {"model", "model_args", "degradation"}  # no --ema
    run_script("infer.py", image_dir / "img0.png", "-o", tmp_path / "sr.png", "--checkpoint", exported)
    refused = run_script("train.py", "--train_dir", image_dir, "--resume", exported, check=False)
    assert refused.returncode == 1 and "weights only" in refused.stderr


def test_early_stopping_says_why(image_dir, tmp_path):
    # A learning rate this small cannot change the uint8 output, so validation never improves.
    result = train(image_dir, tmp_path, "--num_epochs", "10", "--lr", "1e-14", "--patience", "2")
    assert "early stopping: no validation PSNR gain for 2 epochs" in result.stdout
    assert [r["epoch"] for r in read_log(tmp_path / "runs" / "tiny")] == ["1", "2", "3"]


def test_bad_flags_are_rejected_before_training(image_dir, tmp_path):
    for flags, message in [(["--batch_size", "0"], "must be >= 1"), (["--lr", "-1"], "positive number"),
                           (["--upscale_factor", "5"], "invalid choice"),
                           (["--patch_size", "30"], "not a multiple of the scale 4")]:
        result = train(image_dir, tmp_path, *flags, check=False)
        assert result.returncode != 0 and message in result.stderr, (flags, result.stderr)
        assert "Traceback" not in result.stderr
