"""Image files in and out: colour profile and EXIF kept, JPEG quality, unknown suffixes refused,
first frames and oversized images said in one line, sizes read from the header."""
import warnings

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageCms, ImageFile

from conftest import smooth_image
from machinery import images
from utils import UserError

ORIENTATION = ExifTags.Base.Orientation


def srgb_profile() -> bytes:
    """A real ICC profile, as a wide-gamut photo would carry one."""
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def photo(height: int = 20, width: int = 30) -> Image.Image:
    return Image.fromarray(smooth_image(np.random.default_rng(3), height, width))


def turned_exif() -> bytes:
    """EXIF saying: turn 90 degrees clockwise to display, from camera 'Cam'."""
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    exif[ExifTags.Base.Make] = "Cam"
    return exif.tobytes()


def stderr_lines(capsys) -> list[str]:
    return capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp", ".tif"])
def test_the_icc_profile_of_an_input_is_kept_in_its_output(tmp_path, suffix):
    icc = srgb_profile()
    photo().save(tmp_path / "in.jpg", quality=95, icc_profile=icc)
    img = images.open_image(tmp_path / "in.jpg")
    images.save_image(np.asarray(img), tmp_path / f"out{suffix}", **images.image_metadata(img))
    assert Image.open(tmp_path / f"out{suffix}").info["icc_profile"] == icc


def test_exif_is_kept_in_jpeg_with_the_orientation_reset_after_the_turn(tmp_path):
    photo(20, 30).save(tmp_path / "in.jpg", quality=95, exif=turned_exif())
    img = images.open_image(tmp_path / "in.jpg")
    assert img.size == (20, 30)
    images.save_image(np.asarray(img), tmp_path / "out.jpg", **images.image_metadata(img))
    out = Image.open(tmp_path / "out.jpg")
    assert out.size == (20, 30)
    assert out.getexif()[ExifTags.Base.Make] == "Cam"
    assert out.getexif().get(ORIENTATION, 1) == 1  # a viewer must not turn it again
    assert images.image_size(tmp_path / "out.jpg") == (20, 30)


def test_image_metadata_resets_an_orientation_still_there_and_gives_none_for_what_is_missing():
    raw = photo()
    raw.info["exif"] = turned_exif()
    exif = Image.Exif()
    exif.load(images.image_metadata(raw)["exif"])
    assert exif[ORIENTATION] == 1 and exif[ExifTags.Base.Make] == "Cam"
    assert images.image_metadata(photo()) == {"icc_profile": None, "exif": None}


def test_bmp_drops_the_metadata_silently_and_tiff_keeps_the_profile_only(tmp_path):
    metadata = {"icc_profile": srgb_profile(), "exif": turned_exif()}
    images.save_image(np.asarray(photo()), tmp_path / "out.bmp", **metadata)
    images.save_image(np.asarray(photo()), tmp_path / "out.tif", **metadata)
    assert Image.open(tmp_path / "out.bmp").size == (30, 20)
    tiff = Image.open(tmp_path / "out.tif")
    assert tiff.info["icc_profile"] == metadata["icc_profile"]
    assert ExifTags.Base.Make not in tiff.getexif()


def test_jpeg_quality_defaults_to_95_not_pils_75(tmp_path):
    pixels = smooth_image(np.random.default_rng(0), 64, 64)
    Image.fromarray(pixels).save(tmp_path / "pil95.jpg", quality=95)
    Image.fromarray(pixels).save(tmp_path / "pil75.jpg", quality=75)
    images.save_image(pixels, tmp_path / "default.jpg")
    images.save_image(pixels, tmp_path / "q75.jpg", quality=75)
    tables = {p.stem: Image.open(p).quantization for p in tmp_path.iterdir()}
    assert tables["default"] == tables["pil95"] != tables["pil75"]
    assert tables["q75"] == tables["pil75"]


def test_every_write_extension_writes_its_format_in_either_case(tmp_path):
    expected = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP",
                ".tif": "TIFF", ".tiff": "TIFF"}
    assert set(images.WRITE_EXTENSIONS) == set(expected)
    for suffix, fmt in expected.items():
        for name in (f"a{suffix}", f"B{suffix.upper()}"):
            images.save_image(np.asarray(photo()), tmp_path / name)
            assert Image.open(tmp_path / name).format == fmt, name


