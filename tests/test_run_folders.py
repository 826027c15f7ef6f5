"""train.py never loses what a user made: run folders, checkpoints, logs; and it says what is
wrong in one line, before any work, when it can't go on (full disk, odd data, bad flags)."""
import csv
import resource
import signal
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import train
from conftest import ROOT, TINY_RUN, assert_one_line_error, make_images, read_log, run_main, smooth_image
from machinery.checkpoint import load_checkpoint, save_checkpoint
from machinery.files import lock_folder
from utils import UserError


def train_args(image_dir, runs, name="r", *extra):
    return ["--train_dir", image_dir, "--val_dir", image_dir, "--checkpoint_dir", runs, "--run_name", name,
            *TINY_RUN, *extra]


@pytest.fixture
def one_epoch(image_dir, tmp_path):
    """A finished 1-epoch run: (runs folder, its run folder)."""
    runs = tmp_path / "runs"
    code, _, err = run_main(train, *train_args(image_dir, runs, "r", "--num_epochs", "1"))
    assert code == 0, err
    return runs, runs / "r"


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


# ---------------------------------------------------------------- run folders

def test_a_new_run_never_writes_into_a_folder_that_holds_a_run(one_epoch, image_dir):
    runs, folder = one_epoch
    before = snapshot(folder)
    code, _, err = run_main(train, *train_args(image_dir, runs, "r", "--num_epochs", "1", "--seed", "1"))
    assert_one_line_error(code, err, folder, "holds a run already", f"--resume {folder / 'last.pt'}", "--overwrite")
    assert "decoding" not in err and snapshot(folder) == before  # refused before any work
    # Asked explicitly, a new run replaces it.
    code, _, err = run_main(train, *train_args(image_dir, runs, "r", "--num_epochs", "1", "--seed", "1",
                                                 "--overwrite"))
    assert code == 0, err
    assert load_checkpoint(folder / "last.pt")["args"]["seed"] == 1 and len(read_log(folder)) == 1


def test_two_processes_never_share_a_run_folder(one_epoch, image_dir):
    runs, folder = one_epoch
    before = snapshot(folder)
    with lock_folder(folder):  # as a run in progress holds it (flock: any other open file is refused)
        code, _, err = run_main(train, *train_args(image_dir, runs, "r", "--resume", folder / "last.pt",
                                                   "--num_epochs", "2"))
        assert_one_line_error(code, err, folder, "is using this folder")
        assert "decoding" not in err  # refused before any work
        (runs / "new").mkdir()
        with lock_folder(runs / "new"):  # a run started at the same moment under the same name
            code, _, err = run_main(train, *train_args(image_dir, runs, "new", "--num_epochs", "1"))
            assert_one_line_error(code, err, runs / "new", "is using this folder")
    assert snapshot(folder) == before and sorted(p.name for p in (runs / "new").iterdir()) == [".lock"]


def test_a_run_name_stays_inside_the_checkpoint_folder(image_dir, tmp_path):
    code, _, err = run_main(train, *train_args(image_dir, tmp_path / "runs", "../escape", "--num_epochs", "1"))
    assert code == 2 and "--run_name: '../escape' is not a folder name" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


# ---------------------------------------------------------------- resume and export

def test_resume_from_best_pt_is_refused_instead_of_rewinding_the_run(one_epoch, image_dir):
    _, folder = one_epoch
    code, _, err = run_main(train, "--resume", folder / "last.pt", "--num_epochs", "2")
    assert code == 0, err
    before = snapshot(folder)
    best_epoch = load_checkpoint(folder / "best.pt")["epoch"]
    code, _, err = run_main(train, "--resume", folder / "best.pt", "--num_epochs", "3")
    assert_one_line_error(code, err, folder / "best.pt", "would rewind the run", "copy it into a new folder")
    assert snapshot(folder) == before and best_epoch <= 2


def test_export_never_replaces_a_run_checkpoint_and_asks_before_replacing_an_export(one_epoch, tmp_path):
    _, folder = one_epoch
    before = snapshot(folder)
    code, _, err = run_main(train, "--export", folder / "last.pt", folder / "last.pt")
    assert_one_line_error(code, err, folder / "last.pt", "is the checkpoint being exported")
    code, _, err = run_main(train, "--export", folder / "best.pt", folder / "last.pt", "--overwrite")
    assert_one_line_error(code, err, folder / "last.pt", "is a run's checkpoint")
    assert snapshot(folder) == before
    out = tmp_path / "x4.pt"
    assert run_main(train, "--export", folder / "best.pt", out)[0] == 0
    exported = out.read_bytes()
    code, _, err = run_main(train, "--export", folder / "last.pt", out)
    assert_one_line_error(code, err, out, "exists; pass --overwrite")
    assert out.read_bytes() == exported
    code, stdout, err = run_main(train, "--export", folder / "last.pt", out, "--overwrite")
    assert code == 0 and "epoch 1, best val PSNR" in stdout, err
    # Exporting an export says what it is, not "epoch None, val PSNR nan".
    code, stdout, err = run_main(train, "--export", out, tmp_path / "again.pt")
    assert code == 0 and "(weights only)" in stdout, err


