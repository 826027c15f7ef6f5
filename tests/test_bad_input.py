"""Bad input to infer.py and evaluate.py: one-line errors naming the file, exit 1, no output;
unusual but valid images handled and said so."""
import os

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

import evaluate
import infer
from conftest import TINY, ResShuffle, assert_one_line_error, run_main, run_script, smooth_image
from machinery import upscale as upscale_module
from machinery.checkpoint import load_model, save_checkpoint
from machinery.upscale import upscale


@pytest.fixture
def photo():
    """A 30x20 RGB image."""
    return Image.fromarray(smooth_image(np.random.default_rng(7), 20, 30))


def broken_files(folder, photo):
    """name -> path of files that are not readable images."""
    folder.mkdir(exist_ok=True)
    photo.save(folder / "whole.png")
    photo.save(folder / "whole.jpg", quality=95)
    files = {"zero-byte": folder / "empty.png", "truncated PNG": folder / "cut.png",
             "truncated JPEG": folder / "cut.jpg", "text as .png": folder / "text.png"}
    files["zero-byte"].write_bytes(b"")
    files["truncated PNG"].write_bytes((folder / "whole.png").read_bytes()[:200])
    files["truncated JPEG"].write_bytes((folder / "whole.jpg").read_bytes()[:600])
    files["text as .png"].write_text("not an image\n")
    (folder / "whole.png").unlink()
    (folder / "whole.jpg").unlink()
    return files


def test_unreadable_inputs_are_one_line_errors_with_no_output(tiny_checkpoint, tmp_path, photo):
    files = broken_files(tmp_path / "in", photo)
    files["missing"] = tmp_path / "in" / "missing.png"
    for kind, path in files.items():
        out = tmp_path / "out.png"
        code, _, err = run_main(infer, path, "-o", out, "--checkpoint", tiny_checkpoint)
        expected = "no such file" if kind == "missing" else "not a readable image"
        assert_one_line_error(code, err, path, expected)
        assert not out.exists() and not list(tmp_path.glob(".*.tmp")), kind

    empty = tmp_path / "empty_dir"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    for module, args in [(infer, [empty]), (evaluate, ["--data_dir", empty]),
                         (evaluate, ["--data_dir", tmp_path / "nowhere"])]:
        code, _, err = run_main(module, *args, "--checkpoint", tiny_checkpoint)
        assert_one_line_error(code, err, args[-1])

    # evaluate.py names the broken file of a data folder, and writes no CSV.
    for path in files.values():
        if path.exists():
            folder = tmp_path / f"eval_{path.name}"
            folder.mkdir()
            os.link(path, folder / path.name)
            code, _, err = run_main(evaluate, "--data_dir", folder, "--checkpoint", tiny_checkpoint,
                                    "--csv", tmp_path / "t.csv")
            assert code == 1 and f"{folder / path.name}: not a readable image" in err and "Traceback" not in err
            assert not (tmp_path / "t.csv").exists()


def test_an_image_too_small_for_the_scale(tiny_checkpoint, tmp_path):
    # infer.py: any size is valid input (1x1 -> 4x4, in test_every_kind_of_image...); evaluate.py
    # needs an HR image of at least scale x scale to make an LR image from.
    folder = tmp_path / "small"
    folder.mkdir()
    Image.fromarray(np.zeros((3, 5, 3), np.uint8)).save(folder / "tiny.png")
    code, _, err = run_main(evaluate, "--data_dir", folder, "--checkpoint", tiny_checkpoint)
    assert_one_line_error(code, err, folder / "tiny.png", "5x3 is too small to measure at x4")


def test_a_folder_with_bad_files_writes_the_others_and_fails_naming_them(tiny_checkpoint, tmp_path, photo):
    folder = tmp_path / "in"
    broken_files(folder, photo)
    photo.save(folder / "good.png")
    photo.save(folder / "good.jpg")  # same stem: the outputs must not overwrite each other
    code, _, err = run_main(infer, folder, "-o", tmp_path / "out", "--checkpoint", tiny_checkpoint)
    assert code == 1 and "4 of 6 images failed, the other 2 were written" in err and "Traceback" not in err
    for name in ["empty.png", "cut.png", "cut.jpg", "text.png"]:
        assert f"skipped: {folder / name}: not a readable image" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good_jpg_x4.png", "good_png_x4.png"]


