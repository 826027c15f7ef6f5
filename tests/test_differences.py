"""evaluate.py's paired differences: each network against the first, on the same images, with a
95% t-interval (metrics.paired_difference)."""
import csv
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
from conftest import TINY, ResShuffle, run_main
from machinery.checkpoint import save_checkpoint
from metrics import paired_difference, smooth_share


def test_paired_difference_is_the_hand_computed_t_interval():
    # Differences 0.1, 0.3, -0.2, 0.4: mean 0.15, sample sd sqrt(0.21 / 3) = 0.264575, t(0.975, 3) = 3.182446.
    d = paired_difference([1.1, 1.3, 0.8, 1.4], [1.0, 1.0, 1.0, 1.0])
    half = 3.182446 * 0.264575 / 2
    assert d["mean"] == pytest.approx(0.15)
    assert (d["low"], d["high"]) == pytest.approx((0.15 - half, 0.15 + half), abs=1e-5)
    assert (d["ahead"], d["images"]) == (3, 4)


def test_paired_difference_of_one_image_or_equal_differences_is_a_point():
    assert paired_difference([2.0], [1.5]) == {"mean": 0.5, "low": 0.5, "high": 0.5, "ahead": 1, "images": 1}
    d = paired_difference([1.0, 2.0, 3.0], [1.25, 2.25, 3.25])
    assert (d["low"], d["mean"], d["high"], d["ahead"]) == pytest.approx((-0.25, -0.25, -0.25, 0))


def test_paired_difference_interval_narrows_with_more_images_of_the_same_spread():
    few = paired_difference([1.0, 2.0, 1.0, 2.0], [1.0] * 4)
    many = paired_difference([1.0, 2.0] * 8, [1.0] * 16)
    assert few["mean"] == many["mean"] == 0.5
    assert many["high"] - many["low"] < (few["high"] - few["low"]) / 2


def test_evaluate_prints_each_checkpoints_difference_against_the_first_from_its_csv_rows(
        image_dir, tiny_checkpoint, tmp_path):
    torch.manual_seed(1)
    other = tmp_path / "other.pt"
    save_checkpoint({"model": ResShuffle(**TINY).state_dict(), "model_args": TINY}, other)
    table = tmp_path / "table.csv"
    code, out, err = run_main(evaluate, "--data_dir", image_dir, "--checkpoint", tiny_checkpoint, other,
                              "--precision", "fp32", "--csv", table)
    assert code == 0, err
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["checkpoint"] for r in rows] == [str(tiny_checkpoint)] * 3 + [str(other)] * 3
    line = next(line for line in out.splitlines() if line.startswith(str(other)))
    psnr = re.search(r"PSNR ([-+.\d]+) \[([-+.\d]+), ([-+.\d]+)\] dB, ahead on (\d) of 3", line)
    # By hand from the CSV: the mean difference and the t-interval with t(0.975, 2) = 4.302653.
    d = [float(b["psnr"]) - float(a["psnr"]) for a, b in zip(rows[:3], rows[3:])]
    mean = sum(d) / 3
    half = 4.302653 * math.sqrt(sum((x - mean) ** 2 for x in d) / 2) / math.sqrt(3)
    assert [float(g) for g in psnr.groups()[:3]] == pytest.approx([mean, mean - half, mean + half], abs=6e-5)
    assert int(psnr.group(4)) == sum(x > 0 for x in d)
    assert "SSIM" in line and "against " + str(tiny_checkpoint) in out


def test_evaluate_compares_precisions_of_one_checkpoint_and_refuses_images_for_several(
        image_dir, tiny_checkpoint, tmp_path):
    code, out, err = run_main(evaluate, "--data_dir", image_dir, "--checkpoint", tiny_checkpoint,
                              "--precision", "fp32", "bf16")
    assert code == 0, err
    assert re.search(r"^bf16: PSNR [-+.\d]+ \[", out, re.M) and "against fp32" in out
    code, _, err = run_main(evaluate, "--data_dir", image_dir, "--checkpoint", tiny_checkpoint,
                            tmp_path / "missing.pt", "-o", tmp_path / "sr")
    assert code == 1 and "several --checkpoint or --precision values write no images" in err
    assert not (tmp_path / "sr").exists()


def test_smooth_share_counts_the_tiles_of_flat_colour():
    rng = np.random.default_rng(0)
    img = np.full((32, 64, 3), 120, np.uint8)
    img[:, 32:] = rng.integers(0, 256, (32, 32, 3))
    assert smooth_share(img) == 0.5
    assert smooth_share(img[:, :32]) == 1.0 and smooth_share(img[:4]) == 0.0


def test_evaluate_smoothest_keeps_the_images_with_the_largest_smooth_area(image_dir, tiny_checkpoint, tmp_path):
    flat = np.full((64, 72, 3), (110, 160, 220), np.uint8)
    flat[:16] = np.random.default_rng(1).integers(0, 256, (16, 72, 3))  # a quarter textured
    Image.fromarray(flat).save(image_dir / "sky.png")
    table = tmp_path / "t.csv"
    code, out, err = run_main(evaluate, "--data_dir", image_dir, "--checkpoint", tiny_checkpoint,
                              "--smoothest", "1", "--csv", table)
    assert code == 0, err
    assert "smoothest: sky.png 75%" in out
    with open(table, newline="") as f:
        assert [r["name"] for r in csv.DictReader(f)] == ["sky.png"]