# ---------------------------------------------------------------- a full disk

def run_with_file_size_limit(args, limit_bytes):
    """train.py in a process that can't write files over `limit_bytes` (as a disk that fills up):
    writes past it fail with EFBIG, as they would with ENOSPC on a full disk."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return subprocess.run([sys.executable, "train.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, preexec_fn=limit, check=False)


@pytest.mark.slow
@pytest.mark.parametrize("room, failing", [("log", "log.csv: "), ("checkpoint", ".pt: ")])
def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint_and_the_log(one_epoch, room, failing):
    _, folder = one_epoch
    before = snapshot(folder)
    # Room for the log as it is, not for one more row; or for the log, not a checkpoint.
    limit = len(before["log.csv"]) + 10 if room == "log" else 20_000
    assert len(before["log.csv"]) + 60 < 20_000 < len(before["last.pt"])
    result = run_with_file_size_limit(["--resume", folder / "last.pt", "--num_epochs", "2"], limit)
    assert_one_line_error(result.returncode, result.stderr, failing, "could not be written",
                          f"{folder / 'last.pt'} (after epoch 1) is intact", "--resume")
    after = snapshot(folder)  # no temporary file left; the log whole, not 0 bytes
    assert after.pop("log.csv").startswith(before.pop("log.csv")) and after == before
    assert load_checkpoint(folder / "last.pt")["epoch"] == 1


def test_a_failed_torch_save_says_the_disk_is_full(tmp_path, monkeypatch):
    """torch's zip writer reports a full disk as a RuntimeError ('enforce fail at inline_container.cc')."""
    save_checkpoint({"model": {}, "model_args": {}}, tmp_path / "last.pt")
    before = (tmp_path / "last.pt").read_bytes()

    def full(obj, f):
        with open(f, "wb") as out:
            out.write(b"PK\x03\x04partial")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0\nmore lines")
    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr("shutil.disk_usage", lambda p: SimpleNamespace(free=0))
    with pytest.raises(UserError) as e:
        save_checkpoint({"model": {}, "model_args": {}}, tmp_path / "last.pt")
    assert str(e.value) == (f"{tmp_path / 'last.pt'}: could not be written (the write failed: unexpected pos 64 vs 0; "
                            f"the disk is "
                            f"full); the file there before is unchanged")
    assert (tmp_path / "last.pt").read_bytes() == before and sorted(tmp_path.iterdir()) == [tmp_path / "last.pt"]


# ---------------------------------------------------------------- odd data and flags

def test_a_mid_epoch_resume_with_a_smaller_training_set_starts_that_epoch_over(one_epoch, tmp_path):
    _, folder = one_epoch
    state = load_checkpoint(folder / "last.pt")
    state.update(epoch=0, step=2, loss_sum=0.2)  # as if stopped in epoch 1 after step 2 of 3
    save_checkpoint(state, folder / "last.pt")
    one = make_images(tmp_path / "one")
    for p in sorted(one.iterdir())[1:]:
        p.unlink()  # 1 image x 4 patches: 1 step per epoch
    code, out, err = run_main(train, "--resume", folder / "last.pt", "--train_dir", one, "--num_epochs", "1")
    assert code == 0, err
    assert "the training set has changed since the run stopped in epoch 1 at step 2: that epoch starts over, " \
           "with 1 step" in err
    assert "train: 1 image, 4 patches of 32px per epoch, 1 step of 4" in out
    assert load_checkpoint(folder / "last.pt")["epoch"] == 1


def test_images_too_small_to_measure_are_named_before_any_work(image_dir, tmp_path):
    val = tmp_path / "val"
    val.mkdir()
    Image.fromarray(smooth_image(np.random.default_rng(1), 12, 12)).save(val / "tiny.png")
    runs = tmp_path / "runs"
    code, _, err = run_main(train, "--train_dir", image_dir, "--val_dir", val, "--checkpoint_dir", runs,
                            *TINY_RUN, "--num_epochs", "1")
    assert_one_line_error(code, err, val / "tiny.png", "12x12 is too small to measure at x4")
    assert "decoding" not in err and not runs.exists()  # no empty run folder left behind


