"""Interrupted, killed and diverging training runs lose nothing and leave only whole checkpoints."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from conftest import ROOT, TINY_RUN, make_images, read_log, run_main, run_script
from machinery import runs
from machinery.checkpoint import load_checkpoint
from model import build_network

# 15 steps an epoch (3 images x 40 patches, batch 8).
RUN = ["--num_features", "32", "--num_residuals", "2", "--patch_size", "64", "--batch_size", "8",
       "--patches_per_image", "40", "--num_epochs", "3", "--mean_shift", "--image_skip"]


def train_args(image_dir, runs, name, *extra):
    return ["--train_dir", image_dir, "--val_dir", image_dir, "--checkpoint_dir", runs, "--run_name", name,
            *RUN, *extra]


def start(args):
    """Start train.py in its own process group (as a terminal's foreground job is)."""
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(path, proc, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"train.py exited early:\n{proc.communicate()}"
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.005)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A 3-epoch run never stopped, in one precision: the reference (images, run folder)."""
    root = tmp_path_factory.mktemp("reference")
    images, done = make_images(root / "images"), {}

    def reference(precision: str):
        if precision not in done:
            # Decoded into memory: the stopped run maps the data cache, and must match it bit for bit.
            code, _, err = run_main(train, *train_args(images, root / "runs", precision, "--num_workers", "0",
                                                       "--precision", precision, "--data_cache", "none"))
            assert code == 0, err
            done[precision] = root / "runs" / precision
        return images, done[precision]

    return reference


def signal_at_step(monkeypatch, signum, step: int) -> None:
    """Make this process receive `signum` during training step `step` (1-based, counted over the run)."""
    calls = []
    real_step = train.train_step

    def step_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            signal.raise_signal(signum)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", step_then_signal)


@pytest.mark.slow
@pytest.mark.parametrize("signum, workers, precision", [(signal.SIGINT, "1", "fp32"), (signal.SIGTERM, "0", "bf16")],
                         ids=["SIGINT-fp32", "SIGTERM-bf16"])
def test_a_signal_mid_epoch_saves_there_and_resuming_gives_the_uninterrupted_weights(
        uninterrupted, tmp_path, monkeypatch, signum, workers, precision):
    images, reference = uninterrupted(precision)
    signal_at_step(monkeypatch, signum, step=15 + 6)  # epoch 2, step 6 of 15
    barriers = []  # under torchrun every process leaves together, as at a normal end
    monkeypatch.setattr(train.distributed, "barrier", lambda: barriers.append(1))
    code, out, err = run_main(train, *train_args(images, tmp_path / "runs", "stopped", "--num_workers", workers,
                                                 "--precision", precision))
    run_dir = tmp_path / "runs" / "stopped"
    assert code == 128 + signum and barriers == [1], err
    assert f"stopped by {signal.Signals(signum).name} in epoch 2 after step 6 of 15" in out
    assert f"resume with: python train.py --resume {run_dir / 'last.pt'}" in out
    stopped = load_checkpoint(run_dir / "last.pt")
    assert (stopped["epoch"], stopped["step"]) == (1, 6)
    assert [r["epoch"] for r in read_log(run_dir)] == ["1"]

    monkeypatch.undo()
    # Only the checkpoint is named: the run's own flags come from it.
    code, out, err = run_main(train, "--resume", run_dir / "last.pt")
    assert code == 0 and "in epoch 2 after step 6" in out, err
    resumed, expected = load_checkpoint(run_dir / "last.pt"), load_checkpoint(reference / "last.pt")
    assert resumed["epoch"] == expected["epoch"] == 3 and resumed["step"] == 0
    # Tolerance: none. The same arithmetic in the same order gives the same bits on CPU.
    for name, tensor in expected["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name
    for i, moments in expected["optimizer"]["state"].items():
        assert torch.equal(resumed["optimizer"]["state"][i]["exp_avg_sq"], moments["exp_avg_sq"])
    keep = ["epoch", "loss", "lr", "val_psnr", "val_ssim"]
    rows = [[r[k] for k in keep] for r in read_log(run_dir)]
    assert rows == [[r[k] for k in keep] for r in read_log(reference)]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_a_real_process_saves_and_prints_how_to_resume(image_dir, tmp_path, signum):
    run_dir = tmp_path / "runs" / "long"
    proc = start(["train.py", *train_args(image_dir, tmp_path / "runs", "long", "--num_epochs", "100000",
                                          "--patience", "0")])
    wait_for(run_dir / "last.pt", proc)
    if signum == signal.SIGINT:
        os.killpg(proc.pid, signum)  # as a terminal's Ctrl-C: the whole process group
    else:
        proc.send_signal(signum)  # as `kill` or a job scheduler
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert f"stopped by {signal.Signals(signum).name}" in out and "Traceback" not in err
    assert f"resume with: python train.py --resume {run_dir / 'last.pt'}" in out
    load_checkpoint(run_dir / "last.pt")


@pytest.mark.slow
def test_sighup_from_a_closed_terminal_saves_last_pt_and_the_run_resumes(image_dir, tmp_path):
    run_dir = tmp_path / "runs" / "hung_up"
    proc = start(["train.py", *train_args(image_dir, tmp_path / "runs", "hung_up", "--num_epochs", "100000",
                                          "--patience", "0")])
    wait_for(run_dir / "last.pt", proc)
    os.killpg(proc.pid, signal.SIGHUP)  # as a closed terminal or ssh session: the whole process group
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGHUP, err
    assert "stopped by SIGHUP" in out and "Traceback" not in err
    assert f"resume with: python train.py --resume {run_dir / 'last.pt'}" in out
    saved = load_checkpoint(run_dir / "last.pt")
    code, out, err = run_main(train, "--resume", run_dir / "last.pt", "--num_epochs", str(saved["epoch"] + 1))
    assert code == 0 and f"resumed from {run_dir / 'last.pt'}" in out, err
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == saved["epoch"] + 1


@pytest.mark.slow
def test_sigkill_at_random_moments_never_leaves_a_corrupt_checkpoint(image_dir, tmp_path):
    # A 0.6M-parameter network: its checkpoint (weights and Adam moments) takes a while to write.
    args = ["--train_dir", image_dir, "--val_dir", image_dir, "--checkpoint_dir", tmp_path / "runs",
            "--run_name", "killed", "--num_features", "64", "--num_residuals", "4", "--patch_size", "32",
            "--batch_size", "4", "--patches_per_image", "4", "--num_workers", "0", "--num_epochs", "100000",
            "--patience", "0"]
    run_dir = tmp_path / "runs" / "killed"
    rng = random.Random(0)
    mid_write_kills, epochs = 0, []
    for attempt in range(6):
        resume = ["--resume", run_dir / "last.pt"] if (run_dir / "last.pt").exists() else []
        before = (run_dir / "last.pt").stat().st_mtime_ns if resume else None
        proc = start(["train.py", *args, *resume])
        # Training runs once this process has saved last.pt.
        deadline = time.time() + 120
        while not (run_dir / "last.pt").exists() or (run_dir / "last.pt").stat().st_mtime_ns == before:
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.002)
        if attempt % 2 == 0:  # at a random moment
            time.sleep(rng.uniform(0, 0.5))
        else:  # while a checkpoint is being written
            deadline = time.time() + 20  # about 100 saves
            while not any(p.name.startswith((".last.pt.", ".best.pt.")) for p in os.scandir(run_dir)):
                assert proc.poll() is None, proc.communicate()
                assert time.time() < deadline, "checkpoints are not written through a temporary file"
        proc.kill()
        proc.wait()
        leftovers = [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]
        mid_write_kills += bool(leftovers)
        for name in ["last.pt", "best.pt"]:
            if (run_dir / name).exists():
                checkpoint = load_checkpoint(run_dir / name)  # a torn file raises here
                build_network(checkpoint["model_args"]).load_state_dict(checkpoint["model"])
        epochs.append(load_checkpoint(run_dir / "last.pt")["epoch"])
    assert mid_write_kills >= 1, "no kill landed while a checkpoint was written: the test proved nothing"
    assert epochs == sorted(epochs) and epochs[-1] > epochs[0], epochs  # every restart went on

    result = run_script("train.py", "--resume", run_dir / "last.pt", "--num_epochs", epochs[-1] + 1)
    assert "left by a run killed while writing it" in result.stderr or mid_write_kills == 0
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    assert [int(r["epoch"]) for r in read_log(run_dir)] == list(range(1, epochs[-1] + 2))


def test_a_nan_loss_stops_naming_epoch_and_iteration_and_keeps_the_last_good_checkpoint(
        image_dir, tmp_path, monkeypatch):
    calls = []
    real_step = train.train_step

    def step_that_diverges(*args, **kwargs):
        loss = real_step(*args, **kwargs)
        calls.append(1)
        return loss * float("nan") if len(calls) >= 5 else loss  # epoch 2 (3 steps each), iteration 2

    monkeypatch.setattr(train, "train_step", step_that_diverges)
    barriers = []  # under torchrun every process leaves together, as at a normal end
    monkeypatch.setattr(train.distributed, "barrier", lambda: barriers.append(1))
    runs = tmp_path / "runs"
    code, out, err = run_main(train, "--train_dir", image_dir, "--val_dir", image_dir, "--checkpoint_dir", runs,
                              "--run_name", "nan", *TINY_RUN, "--num_epochs", "5")
    assert code == 1 and "Traceback" not in err and barriers == [1]
    assert (f"epoch 2, iteration 2: the loss is nan: training stopped, the last good checkpoint is "
            f"{runs / 'nan' / 'last.pt'} (after epoch 1)") in err
    assert load_checkpoint(runs / "nan" / "last.pt")["epoch"] == 1
    assert [r["epoch"] for r in read_log(runs / "nan")] == ["1"]


def test_resume_refuses_flags_that_change_the_run(image_dir, tmp_path):
    code, _, err = run_main(train, "--train_dir", image_dir, "--val_dir", image_dir, "--checkpoint_dir", tmp_path,
                            "--run_name", "r", *TINY_RUN, "--num_epochs", "1")
    assert code == 0, err
    code, _, err = run_main(train, "--resume", tmp_path / "r" / "last.pt", "--upscale_factor", "2")
    assert code == 1 and ("started with --upscale_factor 4 (resshuffle x4, num_features 8, num_residuals 1, "
                          "mean_shift, image_skip)") in err
    code, _, err = run_main(train, "--resume", tmp_path / "r" / "last.pt", "--arch", "espcn")
    assert code == 1 and "started with --arch resshuffle" in err
    # A run flag typed again with the value the run has is no change.
    code, out, err = run_main(train, "--resume", tmp_path / "r" / "last.pt", "--num_epochs", "2",
                              "--num_features", "8", "--batch_size", "4")
    assert code == 0 and "resumed from" in out and [r["epoch"] for r in read_log(tmp_path / "r")] == ["1", "2"]


def test_a_torn_log_row_is_dropped_on_resume(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("epoch,loss,lr,val_psnr,val_ssim,seconds\n1,0.1,0.0002,30.0,0.9,1.0\n"
                   "2,0.09,0.0002,30.5,0.9,1.0\n3,0.0")
    runs.trim_log(log, keep_through=2)
    assert [r["epoch"] for r in read_log(tmp_path)] == ["1", "2"]
    log.write_text(log.read_text() + "1")  # a row torn inside its first field
    runs.trim_log(log, keep_through=2)
    assert [r["epoch"] for r in read_log(tmp_path)] == ["1", "2"]


def test_a_second_signal_quits_at_once():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)  # SIG_IGN under nohup ... &
    with runs.StopSignal() as stop:
        signal.raise_signal(signal.SIGTERM)  # its handler has run when this returns
        assert stop.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # handlers restored
