"""--precision: what auto picks on each kind of device, training and upscaling in each precision,
where a run records it; and the CUDA-only paths that a CPU can still check (pinned batches,
metrics computed with torch; channels_last after PixelShuffle is tests/test_fast.py's)."""
import csv
import signal

import numpy as np
import pytest
import torch
from PIL import Image

import dataset
import evaluate
import infer
import train
from conftest import TINY, TINY_RUN, ResShuffle, assert_one_line_error, make_images, read_log, run_main, smooth_image
from machinery import precision
from machinery.checkpoint import load_checkpoint, save_checkpoint
from machinery.upscale import upscale
from metrics import measure, measure_on_device
from training import train_step


def test_auto_follows_the_gpu_compute_capability(monkeypatch):
    """bf16 only where the GPU runs it natively (8.0+); older GPUs get fp16 with loss scaling,
    though torch.cuda.is_bf16_supported() says yes there (emulated)."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    for capability, expected in [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        choice, why = precision.choose_precision("auto", torch.device("cuda"))
        assert choice == expected and f"{capability[0]}.{capability[1]}" in why


@pytest.mark.parametrize("avx512_bf16, amx, expected", [
    (False, False, "fp32"), (True, False, "bf16"), (False, True, "bf16"), (True, True, "bf16")])
def test_auto_on_a_cpu_asks_the_hardware(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    choice, why = precision.choose_precision("auto", torch.device("cpu"))
    assert choice == expected
    assert ("no bf16 instructions" in why) == (expected == "fp32")


def test_a_precision_the_device_emulates_warns(monkeypatch, capsys):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert precision.choose_precision("bf16", torch.device("cpu")) == ("bf16", "asked for")
    assert "no native bf16" in capsys.readouterr().err
    assert precision.choose_precision("fp32", torch.device("cpu")) == ("fp32", "asked for")
    assert capsys.readouterr().err == ""
    for capability, request, warns in [((9, 0), "fp16", False), ((9, 0), "bf16", False), ((7, 5), "fp16", False),
                                        ((7, 5), "bf16", True)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        precision.choose_precision(request, torch.device("cuda"))
        assert ("no native" in capsys.readouterr().err) == warns, (capability, request)


def conv_dtypes(net: torch.nn.Module) -> list:
    """A list that fills with the output dtype of every conv the network runs."""
    seen = []
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    return seen


@pytest.mark.parametrize("name, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_a_training_step_runs_in_each_precision(name, dtype):
    torch.manual_seed(0)
    net = ResShuffle(**TINY).to(memory_format=torch.channels_last)
    seen = conv_dtypes(net)
    before = [p.detach().clone() for p in net.parameters()]
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    scaler = precision.grad_scaler(torch.device("cpu"), name)
    assert scaler.is_enabled() == (name == "fp16")
    lr, hr = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 32, 32)
    loss = train_step(net, lr, hr, optimizer, scaler, name)
    assert torch.isfinite(loss).all() and loss.shape == (2,) and seen and set(seen) == {dtype}  # total, the L1 term
    assert all(p.dtype == torch.float32 for p in net.parameters())  # the weights stay fp32
    assert all(not torch.equal(a, p) for a, p in zip(before, net.parameters()))
    if name == "fp16":
        assert scaler.get_scale() == 65536.0  # scaled, and no overflow on this step


def test_scaler_state_moves_between_runs_that_scale_and_runs_that_do_not():
    """A resumed run may change its precision: the scaler that train.py makes for the new one takes
    the state the old one saved, whichever of the two scales its loss."""
    cpu = torch.device("cpu")
    unscaled = {name: precision.grad_scaler(cpu, name).state_dict() for name in ("fp32", "bf16")}
    scaled = torch.amp.GradScaler("cpu", init_scale=128.0).state_dict()  # an fp16 run's, after overflows
    with pytest.raises(RuntimeError, match="empty"):  # torch's own loading refuses an unscaled run's state
        precision.grad_scaler(cpu, "fp16").load_state_dict(unscaled["fp32"])
    for state in (*unscaled.values(), None):  # None: a checkpoint with no "scaler" entry
        fresh = precision.grad_scaler(cpu, "fp16")
        precision.load_scaler_state(fresh, state)  # starts afresh
        assert fresh.get_scale() == 65536.0
    precision.load_scaler_state(fresh, scaled)
    assert fresh.get_scale() == 128.0 and fresh.state_dict() == scaled
    for name in ("fp32", "bf16"):  # an fp16 run resumed in fp32 or bf16 stops scaling its loss
        plain = precision.grad_scaler(cpu, name)
        precision.load_scaler_state(plain, scaled)
        assert plain.get_scale() == 1.0 and plain.state_dict() == {}


def test_a_run_records_its_precision_keeps_it_on_resume_and_may_change_it(image_dir, tmp_path):
    common = ["--train_dir", image_dir, "--val_dir", image_dir, "--checkpoint_dir", tmp_path, *TINY_RUN]
    code, out, err = run_main(train, *common, "--run_name", "r", "--num_epochs", "1", "--precision", "auto")
    assert code == 0, err
    last = tmp_path / "r" / "last.pt"
    chosen = load_checkpoint(last)["precision"]
    assert chosen in ("fp32", "bf16") and f"precision {chosen} (auto: " in out
    code, out, err = run_main(train, "--resume", last, "--num_epochs", "2")
    assert code == 0 and f"precision {chosen} (the run's; --precision changes it)" in out, err
    code, out, err = run_main(train, "--resume", last, "--num_epochs", "3", "--precision", "fp16")
    assert code == 0 and "precision fp16 (asked for)" in out, err
    assert load_checkpoint(last)["precision"] == "fp16" and load_checkpoint(last)["scaler"]
    assert [r["precision"] for r in read_log(tmp_path / "r")] == [chosen, chosen, "fp16"]


def test_a_run_saved_before_precision_existed_resumes_as_it_trained(image_dir, tmp_path):
    """Such a run trained in fp32 on a CPU: it goes on in fp32, not in what auto picks now."""
    code, _, err = run_main(train, "--train_dir", image_dir, "--val_dir", image_dir, "--checkpoint_dir", tmp_path,
                            *TINY_RUN, "--run_name", "old", "--num_epochs", "1", "--precision", "auto")
    assert code == 0, err
    last = tmp_path / "old" / "last.pt"
    checkpoint = load_checkpoint(last)
    del checkpoint["precision"], checkpoint["args"]["precision"], checkpoint["format"]  # as format 1 had it
    save_checkpoint(checkpoint, last)
    code, out, err = run_main(train, "--resume", last, "--num_epochs", "2")
    assert code == 0 and "precision fp32 (the run's; --precision changes it)" in out, err


def test_upscaling_in_bf16_stays_within_a_few_levels_of_fp32(capsys):
    torch.manual_seed(0)
    net = ResShuffle(**TINY, mean_shift=True, image_skip=True).to(memory_format=torch.channels_last).eval()
    img = smooth_image(np.random.default_rng(0), 30, 40)
    seen = conv_dtypes(net)
    exact = upscale(net, img)
    assert set(seen) == {torch.float32}
    seen.clear()
    fast = upscale(net, img, precision="bf16")
    assert set(seen) == {torch.bfloat16}
    diff = np.abs(exact.astype(int) - fast.astype(int))
    assert 0 < diff.max() <= 3 and diff.mean() < 0.5


def test_every_batch_tensor_is_made_pinned_when_asked(image_dir, monkeypatch):
    """Pinned memory needs CUDA; here the request is what is checked."""
    data = dataset.TrainDataset(image_dir, scale=4, patch_size=32, patches_per_image=2, seed=0, quiet=True)
    requests, real_empty = [], torch.empty

    def empty(*args, pin_memory=False, **kwargs):
        requests.append(pin_memory)
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(dataset.torch, "empty", empty)
    lr, hr, flips = data.batch(0, [0, 1, 2], pin_memory=True)
    assert requests == [True, True, True]
    assert flips.dtype == torch.bool and flips.shape == (3, 3)
    assert torch.equal(flips, torch.from_numpy(data.draws(0)[[0, 1, 2], 2:].astype(bool)))


@pytest.mark.parametrize("crop_border", [0, 4])
def test_metrics_computed_with_torch_equal_scikit_image(crop_border):
    rng = np.random.default_rng(1)
    hr = smooth_image(rng, 67, 90)
    for noise in (2, 20):
        sr = np.clip(hr.astype(int) + rng.integers(-noise, noise + 1, hr.shape), 0, 255).astype(np.uint8)
        ours = measure_on_device(torch.from_numpy(sr), torch.from_numpy(hr), crop_border)
        reference = measure(sr, hr, crop_border)
        assert abs(ours["psnr"] - reference["psnr"]) < 1e-4 and abs(ours["ssim"] - reference["ssim"]) < 1e-4
    assert measure_on_device(torch.from_numpy(hr), torch.from_numpy(hr), crop_border) == {"psnr": float("inf"),
                                                                                          "ssim": 1.0}


def test_cuda_memory_counts_reserved_unused_memory_and_keeps_a_margin(monkeypatch, capsys):
    from machinery import upscale as upscale_module
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 10000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 500)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 200)
    assert upscale_module.available_memory(torch.device("cuda")) == 1300
    net = ResShuffle(**TINY)
    need = net.untiled_bytes(50, 50)
    monkeypatch.setattr(upscale_module, "available_memory", lambda device: need / 0.8 * 1.2)
    assert upscale_module.fits_in_memory(net, 50, 50, torch.device("cpu"))
    assert not upscale_module.fits_in_memory(net, 50, 50, torch.device("cuda"))  # not with the margin
    assert "tiling it by" in capsys.readouterr().err


def test_a_bad_precision_in_a_checkpoint_is_one_line_before_any_work(image_dir, tmp_path):
    code, _, err = run_main(train, "--train_dir", image_dir, "--val_dir", image_dir, "--checkpoint_dir", tmp_path,
                            *TINY_RUN, "--run_name", "r", "--num_epochs", "1")
    assert code == 0, err
    last = tmp_path / "r" / "last.pt"
    checkpoint = load_checkpoint(last)
    checkpoint["precision"] = "fp64"
    save_checkpoint(checkpoint, last)
    code, out, err = run_main(train, "--resume", last, "--num_epochs", "2")
    assert_one_line_error(code, err, "holds precision 'fp64'", "pass --precision")
    assert out == ""


@pytest.mark.slow
def test_a_precision_changed_mid_epoch_shows_in_that_epochs_log_row(image_dir, tmp_path, monkeypatch):
    real_step, calls = train.train_step, []

    def step_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # epoch 1, step 2 of 3
            signal.raise_signal(signal.SIGINT)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", step_then_signal)
    code, _, err = run_main(train, "--train_dir", image_dir, "--val_dir", image_dir, "--checkpoint_dir", tmp_path,
                            *TINY_RUN, "--run_name", "r", "--num_epochs", "2")
    assert code == 128 + signal.SIGINT, err
    monkeypatch.undo()
    code, _, err = run_main(train, "--resume", tmp_path / "r" / "last.pt", "--precision", "bf16")
    assert code == 0, err
    assert [r["precision"] for r in read_log(tmp_path / "r")] == ["fp32+bf16", "bf16"]


def test_infer_says_when_its_output_is_not_fp32_and_evaluates_csv_records_it(tiny_checkpoint, tmp_path):
    src = tmp_path / "a.png"
    Image.fromarray(smooth_image(np.random.default_rng(0), 20, 30)).save(src)
    for name, shown in [("bf16", ", bf16)"), ("fp32", "(120x80)")]:
        code, out, err = run_main(infer, src, "-o", tmp_path / f"{name}.png", "--checkpoint", tiny_checkpoint,
                                  "--precision", name)
        assert code == 0 and out.strip().endswith(shown), (out, err)
    code, _, err = run_main(evaluate, "--data_dir", make_images(tmp_path / "hr"), "--checkpoint", tiny_checkpoint,
                            "--csv", tmp_path / "t.csv", "--precision", "bf16")
    assert code == 0, err
    with open(tmp_path / "t.csv", newline="") as f:
        assert {r["precision"] for r in csv.DictReader(f)} == {"bf16"}
