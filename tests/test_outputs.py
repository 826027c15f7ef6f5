"""One set of output rules for infer.py and evaluate.py: inputs never replaced, existing outputs
kept unless --overwrite, names the same for files and folders, outputs checked before any work;
and the same help, flag names and progress in every script."""
import fnmatch
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

import benchmark
import download
import evaluate
import infer
import train
from conftest import ROOT, assert_one_line_error, make_images, run_main, run_script, smooth_image
from machinery import files
from machinery.checkpoint import load_model
from machinery.files import temporary_prefix
from machinery.upscale import upscale


def photo(path, size=(30, 20), **save):
    Image.fromarray(smooth_image(np.random.default_rng(5), size[1], size[0])).save(path, **save)
    return path


def tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ---------------------------------------------------------------- inputs are never replaced

def test_infer_never_overwrites_its_inputs(tiny_checkpoint, tmp_path):
    folder = make_images(tmp_path / "in")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for extra in ([], ["--overwrite"]):
        code, _, err = run_main(infer, folder, "-o", folder, "--checkpoint", tiny_checkpoint, *extra)
        assert_one_line_error(code, err, folder, "the next run would read the outputs as inputs")
        code, _, err = run_main(infer, folder / "img0.png", "-o", folder / "img0.png", "--checkpoint",
                                tiny_checkpoint, *extra)
        assert_one_line_error(code, err, folder / "img0.png", "is an input")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_existing_outputs_are_kept_unless_overwrite(tiny_checkpoint, tmp_path):
    src = photo(tmp_path / "a.png")
    assert run_main(infer, src, "--checkpoint", tiny_checkpoint)[0] == 0
    (tmp_path / "a_x4.png").write_bytes(b"mine")
    code, _, err = run_main(infer, src, "--checkpoint", tiny_checkpoint)
    assert_one_line_error(code, err, tmp_path / "a_x4.png", "exists; pass --overwrite")
    assert (tmp_path / "a_x4.png").read_bytes() == b"mine"
    assert run_main(infer, src, "--checkpoint", tiny_checkpoint, "--overwrite")[0] == 0
    assert Image.open(tmp_path / "a_x4.png").size == (120, 80)


# ---------------------------------------------------------------- colour profile, EXIF and image modes

def test_infer_keeps_the_icc_profile_that_fits_and_any_exif(tiny_checkpoint, tmp_path):
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    src = photo(tmp_path / "wide.jpg", icc_profile=icc, quality=95)
    for out in ("out.jpg", "out.png"):
        code, _, err = run_main(infer, src, "-o", tmp_path / out, "--checkpoint", tiny_checkpoint)
        assert code == 0, err
        assert Image.open(tmp_path / out).info.get("icc_profile") == icc
    # A profile of another colour space (CMYK, Lab) would misrender the RGB upscale: left out, said.
    lab = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    src = photo(tmp_path / "lab.jpg", icc_profile=lab, quality=95)
    code, _, err = run_main(infer, src, "--checkpoint", tiny_checkpoint)
    assert code == 0 and "the input's colour profile is not one for RGB images" in err, err
    assert "icc_profile" not in Image.open(tmp_path / "lab_x4.png").info
    # Malformed EXIF is left out, not a traceback after the work.
    photo(tmp_path / "bad.jpg", exif=b"Exif\0\0garbage", quality=95)
    code, _, err = run_main(infer, tmp_path / "bad.jpg", "--checkpoint", tiny_checkpoint)
    assert code == 0 and Image.open(tmp_path / "bad_x4.png").size == (120, 80), err


def test_valid_exif_reaches_the_upscale(tiny_checkpoint, tmp_path):
    exif = Image.Exif()
    exif[0x010F] = "ResShuffle test camera"  # Make
    src = photo(tmp_path / "cam.jpg", exif=exif, quality=95)
    code, _, err = run_main(infer, src, "-o", tmp_path / "up.jpg", "--checkpoint", tiny_checkpoint)
    assert code == 0, err
    assert Image.open(tmp_path / "up.jpg").getexif().get(0x010F) == "ResShuffle test camera"


