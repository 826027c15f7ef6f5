"""infer.py on videos (video.py): frames, times, rotation and audio kept; slices; Ctrl-C and bad
files leave nothing and say so in one line. The clips are made here with PyAV."""
import os
import re
import signal
from fractions import Fraction

import numpy as np
import pytest
import torch

import benchmark
import infer
from conftest import assert_one_line_error, run_main, run_script, terminal_lines
from machinery import video
from machinery.checkpoint import load_model
from machinery.upscale import upscale
from metrics import psnr

av = pytest.importorskip("av")

FRAMES, WIDTH, HEIGHT, FPS = 24, 64, 48, 24

# PSNR of an output frame, decoded, against infer.py's image path on the input frame: H.264 at
# crf 17 in yuv420p (chroma at half resolution) is all that separates them. Measured on these
# clips with the tiny network (random weights: a noisy output, hard on 4:2:0), over 24 frames:
#   RGB:               27.9 to 28.4 dB (crf 0: 28.7 to 28.9, the 4:2:0 chroma alone)
#   luma (y_channel):  38.8 to 40.3 dB (crf 0: 42.7; crf 23: 35.9)
# A colour matrix mixed up between decoding and encoding (BT.601 for BT.709): RGB 25.0, luma 27.9.
MIN_PSNR_RGB, MIN_PSNR_Y = 26.0, 36.0


def matches_the_image_path(out: np.ndarray, frame: np.ndarray, model) -> bool:
    ref = upscale(model, frame)
    return psnr(out, ref) > MIN_PSNR_RGB and psnr(out, ref, y_channel=True) > MIN_PSNR_Y


def moving_frames(count: int = FRAMES, width: int = WIDTH, height: int = HEIGHT):
    """Smooth colour gradients that drift a few pixels a frame: HWC uint8 RGB."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    for i in range(count):
        t = i / count
        channels = [np.sin(2 * np.pi * (1.3 * x + 0.4 * y + t)), np.sin(2 * np.pi * (0.5 * x - 1.1 * y - t) + 1),
                    np.cos(2 * np.pi * (0.8 * (x + y) + 2 * t))]
        yield (127.5 + 100 * np.stack(channels, -1)).clip(0, 255).astype(np.uint8)


def make_clip(path, count: int = FRAMES, audio: bool = True, rotation: int = 0, faststart: bool = False,
              video_stream: bool = True):
    """An H.264 clip of `moving_frames` at FPS (BT.709 tags), with a 440 Hz AAC sine as long as it."""
    with av.open(str(path), "w", options={"movflags": "+faststart"} if faststart else {}) as c:
        v = c.add_stream("libx264", rate=FPS, options={"crf": "12"}) if video_stream else None
        a = c.add_stream("aac", rate=48000, layout="mono") if audio else None
        if v is not None:
            v.width, v.height, v.pix_fmt = WIDTH, HEIGHT, "yuv420p"
            v.codec_context.color_primaries = v.codec_context.color_trc = v.codec_context.colorspace = 1
            if rotation:
                v.set_display_rotation(rotation)
            for i, img in enumerate(moving_frames(count)):
                frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p",
                                                                                 dst_colorspace="itu709")
                frame.pts, frame.time_base = i, Fraction(1, FPS)
                c.mux(v.encode(frame))
            c.mux(v.encode(None))
        if a is not None:
            encode_sine(c, a, seconds=count / FPS)
    return path


def encode_sine(container, stream, seconds: float, rate: int = 48000) -> None:
    samples = (0.3 * np.sin(2 * np.pi * 440 * np.arange(int(rate * seconds)) / rate)).astype(np.float32)
    for k in range(0, len(samples), 1024):
        frame = av.AudioFrame.from_ndarray(samples[None, k:k + 1024], format="flt", layout="mono")
        frame.sample_rate, frame.pts = rate, k
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def decoded(path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]


def audio_packets(path) -> list[bytes]:
    with av.open(str(path)) as c:
        return [bytes(p) for p in c.demux(c.streams.audio[0]) if p.dts is not None]


def video_times(path) -> dict:
    """The video stream's rate, frame times in seconds, duration and tags, as a reader sees them."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        frames = list(c.decode(s))
        return {"rate": s.average_rate, "times": [float(f.pts * f.time_base) for f in frames],
                "duration": video.stated_duration(s), "container": c.duration, "rotation": frames[0].rotation,
                "colour": [getattr(frames[0], k) for k in ("color_primaries", "color_trc", "colorspace")],
                "size": (frames[0].width, frames[0].height), "streams": [st.type for st in c.streams]}


def infer_video(*args, terminal: bool = False):
    return run_main(infer, *map(str, args), "--precision", "fp32", terminal=terminal)


@pytest.fixture
def clip(tmp_path):
    return make_clip(tmp_path / "clip.mp4", rotation=90)