def test_every_kind_of_image_is_upscaled_and_said_so(tiny_checkpoint, tmp_path, photo):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.array([[[200, 100, 50]]], np.uint8)).save(src / "one_pixel.png")
    photo.convert("L").save(src / "gray.png")
    photo.convert("LA").save(src / "gray_alpha.png")
    photo.convert("RGBA").save(src / "rgba.png")
    photo.convert("P").save(src / "palette_transparent.png", transparency=0)
    Image.fromarray(np.asarray(photo.convert("L"), np.uint16) * 257).save(src / "gray16.png")
    photo.save(src / "rgb.jpg", quality=98, subsampling=0)
    photo.convert("CMYK").save(src / "cmyk.jpg", quality=98, subsampling=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    photo.transpose(Image.Transpose.ROTATE_90).save(src / "exif_rotated.jpg", quality=98, subsampling=0,
                                                         exif=exif)
    assert Image.open(src / "gray16.png").mode == "I;16" and Image.open(src / "cmyk.jpg").mode == "CMYK"

    code, out, err = run_main(infer, src, "-o", tmp_path / "out", "--checkpoint", tiny_checkpoint)
    assert code == 0, err
    result = {p.stem.removesuffix("_x4"): Image.open(p) for p in (tmp_path / "out").iterdir()}
    expected = {"one_pixel": ("RGB", (4, 4)), "gray": ("L", (120, 80)), "gray_alpha": ("LA", (120, 80)),
                "rgba": ("RGBA", (120, 80)), "palette_transparent": ("RGBA", (120, 80)),
                "gray16": ("L", (120, 80)), "rgb": ("RGB", (120, 80)), "cmyk": ("RGB", (120, 80)),
                "exif_rotated": ("RGB", (120, 80))}  # displayed upright: the EXIF rotation applied
    assert {k: (v.mode, v.size) for k, v in result.items()} == expected
    assert "gray16.png (30x20, read and written as 8-bit)" in out
    # 16-bit values are scaled to 8 bits, not clipped; CMYK and EXIF-rotated JPEGs hold the same picture.
    gray = np.asarray(result["gray"], float)
    assert np.abs(np.asarray(result["gray16"], float) - gray).mean() < 1
    rgb = np.asarray(result["rgb"], float)
    assert np.abs(np.asarray(result["cmyk"], float) - rgb).mean() < 6
    assert np.abs(np.asarray(result["exif_rotated"], float) - rgb).mean() < 6

    code, out, err = run_main(infer, src / "rgba.png", "-o", tmp_path / "rgba.jpg", "--checkpoint", tiny_checkpoint)
    assert code == 0 and "alpha dropped: JPEG has none" in out and Image.open(tmp_path / "rgba.jpg").mode == "RGB"


def test_output_in_a_missing_or_read_only_folder(tiny_checkpoint, tmp_path, photo, unwritable_dir):
    photo.save(tmp_path / "a.png")
    code, _, err = run_main(infer, tmp_path / "a.png", "-o", f"{unwritable_dir}/a4.png",
                            "--checkpoint", tiny_checkpoint)
    assert_one_line_error(code, err, unwritable_dir, "can't create files there")
    code, _, err = run_main(evaluate, "--data_dir", tmp_path, "--checkpoint", tiny_checkpoint,
                            "--save_dir", f"{unwritable_dir}/sr")
    assert_one_line_error(code, err, unwritable_dir, "can't create files there")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "read_only", "tiny.pt"]
    # A missing output folder is made, in every script.
    code, _, err = run_main(infer, tmp_path / "a.png", "-o", tmp_path / "missing" / "a4.png",
                            "--checkpoint", tiny_checkpoint)
    assert code == 0 and (tmp_path / "missing" / "a4.png").is_file(), err