def test_gray_with_alpha_can_be_written_as_bmp(tiny_checkpoint, tmp_path):
    src = tmp_path / "la.png"
    Image.open(photo(tmp_path / "rgb.png")).convert("LA").save(src)
    code, _, err = run_main(infer, src, "-o", tmp_path / "la.bmp", "--checkpoint", tiny_checkpoint)
    assert code == 0 and Image.open(tmp_path / "la.bmp").size == (120, 80), err


# ---------------------------------------------------------------- evaluate's outputs never collide

def test_evaluate_outputs_of_same_named_images_and_sets_do_not_collide(tiny_checkpoint, tmp_path):
    a, b = tmp_path / "a" / "val", tmp_path / "b" / "val"
    for folder in (a, b):
        folder.mkdir(parents=True)
        photo(folder / "x.png", size=(40, 40))
    photo(a / "x.jpg", size=(40, 40), quality=95)
    code, out, err = run_main(evaluate, "--data_dir", a, b, "--checkpoint", tiny_checkpoint,
                              "-o", tmp_path / "sr", "--compare_dir", tmp_path / "cmp", "--compare_size", "16")
    assert code == 0, err
    assert tree(tmp_path / "sr") == ["val", "val/x_jpg.png", "val/x_png.png", "val_2", "val_2/x.png"]
    assert tree(tmp_path / "cmp") == ["val", "val/x_jpg_compare.png", "val/x_png_compare.png", "val_2",
                                      "val_2/x_compare.png"]
    table = [line.split()[:2] for line in out.splitlines()[-2:]]  # set, images
    assert table == [["val", "2"], ["val_2", "1"]]


# ---------------------------------------------------------------- one naming rule

def test_output_names_are_one_rule_for_files_and_folders(tiny_checkpoint, tmp_path):
    folder = make_images(tmp_path / "in")
    (folder / "sub").mkdir()
    photo(folder / "sub" / "deep.png")
    code, _, err = run_main(infer, folder, "-o", f"{tmp_path / 'new'}/", "--checkpoint", tiny_checkpoint)
    assert code == 0 and "1 subfolder not searched (--recursive searches them)" in err, err
    assert tree(tmp_path / "new") == ["img0_x4.png", "img1_x4.png", "img2_x4.png"]
    code, _, err = run_main(infer, folder, "--recursive", "--checkpoint", tiny_checkpoint)
    assert code == 0, err
    assert tree(tmp_path / "in_x4") == ["img0_x4.png", "img1_x4.png", "img2_x4.png", "sub", "sub/deep_x4.png"]
    code, _, err = run_main(infer, folder / "img0.png", "-o", tmp_path / "newdir", "--checkpoint", tiny_checkpoint)
    assert code == 0 and tree(tmp_path / "newdir") == ["img0_x4.png"], err


