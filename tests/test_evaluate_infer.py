"""evaluate.py and infer.py as a user runs them: tables, CSV, outputs, tiling, one-line errors."""
import csv

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, ResShuffle, run_script, smooth_image
from machinery import upscale as upscale_module
from machinery.checkpoint import load_model, save_checkpoint
from machinery.upscale import upscale
from utils import UserError


@pytest.mark.slow
def test_evaluate_prints_model_and_bicubic_and_writes_csv_and_images(image_dir, tiny_checkpoint, tmp_path):
    out_csv, save_dir = tmp_path / "table.csv", tmp_path / "sr"
    result = run_script("evaluate.py", "--data_dir", image_dir, "--checkpoint", tiny_checkpoint,
                        "--csv", out_csv, "--save_dir", save_dir)
    assert "crop border 4" in result.stdout and "RGB" in result.stdout
    assert "mean of 3 images" in result.stdout and "gain over bicubic" in result.stdout
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["img0.png", "img1.png", "img2.png"]
    # img1 is 66x70: modcropped to 64x68 before downsampling.
    assert (rows[1]["width"], rows[1]["height"]) == ("64", "68")
    assert Image.open(save_dir / "img1.png").size == (64, 68)
    assert all(float(r["bicubic_psnr"]) > 20 for r in rows)

    y = run_script("evaluate.py", "--data_dir", image_dir, "--checkpoint", tiny_checkpoint, "--y_channel",
                   "--crop_border", "0")
    assert "Y (BT.601)" in y.stdout and "crop border 0" in y.stdout


def test_evaluates_csv_keeps_a_name_that_is_not_utf8_as_its_bytes(image_dir, tiny_checkpoint, tmp_path):
    import os

    import evaluate
    from conftest import run_main
    raw = os.fsencode(image_dir / "img0.png")
    os.rename(raw, raw.replace(b"img0", b"x\xff"))
    code, _, err = run_main(evaluate, "--data_dir", image_dir, "--checkpoint", tiny_checkpoint,
                            "--csv", tmp_path / "table.csv")
    assert code == 0, err
    table = (tmp_path / "table.csv").read_bytes()
    assert b"x\xff.png" in table and b"\\udcff" not in table


@pytest.mark.slow
def test_infer_output_is_exactly_scale_times_input(tiny_checkpoint, tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "odd.png"
    Image.fromarray(smooth_image(rng, 9, 13)).save(src)
    run_script("infer.py", src, "--checkpoint", tiny_checkpoint)
    assert Image.open(tmp_path / "odd_x4.png").size == (52, 36)


@pytest.mark.slow
def test_infer_folder_gray_and_alpha(tiny_checkpoint, tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "in"
    folder.mkdir()
    rgb = Image.fromarray(smooth_image(rng, 10, 12))
    rgb.convert("L").save(folder / "gray.png")
    rgba = rgb.convert("RGBA")
    alpha = np.zeros((10, 12), np.uint8)
    alpha[:, 6:] = 255
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(folder / "alpha.png")
    run_script("infer.py", folder, "-o", tmp_path / "out", "--checkpoint", tiny_checkpoint)
    gray, rgba_out = Image.open(tmp_path / "out" / "gray_x4.png"), Image.open(tmp_path / "out" / "alpha_x4.png")
    assert gray.mode == "L" and gray.size == (48, 40)
    assert rgba_out.mode == "RGBA" and rgba_out.size == (48, 40)
    out_alpha = np.asarray(rgba_out.getchannel("A"))
    assert out_alpha[:, :20].max() < 10 and out_alpha[:, 28:].min() > 245


@pytest.mark.parametrize("reconstruct_tile", [128, 4])
def test_tiled_output_equals_untiled_with_enough_padding(tiny_checkpoint, monkeypatch, reconstruct_tile):
    # 4: the HR stages run on several blocks per tile, at unaligned edges too.
    monkeypatch.setattr(upscale_module, "RECONSTRUCT_TILE", reconstruct_tile)
    model, _ = load_model(tiny_checkpoint, torch.device("cpu"))
    img = smooth_image(np.random.default_rng(3), 37, 29)
    whole = upscale(model, img)
    tiled = upscale(model, img, tile=10, tile_pad=model.receptive_radius())
    assert tiled.shape == whole.shape == (148, 116, 3)
    diff = np.abs(tiled.astype(int) - whole.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.999  # float summation order may flip a rounding
    unpadded = upscale(model, img, tile=10, tile_pad=0)
    assert np.abs(unpadded.astype(int) - whole.astype(int)).max() > 1  # the check above can fail


@pytest.mark.slow
def test_missing_checkpoint_and_input_are_one_line_errors(tiny_checkpoint, tmp_path):
    src = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src)
    for args, message in [((src, "--checkpoint", tmp_path / "none.pt"), "no such checkpoint"),
                          ((tmp_path / "missing.png", "--checkpoint", tiny_checkpoint), "no such file"),
                          ((src, "--checkpoint", src),
                           "not a PyTorch checkpoint (neither a zip, a pickle nor a safetensors file)")]:
        result = run_script("infer.py", *args, check=False)
        assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "a_x4.png").exists()


def test_checkpoint_of_another_size_is_refused_with_what_it_holds(tmp_path):
    model = ResShuffle(**TINY)
    path = tmp_path / "lying.pt"
    save_checkpoint({"model": model.state_dict(), "model_args": dict(TINY, num_features=16)}, path)
    with pytest.raises(UserError, match="num_features': 16"):
        load_model(path, torch.device("cpu"))


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    torch.save({"model": Payload(), "model_args": {}}, path)
    with pytest.raises(UserError, match="refused: it holds objects that weights_only=True loading does not allow") as e:
        load_model(path, torch.device("cpu"))
    assert not marker.exists()
    assert "weights_only` set to `False`" not in str(e.value)  # torch's advice to retry unsafely is not passed on


@pytest.mark.slow
def test_comparison_panels_show_the_most_detailed_crop_four_ways(tiny_checkpoint, tmp_path):
    from evaluate import comparison
    rng = np.random.default_rng(5)
    hr = np.full((64, 96, 3), 128, np.uint8)
    hr[16:48, 56:88] = rng.integers(0, 256, (32, 32, 3))  # the only detail in the image
    lr = np.asarray(Image.fromarray(hr).resize((24, 16), Image.BICUBIC))
    sr = np.asarray(Image.fromarray(lr).resize((96, 64), Image.NEAREST))
    bicubic = np.asarray(Image.fromarray(lr).resize((96, 64), Image.BICUBIC))
    panel = np.asarray(comparison(hr, lr, sr, bicubic, scale=4, size=32))
    assert panel.shape == (32 + 16, 4 * 32 + 3 * 4, 3)
    np.testing.assert_array_equal(panel[:32, :32], hr[16:48, 56:88])  # found the detailed window
    np.testing.assert_array_equal(panel[:32, 3 * 36:3 * 36 + 32], sr[16:48, 56:88])

    folder = tmp_path / "one"
    folder.mkdir()
    Image.fromarray(hr).save(folder / "a.png")
    run_script("evaluate.py", "--data_dir", folder, "--checkpoint", tiny_checkpoint, "--compare_dir", tmp_path / "cmp",
               "--compare_size", "32")
    assert Image.open(tmp_path / "cmp" / "a_compare.png").size == (140, 48)
