"""train.py as a user runs it: a short run, its checkpoints and log, resume, export, early stopping, bad flags."""
import shutil

import pytest
import torch

import infer
import train
from conftest import TINY_RUN, make_images, read_log, run_main, run_script
from machinery.checkpoint import load_checkpoint

TWO_EPOCHS = [*TINY_RUN, "--step_size", "1", "--gamma", "0.5", "--num_epochs", "2"]


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """A 2-epoch run of train.py in its own process, as a user starts it: (stdout, images, run folder)."""
    root = tmp_path_factory.mktemp("two_epochs")
    images = make_images(root / "images")
    result = run_script("train.py", "--train_dir", images, "--val_dir", images, "--checkpoint_dir", root / "runs",
                        "--run_name", "tiny", *TWO_EPOCHS)
    return result.stdout, images, root / "runs" / "tiny"


@pytest.mark.slow
def test_a_run_writes_last_best_and_one_log_row_per_epoch(two_epochs):
    stdout, _, run_dir = two_epochs
    assert {p.name for p in run_dir.iterdir()} == {"last.pt", "best.pt", "log.csv", "curves.png", ".lock"}
    assert "val bicubic" in stdout and "epoch 2: loss" in stdout
    log = read_log(run_dir)
    assert [r["epoch"] for r in log] == ["1", "2"]
    assert [float(r["lr"]) for r in log] == [2e-4, 1e-4]  # StepLR, step 1, gamma 0.5
    assert all(float(r["val_psnr"]) > 10 and 0 < float(r["val_ssim"]) <= 1 for r in log)


@pytest.mark.slow
def test_last_pt_holds_the_whole_run_state(two_epochs):
    _, _, run_dir = two_epochs
    last = load_checkpoint(run_dir / "last.pt")
    assert last["epoch"] == 2 and last["step"] == 0 and last["model_args"]["num_features"] == 8
    assert {"model", "optimizer", "scheduler", "scaler", "best_psnr", "best_epoch", "rng", "args"} <= last.keys()
    best_in_log = max(float(r["val_psnr"]) for r in read_log(run_dir))
    assert abs(last["best_psnr"] - best_in_log) < 1e-4  # the log rounds to 4 digits


@pytest.mark.slow
def test_resume_goes_on_with_the_optimizer_state_and_lr_schedule(two_epochs, tmp_path):
    _, images, run_dir = two_epochs
    run_dir = shutil.copytree(run_dir, tmp_path / "tiny")
    before = load_checkpoint(run_dir / "last.pt")
    code, out, err = run_main(train, "--train_dir", images, "--val_dir", images, "--num_epochs", "3",
                              "--resume", run_dir / "last.pt")
    assert code == 0, err
    assert "after epoch 2, lr 5e-05" in out
    log = read_log(run_dir)
    assert [r["epoch"] for r in log] == ["1", "2", "3"] and float(log[2]["lr"]) == 5e-5
    after = load_checkpoint(run_dir / "last.pt")
    assert after["epoch"] == 3
    # Adam's step count went on from the checkpoint: 3 epochs' worth.
    steps_per_epoch = float(before["optimizer"]["state"][0]["step"]) / 2
    assert all(float(s["step"]) == 3 * steps_per_epoch for s in after["optimizer"]["state"].values())
    assert not torch.equal(after["model"]["tail.weight"], before["model"]["tail.weight"])


@pytest.mark.slow
def test_an_export_holds_the_weights_only_and_infer_loads_it(two_epochs, tmp_path):
    _, images, run_dir = two_epochs
    exported = tmp_path / "weights.pt"
    code, out, err = run_main(train, "--export", run_dir / "best.pt", exported)
    assert code == 0, err
    held = torch.load(exported, weights_only=True)
    assert set(held) == {"model", "model_args", "degradation", "training"}  # no --ema
    best_epoch = load_checkpoint(run_dir / "best.pt")["epoch"]
    logged = sum(float(r["seconds"]) for r in read_log(run_dir) if int(r["epoch"]) <= best_epoch)
    assert held["training"] == {"epochs": best_epoch, "steps": 3 * best_epoch, "seconds": round(logged, 1),
                                "precision": "fp32", "recipe": "seed"}
    code, _, err = run_main(infer, images / "img0.png", "-o", tmp_path / "sr.png", "--checkpoint", exported)
    assert code == 0 and (tmp_path / "sr.png").exists(), err


@pytest.mark.slow
def test_an_export_cannot_be_resumed(two_epochs, tmp_path):
    _, images, run_dir = two_epochs
    assert run_main(train, "--export", run_dir / "best.pt", tmp_path / "weights.pt")[0] == 0
    code, _, err = run_main(train, "--train_dir", images, "--resume", tmp_path / "weights.pt")
    assert code == 1 and "holds weights only; --resume needs a run's last.pt" in err


def test_early_stopping_says_why(image_dir, tmp_path):
    # A learning rate this small cannot change the uint8 output, so validation never improves.
    code, out, err = run_main(train, "--train_dir", image_dir, "--val_dir", image_dir, "--checkpoint_dir", tmp_path,
                              "--run_name", "tiny", *TINY_RUN, "--num_epochs", "10", "--lr", "1e-14",
                              "--patience", "2")
    assert code == 0, err
    assert "early stopping: no validation PSNR gain for 2 epochs" in out
    assert [r["epoch"] for r in read_log(tmp_path / "tiny")] == ["1", "2", "3"]


@pytest.mark.parametrize("flags, message", [(["--batch_size", "0"], "must be >= 1"),
                                            (["--lr", "-1"], "positive number"),
                                            (["--upscale_factor", "5"], "invalid choice"),
                                            (["--patch_size", "30"], "not a multiple of the scale 4")])
def test_a_bad_flag_is_one_line_before_training(image_dir, tmp_path, flags, message):
    code, _, err = run_main(train, "--train_dir", image_dir, "--val_dir", image_dir, "--checkpoint_dir", tmp_path,
                            *TINY_RUN, *flags)
    assert code == 2 and message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == [image_dir]  # no run folder


def test_a_training_set_smaller_than_one_batch_is_refused(image_dir, tmp_path):
    code, _, err = run_main(train, "--train_dir", image_dir, "--val_dir", image_dir, "--checkpoint_dir", tmp_path,
                            *TINY_RUN, "--batch_size", "64")
    assert code == 1 and "12 patches per epoch is less than one batch of 64" in err


def test_every_flag_of_train_py_says_what_it_is_to_a_run():
    parser = train.build_parser()
    dests = {a.dest for a in parser._actions if a.dest != "help"}  # the test may look inside argparse; train.py doesn't
    assert set(train.FLAGS) == dests and set(train.FLAGS.values()) == {"run", "session", "command"}


def test_untyped_flags_take_argparse_defaults_and_typed_ones_are_given_even_at_their_default():
    plain = vars(train.build_parser().parse_args(["--lr", "2e-4"]))
    args = train.parse_args(["--lr", "2e-4", "--no-tensorboard", "--max_images", "3"])
    assert args.given == ["lr", "max_val_images", "tensorboard"]
    assert {k: getattr(args, k) for k in plain if k != "max_val_images"} == {k: v for k, v in plain.items()
                                                                             if k != "max_val_images"}
    assert args.max_val_images == 3 and not args.tensorboard