def test_an_unknown_output_extension_is_an_error_before_any_work(tiny_checkpoint, tmp_path):
    src = photo(tmp_path / "a.png")
    code, _, err = run_main(infer, src, "-o", tmp_path / "x.xyz", "--checkpoint", tiny_checkpoint)
    assert_one_line_error(code, err, "x.xyz: unknown image extension '.xyz'")
    code, _, err = run_main(infer, tmp_path, "-o", tmp_path / "x.png", "--checkpoint", tiny_checkpoint)
    assert_one_line_error(code, err, "names a file, but", "is a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "tiny.pt"]


def test_jpeg_quality_has_a_flag_with_default_95(tiny_checkpoint, tmp_path):
    src = photo(tmp_path / "a.png", size=(60, 40))
    for q in ("95", "30"):
        extra = ["--quality", q] if q != "95" else []
        code, _, err = run_main(infer, src, "-o", tmp_path / f"q{q}.jpg", "--checkpoint", tiny_checkpoint, *extra)
        assert code == 0, err
    model, _ = load_model(tiny_checkpoint, torch.device("cpu"))
    sr = Image.fromarray(upscale(model, np.asarray(Image.open(src))))
    for q in (95, 30):
        sr.save(tmp_path / "ref.jpg", quality=q)
        assert Image.open(tmp_path / f"q{q}.jpg").quantization == Image.open(tmp_path / "ref.jpg").quantization
    code, _, err = run_main(infer, src, "-o", tmp_path / "q0.jpg", "--quality", "0", "--checkpoint", tiny_checkpoint)
    assert code == 2 and "--quality: must be 1 to 100" in err


# ---------------------------------------------------------------- outputs checked before the work

def test_evaluate_checks_and_makes_its_outputs_like_infer(tiny_checkpoint, tmp_path):
    data = make_images(tmp_path / "val")
    csv = tmp_path / "missing" / "deeper" / "r.csv"
    code, _, err = run_main(evaluate, "--data_dir", data, "--checkpoint", tiny_checkpoint, "--csv", csv)
    assert code == 0 and csv.is_file(), err
    csv.write_text("mine")
    code, out, err = run_main(evaluate, "--data_dir", data, "--checkpoint", tiny_checkpoint, "--csv", csv)
    assert_one_line_error(code, err, csv, "exists; pass --overwrite")
    assert out == "" and csv.read_text() == "mine"  # refused before any work
    (tmp_path / "sr").mkdir()
    (tmp_path / "sr" / "img1.png").write_bytes(b"mine")
    code, out, err = run_main(evaluate, "--data_dir", data, "--checkpoint", tiny_checkpoint, "-o", tmp_path / "sr")
    assert_one_line_error(code, err, tmp_path / "sr" / "img1.png", "exists")
    assert out == "" and tree(tmp_path / "sr") == ["img1.png"]


def test_a_read_only_output_folder_is_one_line_before_any_work(tiny_checkpoint, tmp_path, unwritable_dir):
    folder = make_images(tmp_path / "in")
    code, out, err = run_main(infer, folder, "-o", f"{unwritable_dir}/resshuffle_out", "--checkpoint",
                              tiny_checkpoint)
    assert_one_line_error(code, err, unwritable_dir, "can't create files there")
    assert out == "" and "skipped" not in err


# ---------------------------------------------------------------- defaults from the repository

@pytest.mark.slow
def test_shipped_defaults_resolve_from_the_repository_not_the_current_folder(tmp_path):
    src = photo(tmp_path / "a.png")
    result = run_script(ROOT / "infer.py", src.name, cwd=tmp_path)  # the default checkpoint, run from elsewhere
    assert "a.png (30x20) -> a_x4.png (120x80" in result.stdout  # ", bf16)" where auto picks it
    result = run_script(ROOT / "infer.py", "missing.png", "--checkpoint", "missing.pt", cwd=tmp_path, check=False)
    assert result.returncode == 1 and result.stderr.strip() == "infer.py: error: missing.png: no such file or folder"


# ---------------------------------------------------------------- help and names

@pytest.mark.parametrize("module", [train, infer, evaluate, download, benchmark])
def test_every_flag_has_help_with_its_default_and_usage_is_printed_once(module):
    parser = module.build_parser()
    for action in parser._actions:
        assert action.help, f"{module.__name__}: {action.option_strings or action.dest} has no help"
    text = parser.format_help()
    assert text.count("usage:") == 1
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert text.split("options:")[1].count("(default:") == len(flags), text


def test_one_name_for_one_thing_and_the_old_names_still_work(tiny_checkpoint, tmp_path):
    data = make_images(tmp_path / "val")
    for flags in (["--max_images", "1", "-o", tmp_path / "a"], ["--max_val_images", "1", "--save_dir", tmp_path / "b"]):
        code, out, err = run_main(evaluate, "--data_dir", data, "--checkpoint", tiny_checkpoint, *flags)
        assert code == 0 and "mean of 1 image " in out, err
    assert tree(tmp_path / "a") == tree(tmp_path / "b") == ["img0.png"]
    assert train.parse_args(["--max_images", "2"]).max_val_images == 2
    assert train.parse_args(["--max_val_images", "3"]).max_val_images == 3
    code, _, err = run_main(infer, data / "img0.png", "--save_dir", tmp_path / "c", "--checkpoint", tiny_checkpoint)
    assert code == 0 and tree(tmp_path / "c") == ["img0_x4.png"], err


# ---------------------------------------------------------------- progress

def test_a_large_image_shows_progress_over_its_tiles(tiny_checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    model, _ = load_model(tiny_checkpoint, torch.device("cpu"))
    img = smooth_image(np.random.default_rng(2), 40, 70)
    upscale(model, img, tile=32)
    assert capsys.readouterr().err == ""
    upscale(model, img, tile=32, progress=True)
    err = capsys.readouterr().err
    assert "tiles:   0%|          | 0/6 [" in err
    upscale(model, img, tile=32, self_ensemble=True, progress=True)
    assert "tiles (8 flips):   0%|          | 0/48 [" in capsys.readouterr().err
    upscale(model, img, tile=256, self_ensemble=True, progress=True)  # one tile: the bar counts flips
    assert "flips:   0%|          | 0/8 [" in capsys.readouterr().err


def test_evaluates_bar_has_a_total(tiny_checkpoint, tmp_path):
    data = make_images(tmp_path / "val")
    code, _, err = run_main(evaluate, "--data_dir", data, "--checkpoint", tiny_checkpoint, terminal=True)
    assert code == 0 and "evaluating:   0%|          | 0/3 [" in err, err


def test_a_folder_run_draws_a_bar_on_a_terminal_and_none_in_a_log(tiny_checkpoint, tmp_path):
    data = make_images(tmp_path / "in")
    code, _, err = run_main(infer, data, "-o", tmp_path / "a", "--checkpoint", tiny_checkpoint, terminal=True)
    assert code == 0 and "upscaling:   0%|          | 0/3 [" in err, err
    code, out, err = run_main(infer, data, "-o", tmp_path / "b", "--checkpoint", tiny_checkpoint, "--tile", "32",
                              "--precision", "fp32")
    assert code == 0 and err == "", err  # neither the folder's bar nor the tiles'
    assert out.splitlines()[1:] == [f"{data / f'img{i}.png'} ({w}x{h}) -> {tmp_path / 'b' / f'img{i}_x4.png'} "
                                    f"({4 * w}x{4 * h})" for i, (w, h) in enumerate([(80, 64), (66, 70), (96, 96)])]


# ---------------------------------------------------------------- wording

def test_counts_of_one_are_singular(image_dir, tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(image_dir / "img0.png", one)
    code, out, err = run_main(train, "--train_dir", one, "--val_dir", one, "--checkpoint_dir", tmp_path / "runs",
                              "--num_features", "8", "--num_residuals", "1", "--patch_size", "32", "--batch_size",
                              "4", "--patches_per_image", "4", "--num_workers", "0", "--num_epochs", "1")
    assert code == 0, err
    assert "train: 1 image, 4 patches of 32px per epoch, 1 step of 4; val: 1 image" in out


# ---------------------------------------------------------------- the clone stays clean

def ignored_at_the_root(name: str) -> bool:
    """Whether the repository's .gitignore ignores the file `name` at the repository root, by git's
    rules for such a file (read here, so that no test needs git): the last pattern that matches
    decides, `!` re-includes, a leading `/` or `**/` matches at the root, a pattern ending in `/`
    matches folders only, and one with a `/` further in matches no file at the root."""
    ignored = False
    for line in (ROOT / ".gitignore").read_text().splitlines():
        pattern = line.rstrip()
        if not pattern or pattern.startswith("#") or pattern.endswith("/"):
            continue
        negated = pattern.startswith("!")
        pattern = pattern.removeprefix("!").removeprefix("**/").removeprefix("/")
        if "/" not in pattern and fnmatch.fnmatchcase(name, pattern):
            ignored = not negated
    return ignored


def test_the_readme_demo_output_is_ignored():
    assert ignored_at_the_root("coffee_x4.png")  # the README's first command writes it in the clone
    assert not ignored_at_the_root("infer.py")


# ---------------------------------------------------------------- outputs never collide with inputs or each other

def test_two_inputs_never_share_an_output(tiny_checkpoint, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.png", "a.jpg", "a_png.png"):
        photo(folder / name)
    code, _, err = run_main(infer, folder, "--checkpoint", tiny_checkpoint)
    assert_one_line_error(code, err, "would both be written as", "a_png_x4.png; rename one of them")
    code, _, err = run_main(evaluate, "--data_dir", folder, "--checkpoint", tiny_checkpoint, "-o", tmp_path / "sr")
    assert_one_line_error(code, err, "would both be written as", "a_png.png; rename one of them")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "tiny.pt"]


def test_evaluate_never_writes_its_csv_over_an_input(tiny_checkpoint, tmp_path):
    data = make_images(tmp_path / "val")
    before = (data / "img0.png").read_bytes(), tiny_checkpoint.read_bytes()
    for target in (data / "img0.png", tiny_checkpoint):
        code, _, err = run_main(evaluate, "--data_dir", data, "--checkpoint", tiny_checkpoint, "--csv", target,
                                "--overwrite")
        assert_one_line_error(code, err, target, "is an input")
    assert ((data / "img0.png").read_bytes(), tiny_checkpoint.read_bytes()) == before


def test_set_names_and_folders_named_dot_are_distinct_and_inside_the_output(tiny_checkpoint, tmp_path, monkeypatch):
    for parent in ("p", "q", "r"):
        (tmp_path / parent).mkdir()
    make_images(tmp_path / "p" / "val_2")
    make_images(tmp_path / "q" / "val")
    make_images(tmp_path / "r" / "val")
    code, _, err = run_main(evaluate, "--data_dir", tmp_path / "p/val_2", tmp_path / "q/val", tmp_path / "r/val",
                              "--checkpoint", tiny_checkpoint, "--max_images", "1", "-o", tmp_path / "sr")
    assert code == 0, err
    assert tree(tmp_path / "sr") == ["val", "val/img0.png", "val_2", "val_2/img0.png", "val_3", "val_3/img0.png"]
    monkeypatch.chdir(tmp_path / "q" / "val")
    code, _, err = run_main(infer, ".", "--checkpoint", tiny_checkpoint)
    assert code == 0 and tree(tmp_path / "q" / "val_x4") == ["img0_x4.png", "img1_x4.png", "img2_x4.png"], err
    code, _, err = run_main(infer, "img0.png", "-o", "new.dir/", "--checkpoint", tiny_checkpoint)
    assert code == 0 and tree(tmp_path / "q" / "val" / "new.dir") == ["img0_x4.png"], err
    code, _, err = run_main(infer, "img0.png", "-o", "new.dir2", "--checkpoint", tiny_checkpoint)
    assert_one_line_error(code, err, "unknown image extension '.dir2'", "for a folder, end the name with /")


def test_evaluate_never_writes_into_its_data_folders(tiny_checkpoint, tmp_path):
    data = make_images(tmp_path / "val")
    for out in (data, data / "sr"):
        code, _, err = run_main(evaluate, "--data_dir", data, "--checkpoint", tiny_checkpoint, "-o", out)
        assert_one_line_error(code, err, "where the inputs are; the next run would read the outputs as inputs")
    assert tree(data) == ["img0.png", "img1.png", "img2.png"]


def test_evaluates_csv_never_replaces_an_image_it_writes(tiny_checkpoint, tmp_path):
    data = make_images(tmp_path / "val")
    code, _, err = run_main(evaluate, "--data_dir", data, "--checkpoint", tiny_checkpoint, "-o", tmp_path / "sr",
                            "--csv", tmp_path / "sr" / "img0.png")
    assert_one_line_error(code, err, "the --csv table", "would both be written as")
    assert not (tmp_path / "sr").exists()


def test_evaluates_csv_named_through_a_link_never_replaces_an_image_it_writes(tiny_checkpoint, tmp_path):
    """Two names for one place (a link to the output folder) are one output."""
    (tmp_path / "o2").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "o2")
    data = make_images(tmp_path / "val")
    code, _, err = run_main(evaluate, "--data_dir", data, "--checkpoint", tiny_checkpoint, "-o", tmp_path / "o2",
                            "--csv", tmp_path / "alias" / "img0.png")
    assert_one_line_error(code, err, "the --csv table", "would both be written as")


def test_an_output_file_and_a_folder_of_outputs_under_one_name_are_refused(tiny_checkpoint, tmp_path):
    folder = make_images(tmp_path / "in")
    photo(folder / "a.png")
    (folder / "a_x4.png").mkdir()
    photo(folder / "a_x4.png" / "b.png")
    code, _, err = run_main(infer, folder, "--recursive", "-o", tmp_path / "o1", "--checkpoint", tiny_checkpoint)
    assert_one_line_error(code, err, "a_x4.png: would be written as the output of", "and as a folder of other outputs")


def test_recursive_never_reads_its_outputs_through_a_link(tiny_checkpoint, tmp_path):
    folder = make_images(tmp_path / "in")
    (tmp_path / "in_x4").mkdir()
    photo(tmp_path / "in_x4" / "old_x4.png")
    (folder / "out").symlink_to(tmp_path / "in_x4")
    code, _, err = run_main(infer, folder, "--recursive", "--checkpoint", tiny_checkpoint)
    assert_one_line_error(code, err, "where inputs are read from (through a link?)")
    assert tree(tmp_path / "in_x4") == ["old_x4.png"]


def test_an_output_folder_above_the_input_folder_is_fine(tiny_checkpoint, tmp_path, monkeypatch):
    make_images(tmp_path / "in")
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(infer, "in", "-o", ".", "--checkpoint", tiny_checkpoint)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.glob("*_x4.png")) == ["img0_x4.png", "img1_x4.png", "img2_x4.png"]


# ---------------------------------------------------------------- links, long names and failed writes

def test_a_dangling_link_on_the_output_path_is_named_before_any_work(tiny_checkpoint, tmp_path):
    folder = make_images(tmp_path / "in")
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    code, _, err = run_main(infer, folder, "-o", tmp_path / "gone" / "out", "--checkpoint", tiny_checkpoint)
    assert_one_line_error(code, err, tmp_path / "gone", "is a link to", "which does not exist")
    assert "skipped" not in err


def test_recursive_follows_linked_folders_once_and_skips_hidden_ones(tiny_checkpoint, tmp_path):
    real = make_images(tmp_path / "real")
    src = tmp_path / "in"
    src.mkdir()
    (src / "linked").symlink_to(real)
    (src / "loop").symlink_to(src)  # a link loop must end
    make_images(src / ".git")
    code, _, err = run_main(infer, src, "--recursive", "--checkpoint", tiny_checkpoint)
    assert code == 0, err
    assert tree(tmp_path / "in_x4") == ["linked", "linked/img0_x4.png", "linked/img1_x4.png", "linked/img2_x4.png"]


def test_a_failed_write_leaves_no_empty_folder(tiny_checkpoint, tmp_path, monkeypatch):
    src = photo(tmp_path / "a.png")

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Image.Image, "save", full)
    code, _, err = run_main(infer, src, "-o", tmp_path / "new" / "deeper" / "a.png", "--checkpoint", tiny_checkpoint)
    assert_one_line_error(code, err, "could not be written (No space left on device", "nothing was written")
    assert not (tmp_path / "new").exists()