def test_video_keeps_frames_times_rotation_colour_and_audio_bit_for_bit(clip, tiny_checkpoint, tmp_path):
    code, out, err = infer_video(clip, "--checkpoint", tiny_checkpoint, terminal=True)
    assert code == 0, err
    assert "upscaling: 100%" in err and "24/24 [" in err and "frame/s]" in err  # the bar: frames/s, time left
    dst = tmp_path / "clip_x4.mp4"
    assert f"-> {dst} (256x192, H.264 crf 17)" in out
    src_info, dst_info = video_times(clip), video_times(dst)
    assert len(dst_info["times"]) == FRAMES and dst_info["size"] == (WIDTH * 4, HEIGHT * 4)
    assert dst_info["rate"] == FPS and dst_info["times"] == src_info["times"]
    assert dst_info["duration"] == src_info["duration"] == 1.0 and dst_info["container"] == src_info["container"]
    assert dst_info["rotation"] == 90 and dst_info["colour"] == src_info["colour"] == [1, 1, 1]
    assert dst_info["streams"] == ["video", "audio"]
    packets = audio_packets(clip)
    assert len(packets) > 40 and audio_packets(dst) == packets


def test_video_frames_equal_the_image_path_within_h264(tiny_checkpoint, tmp_path):
    """Frame k of the output, decoded, against upscale.upscale (infer.py's image path) on frame k of the input."""
    clip = make_clip(tmp_path / "clip.mp4", count=8)
    assert infer_video(clip, "--checkpoint", tiny_checkpoint, "--tile", "32")[0] == 0  # tiled: 4 tiles a frame
    model, _ = load_model(tiny_checkpoint, torch.device("cpu"))
    outputs = decoded(tmp_path / "clip_x4.mp4")
    assert len(outputs) == 8
    for k, (frame, out) in enumerate(zip(decoded(clip), outputs)):
        assert matches_the_image_path(out, frame, model), k


def test_frames_slice_starts_at_zero_without_audio(clip, tiny_checkpoint, tmp_path):
    code, out, err = infer_video(clip, "--checkpoint", tiny_checkpoint, "--frames", "5:15", "-o", tmp_path / "cut.mkv")
    assert code == 0, err
    assert "10 frames" in out and "--frames: audio and subtitles left out" in out
    info = video_times(tmp_path / "cut.mkv")
    assert info["streams"] == ["video"] and len(info["times"]) == 10
    assert info["times"][0] == 0 and info["rotation"] == 90
    model, _ = load_model(tiny_checkpoint, torch.device("cpu"))
    assert matches_the_image_path(decoded(tmp_path / "cut.mkv")[0], decoded(clip)[5], model)


@pytest.mark.parametrize("signum, name", [(signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM"),
                                          (signal.SIGHUP, "SIGHUP")])
def test_ctrl_c_sigterm_or_sighup_mid_video_leaves_nothing_and_says_where(clip, tiny_checkpoint, tmp_path,
                                                                          monkeypatch, signum, name):
    calls = []

    def interrupted_at_frame_7(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7 and signum == signal.SIGINT:
            raise KeyboardInterrupt  # Python's SIGINT handler (a shell may start this suite with SIGINT ignored)
        if len(calls) == 7:
            signal.raise_signal(signum)  # as `kill` would send it
        return upscale(*args, **kwargs)

    monkeypatch.setattr(video, "upscale", interrupted_at_frame_7)
    before, handlers = sorted(os.listdir(tmp_path)), [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)]
    code, _, err = infer_video(clip, "--checkpoint", tiny_checkpoint)
    assert code == 128 + signum
    assert terminal_lines(err) == [f"infer.py: stopped by {name} at frame 7 of 24; nothing was written"]
    assert sorted(os.listdir(tmp_path)) == before  # no output, no temporary file
    assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)] == handlers  # put back


