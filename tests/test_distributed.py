"""train.py under torchrun: 2 CPU processes (gloo), DistributedDataParallel."""
import csv

import numpy as np
import pytest
import torch

from conftest import TINY_RUN, read_log, run_script
from dataset import EpochSampler
from machinery.checkpoint import load_checkpoint


def torchrun(*args, check=True):
    return run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py", *args,
                      check=check)


def test_ranks_draw_disjoint_patches_of_the_same_epoch_order():
    data = list(range(23))
    one = EpochSampler(data, seed=3)
    ranks = [EpochSampler(data, seed=3, rank=r, world_size=2) for r in range(2)]
    for sampler in [one, *ranks]:
        sampler.set_epoch(5, start=4)
    full = list(one)
    mine = [list(s) for s in ranks]
    assert len(mine[0]) == len(mine[1]) == len(ranks[0]) == 9  # (23 - 4) // 2
    assert not set(mine[0]) & set(mine[1])
    # Global step k of batch b uses samples [k*b*2, (k+1)*b*2) of the order, split between ranks.
    assert sorted(mine[0][:2] + mine[1][:2]) == sorted(full[:4])


@pytest.mark.slow
def test_torchrun_two_processes_average_gradients_and_write_one_run(image_dir, tmp_path):
    runs = tmp_path / "runs"
    common = ["--train_dir", image_dir, "--val_dir", image_dir, "--checkpoint_dir", runs, *TINY_RUN]
    result = torchrun(*common, "--run_name", "ddp", "--batch_size", "2", "--num_epochs", "1")
    assert "distributed: 2 processes (gloo), batch 2 per process, 4 per step" in result.stdout
    assert "3 steps of 2 x 2" in result.stdout
    # Rank 1 answered the end-of-epoch check: it ran, and holds rank 0's weights.
    assert "weights identical on 2 processes" in result.stdout
    assert result.stdout.count("val bicubic") == 1  # only rank 0 prints
    assert [p.name for p in runs.iterdir()] == ["ddp"]
    assert sorted(p.name for p in (runs / "ddp").iterdir()) == [".lock", "best.pt", "curves.png", "last.pt", "log.csv"]
    assert load_checkpoint(runs / "ddp" / "last.pt")["world_size"] == 2
    run_script("infer.py", image_dir / "img0.png", "-o", tmp_path / "sr.png", "--checkpoint", runs / "ddp" / "last.pt")

    # Resumed under torchrun, it goes on.
    result = torchrun("--resume", runs / "ddp" / "last.pt", "--num_epochs", "2")
    assert "resumed from" in result.stdout and [r["epoch"] for r in read_log(runs / "ddp")] == ["1", "2"]

    # One process with batch 4 sees the same 4 patches per step as 2 x 2: with the gradients
    # averaged across the 2 processes, it reaches the same weights (to float summation order).
    run_script("train.py", *common, "--run_name", "single", "--batch_size", "4", "--num_epochs", "2")
    ddp, single = load_checkpoint(runs / "ddp" / "last.pt"), load_checkpoint(runs / "single" / "last.pt")
    for name, tensor in single["model"].items():
        torch.testing.assert_close(ddp["model"][name], tensor, rtol=1e-4, atol=1e-6, msg=name)
    np.testing.assert_allclose([float(r["loss"]) for r in read_log(runs / "ddp")],
                               [float(r["loss"]) for r in read_log(runs / "single")], rtol=1e-4)


@pytest.mark.slow
def test_torchrun_ranks_obey_early_stopping_decided_by_rank_0(image_dir, tmp_path):
    # An lr this small cannot change the uint8 output: no validation gain, stop after epoch 2.
    result = torchrun("--train_dir", image_dir, "--val_dir", image_dir, "--checkpoint_dir", tmp_path, *TINY_RUN,
                      "--run_name", "es", "--batch_size", "2", "--num_epochs", "50", "--lr", "1e-14",
                      "--patience", "1")
    assert "early stopping: no validation PSNR gain for 1 epoch " in result.stdout
    assert [r["epoch"] for r in read_log(tmp_path / "es")] == ["1", "2"]


@pytest.mark.slow
def test_torchrun_processes_train_from_one_cache_and_split_validation_scoring_as_one_process(image_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    runs = tmp_path / "runs"
    result = torchrun("--train_dir", image_dir, "--val_dir", image_dir, "--checkpoint_dir", runs, *TINY_RUN,
                      "--run_name", "v", "--num_epochs", "1", "--tensorboard", "--data_cache", tmp_path / "cache")
    assert "val: 3 images, split over the 2 processes" in result.stdout
    # One process built the training set's cache, the other waited and mapped it.
    assert result.stdout.count("data cache: built") == 1
    assert [p.suffix for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == [".cache"]
    # One process (evaluate.py) measuring the saved weights gives the logged figures, to the printed decimals.
    run_script("evaluate.py", "--data_dir", image_dir, "--checkpoint", runs / "v" / "last.pt",
               "--csv", tmp_path / "e.csv")
    with open(tmp_path / "e.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    logged = read_log(runs / "v")[0]
    for key in ("psnr", "ssim", "bicubic_psnr", "bicubic_ssim"):
        logged_key = key if key.startswith("bicubic") else f"val_{key}"
        assert logged[logged_key] == f"{np.mean([float(r[key]) for r in rows]):.4f}", key
    # The first 3 images' crops reach TensorBoard, whichever process scored them.
    events = EventAccumulator(str(runs / "v" / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert sorted(events.Tags()["images"]) == ["val/img0.png", "val/img1.png", "val/img2.png"]