def test_a_negative_seed_and_a_log_that_is_a_folder_are_one_line(one_epoch, image_dir):
    runs, folder = one_epoch
    code, _, err = run_main(train, *train_args(image_dir, runs, "s", "--seed", "-1"))
    assert code == 2 and "argument --seed: must be in 0 to 4294967295, got -1" in err and "Traceback" not in err
    (folder / "log.csv").unlink()
    (folder / "log.csv").mkdir()
    code, _, err = run_main(train, "--resume", folder / "last.pt", "--num_epochs", "2")
    assert_one_line_error(code, err, folder / "log.csv", "is not a regular file")


# ---------------------------------------------------------------- said at once

def test_nothing_to_do_and_a_mistyped_folder_are_said_before_decoding(one_epoch, image_dir, tmp_path):
    runs, folder = one_epoch
    code, out, err = run_main(train, "--resume", folder / "last.pt", "--num_epochs", "1")
    assert code == 0 and "trained 1 of --num_epochs 1 already; nothing to do" in out and "decoding" not in err
    code, _, err = run_main(train, "--train_dir", image_dir, "--val_dir", tmp_path / "vla", "--checkpoint_dir", runs,
                            *TINY_RUN)
    assert_one_line_error(code, err, tmp_path / "vla", "no such folder")
    assert "decoding" not in err


def test_resuming_under_another_process_count_says_so(capsys):
    run = SimpleNamespace(world_size=1, lead=True, args=SimpleNamespace(batch_size=2), steps_per_epoch=16,
                          step=0, epoch=1)
    train.note_process_count(run, {"world_size": 2, "steps_per_epoch": 8})
    assert "the run had 2 processes (4 patches per step), this has 1 (2 per step, 16 steps per epoch)" in \
           capsys.readouterr().out


def test_only_rank_0_shows_the_decoding_bar(image_dir, capsys):
    args = train.parse_args(["--train_dir", str(image_dir), "--data_cache", "none", *TINY_RUN])
    train.make_loader(args, scale=4, rank=1, world_size=2, device=torch.device("cpu"))
    assert capsys.readouterr().err == ""
    train.make_loader(args, scale=4, rank=0, world_size=2, device=torch.device("cpu"))
    assert "decoding images" in capsys.readouterr().err


def test_only_rank_0_shows_the_caching_bar_and_says_where_the_cache_is(image_dir, tmp_path, capsys, monkeypatch):
    args = train.parse_args(["--train_dir", str(image_dir), "--data_cache", str(tmp_path / "cache"), *TINY_RUN])
    train.make_loader(args, scale=4, rank=0, world_size=2, device=torch.device("cpu"))
    out = capsys.readouterr()
    assert "caching images" in out.err and f"data cache: built {tmp_path / 'cache'}" in out.out
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    train.make_loader(args, scale=4, rank=1, world_size=2, device=torch.device("cpu"))
    assert capsys.readouterr() == ("", "")


def test_a_lock_file_that_cannot_be_opened_is_one_line(image_dir, tmp_path):
    runs = tmp_path / "runs"
    (runs / "odd").mkdir(parents=True)
    (runs / "odd" / ".lock").mkdir()
    code, _, err = run_main(train, *train_args(image_dir, runs, "odd", "--num_epochs", "1"))
    assert_one_line_error(code, err, runs / "odd" / ".lock", "can't be opened as a lock file")


def test_export_makes_the_missing_folders_of_its_output(one_epoch, tmp_path):
    _, folder = one_epoch
    code, _, err = run_main(train, "--export", folder / "best.pt", tmp_path / "new" / "deeper" / "x4.pt")
    assert code == 0 and (tmp_path / "new" / "deeper" / "x4.pt").is_file(), err  # folders made, as everywhere