def test_an_untiled_image_too_big_for_memory_is_tiled_instead(tiny_checkpoint, monkeypatch, capsys):
    model, _ = load_model(tiny_checkpoint, torch.device("cpu"))
    img = smooth_image(np.random.default_rng(3), 40, 50)
    whole = upscale(model, img, tile=0)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(upscale_module, "available_memory", lambda device: 1e6)  # 1 MB free
    tiled = upscale(model, img, tile=0)
    assert "50x40 in one piece needs about" in capsys.readouterr().err
    assert np.abs(tiled.astype(int) - whole.astype(int)).max() <= 1
    assert model.untiled_bytes(40, 50) > 1e6


def test_running_out_of_memory_is_one_line_suggesting_tile():
    class Fake:
        @staticmethod
        def main(args):
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: "
                               "can't allocate memory: you tried to allocate 99999999999 bytes.\nmore")

        @staticmethod
        def build_parser():
            return infer.build_parser()

    Fake.__name__ = "infer"
    code, _, err = run_main(Fake, "x.png")
    assert_one_line_error(code, err, "out of memory", "smaller --tile")


def test_checkpoints_that_are_not_usable_say_what_they_hold(tmp_path, photo):
    photo.save(tmp_path / "a.png")
    x2 = ResShuffle(**dict(TINY, scale=2))
    cases = {
        "x2.pt": ({"model": x2.state_dict(), "model_args": TINY},
                  "its weights do not match its model_args", "upsample.2.weight (shape (32, 8, 3, 3)) is missing"),
        "other_net.pt": ({"model": {"conv1.weight": torch.zeros(4, 3, 3, 3)}, "model_args": TINY},
                         "its weights do not match", "head.0.weight (shape (8, 3, 9, 9)) is missing"),
        "unknown_arch.pt": ({"model": x2.state_dict(), "model_args": dict(TINY, arch="srcnn")},
                            "do not describe a network (unknown network 'srcnn': known are resshuffle"),
        "bare_state_dict.pt": (x2.state_dict(), "not a ResShuffle checkpoint"),
        "tensor.pt": (torch.zeros(3), "not a ResShuffle checkpoint"),
        # A small file claiming a huge network is refused before the network is built (minutes, gigabytes).
        "deep.pt": ({"model": x2.state_dict(), "model_args": dict(TINY, num_residuals=100_000)},
                    "describe a network far larger than the 7,987 weights it holds"),
        "wide.pt": ({"model": x2.state_dict(), "model_args": dict(TINY, num_features=10 ** 9)},
                    "describe a network far larger than the 7,987 weights it holds"),
        "no_width.pt": ({"model": x2.state_dict(), "model_args": dict(TINY, arch="edsr_baseline", num_features=0,
                                                                        num_residuals=10 ** 6)},
                        "do not describe a network (num_features must be >= 1"),
        "overflowing.pt": ({"model": x2.state_dict(), "model_args": {"arch": "espcn", "scale": 4,
                                                                         "num_features": 10 ** 18}},
                           "do not describe a network (Storage size calculation overflowed"),
        "nested_args.pt": ({"model": x2.state_dict(), "model_args": dict(TINY, scale=[[[2]]])},
                           "its model_args are not a network's options"),
    }
    for name, (content, *messages) in cases.items():
        save_checkpoint(content, tmp_path / name)
        code, _, err = run_main(infer, tmp_path / "a.png", "--checkpoint", tmp_path / name)
        assert_one_line_error(code, err, tmp_path / name, *messages)
    safetensors.torch.save_file({"model.w": torch.zeros(2)}, tmp_path / "nested.safetensors",
                                metadata={"format": "resshuffle", "model_args": "[" * 100_000 + "]" * 100_000})
    code, _, err = run_main(infer, tmp_path / "a.png", "--checkpoint", tmp_path / "nested.safetensors")
    assert_one_line_error(code, err, "nested.safetensors: not a ResShuffle safetensors file (maximum recursion depth")
    assert not (tmp_path / "a_x4.png").exists() and not (tmp_path / "a_x2.png").exists()