def test_an_output_name_too_long_for_a_temporary_name_is_written(tiny_checkpoint, tmp_path):
    src = photo(tmp_path / "a.png")
    out = tmp_path / ("c" * 245 + ".png")  # 249 characters: the file system allows 255
    code, _, err = run_main(infer, src, "-o", out, "--checkpoint", tiny_checkpoint)
    assert code == 0 and out.is_file(), err


def test_an_output_path_in_a_link_loop_fails_before_any_work(tiny_checkpoint, tmp_path):
    folder = make_images(tmp_path / "in")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    code, _, err = run_main(infer, folder, "-o", tmp_path / "loop", "--checkpoint", tiny_checkpoint)
    assert code == 1 and "Traceback" not in err and "upscaling" not in err, err


def test_an_output_name_longer_than_file_systems_allow_is_one_line_before_any_work(tiny_checkpoint, tmp_path):
    folder = make_images(tmp_path / "in")
    code, _, err = run_main(infer, folder, "-o", f"{tmp_path}/new/{'c' * 300}/", "--checkpoint", tiny_checkpoint)
    assert_one_line_error(code, err, "is 300 bytes, longer than file systems allow (255)")
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------- --skip_existing

def test_skip_existing_finishes_a_stopped_folder_run_and_names_failures_by_path(tiny_checkpoint, tmp_path):
    folder = make_images(tmp_path / "in")
    (tmp_path / "in_x4").mkdir()
    (tmp_path / "in_x4" / "img1_x4.png").write_bytes(b"done before")
    code, out, err = run_main(infer, folder, "--skip_existing", "--checkpoint", tiny_checkpoint)
    assert code == 0 and "skipped 1 input of 3: their outputs are there already" in out, err
    assert (tmp_path / "in_x4" / "img1_x4.png").read_bytes() == b"done before"
    assert tree(tmp_path / "in_x4") == ["img0_x4.png", "img1_x4.png", "img2_x4.png"]
    (folder / "sub").mkdir()
    (folder / "sub" / "bad.png").write_text("not an image")
    photo(folder / "sub" / "good.png")
    code, out, err = run_main(infer, folder, "--recursive", "--skip_existing", "--checkpoint", tiny_checkpoint)
    assert code == 1 and "1 of 2 images failed, the other 1 was written: sub/bad.png" in err
    assert (tmp_path / "in_x4" / "sub" / "good_x4.png").is_file()