def test_bad_videos_are_one_line_errors_and_write_nothing(tiny_checkpoint, tmp_path):
    (tmp_path / "text.mp4").write_text("not a video\n" * 50)
    (tmp_path / "empty.mkv").write_bytes(b"")
    make_clip(tmp_path / "sound.mp4", video_stream=False)
    for name, faststart in (("cut.mp4", True), ("cut.mkv", False), ("moovless.mp4", False)):
        whole = make_clip(tmp_path / f"whole_{name}", faststart=faststart).read_bytes()
        (tmp_path / name).write_bytes(whole[:len(whole) // 2])
    cases = {"text.mp4": "not a video FFmpeg can read", "empty.mkv": "not a video FFmpeg can read",
             "sound.mp4": "has no video stream (it holds: audio)", "moovless.mp4": "not a video FFmpeg can read",
             "cut.mp4": "frames could be decoded (a truncated or damaged file?); nothing was written",
             "cut.mkv": "s it states (a truncated or damaged file?); nothing was written"}
    # Where the cut lands in a packet, FFmpeg may instead stop decoding with an error: the same refusal.
    decoding_failed = re.compile(r"failed at frame \d+ of \d+ \(.*\); nothing was written$")
    for name, message in cases.items():
        code, _, err = infer_video(tmp_path / name, "--checkpoint", tiny_checkpoint, "-o", tmp_path / "out.mkv")
        if name.startswith("cut.") and decoding_failed.search(err.strip()):
            message = "failed at frame"
        assert_one_line_error(code, err, f"infer.py: error: {tmp_path / name}: ", message)
        assert not (tmp_path / "out.mkv").exists() and not list(tmp_path.glob(".*"))


def test_video_outputs_follow_the_image_rules(clip, tiny_checkpoint, tmp_path):
    args = (clip, "--checkpoint", tiny_checkpoint, "--frames", "0:2")
    assert infer_video(*args)[0] == 0
    code, _, err = infer_video(*args)
    assert_one_line_error(code, err, "clip_x4.mp4: exists; pass --overwrite to replace it")
    assert infer_video(*args, "--overwrite")[0] == 0
    code, _, err = infer_video(*args, "-o", clip)
    assert_one_line_error(code, err, "is an input; outputs never replace inputs")
    code, _, err = infer_video(*args, "-o", tmp_path / "x.webm")
    assert_one_line_error(code, err, "a video is written as .mp4 .m4v .mov .mkv")
    assert infer_video(*args, "-o", tmp_path / "new" / "")[0] == 0  # a folder, made
    assert (tmp_path / "new" / "clip_x4.mp4").is_file()
    assert infer_video(clip, "--frames", "0:2", "--scale", "3")[0] == 0  # the shipped x3: 192x144, even
    assert (tmp_path / "clip_x3.mp4").is_file()


def test_folder_run_takes_images_and_names_the_videos_left(image_dir, tiny_checkpoint, tmp_path):
    make_clip(image_dir / "clip.mp4", audio=False, count=2)
    code, _, err = infer_video(image_dir, "-o", tmp_path / "out", "--checkpoint", tiny_checkpoint)
    assert code == 0 and "1 video not upscaled: give each video as INPUT" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["img0_x4.png", "img1_x4.png", "img2_x4.png"]


def test_frame_span_parses_python_like_slices():
    assert video.frame_span("0:48") == (0, 48) and video.frame_span("10:") == (10, None)
    assert video.frame_span(":5") == (0, 5)
    for bad in ("5", "5:5", "-1:3", "a:b", "3:1"):
        with pytest.raises(ValueError):
            video.frame_span(bad)


def test_benchmark_times_the_video_path_at_x2_and_x4(image_dir, tiny_checkpoint, monkeypatch, capsys):
    model, _ = load_model(tiny_checkpoint, torch.device("cpu"))
    monkeypatch.setattr(benchmark, "load_chosen", lambda *args, **kwargs: (model, {}, tiny_checkpoint))
    plan = benchmark.QUICK._replace(video_lr=(48, 32), video_frames=2)
    figures = benchmark.bench_video(torch.device("cpu"), image_dir, plan, "bf16")
    assert sorted(figures) == [f"video_48x32_x{s}_fps_{p}" for s in (2, 4) for p in ("bf16", "fp32")]
    assert all(v > 0 for v in figures.values()) and "video 48x32 -> x4 bf16, frames/s" in capsys.readouterr().out


@pytest.mark.slow
def test_infer_upscales_a_video_from_the_command_line(tiny_checkpoint, tmp_path):
    make_clip(tmp_path / "clip.mkv", count=6)
    result = run_script("infer.py", tmp_path / "clip.mkv", "--checkpoint", tiny_checkpoint, "--crf", "23")
    assert "clip_x4.mkv (256x192, H.264 crf 23" in result.stdout
    assert len(decoded(tmp_path / "clip_x4.mkv")) == 6 and audio_packets(tmp_path / "clip_x4.mkv")
    result = run_script("infer.py", tmp_path / "clip.mkv", "--crf", "52", check=False)
    assert result.returncode == 2 and "must be 0 to 51" in result.stderr


def test_audio_the_output_container_cannot_hold_is_refused_before_any_frame(tiny_checkpoint, tmp_path, monkeypatch):
    src = tmp_path / "pcm.mkv"  # PCM stereo, as camcorders and screen recorders write: .mp4 refuses it at its end
    with av.open(str(src), "w") as c:
        v = c.add_stream("libx264", rate=FPS)
        v.width, v.height, v.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        a = c.add_stream("pcm_s16le", rate=48000, layout="stereo")
        for i, img in enumerate(moving_frames(4)):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            c.mux(v.encode(frame))
        c.mux(v.encode(None))
        audio = av.AudioFrame.from_ndarray(np.zeros((1, 2 * 1024), np.int16), format="s16", layout="stereo")
        audio.sample_rate, audio.pts = 48000, 0
        c.mux(a.encode(audio))
        c.mux(a.encode(None))
    monkeypatch.setattr(video, "upscale", lambda *a, **k: pytest.fail("a frame was upscaled"))
    code, _, err = infer_video(src, "--checkpoint", tiny_checkpoint, "-o", tmp_path / "out.mp4")
    assert_one_line_error(code, err, f"{src}: .mp4 can't hold its streams (unsupported channel layout",
                          "-o NAME.mkv holds most")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pcm.mkv", "tiny.pt"]
    monkeypatch.undo()
    assert infer_video(src, "--checkpoint", tiny_checkpoint)[0] == 0  # the default, pcm_x4.mkv, holds it
    assert audio_packets(tmp_path / "pcm_x4.mkv") == audio_packets(src)
