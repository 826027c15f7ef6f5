"""A FIFO, a device or a folder where a file is read (an image, a checkpoint, a folder run's
entries) is said to be what it is, never opened (a FIFO would wait for a writer for ever), and
never called missing."""
import os

import pytest

import app
import evaluate
import infer
from conftest import assert_one_line_error, run_main
from machinery import files, images
from utils import UserError

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")


def strange_files(folder, suffix):
    """A FIFO and a link to /dev/zero in `folder`, named with `suffix`."""
    folder.mkdir(parents=True, exist_ok=True)
    os.mkfifo(folder / f"fifo{suffix}")
    os.symlink("/dev/zero", folder / f"zero{suffix}")
    return folder / f"fifo{suffix}", folder / f"zero{suffix}"


def test_a_path_that_is_not_a_regular_file_is_described_and_a_file_or_missing_one_is_not(tmp_path):
    fifo, zero = strange_files(tmp_path, ".png")
    (tmp_path / "plain.png").write_bytes(b"x")
    assert files.not_a_file(fifo) == "is a FIFO (a named pipe)"
    assert files.not_a_file(zero) == "is a link to /dev/zero, a character device"
    assert files.not_a_file(tmp_path) == "is a folder"
    assert files.not_a_file(tmp_path / "plain.png") is None
    assert files.not_a_file(tmp_path / "missing.png") is None


def test_a_fifo_or_a_device_as_an_image_says_what_it_is(tiny_checkpoint, tmp_path):
    fifo, zero = strange_files(tmp_path, ".png")
    code, _, err = run_main(infer, fifo, "--checkpoint", tiny_checkpoint)
    assert_one_line_error(code, err, f"{fifo}: is a FIFO (a named pipe), not a regular file")
    code, _, err = run_main(infer, zero, "--checkpoint", tiny_checkpoint)
    assert_one_line_error(code, err, f"{zero}: is a link to /dev/zero, a character device, not a regular file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo.png", "tiny.pt", "zero.png"]


def test_a_missing_image_still_says_no_such_file(tmp_path):
    with pytest.raises(UserError, match="missing.png: no such file$"):
        images.image_size(tmp_path / "missing.png")


@pytest.mark.parametrize("script", [infer, evaluate])
def test_a_fifo_or_a_device_as_a_checkpoint_says_what_it_is(script, image_dir, tmp_path):
    fifo, _ = strange_files(tmp_path, ".pt")
    for checkpoint, kind in [(fifo, "is a FIFO (a named pipe)"), ("/dev/zero", "is a character device")]:
        argv = [image_dir / "img0.png"] if script is infer else ["--data_dir", image_dir]
        code, _, err = run_main(script, *argv, "--checkpoint", checkpoint, "-o", tmp_path / "out")
        assert_one_line_error(code, err, f"{checkpoint}: {kind}, not a regular file")
        assert "no such checkpoint" not in err
    assert not (tmp_path / "out").exists()


def test_a_fifo_as_the_apps_checkpoint_says_what_it_is(tmp_path):
    fifo, _ = strange_files(tmp_path, ".mp4")
    code, _, err = run_main(app, "--port", "0", "--checkpoint", fifo)
    assert_one_line_error(code, err, f"{fifo}: is a FIFO (a named pipe), not a regular file")


def test_a_folder_run_says_which_entries_it_left_out_as_not_files(tiny_checkpoint, image_dir, tmp_path):
    strange_files(image_dir, ".png")
    (image_dir / "folder.png").mkdir()  # a subfolder: infer says so already, as a subfolder
    code, _, err = run_main(infer, image_dir, "--checkpoint", tiny_checkpoint, "-o", tmp_path / "out")
    assert code == 0, err
    left_out = [line for line in err.splitlines() if "not a regular file" in line or "not regular files" in line]
    assert left_out == [f"infer.py: warning: {image_dir}: 2 entries named as images are not regular files, left "
                        f"out: fifo.png is a FIFO (a named pipe); zero.png is a link to /dev/zero, a character "
                        f"device"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["img0_x4.png", "img1_x4.png", "img2_x4.png"]


def test_the_left_out_entries_are_said_once_a_folder_and_the_first_few_named(tmp_path, capsys):
    folder = tmp_path / "many"
    for i in range(5):
        strange_files(folder / "sub", f"{i}.jpg")
    assert images.list_images(folder, recursive=True) == []
    assert images.list_images(folder, recursive=True) == []  # train.py lists its folder twice
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{folder}: 10 entries named as images are not regular files" in err[0]
    assert "sub/fifo0.jpg is a FIFO (a named pipe); sub/fifo1.jpg is a FIFO" in err[0]
    assert err[0].endswith("; and 7 more")
