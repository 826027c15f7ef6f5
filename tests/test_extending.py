"""An experiment is one file and one registration: a network, a loss and a metric registered from
this file (as docs/extending.md shows) go through train, resume, evaluate, infer, export and
torch.hub with no other edit."""
import csv

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import evaluate
import infer
import losses
import metrics
import model
import train
from conftest import ROOT, make_images, read_log, run_main
from machinery.checkpoint import load_checkpoint, load_model

pytestmark = pytest.mark.slow  # a training run, an ONNX export and a torch.hub load


class TwoConv(nn.Module):
    """The smallest network: conv3x3 to features, ReLU, conv3x3 to r^2 x RGB, PixelShuffle."""

    def __init__(self, scale: int = 2, num_features: int = 8):
        super().__init__()
        self.scale = scale
        self.body = nn.Sequential(nn.Conv2d(3, num_features, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(num_features, 3 * scale * scale, 3, padding=1), nn.PixelShuffle(scale))

    def forward(self, x):
        return self.body(x)


def max_error(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """A toy loss: the worst pixel's error."""
    return (sr - hr).abs().amax()


def mean_abs_error(img: np.ndarray, hr: np.ndarray, crop_border: int = 0, y_channel: bool = False) -> float:
    """A toy metric: the mean absolute difference in levels."""
    a, b = metrics._prepare(img, hr, crop_border, y_channel)
    return float(np.abs(a - b).mean())


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(model.NETWORKS, "twoconv", TwoConv)
    monkeypatch.setitem(losses.LOSSES, "maxerr", max_error)
    monkeypatch.setitem(metrics.METRICS, "mae", metrics.Metric(mean_abs_error, "MAE", "levels"))


def test_a_registered_network_loss_and_metric_go_through_every_script(registered, tmp_path):
    images = make_images(tmp_path / "images")
    common = ["--train_dir", images, "--val_dir", images, "--checkpoint_dir", tmp_path / "runs", "--patch_size", "32",
              "--batch_size", "4", "--patches_per_image", "4", "--num_workers", "0", "--precision", "fp32"]

    # train: the network, the loss and the metric by name; log.csv has the term and the metric
    code, out, err = run_main(train, *common, "--run_name", "toy", "--arch", "twoconv", "--upscale_factor", "2",
                              "--num_features", "4", "--loss", "l1+0.1*maxerr", "--num_epochs", "1")
    assert code == 0, err
    run = tmp_path / "runs" / "toy"
    assert "twoconv" in out and "PSNR/SSIM/MAE" in out
    row = read_log(run)[0]
    assert float(row["val_mae"]) > 0 and float(row["bicubic_mae"]) > 0 and float(row["loss_maxerr"]) > 0
    assert float(row["loss"]) == pytest.approx(float(row["loss_l1"]) + 0.1 * float(row["loss_maxerr"]), abs=2e-6)
    assert load_checkpoint(run / "last.pt")["model_args"] == {"arch": "twoconv", "scale": 2, "num_features": 4}

    # resume: the loss is part of the run
    code, _, err = run_main(train, "--resume", run / "last.pt", "--num_epochs", "2", "--loss", "l1")
    assert code == 1 and "--loss l1+0.1*maxerr" in err
    code, out, err = run_main(train, "--resume", run / "last.pt", "--num_epochs", "2")
    assert code == 0, err
    assert [r["epoch"] for r in read_log(run)] == ["1", "2"] and read_log(run)[1]["loss_maxerr"]

    # evaluate: the metric in the tables and the CSV
    code, out, err = run_main(evaluate, "--data_dir", images, "--checkpoint", run / "best.pt",
                              "--csv", tmp_path / "eval.csv")
    assert code == 0, err
    assert "PSNR/SSIM/MAE" in out and "MAE" in out.split("gain over bicubic")[1]
    with open(tmp_path / "eval.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["arch"] == "twoconv" and float(rows[0]["mae"]) > 0 and float(rows[0]["bicubic_mae_y"]) > 0

    # infer: the network states no receptive radius, so whole images unless --tile_pad is given
    Image.fromarray(np.full((20, 24, 3), 128, np.uint8)).save(tmp_path / "in.png")
    code, out, err = run_main(infer, tmp_path / "in.png", "--checkpoint", run / "best.pt", "-o", tmp_path / "sr.png")
    assert code == 0, err
    assert "whole images" in out and Image.open(tmp_path / "sr.png").size == (48, 40)
    code, out, err = run_main(infer, tmp_path / "in.png", "--checkpoint", run / "best.pt", "-o", tmp_path / "sr8.png",
                              "--tile", "8", "--tile_pad", "2")
    assert code == 0, err
    assert "tiles of 8 LR px with 2 px of context" in out
    assert np.array_equal(np.asarray(Image.open(tmp_path / "sr.png")), np.asarray(Image.open(tmp_path / "sr8.png")))

    # export to .safetensors and .onnx, each loads as the same network
    net, _ = load_model(run / "best.pt", torch.device("cpu"))
    x = torch.rand(1, 3, 12, 10)
    for suffix in (".safetensors", ".onnx"):
        code, _, err = run_main(train, "--export", run / "best.pt", tmp_path / f"toy{suffix}")
        assert code == 0, err
    exported, info = load_model(tmp_path / "toy.safetensors", torch.device("cpu"))
    assert info["arch"] == "twoconv" and info["training"]["epochs"] == 2
    assert torch.equal(exported(x), net(x))
    from machinery.onnx_export import onnx_session
    session, name = onnx_session(tmp_path / "toy.onnx")
    assert np.abs(session.run(None, {name: x.numpy()})[0] - net(x).detach().numpy()).max() < 1e-4

    # torch.hub: any checkpoint, through the registry
    hub_net = torch.hub.load(str(ROOT), "from_checkpoint", path=str(tmp_path / "toy.safetensors"), source="local")
    assert isinstance(hub_net, TwoConv) and torch.equal(hub_net(x), net(x).clamp(0, 1))  # hub clamps, as documented
