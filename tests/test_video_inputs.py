"""infer.py on hostile videos: names FFmpeg could read as URLs, frame sizes that change or
are too large, files that are not files, 10-bit input, SIGHUP, and names with control characters."""
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, assert_one_line_error, terminal_lines
from machinery import video
from test_video import FPS, HEIGHT, WIDTH, infer_video, make_clip

av = pytest.importorskip("av")


def left_in(folder) -> list[str]:
    return sorted(os.listdir(folder))


@pytest.fixture
def listener():
    """A TCP server on 127.0.0.1 that counts the connections it gets (closing each at once); its port."""
    server = socket.create_server(("127.0.0.1", 0))
    connections = []

    def accept():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:  # closed: the test is over
                return
            connections.append(conn.getpeername())
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1], connections
    server.close()


def test_video_names_with_a_colon_are_files_never_urls(tiny_checkpoint, tmp_path, monkeypatch, listener):
    port, connections = listener
    monkeypatch.chdir(tmp_path)
    name = f"tcp:127.0.0.1:{port}.mp4"  # FFmpeg reads a relative name like this as a TCP address
    make_clip(tmp_path / name, count=2)
    code, _, err = infer_video(name, "--checkpoint", tiny_checkpoint)
    assert connections == [], err
    assert code == 0, err
    assert (tmp_path / f"tcp:127.0.0.1:{port}_x4.mp4").is_file()
    make_clip(tmp_path / "clip.mp4", count=2)
    code, _, err = infer_video("clip.mp4", "--checkpoint", tiny_checkpoint, "-o", f"tcp:127.0.0.1:{port}/")
    assert connections == [], err
    assert code == 0, err
    assert (tmp_path / f"tcp:127.0.0.1:{port}" / "clip_x4.mp4").is_file()


def test_what_reaches_ffmpeg_is_a_file_url(tiny_checkpoint, tmp_path, monkeypatch):
    opened, real_open = [], av.open

    def recording_open(file, *args, **kwargs):
        opened.append(file)
        return real_open(file, *args, **kwargs)

    make_clip(tmp_path / "clip.mp4", count=2)
    monkeypatch.setattr(video.av, "open", recording_open)
    monkeypatch.chdir(tmp_path)
    assert infer_video("clip.mp4", "--checkpoint", tiny_checkpoint, "-o", "out/")[0] == 0
    names = [f for f in opened if isinstance(f, str)]
    assert len(names) >= 4  # probe, rehearse, transcode's input and its output
    assert all(f.startswith("file:/") for f in names), names


