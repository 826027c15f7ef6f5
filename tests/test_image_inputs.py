"""Hostile image inputs: formats read by an allow-list (no EPS, so no Ghostscript),
16-bit inputs said and kept gray, folder outputs in any written format, hostile checkpoint
metadata in evaluate.py, and names printed with their control characters escaped."""
import ast
import struct
import subprocess
import zlib

import numpy as np
import pytest
import torch
from PIL import EpsImagePlugin, Image

import dataset
import evaluate
import infer
from conftest import ROOT, TINY, ResShuffle, assert_one_line_error, run_main, smooth_image, terminal_lines
from machinery import images
from machinery.checkpoint import save_checkpoint
from utils import UserError

# An EPS that loops for ever where Ghostscript runs it.
HOSTILE_EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 12\n%%EndComments\n{ } loop\nshowpage\n%%EOF\n"


@pytest.fixture
def ghostscript(monkeypatch):
    """Every call PIL makes to Ghostscript, recorded; each is rejected as a real gs rejects a bad file."""
    calls = []

    def rejecting(*args, **kwargs):
        calls.append(args)
        raise subprocess.CalledProcessError(1, ["gs"])
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", rejecting)
    return calls


def photo(path, height=20, width=30, seed=0):
    Image.fromarray(smooth_image(np.random.default_rng(seed), height, width)).save(path)
    return path


@pytest.mark.parametrize("name", ["holiday.png", "figure.eps"])
def test_an_eps_is_refused_by_format_and_never_reaches_ghostscript(tmp_path, ghostscript, name):
    path = tmp_path / name
    path.write_bytes(HOSTILE_EPS)
    for read in (images.open_image, images.image_size, images.load_rgb):
        with pytest.raises(UserError, match="not one of the formats read here"):
            read(path)
    assert ghostscript == []


def unrestricted_opens() -> set[str]:
    """The repository's modules with an Image.open(...) call that passes no formats= allow-list."""
    found = set()
    for path in [*ROOT.glob("*.py"), *(ROOT / "machinery").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and ast.unparse(node.func).endswith("Image.open")
                    and not any(k.arg == "formats" for k in node.keywords)):
                found.add(path.relative_to(ROOT).as_posix())
    return found


def test_every_image_open_names_the_formats_it_reads():
    assert unrestricted_opens() == set()


def test_every_read_format_is_one_pil_has_and_every_written_one_is_read():
    Image.init()
    assert set(images.READ_FORMATS) <= set(Image.OPEN)
    assert set(images.WRITE_FORMATS.values()) <= set(images.READ_FORMATS)
    assert "EPS" not in images.READ_FORMATS


@pytest.mark.parametrize("name", ["holiday.png", "figure.eps"])
def test_infer_refuses_an_eps_in_one_line(tiny_checkpoint, tmp_path, ghostscript, name):
    path = tmp_path / name
    path.write_bytes(HOSTILE_EPS)
    code, out, err = run_main(infer, path, "-o", tmp_path / "out.png", "--checkpoint", tiny_checkpoint)
    assert_one_line_error(code, err, name, "not one of the formats read here")
    assert not (tmp_path / "out.png").exists() and ghostscript == []


def test_an_eps_in_a_folder_is_skipped_and_the_others_are_written(tiny_checkpoint, tmp_path, ghostscript):
    folder = tmp_path / "in"
    folder.mkdir()
    photo(folder / "a.png")
    (folder / "b.png").write_bytes(HOSTILE_EPS)
    photo(folder / "c.png", seed=1)
    code, out, err = run_main(infer, folder, "-o", tmp_path / "out", "--checkpoint", tiny_checkpoint)
    assert code == 1 and "Traceback" not in err and "1 of 3 images failed" in err and "b.png" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a_x4.png", "c_x4.png"]
    assert ghostscript == []


def test_training_and_evaluation_skip_or_refuse_an_eps(tiny_checkpoint, tmp_path, ghostscript):
    folder = tmp_path / "hr"
    folder.mkdir()
    for i in range(2):
        photo(folder / f"{i}.png", height=64, width=64, seed=i)
    (folder / "eps.png").write_bytes(HOSTILE_EPS)
    data = dataset.TrainDataset(folder, scale=4, patch_size=32, patches_per_image=1, cache_dir=None, num_threads=1)
    assert [p.name for p in data.paths] == ["0.png", "1.png"]
    code, out, err = run_main(evaluate, "--data_dir", folder, "--checkpoint", tiny_checkpoint)
    assert_one_line_error(code, err, "eps.png", "not one of the formats read here")
    assert ghostscript == []


def test_a_cameras_mpo_is_still_read_as_its_first_frame(tmp_path, capsys):
    first, preview = Image.open(photo(tmp_path / "a.png")), Image.open(photo(tmp_path / "b.png", seed=1))
    first.save(tmp_path / "camera.jpg", format="MPO", save_all=True, append_images=[preview])
    with images.opened(tmp_path / "camera.jpg") as img:
        assert img.format == "MPO"
    assert images.open_image(tmp_path / "camera.jpg").size == (30, 20) and capsys.readouterr().err == ""