@pytest.mark.slow
def test_errors_reach_the_terminal_as_one_line_from_a_real_process(tiny_checkpoint, tmp_path):
    (tmp_path / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    result = run_script("infer.py", tmp_path / "cut.png", "--checkpoint", tiny_checkpoint, check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "not a readable image" in result.stderr


def test_weights_holding_nan_or_inf_are_refused_in_one_line(tmp_path, photo):
    photo.save(tmp_path / "a.png")
    for bad in (float("nan"), float("inf")):
        state = ResShuffle(**TINY).state_dict()
        state["tail.bias"][0] = bad
        save_checkpoint({"model": state, "model_args": TINY}, tmp_path / "diverged.pt")
        code, _, err = run_main(infer, tmp_path / "a.png", "--checkpoint", tmp_path / "diverged.pt")
        assert_one_line_error(code, err, "diverged.pt: its weights hold NaN or inf values (tail.bias)")
    assert not (tmp_path / "a_x4.png").exists()


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64, torch.bool])
def test_weights_that_are_not_real_floats_are_refused_in_one_line(tmp_path, photo, dtype):
    """load_state_dict would cast them silently: integers truncated, complex numbers' imaginary parts
    dropped with torch's two-line warning."""
    photo.save(tmp_path / "a.png")
    state = ResShuffle(**TINY).state_dict()
    state["tail.weight"] = (state["tail.weight"] * 10).to(dtype)
    save_checkpoint({"model": state, "model_args": TINY}, tmp_path / "odd.pt")
    code, _, err = run_main(infer, tmp_path / "a.png", "--checkpoint", tmp_path / "odd.pt")
    assert_one_line_error(code, err, "odd.pt: its weights do not match its model_args", f"tail.weight is {dtype}")
    assert not (tmp_path / "a_x4.png").exists()


def test_a_csv_name_ending_in_a_slash_is_a_folder_not_a_file(tiny_checkpoint, tmp_path, photo):
    (tmp_path / "val").mkdir()
    photo.save(tmp_path / "val" / "a.png")
    code, _, err = run_main(evaluate, "--data_dir", tmp_path / "val", "--checkpoint", tiny_checkpoint,
                            "--csv", f"{tmp_path / 'out'}/")
    assert_one_line_error(code, err, "out/: ends in '/', a folder; name the output file")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("device", ["mps", "xpu", "hpu"])  # meta: test_train_inputs.py
def test_a_device_this_machine_lacks_is_one_line(device, tmp_path, photo, tiny_checkpoint):
    if getattr(getattr(torch, device, None), "is_available", lambda: False)():
        pytest.skip(f"this machine has a {device} device")
    photo.save(tmp_path / "a.png")
    code, _, err = run_main(infer, tmp_path / "a.png", "--checkpoint", tiny_checkpoint, "--device", device)
    assert_one_line_error(code, err, f"device '{device}' asked for, but this machine has no such device")
    assert not (tmp_path / "a_x4.png").exists()


LONG = "n" * 300  # a name no file system holds (255 bytes at most)


@pytest.mark.parametrize("script, argv", [
    ("train", ["--train_dir", f"/tmp/{LONG}", "--num_epochs", "1"]),
    ("train", ["--resume", f"/tmp/{LONG}/last.pt"]),
    ("train", ["--export", f"/tmp/{LONG}.pt", "/tmp/x.safetensors"]),
    ("evaluate", ["--data_dir", f"/tmp/{LONG}"]),
    ("infer", [f"/tmp/{LONG}.png"]),
    ("plot", [f"/tmp/{LONG}.csv"]),
    ("download", ["--root", f"/tmp/{LONG}"]),
    ("photos", [f"/tmp/{LONG}"]),
])
def test_a_path_with_a_name_longer_than_file_systems_allow_is_one_line(script, argv):
    module = __import__(script)
    code, _, err = run_main(module, *argv)
    assert_one_line_error(code, err, "a name in it is 30", "bytes, longer than file systems allow (255)")
    assert LONG not in err  # the name is shown cut short


def test_a_folder_run_on_a_full_disk_says_none_was_written(tiny_checkpoint, tmp_path, photo, monkeypatch):
    (tmp_path / "in").mkdir()
    for name in ("a.png", "b.png"):
        photo.save(tmp_path / "in" / name)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Image.Image, "save", full)
    code, _, err = run_main(infer, tmp_path / "in", "-o", tmp_path / "out", "--checkpoint", tiny_checkpoint)
    last_line = err.strip().splitlines()[-1]
    assert code == 1 and last_line.endswith("2 of 2 images failed, none was written: a.png, b.png"), err
    assert not (tmp_path / "out").exists()
