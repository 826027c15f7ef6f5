"""A resumed run's state in a hand-edited or damaged last.pt: every field that --resume
reads is checked, by type and range, and a bad one is one line naming it, before anything is written."""
import math
import shutil

import pytest

import train
from conftest import TINY_RUN, assert_one_line_error, make_images, run_main
from machinery.checkpoint import load_checkpoint, save_checkpoint

DAMAGED = "the run's checkpoint was edited or damaged"


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """A 2-epoch run's folder (its images as its --train_dir and --val_dir)."""
    root = tmp_path_factory.mktemp("two_epochs")
    images = make_images(root / "images")
    code, _, err = run_main(train, "--train_dir", images, "--val_dir", images, "--checkpoint_dir", root / "runs",
                            "--run_name", "r", *TINY_RUN, "--num_epochs", "2", "--data_cache", "none")
    assert code == 0, err
    return root / "runs" / "r"


def edited(two_epochs, tmp_path, edit):
    """A copy of the run whose last.pt went through `edit(checkpoint)`; its last.pt."""
    folder = tmp_path / "edited"
    shutil.copytree(two_epochs, folder)
    checkpoint = load_checkpoint(folder / "last.pt")
    edit(checkpoint)
    save_checkpoint(checkpoint, folder / "last.pt")
    return folder / "last.pt"


def setting(key, value):
    return lambda c: c.update({key: value})


def optimizer_lr(value):
    return lambda c: c["optimizer"]["param_groups"][0].update(lr=value)


def exp_avg_of_another_shape(c):
    state = c["optimizer"]["state"][0]
    state["exp_avg"] = state["exp_avg"].flatten()[:3]


@pytest.mark.parametrize("edit, needles", [
    (lambda c: c["args"].update(loss="l1+l2"), ["its term_sums is [", "2 numbers, one per term of its --loss l1+l2"]),
    (setting("term_sums", [0.0, 0.0, 0.0]), ["its term_sums is [0.0, 0.0, 0.0]", "one per term of its --loss l1"]),
    (setting("term_sums", "x"), ["its term_sums is 'x'"]),
    (setting("term_sums", [math.nan]), ["its term_sums is [nan]"]),
    (setting("epoch", "2"), ["its epoch is '2'", "a whole number"]),
    (setting("epoch", -1), ["its epoch is -1", "a whole number"]),
    (setting("step", -3), ["its step is -3"]),
    (setting("step", 3), ["its step is 3", "fewer than its steps_per_epoch, 3"]),
    (setting("steps_per_epoch", 0), ["its steps_per_epoch is 0"]),
    (setting("best_psnr", "x"), ["its best_psnr is 'x'"]),
    (setting("best_psnr", math.nan), ["its best_psnr is nan"]),
    (setting("best_epoch", -1), ["its best_epoch is -1", "a whole number"]),
    (setting("loss_sum", None), ["its loss_sum is None"]),
    (setting("seconds", -1.0), ["its seconds is -1.0"]),
    (setting("world_size", 0), ["its world_size is 0"]),
    (lambda c: c.update(step=1, epoch_precision=5), ["its epoch_precision is 5"]),
    (setting("rng", "x"), ["its rng is 'x'"]),
    (setting("rng", {"torch": "x", "cuda": None}), ["its rng is {"]),
    (setting("optimizer", {}), ["its optimizer is {}"]),
    (optimizer_lr("fast"), ["its optimizer is {"]),
    (exp_avg_of_another_shape, ["its optimizer is {"]),
    (setting("scheduler", "x"), ["its scheduler is 'x'"]),
    (lambda c: c["scheduler"].update(last_epoch="x"), ["its scheduler is {"]),
    (setting("scaler", "x"), ["its scaler is 'x'"]),
    (lambda c: c["model"].popitem(), ["its model is {", "the network's weights (", "Missing key(s) in state_dict"]),
    (setting("degradation", "bogus"), ["its degradation is 'bogus'", "pil, matlab"]),
], ids=[
    'loss_with_more_terms', 'term_sums_too_many', 'term_sums_a_string', 'term_sums_nan',
    'epoch_a_string', 'epoch_negative', 'step_negative', 'step_past_the_epoch',
    'steps_per_epoch_zero', 'best_psnr_a_string', 'best_psnr_nan', 'best_epoch_negative',
    'loss_sum_none', 'seconds_negative', 'world_size_zero', 'epoch_precision_a_number',
    'rng_a_string', 'rng_torch_a_string', 'optimizer_empty', 'optimizer_lr_a_string',
    'optimizer_state_of_another_shape', 'scheduler_a_string', 'scheduler_last_epoch_a_string', 'scaler_a_string',
    'model_missing_a_tensor', 'degradation_unregistered'])
def test_a_hand_edited_run_state_is_one_line_naming_the_field(two_epochs, tmp_path, edit, needles):
    last = edited(two_epochs, tmp_path, edit)
    before, log = last.read_bytes(), (last.parent / "log.csv").read_bytes()
    code, out, err = run_main(train, "--resume", last, "--num_epochs", "3", "--data_cache", "none")
    assert_one_line_error(code, err, f"train.py: error: {last}: ", *needles, DAMAGED)
    assert last.read_bytes() == before and (last.parent / "log.csv").read_bytes() == log
    assert "resumed from" not in out


@pytest.mark.parametrize("ema", [{"x": 1}, "x"])
def test_averaged_weights_of_another_network_are_one_line_when_a_resume_averages(two_epochs, tmp_path, ema):
    last = edited(two_epochs, tmp_path, setting("ema", ema))
    code, _, err = run_main(train, "--resume", last, "--num_epochs", "3", "--data_cache", "none", "--ema", "0.9")
    assert_one_line_error(code, err, f"its ema is {ema!r}", DAMAGED)


def test_a_long_bad_value_is_shown_short(two_epochs, tmp_path):
    last = edited(two_epochs, tmp_path, setting("term_sums", list(range(1000))))
    code, _, err = run_main(train, "--resume", last, "--num_epochs", "3", "--data_cache", "none")
    assert_one_line_error(code, err, "its term_sums is [0, 1, 2, 3, 4, 5, ...]", DAMAGED)


def test_an_unedited_run_and_one_never_validated_resume(two_epochs, tmp_path):
    last = edited(two_epochs, tmp_path, lambda c: c.update(best_psnr=-math.inf, best_epoch=0))
    code, out, err = run_main(train, "--resume", last, "--num_epochs", "3", "--data_cache", "none")
    assert code == 0 and "resumed from" in out and "not validated yet" in out, err
    assert load_checkpoint(last)["epoch"] == 3