def size_changing_clip(path, sizes=((WIDTH, HEIGHT), (WIDTH // 2, HEIGHT // 2)), each: int = 3):
    """Motion JPEG in Matroska whose frames change size mid-stream: `each` frames of each size."""
    with av.open(str(path), "w") as c:
        stream = c.add_stream("mjpeg", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = *sizes[0], "yuvj420p"
        index = 0
        for width, height in sizes:
            encoder = av.CodecContext.create("mjpeg", "w")
            encoder.width, encoder.height, encoder.pix_fmt = width, height, "yuvj420p"
            encoder.time_base = Fraction(1, FPS)
            for _ in range(each):
                img = np.full((height, width, 3), 40 * index % 255, np.uint8)
                frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuvj420p")
                frame.pts, frame.time_base = index, Fraction(1, FPS)
                for packet in encoder.encode(frame):
                    packet.stream, packet.pts, packet.dts, packet.time_base = stream, index, index, Fraction(1, FPS)
                    c.mux(packet)
                index += 1
    return path


def test_a_frame_size_change_mid_video_is_refused_naming_the_frame(tiny_checkpoint, tmp_path):
    src = size_changing_clip(tmp_path / "sizes.mkv")
    code, _, err = infer_video(src, "--checkpoint", tiny_checkpoint, "-o", tmp_path / "out.mkv")
    assert_one_line_error(code, err, f"{src}: frame 4 is 32x24, where the video starts at 64x48",
                          "--frames 0:3", "nothing was written")
    assert left_in(tmp_path) == ["sizes.mkv", "tiny.pt"]


def test_a_video_above_the_pixel_limit_is_refused_from_its_header(tiny_checkpoint, tmp_path, monkeypatch):
    src = make_clip(tmp_path / "clip.mp4", count=2)  # 64x48: 3,072 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # refused above twice the limit, as PIL does
    code, _, err = infer_video(src, "--checkpoint", tiny_checkpoint)
    assert_one_line_error(code, err, f"{src}: 64x48 frames", "refused, too many pixels to decode safely")
    assert left_in(tmp_path) == ["clip.mp4", "tiny.pt"]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # between the limit and twice it: decoded, and said
    code, _, err = infer_video(src, "--checkpoint", tiny_checkpoint)
    assert code == 0, err
    assert "above PIL's decompression-bomb limit" in err and "decoding it anyway" in err


def test_an_mkv_output_is_not_told_to_use_mkv(tiny_checkpoint, tmp_path, monkeypatch):
    src = make_pcm_clip(tmp_path / "pcm.mkv")
    monkeypatch.setitem(video.OUTPUT_FORMATS, ".mkv", "mp4")  # a Matroska that refuses the audio, as MP4 does
    code, _, err = infer_video(src, "--checkpoint", tiny_checkpoint, "-o", tmp_path / "out.mkv")
    assert_one_line_error(code, err, ".mkv can't hold its streams", "--frames 0: ")
    assert "NAME.mkv" not in err
    assert infer_video(src, "--checkpoint", tiny_checkpoint, "-o", tmp_path / "out.mkv", "--frames", "0:")[0] == 0


def test_each_container_refusal_in_one_process_says_why(tiny_checkpoint, tmp_path):
    src = make_pcm_clip(tmp_path / "pcm.mkv")
    for _ in range(2):  # PyAV logs a line the same as the last one only once
        code, _, err = infer_video(src, "--checkpoint", tiny_checkpoint, "-o", tmp_path / "out.mp4")
        assert_one_line_error(code, err, ".mp4 can't hold its streams (unsupported channel layout")


def make_pcm_clip(path, frames: int = 4):
    """H.264 with PCM stereo audio (which MP4 refuses), in Matroska."""
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=FPS)
        v.width, v.height, v.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        a = c.add_stream("pcm_s16le", rate=48000, layout="stereo")
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.zeros((HEIGHT, WIDTH, 3), np.uint8), format="rgb24")
            frame.pts = i
            c.mux(v.encode(frame))
        c.mux(v.encode(None))
        audio = av.AudioFrame.from_ndarray(np.zeros((1, 2 * 1024), np.int16), format="s16", layout="stereo")
        audio.sample_rate, audio.pts = 48000, 0
        c.mux(a.encode(audio))
        c.mux(a.encode(None))
    return path


def test_a_fifo_or_a_device_as_a_video_says_what_it_is(tiny_checkpoint, tmp_path):
    os.mkfifo(tmp_path / "pipe.mp4")
    os.symlink("/dev/zero", tmp_path / "zero.mkv")
    code, _, err = infer_video(tmp_path / "pipe.mp4", "--checkpoint", tiny_checkpoint)
    assert_one_line_error(code, err, f"{tmp_path / 'pipe.mp4'}: is a FIFO (a named pipe), not a regular file")
    code, _, err = infer_video(tmp_path / "zero.mkv", "--checkpoint", tiny_checkpoint)
    assert_one_line_error(code, err, f"{tmp_path / 'zero.mkv'}: is a link to /dev/zero, a character device, "
                                     f"not a regular file")
    assert left_in(tmp_path) == ["pipe.mp4", "tiny.pt", "zero.mkv"]


def test_a_10_bit_video_is_said_to_be_read_and_written_as_8_bit(tiny_checkpoint, tmp_path):
    src = tmp_path / "deep.mkv"
    with av.open(str(src), "w") as c:
        v = c.add_stream("libx264", rate=FPS)
        v.width, v.height, v.pix_fmt = WIDTH, HEIGHT, "yuv420p10le"
        for i in range(2):
            frame = av.VideoFrame.from_ndarray(np.zeros((HEIGHT, WIDTH, 3), np.uint8), format="rgb24")
            frame = frame.reformat(format="yuv420p10le")
            frame.pts = i
            c.mux(v.encode(frame))
        c.mux(v.encode(None))
    code, _, err = infer_video(src, "--checkpoint", tiny_checkpoint)
    assert code == 0, err
    assert terminal_lines(err) == [f"infer.py: warning: {src}: yuv420p10le is 10 bits a sample: read and written "
                                   f"as 8-bit (the network works on 8-bit images)"]
    with av.open(str(tmp_path / "deep_x4.mkv")) as c:
        assert c.streams.video[0].codec_context.format.name == "yuv420p"


def test_a_name_with_control_characters_is_shown_escaped(tiny_checkpoint, tmp_path):
    src = tmp_path / "a\x1b]0;owned\x07\nb.mp4"
    src.write_text("not a video\n")
    code, _, err = infer_video(src, "--checkpoint", tiny_checkpoint)
    assert_one_line_error(code, err, "a\\x1b]0;owned\\x07\\x0ab.mp4: not a video FFmpeg can read")
    assert "\x1b" not in err and "\x07" not in err


@pytest.mark.slow
def test_sighup_mid_video_stops_it_as_sigterm_does_and_leaves_nothing(tiny_checkpoint, tmp_path):
    make_clip(tmp_path / "clip.mp4", count=480, audio=False)
    process = subprocess.Popen([sys.executable, "infer.py", tmp_path / "clip.mp4", "--checkpoint", tiny_checkpoint,
                                "--precision", "fp32"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".clip_x4.mp4.*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # the temporary output is there: the frames are being written
    process.send_signal(signal.SIGHUP)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGHUP, err
    assert terminal_lines(err)[-1].startswith("infer.py: stopped by SIGHUP at frame "), err
    assert terminal_lines(err)[-1].endswith(" of 480; nothing was written"), err
    assert left_in(tmp_path) == ["clip.mp4", "tiny.pt"]