def test_skip_existing_never_takes_an_input_for_a_finished_output(tiny_checkpoint, tmp_path):
    folder = make_images(tmp_path / "in")
    code, _, err = run_main(infer, folder / "img0.png", "-o", folder / "img0.png", "--skip_existing",
                            "--checkpoint", tiny_checkpoint)
    assert_one_line_error(code, err, "is an input")


def test_skip_existing_and_overwrite_exclude_each_other(tiny_checkpoint, tmp_path):
    folder = make_images(tmp_path / "in")
    code, _, err = run_main(infer, folder, "--skip_existing", "--overwrite", "--checkpoint", tiny_checkpoint)
    assert code == 2 and "not allowed with argument" in err


def test_the_next_write_into_a_folder_removes_what_killed_writes_left_there(tiny_checkpoint, tmp_path, monkeypatch):
    src = photo(tmp_path / "a.png")
    pid_max = Path("/proc/sys/kernel/pid_max")
    dead = int(pid_max.read_text()) + 1 if pid_max.exists() else 2 ** 31  # a process id no process has
    left = [tmp_path / f"{temporary_prefix(name).rsplit('-', 2)[0]}-{dead}-k1ll3d_x.tmp"
            for name in ("a_x4.png", "b.safetensors")]
    kept = [tmp_path / ".a_x4.png.mine.tmp",  # a user's
            tmp_path / f"{temporary_prefix('a_x4.png')}stillwri.tmp",  # a live writer's
            tmp_path / f".a_x4.png.otherhost-{dead}-k1ll3d_x.tmp"]  # another machine's, on a shared disk
    for p in [*left, *kept]:
        p.write_bytes(b"half")
    monkeypatch.setattr(files, "CLEANED", set())  # as in a new process (this one has written there)
    code, _, err = run_main(infer, src, "--checkpoint", tiny_checkpoint)
    assert code == 0 and all(f"removed {p}, left by a process killed while writing it" in err for p in left), err
    assert not any(p.exists() for p in left) and all(p.read_bytes() == b"half" for p in kept)