def png16(path, pixels: np.ndarray):
    """A 16-bit PNG of HxWxC uint16 `pixels` (C: 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA), which PIL can't write."""
    height, width, channels = pixels.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return path


def deep_pixels(channels: int, height=20, width=30) -> np.ndarray:
    rgb = smooth_image(np.random.default_rng(2), height, width).astype(np.uint16) * 257
    gray = rgb[..., :1]
    alpha = np.full((height, width, 1), 65535, np.uint16)
    alpha[:, :width // 2] = 0
    return {1: gray, 2: np.concatenate([gray, alpha], -1), 3: rgb, 4: np.concatenate([rgb, alpha], -1)}[channels]


def test_16_bit_gray_with_alpha_stays_gray_with_alpha(tiny_checkpoint, tmp_path):
    src = png16(tmp_path / "la16.png", deep_pixels(2))
    assert images.load_rgb(src).shape == (20, 30, 3)
    code, out, err = run_main(infer, src, "--checkpoint", tiny_checkpoint)
    assert code == 0, err
    result = Image.open(tmp_path / "la16_x4.png")
    assert result.mode == "LA" and result.size == (120, 80)
    assert np.asarray(result)[:, :52, 1].max() == 0 and np.asarray(result)[:, 68:, 1].min() == 255


def test_every_16_bit_input_is_said_once_and_no_8_bit_one(tiny_checkpoint, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for channels, name in [(1, "gray16"), (2, "la16"), (3, "rgb16"), (4, "rgba16")]:
        png16(folder / f"{name}.png", deep_pixels(channels))
    Image.fromarray(deep_pixels(1)[..., 0]).save(folder / "gray16.tif")
    photo(folder / "rgb8.png")
    code, out, err = run_main(infer, folder, "-o", tmp_path / "out", "--checkpoint", tiny_checkpoint)
    assert code == 0, err
    said = {line.split(" ")[0].rsplit("/", 1)[-1]: line.count("read and written as 8-bit")
            for line in out.splitlines() if " -> " in line}
    assert said == {"gray16.png": 1, "gray16.tif": 1, "la16.png": 1, "rgb16.png": 1, "rgba16.png": 1, "rgb8.png": 0}
    assert "8-bit" not in err


def test_a_folder_run_writes_the_format_ext_names(tiny_checkpoint, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    photo(folder / "a.png")
    photo(folder / "b.png", seed=1).rename(folder / "b.tif")
    code, out, err = run_main(infer, folder, "-o", tmp_path / "out", "--ext", "jpg", "--checkpoint", tiny_checkpoint)
    assert code == 0, err
    assert {p.name: Image.open(p).format for p in (tmp_path / "out").iterdir()} == {"a_x4.jpg": "JPEG",
                                                                                 "b_x4.jpg": "JPEG"}
    code, out, err = run_main(infer, folder, "--checkpoint", tiny_checkpoint)  # the default stays PNG
    assert code == 0 and sorted(p.name for p in (tmp_path / "in_x4").iterdir()) == ["a_x4.png", "b_x4.png"], err
    code, out, err = run_main(infer, folder / "a.png", "--ext", ".WEBP", "--checkpoint", tiny_checkpoint)
    assert code == 0 and Image.open(folder / "a_x4.webp").format == "WEBP", err


def test_ext_is_one_of_the_written_formats_and_not_beside_an_output_file(tiny_checkpoint, tmp_path):
    photo(tmp_path / "a.png")
    code, out, err = run_main(infer, tmp_path / "a.png", "--ext", "gif", "--checkpoint", tiny_checkpoint)
    assert code == 2 and "--ext" in err and ".jpg" in err
    code, out, err = run_main(infer, tmp_path / "a.png", "-o", tmp_path / "b.png", "--ext", "jpg",
                              "--checkpoint", tiny_checkpoint)
    assert_one_line_error(code, err, "--ext", "b.png")
    assert not (tmp_path / "b.png").exists()
    (tmp_path / "clip.mp4").write_bytes(b"")
    code, out, err = run_main(infer, tmp_path / "clip.mp4", "--ext", "jpg", "--checkpoint", tiny_checkpoint)
    assert_one_line_error(code, err, "--ext", "clip.mp4", "video")


@pytest.mark.parametrize("training", [[1, 2], "abc", {"steps": "10"}, {"steps": 5, "seconds": "7"},
                                      {"steps": 5, "seconds": 10 ** 60}, {"steps": True}, {"steps": 5, "seconds": -3},
                                      {"steps": 5, "seconds": float("nan")}, {"steps": 5, "precision": ["bf16"]}],
                         ids=["list", "string", "steps_text", "seconds_text", "60_digits", "bool", "negative", "nan",
                              "precision_list"])
def test_evaluate_leaves_out_a_malformed_training_record_in_one_line(image_dir, tmp_path, training):
    torch.manual_seed(0)
    path = tmp_path / "hostile.pt"
    save_checkpoint({"model": ResShuffle(**TINY).state_dict(), "model_args": TINY, "training": training}, path)
    code, out, err = run_main(evaluate, "--data_dir", image_dir, "--checkpoint", path, "--max_images", "1")
    assert code == 0 and "Traceback" not in err, err
    said = [line for line in err.splitlines() if "training" in line]
    assert len(said) == 1 and said[0].startswith(f"evaluate.py: warning: {path}: its training record is not one")
    assert said[0].endswith("; left out") and len(said[0]) < len(str(path)) + 150
    assert "steps" not in out and out.splitlines()[-1].split()[-2] == "-"  # the table's train h: unknown


def test_evaluate_shows_a_sound_training_record(image_dir, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "sound.pt"
    training = {"epochs": 3, "steps": 6300, "seconds": 288.0, "precision": "bf16"}
    save_checkpoint({"model": ResShuffle(**TINY).state_dict(), "model_args": TINY, "training": training}, path)
    code, out, err = run_main(evaluate, "--data_dir", image_dir, "--checkpoint", path, "--max_images", "1")
    assert code == 0 and err == "", err
    assert "(6,300 steps, 0.08 h in bf16)" in out and out.splitlines()[-1].split()[-2] == "0.08"


# A name that would set the terminal's title (an OSC sequence), and one that would forge a line.
OSC_NAME, NEWLINE_NAME = "\x1b]0;owned\x07a.png", "b\nforged: all fine.png"


def assert_escaped(text: str) -> None:
    assert "\x1b" not in text and "\x07" not in text and "\nforged" not in text, text
    assert "\\x1b]0;owned\\x07a.png" in text or "b\\x0aforged" in text, text


def hostile_folder(folder, *, broken: str | None = None, size: int = 20):
    folder.mkdir()
    for i, name in enumerate([OSC_NAME, NEWLINE_NAME]):
        photo(folder / name, height=size, width=size + 10, seed=i)
    if broken:
        (folder / broken).write_bytes(HOSTILE_EPS)
    return folder


def test_infer_prints_names_with_control_characters_escaped(tiny_checkpoint, tmp_path):
    folder = hostile_folder(tmp_path / "in")
    code, out, err = run_main(infer, folder, "-o", tmp_path / "out", "--checkpoint", tiny_checkpoint)
    assert code == 0, err
    assert_escaped(out)
    assert "\\x1b]0;owned\\x07a.png" in out and "b\\x0aforged: all fine.png" in out
    (folder / OSC_NAME).write_bytes(HOSTILE_EPS)  # a file that fails: named in the skip line and the summary
    code, out, err = run_main(infer, folder, "-o", tmp_path / "out2", "--checkpoint", tiny_checkpoint)
    assert code == 1 and err.count("\\x1b]0;owned\\x07a.png") == 2
    assert_escaped(out + err)
    code, out, err = run_main(infer, folder / OSC_NAME, "--checkpoint", tiny_checkpoint)
    assert_one_line_error(code, err, "\\x1b]0;owned\\x07a.png")
    assert_escaped(err)


def test_evaluate_prints_names_with_control_characters_escaped(tiny_checkpoint, tmp_path):
    folder = hostile_folder(tmp_path / "set\x1b]0;x\x07", size=48)
    code, out, err = run_main(evaluate, "--data_dir", folder, "--per_image", "--checkpoint", tiny_checkpoint)
    assert code == 0, err
    assert_escaped(out + err)
    assert "set\\x1b]0;x\\x07" in out  # the set's name, in the table of means
    (folder / "small\nforged.png").write_bytes(b"")  # unreadable: the one-line error names it
    code, out, err = run_main(evaluate, "--data_dir", folder, "--checkpoint", tiny_checkpoint)
    assert_one_line_error(code, err, "small\\x0aforged.png")
    assert "\x1b" not in err


def test_training_and_image_warnings_print_names_escaped(tmp_path, capsys):
    folder = hostile_folder(tmp_path / "hr\x1b]0;x\x07", broken="c\nforged.png", size=64)
    data = dataset.TrainDataset(folder, scale=4, patch_size=32, patches_per_image=1, cache_dir=None, num_threads=1)
    assert len(data.paths) == 2
    err = capsys.readouterr().err
    assert len(terminal_lines(err)) == 1 and "c\\x0aforged.png" in err and "hr\\x1b]0;x\\x07" in err
    assert "\x1b" not in err
    with pytest.raises(UserError) as caught:
        images.open_image(folder / "c\nforged.png")
    assert "\n" not in str(caught.value) and "c\\x0aforged.png" in str(caught.value)
    Image.open(folder / OSC_NAME).save(tmp_path / "frames\x1b.gif", save_all=True,
                                       append_images=[Image.open(folder / NEWLINE_NAME)])
    images.open_image(tmp_path / "frames\x1b.gif")
    assert "frames\\x1b.gif: has 2 frames" in capsys.readouterr().err
