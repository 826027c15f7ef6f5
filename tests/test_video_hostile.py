"""infer.py on hostile videos (issue 34): names FFmpeg could read as URLs, frame sizes that change or
are too large, files that are not files, 10-bit input, SIGHUP, and names with control characters."""
import os
import socket
import threading

import pytest

from conftest import assert_one_line_error
from machinery import video
from test_video import infer_video, make_clip

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


def test_a_fifo_or_a_device_as_a_video_says_what_it_is(tiny_checkpoint, tmp_path):
    os.mkfifo(tmp_path / "pipe.mp4")
    os.symlink("/dev/zero", tmp_path / "zero.mkv")
    code, _, err = infer_video(tmp_path / "pipe.mp4", "--checkpoint", tiny_checkpoint)
    assert_one_line_error(code, err, f"{tmp_path / 'pipe.mp4'}: is a FIFO (a named pipe), not a regular file")
    code, _, err = infer_video(tmp_path / "zero.mkv", "--checkpoint", tiny_checkpoint)
    assert_one_line_error(code, err, f"{tmp_path / 'zero.mkv'}: is a link to /dev/zero, a character device, "
                                     f"not a regular file")
    assert left_in(tmp_path) == ["pipe.mp4", "tiny.pt", "zero.mkv"]