@pytest.mark.parametrize("name", ["x.xyz", "x.gif", "newdir"])
def test_an_unknown_extension_is_an_error_and_writes_nothing(tmp_path, name):
    with pytest.raises(UserError, match="unknown image extension") as e:
        images.save_image(np.asarray(photo()), tmp_path / name)
    assert str(e.value).startswith(str(tmp_path / name)) and ".png .jpg" in str(e.value)
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def solid_frames() -> list[Image.Image]:
    return [Image.new("RGB", (16, 12), colour) for colour in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]


@pytest.mark.parametrize("name", ["anim.gif", "pages.tif", "anim.png"])
def test_a_many_frame_image_is_read_as_its_first_frame_with_one_warning(tmp_path, capsys, name):
    first, *rest = solid_frames()
    first.save(tmp_path / name, save_all=True, append_images=rest)
    rgb = np.asarray(images.to_rgb8(images.open_image(tmp_path / name)))
    assert rgb.shape == (12, 16, 3) and (rgb == (255, 0, 0)).all()
    lines = stderr_lines(capsys)
    assert len(lines) == 1 and f"{name}: has 3 frames; only the first is used" in lines[0]


def test_a_single_frame_image_says_nothing(tmp_path, capsys):
    photo().save(tmp_path / "still.png")
    images.open_image(tmp_path / "still.png")
    assert capsys.readouterr().err == ""


def test_an_image_above_the_bomb_limit_is_decoded_with_one_line_and_twice_it_refused(tmp_path, capsys,
                                                                                         monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # warning above 1000 pixels, error above 2000
    photo(40, 40).save(tmp_path / "big.png")  # 1600 pixels
    photo(50, 50).save(tmp_path / "huge.png")  # 2500 pixels
    with warnings.catch_warnings(record=True) as leaked:  # the filters in force, images.py's among them
        assert images.open_image(tmp_path / "big.png").size == (40, 40)
    assert leaked == []  # not PIL's two-line warning as well
    lines = stderr_lines(capsys)
    assert len(lines) == 1
    assert "big.png: 40x40" in lines[0] and "decompression-bomb limit" in lines[0] and "decoding it anyway" in lines[0]
    with pytest.raises(UserError, match="huge.png: refused, too many pixels"):
        images.open_image(tmp_path / "huge.png")
    assert images.image_size(tmp_path / "big.png") == (40, 40)  # open_image says it; image_size does not
    assert capsys.readouterr().err == ""


def test_a_gif_above_the_bomb_limit_says_so_once_not_once_per_frame(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 150)  # the frames are 16x12 = 192 pixels
    first, *rest = solid_frames()
    first.save(tmp_path / "anim.gif", save_all=True, append_images=rest)
    images.open_image(tmp_path / "anim.gif")
    lines = stderr_lines(capsys)
    assert len(lines) == 2
    frames, big = sorted(lines, key=lambda line: "has 3 frames" not in line)
    assert "has 3 frames" in frames and "16x12" in big and "decoding it anyway" in big


def test_image_size_reads_the_header_without_decoding_and_applies_the_orientation(tmp_path, monkeypatch):
    photo(20, 30).save(tmp_path / "turned.jpg", quality=95, exif=turned_exif())
    photo(20, 30).save(tmp_path / "turned.png", exif=turned_exif())
    photo(20, 30).save(tmp_path / "plain.png")

    def no_decoding(self):
        raise AssertionError("image_size decoded the pixels")
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    assert images.image_size(tmp_path / "turned.jpg") == (20, 30)
    assert images.image_size(tmp_path / "turned.png") == (20, 30)
    assert images.image_size(tmp_path / "plain.png") == (30, 20)


def test_image_size_gives_open_images_one_line_errors(tmp_path):
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(UserError, match="missing.png: no such file"):
        images.image_size(tmp_path / "missing.png")
    with pytest.raises(UserError, match="text.png: not a readable image"):
        images.image_size(tmp_path / "text.png")
