"""Training to look at: curves.png at every validation, --tensorboard, plot.py."""
import sys

import numpy as np
import pytest
from PIL import Image

import plot
import train
from conftest import ROOT, TINY_RUN, assert_one_line_error, read_log, run_main
from metrics import METRICS

# curves.png: a panel per metric, the loss and the learning rate, 4.4 x 3.6 inches each at 80 dpi
CURVES_SIZE = (round(4.4 * (len(METRICS) + 2) * 80), 288)


def train_tiny(image_dir, runs, *extra):
    return run_main(train, "--train_dir", image_dir, "--val_dir", image_dir, "--checkpoint_dir", runs, *TINY_RUN,
                    "--run_name", "r", *extra)


def test_a_short_run_leaves_curves_png_redrawn_at_every_validation(image_dir, tmp_path):
    code, _, err = train_tiny(image_dir, tmp_path, "--num_epochs", "3", "--val_every", "2")
    assert code == 0, err
    png = tmp_path / "r" / "curves.png"
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape == (*CURVES_SIZE[::-1], 3) and len(np.unique(img.reshape(-1, 3), axis=0)) > 50  # drawn, not blank
    rows = read_log(tmp_path / "r")
    assert [r["bicubic_psnr"] != "" for r in rows] == [False, True, True]  # epochs 2 and 3 validated


def test_tensorboard_gets_the_scalars_and_validation_crops(image_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    code, _, err = train_tiny(image_dir, tmp_path, "--num_epochs", "2", "--tensorboard")
    assert code == 0, err
    events = EventAccumulator(str(tmp_path / "r" / "tensorboard"), size_guidance={"images": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"loss", "loss_l1", "lr", "val_psnr", "val_ssim", "bicubic_psnr", "bicubic_ssim"} <= scalars
    psnr = [(e.step, round(e.value, 4)) for e in events.Scalars("val_psnr")]
    assert psnr == [(int(r["epoch"]), float(r["val_psnr"])) for r in read_log(tmp_path / "r")]
    assert sorted(events.Tags()["images"]) == ["val/img0.png", "val/img1.png", "val/img2.png"]
    image = events.Images("val/img0.png")[-1]
    assert (image.width, image.height) == (3 * 64, 64)  # bicubic | SR | HR of the 64x80 image's centre


def test_tensorboard_missing_is_one_line_before_any_work(image_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    code, out, err = train_tiny(image_dir, tmp_path / "runs", "--num_epochs", "1", "--tensorboard")
    assert_one_line_error(code, err, "--tensorboard needs the tensorboard package: pip install tensorboard")
    assert out == "" and not (tmp_path / "runs").exists()


def test_a_tensorboard_run_resumes_without_it_where_the_package_is_missing(image_dir, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    assert train_tiny(image_dir, tmp_path, "--num_epochs", "1", "--tensorboard")[0] == 0
    events = sorted((tmp_path / "r" / "tensorboard").iterdir())
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "torch.utils.tensorboard", None)
        code, out, err = run_main(train, "--resume", tmp_path / "r" / "last.pt", "--num_epochs", "2")
        assert code == 0 and "going on without it" in err and "epoch 2:" in out, err
        assert sorted((tmp_path / "r" / "tensorboard").iterdir()) == events and len(read_log(tmp_path / "r")) == 2
        # Typed on resume, it is asked for: one line, as for a new run.
        code, _, err = run_main(train, "--resume", tmp_path / "r" / "last.pt", "--num_epochs", "3", "--tensorboard")
        assert_one_line_error(code, err, "--tensorboard needs the tensorboard package")
    # Installed again, the run logs again: it is still a --tensorboard run.
    assert run_main(train, "--resume", tmp_path / "r" / "last.pt", "--num_epochs", "3")[0] == 0
    assert len(list((tmp_path / "r" / "tensorboard").iterdir())) == len(events) + 1


def test_tensorboard_is_turned_off_on_resume_with_no_tensorboard(image_dir, tmp_path):
    pytest.importorskip("tensorboard")
    assert train_tiny(image_dir, tmp_path, "--num_epochs", "1", "--tensorboard")[0] == 0
    events = sorted((tmp_path / "r" / "tensorboard").iterdir())
    code, _, err = run_main(train, "--resume", tmp_path / "r" / "last.pt", "--num_epochs", "2", "--no-tensorboard")
    assert code == 0, err
    assert sorted((tmp_path / "r" / "tensorboard").iterdir()) == events


def test_plot_draws_the_shipped_log_and_keeps_what_exists(tmp_path):
    out = tmp_path / "curves.png"
    log = ROOT / "checkpoints" / "resshuffle_x4.log.csv"
    epochs = len(log.read_text().splitlines()) - 1  # the header
    code, stdout, err = run_main(plot, log, "-o", out)
    assert code == 0 and f"({epochs} epochs)" in stdout, err
    assert Image.open(out).size == CURVES_SIZE
    before = out.read_bytes()
    code, _, err = run_main(plot, log, "-o", out)
    assert_one_line_error(code, err, "exists; pass --overwrite")
    assert out.read_bytes() == before
    code, _, err = run_main(plot, tmp_path / "missing.csv")
    assert_one_line_error(code, err, "missing.csv: no such log file")


def test_plot_writes_only_pngs_never_over_its_log_and_names_a_bad_value(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("epoch,loss,lr,val_psnr\n1,0.05,0.0002,25.1\n")
    code, _, err = run_main(plot, log, "-o", log, "--overwrite")
    assert_one_line_error(code, err, "plot.py writes a PNG")
    assert log.read_text().startswith("epoch,loss")
    log.write_text("epoch,loss,lr,val_psnr\n1,abc,0.0002,25.1\n")
    code, _, err = run_main(plot, log)
    assert_one_line_error(code, err, "log.csv: could not convert string to float: 'abc'")
    assert not (tmp_path / "log_curves.png").exists()


def test_overwriting_a_run_removes_its_tensorboard_events(image_dir, tmp_path):
    pytest.importorskip("tensorboard")
    assert train_tiny(image_dir, tmp_path, "--num_epochs", "1", "--tensorboard")[0] == 0
    assert list((tmp_path / "r" / "tensorboard").iterdir())
    assert train_tiny(image_dir, tmp_path, "--num_epochs", "1", "--overwrite")[0] == 0
    assert not (tmp_path / "r" / "tensorboard").exists()


def test_plot_after_a_run_writes_beside_the_log_without_touching_the_runs_curves(image_dir, tmp_path):
    code, _, err = train_tiny(image_dir, tmp_path, "--num_epochs", "1")
    assert code == 0, err
    run_curves = (tmp_path / "r" / "curves.png").read_bytes()
    code, out, err = run_main(plot, tmp_path / "r")  # the run's folder stands for its log.csv
    assert code == 0, err
    assert (tmp_path / "r" / "log_curves.png").is_file() and "log_curves.png" in out
    assert "(1 epoch)" in out  # not "1 epochs"
    assert (tmp_path / "r" / "curves.png").read_bytes() == run_curves


def test_a_tensorboard_file_where_the_run_keeps_its_events_is_one_line(image_dir, tmp_path):
    pytest.importorskip("tensorboard")
    assert train_tiny(image_dir, tmp_path, "--num_epochs", "1")[0] == 0
    (tmp_path / "r" / "tensorboard").write_text("mine")
    code, _, err = run_main(train, "--resume", tmp_path / "r" / "last.pt", "--num_epochs", "2", "--tensorboard")
    assert_one_line_error(code, err, "tensorboard: is not a folder, where the run keeps its TensorBoard events")
    assert (tmp_path / "r" / "tensorboard").read_text() == "mine"