def test_a_run_resumes_from_any_folder(image_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(image_dir.parent)
    code, _, err = run_main(train, *train_args(image_dir.name, "runs", "rel", "--num_epochs", "1"))
    assert code == 0, err
    monkeypatch.chdir("/")
    code, out, err = run_main(train, "--resume", tmp_path / "runs" / "rel" / "last.pt", "--num_epochs", "2")
    assert code == 0 and "resumed from" in out and "after epoch 1" in out, err


def test_a_column_the_user_added_to_the_log_is_kept(one_epoch):
    _, folder = one_epoch
    rows = read_log(folder)
    with open(folder / "log.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], "note"])
        writer.writeheader()
        writer.writerows([r | {"note": "lr looks high"} for r in rows])
    code, _, err = run_main(train, "--resume", folder / "last.pt", "--num_epochs", "2")
    assert code == 0, err
    assert [(r["epoch"], r["note"]) for r in read_log(folder)] == [("1", "lr looks high"), ("2", "")]


def test_a_run_that_saved_no_last_pt_is_refused_naming_overwrite(image_dir, tmp_path):
    runs = tmp_path / "runs"
    (runs / "early").mkdir(parents=True)
    (runs / "early" / "log.csv").write_text("epoch,loss,lr,val_psnr,val_ssim,seconds\n1,0.1,0.0002,,,1.0\n")
    code, _, err = run_main(train, *train_args(image_dir, runs, "early", "--num_epochs", "1"))
    assert_one_line_error(code, err, "saved no last.pt to resume", "--overwrite")


def test_a_batch_an_epoch_cannot_fill_is_said_before_decoding(image_dir, tmp_path):
    code, _, err = run_main(train, *train_args(image_dir, tmp_path / "runs", "big", "--num_epochs", "1",
                                               "--batch_size", "64"))
    assert_one_line_error(code, err, "12 patches per epoch is less than one batch of 64")
    assert "decoding" not in err


def test_a_patch_size_no_image_can_hold_is_one_line(image_dir, tmp_path):
    code, _, err = run_main(train, *train_args(image_dir, tmp_path / "runs", "huge", "--num_epochs", "1",
                                               "--patch_size", "400"))
    assert_one_line_error(code, err, "none of its 3 images is readable and at least 400x400: lower --patch_size")


def test_resume_naming_a_run_folder_points_at_its_last_pt(one_epoch):
    _, folder = one_epoch
    code, _, err = run_main(train, "--resume", folder, "--num_epochs", "2")
    assert_one_line_error(code, err, f"is a run's folder; name its checkpoint: {folder / 'last.pt'}")


def test_a_users_own_tmp_file_in_the_run_folder_is_not_taken_for_a_killed_write(one_epoch):
    _, folder = one_epoch
    (folder / ".notes.tmp").write_text("mine")
    code, _, err = run_main(train, "--resume", folder / "last.pt", "--num_epochs", "2")
    assert code == 0 and (folder / ".notes.tmp").read_text() == "mine", err


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_new_run_never_replaces_curves_or_tensorboard_files_no_run_made(image_dir, tmp_path, overwrite):
    folder = tmp_path / "runs" / "u"
    (folder / "tensorboard" / "o").mkdir(parents=True)
    (folder / "tensorboard" / "o" / "ev").write_text("x")
    Image.fromarray(smooth_image(np.random.default_rng(0), 8, 8)).save(folder / "curves.png")
    before = (folder / "curves.png").read_bytes()
    code, _, err = run_main(train, *train_args(image_dir, tmp_path / "runs", "u", "--num_epochs", "1", *overwrite))
    assert_one_line_error(code, err, "a new run would write there, and no run made it")
    assert (folder / "curves.png").read_bytes() == before and (folder / "tensorboard" / "o" / "ev").read_text() == "x"
    assert sorted(p.name for p in folder.iterdir()) == ["curves.png", "tensorboard"]


@pytest.mark.slow
def test_a_full_disk_during_a_safetensors_export_is_one_line_and_writes_nothing(tiny_checkpoint, tmp_path):
    out = tmp_path / "x4.safetensors"
    result = run_with_file_size_limit(["--export", tiny_checkpoint, out], 1000)
    assert_one_line_error(result.returncode, result.stderr, f"{out}: could not be written (File too large",
                          "nothing was written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.pt"]


@pytest.mark.slow
def test_a_full_disk_with_tensorboard_is_one_line_and_keeps_the_last_checkpoint(image_dir, tmp_path):
    pytest.importorskip("tensorboard")
    folder = tmp_path / "runs" / "r"
    # Files of up to 160,000 bytes: a checkpoint (about 150 KB) and one epoch's events (about 110 KB) fit,
    # two epochs' events do not.
    result = run_with_file_size_limit(train_args(image_dir, tmp_path / "runs", "r", "--num_epochs", "3",
                                                 "--tensorboard"), 160_000)
    assert_one_line_error(result.returncode, result.stderr, "tensorboard: TensorBoard events could not be written",
                          f"{folder / 'last.pt'} (after epoch 2) is intact", "--resume")
    assert load_checkpoint(folder / "last.pt")["epoch"] == 2 and len(read_log(folder)) == 2
    # The sizes the limit was chosen for: the checkpoint fits, the events file ran into it.
    events = max(p.stat().st_size for p in (folder / "tensorboard").iterdir())
    assert (folder / "last.pt").stat().st_size < 160_000 == events
