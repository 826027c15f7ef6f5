"""Upscaling a video file frame by frame through upscale.upscale: H.264 out, audio and subtitles copied.

Frames stream through (decode -> upscale -> encode), so memory does not grow with the length.
The video becomes H.264 (libx264, yuv420p, --crf) with the input's frame times, rate, rotation
(display matrix), sample aspect ratio and colour tags (primaries, transfer, matrix, range);
audio and subtitle packets are copied as they are, not re-encoded. The output container is the
input's where it carries H.264 (.mp4 .m4v .mov .mkv), else Matroska (.mkv: it carries what
.webm, .avi and the others hold). Needs PyAV (requirements-optional.txt).

Refused before any frame is written: a frame size above the image path's pixel limit (PIL's
MAX_IMAGE_PIXELS, read from the stream's header), and a frame size that changes mid-stream (one
output has one size; the encoder would squeeze the frame into it).
"""
import io
import os
import signal
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from utils import UserError, first_line, plural, shown, sigterm_raises, warn

from .files import atomic_path, folder_for, not_a_file
from .upscale import DEFAULT_TILE, upscale

try:
    import av
    import av.logging
except ImportError:  # optional: only videos need it
    av = None

# Read as videos when INPUT is one of these (a folder run takes images only).
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".ts", ".mts", ".m2ts", ".flv", ".mpg",
                    ".mpeg", ".wmv", ".ogv", ".3gp")
# Output extensions and their muxers: containers that carry H.264 beside the input's audio.
OUTPUT_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}
FALLBACK_EXTENSION = ".mkv"  # for inputs whose container can't carry H.264 (.webm) or carries it badly (.avi)

# x264's CRF: 17 is visually lossless with a little margin (18 is the usual "nearly so").
DEFAULT_CRF = 17

# AVColorSpace (the frame's and stream's tag) -> the matrix swscale converts RGB with, so that
# the RGB frames are encoded back with the matrix they were decoded with.
SWS_COLORSPACES = {1: "itu709", 4: "fcc", 5: "itu601", 6: "smpte170m", 7: "smpte240m", 9: "bt2020", 10: "bt2020"}
MPEG_RANGE, JPEG_RANGE = 1, 2  # AVColorRange: limited (16-235) and full (0-255)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP during a video; the message names it, says at which frame, and
    that nothing was written; `signum` gives the exit status (128 + signum)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (`signum`), raised where the work is, so that it unwinds as Ctrl-C does
    (the temporary file removed)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class VideoInfo(NamedTuple):
    """What `probe` reads from a video's first stream and frame."""
    width: int
    height: int
    frames: int | None  # as the container states it; None where it doesn't (Matroska)
    rate: Fraction  # frames per second
    duration: float | None  # seconds, of the video stream, where stated
    display_matrix: list[int] | None  # FFmpeg's 3x3 int32 DISPLAYMATRIX (rotation, flips)
    colour: dict  # color_primaries, color_trc, colorspace, color_range as the first frame tags them

    def estimated_frames(self) -> int | None:
        """The frame count, stated or from the duration (for the progress bar only)."""
        if self.frames:
            return self.frames
        return round(self.duration * self.rate) if self.duration else None


def is_video(path: Path) -> bool:
    """A path with a video extension, not a folder: infer.py reads it as a video (a FIFO or a
    device too, so that `probe` says what it is)."""
    return path.suffix.lower() in VIDEO_EXTENSIONS and path.exists() and not path.is_dir()


def require_av() -> None:
    if av is None:
        raise UserError("videos need PyAV: pip install av (see requirements-optional.txt)")


def frame_span(text: str) -> tuple[int, int | None]:
    """--frames 'A:B' (also 'A:', ':B'): frame indices start (counted from 0) to stop (not included)."""
    start, colon, stop = text.partition(":")
    try:
        span = (int(start) if start.strip() else 0, int(stop) if stop.strip() else None)
    except ValueError:
        span = None
    if not colon or span is None or span[0] < 0 or (span[1] is not None and span[1] <= span[0]):
        raise ValueError(f"{text!r}: use START:STOP with 0 <= START < STOP (either may be left out), e.g. 0:48")
    return span


# ---------------------------------------------------------------- paths and checks, before any work

def output_path(src: Path, output: str | None, scale: int) -> Path:
    """Where the video goes: -o as a file (a video extension), or <stem>_x<scale><ext> in -o as a
    folder, or beside `src`. <ext> is src's where OUTPUT_FORMATS has it, else .mkv."""
    ext = src.suffix.lower() if src.suffix.lower() in OUTPUT_FORMATS else FALLBACK_EXTENSION
    name = f"{src.stem}_x{scale}{ext}"
    if not output:
        return src.with_name(name)
    if Path(output).is_dir() or output.endswith("/") or not Path(output).suffix:
        return Path(output) / name
    if Path(output).suffix.lower() not in OUTPUT_FORMATS:
        raise UserError(f"{shown(output)}: a video is written as {' '.join(OUTPUT_FORMATS)} (H.264), not "
                        f"{Path(output).suffix!r} (for a folder, end the name with /)")
    return Path(output)


def ffmpeg_url(path) -> str:
    """`path` as FFmpeg is given it: the file: protocol and an absolute path, so that no name
    ('tcp:host:port.mp4', 'http:...', 'concat:a|b', a folder named so) is read as a URL."""
    return "file:" + os.path.abspath(path)


def probe(path: Path) -> VideoInfo:
    """The video's size, rate, frame count and tags; a one-line error for a file that is not a
    readable video (another kind of file, no video stream, a first frame that can't be decoded)."""
    require_av()
    check_regular_file(path)
    try:
        with av.open(ffmpeg_url(path)) as container:
            return read_info(path, container)
    except av.FFmpegError as e:
        raise UserError(f"{shown(path)}: not a video FFmpeg can read ({ffmpeg_message(e)})") from None


def check_regular_file(path: Path) -> None:
    """Refuse, saying what it is, a path that is not a regular file: FFmpeg would wait on a FIFO
    for ever, and read a device (/dev/zero) without end."""
    try:
        os.stat(path)
    except OSError as e:
        raise UserError(f"{shown(path)}: cannot be read ({e.strerror})") from None
    kind = not_a_file(path)
    if kind:
        raise UserError(f"{shown(path)}: {kind}, not a regular file: a video is read from a file")


def read_info(path: Path, container) -> VideoInfo:
    if container.format.name == "image2" or container.format.name.endswith("_pipe"):
        raise UserError(f"{shown(path)}: is an image ({container.format.name}), not a video: give it its image "
                        f"extension")
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["no streams"]
        raise UserError(f"{shown(path)}: has no video stream (it holds: {', '.join(kinds)})")
    stream = container.streams.video[0]
    check_pixels(path, stream.codec_context.width, stream.codec_context.height)  # from the header: not decoded yet
    first = next(container.decode(stream), None)
    if first is None:
        raise UserError(f"{shown(path)}: no video frame could be decoded (a torn or truncated file?)")
    if (first.width, first.height) != (stream.codec_context.width, stream.codec_context.height):
        check_pixels(path, first.width, first.height)
    bits = max(c.bits for c in first.format.components)
    if bits > 8:  # as for 16-bit images: said, not done silently
        warn(f"{shown(path)}: {first.format.name} is {bits} bits a sample: read and written as 8-bit (the network "
             f"works on 8-bit images)")
    # PyAV 18.1 made side_data a mapping of type to data; before, a sequence of data.
    side_data = first.side_data.values() if hasattr(first.side_data, "values") else first.side_data
    matrix = next((np.frombuffer(bytes(d), "<i4").tolist() for d in side_data
                   if str(d.type).endswith("DISPLAYMATRIX")), None)
    colour = {k: getattr(first, k) for k in ("color_primaries", "color_trc", "colorspace", "color_range")}
    rate = stream.average_rate or stream.guessed_rate or Fraction(25)
    return VideoInfo(first.width, first.height, stated_frames(stream), Fraction(rate), stated_duration(stream),
                     matrix, colour)


def check_pixels(path: Path, width: int, height: int) -> None:
    """The image path's limit (PIL.Image.MAX_IMAGE_PIXELS) on each frame: above twice it refused,
    as PIL refuses an image; above it decoded, and said, as images.open_image does."""
    limit, pixels = Image.MAX_IMAGE_PIXELS, width * height
    if not limit or pixels <= limit:
        return
    size = f"{width}x{height} frames ({pixels / 1e6:.1f} megapixels)"
    if pixels > 2 * limit:
        raise UserError(f"{shown(path)}: {size} are above twice PIL's decompression-bomb limit of {limit / 1e6:.1f} "
                        f"megapixels: refused, too many pixels to decode safely")
    warn(f"{shown(path)}: {size} are above PIL's decompression-bomb limit of {limit / 1e6:.1f} megapixels; "
         f"decoding it anyway")


def stated_frames(stream) -> int | None:
    """The frame count the container states (MP4, MOV; mkvmerge's NUMBER_OF_FRAMES tag), else None."""
    count = stream.frames or stream.metadata.get("NUMBER_OF_FRAMES", "")
    return int(count) if str(count).isdigit() and int(count) > 0 else None


def stated_duration(stream) -> float | None:
    """The video stream's duration in seconds as the container states it (Matroska: its DURATION
    tag, '00:01:02.500000000'), else None."""
    if stream.duration:
        return float(stream.duration * stream.time_base)
    hours, minutes, seconds = (stream.metadata.get("DURATION", "").split(":") + ["", "", ""])[:3]
    try:
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    except ValueError:
        return None


def check_encodable(info: VideoInfo, scale: int, src: Path) -> None:
    """H.264 in 4:2:0 needs an even width and height: an odd size times 3 is refused now."""
    width, height = info.width * scale, info.height * scale
    if width % 2 or height % 2:
        raise UserError(f"{shown(src)}: x{scale} makes it {width}x{height}; H.264 (yuv420p) needs an even width "
                        f"and height: use --scale 2 or 4")


def ffmpeg_message(e: Exception) -> str:
    """FFmpeg's reason, without PyAV's '[Errno N]' and file name."""
    return shown(first_line(Exception(getattr(e, "strerror", None) or e)))


# ---------------------------------------------------------------- the work

@dataclass
class Progress:
    """How far `transcode` got: for the messages when it stops, and the check that it read everything."""
    total: int | None  # frames asked for, where known
    written: int = 0
    first_pts: int | None = None  # of frame 0, in the stream's time base
    end: float | None = None  # seconds from frame 0 to the end of the last frame decoded

    def where(self) -> str:
        """'frame 37 of 120': the frame being worked on, 1-based, of those asked for; or, once
        all were written, 'the end of the file' (the muxer's trailer)."""
        if self.total and self.written >= self.total:
            return "the end of the file"
        return f"frame {self.written + 1}" + (f" of {self.total}" if self.total else "")


def upscale_video(model, src: Path, dst: Path, info: VideoInfo, *, crf: int = DEFAULT_CRF,
                  frames: tuple[int, int | None] | None = None, tile: int = DEFAULT_TILE,
                  tile_pad: int | None = None, self_ensemble: bool = False, precision: str = "fp32") -> int:
    """Upscale `src` into `dst` (written whole or not at all); the number of frames written.

    Args:
        info: `probe(src)`.
        frames: (start, stop) frame indices (stop None: to the end); None: all. With a span,
            audio and subtitles are left out (cutting them to the frames is not done).
    Raises Interrupted on Ctrl-C, SIGTERM or SIGHUP and UserError on a failure, each saying where it stopped.
    """
    span = frames or (0, None)
    total = info.estimated_frames()
    progress = Progress(None if total is None else max(0, min(total, span[1] or total) - span[0]))
    options = dict(tile=tile, tile_pad=tile_pad, self_ensemble=self_ensemble, precision=precision)
    # A bar on a terminal only (as for folders of images): frames/s and the time left.
    with sigterm_raises(Terminated), tqdm(total=progress.total, desc="upscaling", unit="frame", disable=None) as bar:
        try:
            with folder_for(dst), atomic_path(dst) as tmp:
                transcode(model, src, tmp, OUTPUT_FORMATS[dst.suffix.lower()], info, crf=crf, span=span,
                          copy=frames is None, options=options, progress=progress, bar=bar)
                check_complete(src, info, span, progress)
        except KeyboardInterrupt as e:
            signum = e.signum if isinstance(e, Terminated) else signal.SIGINT
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            raise Interrupted(f"stopped by {name} at {progress.where()}; nothing was written", signum=signum) from None
        except av.FFmpegError as e:
            raise UserError(f"{shown(src)}: failed at {progress.where()} ({ffmpeg_message(e)}); "
                            f"nothing was written") from None
    return progress.written


def check_complete(src: Path, info: VideoInfo, span: tuple[int, int | None], progress: Progress) -> None:
    """Refuse an output short of what the container states (a truncated file), or one with no frame."""
    (start, stop), written = span, progress.written
    if written == 0:
        raise UserError(f"{shown(src)}: no frame in --frames {start}:{'' if stop is None else stop}"
                        f"{'' if info.frames is None else f' (it has {info.frames})'}; nothing was written")
    expected = None if info.frames is None else min(info.frames, stop or info.frames) - start
    if expected is not None and written < expected:
        raise UserError(f"{shown(src)}: only {written} of {expected} frames could be decoded (a truncated or damaged "
                        f"file?); nothing was written")
    # Without a frame count (Matroska), the stated duration: short by more than half a frame.
    if info.frames is None and stop is None and info.duration and progress.end < info.duration - 0.5 / info.rate:
        raise UserError(f"{shown(src)}: the video stops at {progress.end:.2f} s of the {info.duration:.2f} s it states "
                        f"(a truncated or damaged file?); nothing was written")


def transcode(model, src: Path, tmp: str, muxer: str, info: VideoInfo, *, crf: int, span: tuple[int, int | None],
              copy: bool, options: dict, progress: Progress, bar: tqdm) -> None:
    """Decode `src`, upscale frames span[0] to span[1] (not included), encode them into `tmp`;
    copy audio and subtitle packets where `copy`."""
    (start, stop), offset = span, 0
    with av.open(ffmpeg_url(src)) as inp, av.open(ffmpeg_url(tmp), "w", format=muxer) as out:
        video = inp.streams.video[0]
        out.metadata.update({k: v for k, v in inp.metadata.items() if k != "encoder"})
        encoder = add_video_stream(out, video, info, model.scale, crf)
        copies = copy_streams(inp, out, video) if copy else {}
        for index, frame in enumerate(decoded_frames(inp, out, video, copies)):
            pts = frame_pts(frame, index, info.rate, video.time_base, progress)
            if stop is not None and index >= stop:
                break
            if index < start:
                continue
            check_frame_size(src, frame, index, start, info)
            if progress.written == 0:  # a span starts where the video starts
                offset = pts - progress.first_pts
            out.mux(encoder.encode(upscaled_frame(model, frame, info, pts - offset, video.time_base, options)))
            progress.written += 1
            bar.update()
        out.mux(encoder.encode(None))  # the frames the encoder holds back (B-frames, lookahead)


def check_frame_size(src: Path, frame, index: int, start: int, info: VideoInfo) -> None:
    """Refuse a frame whose size is not the first's: one output has one size, and the encoder
    would squeeze the frame into it."""
    if (frame.width, frame.height) != (info.width, info.height):
        before = f" (--frames {start}:{index} upscales those before it)" if index > start else ""
        raise UserError(f"{shown(src)}: frame {index + 1} is {frame.width}x{frame.height}, where the video starts at "
                        f"{info.width}x{info.height}: a video whose frame size changes is refused{before}; "
                        f"nothing was written")


def frame_pts(frame, index: int, rate: Fraction, time_base: Fraction, progress: Progress) -> int:
    """The frame's time in `time_base`; where the container has none (raw streams), its place at
    the rate. Notes the first frame's time, and the end of this one, in `progress`."""
    pts = frame.pts if frame.pts is not None else round(index / rate / time_base)
    progress.first_pts = pts if progress.first_pts is None else progress.first_pts
    duration = frame.duration or round(1 / rate / time_base)
    progress.end = float((pts + duration - progress.first_pts) * time_base)
    return pts


def add_video_stream(out, video, info: VideoInfo, scale: int, crf: int):
    """The H.264 stream: scale x the size, the input's time base, rate, rotation and colour tags."""
    stream = out.add_stream("libx264", rate=info.rate, options={"crf": str(crf)})
    stream.width, stream.height, stream.pix_fmt = info.width * scale, info.height * scale, "yuv420p"
    stream.time_base = stream.codec_context.time_base = video.time_base  # frame times kept as they are
    for key, value in info.colour.items():
        setattr(stream.codec_context, key, value)
    if video.sample_aspect_ratio:
        stream.codec_context.sample_aspect_ratio = video.sample_aspect_ratio
    if info.display_matrix is not None:
        stream.set_display_matrix(info.display_matrix)
    return stream


def rehearse(src: Path, dst: Path, info: VideoInfo, scale: int, crf: int, copy: bool) -> None:
    """Write the output's start into memory, a blank frame for each of the first two: a stream the
    container refuses (PCM audio in .mp4: at its end, in FFmpeg) fails now, not after every frame."""
    level, skip = av.logging.get_level(), av.logging.get_skip_repeated()
    av.logging.set_level(av.logging.ERROR)  # FFmpeg says why only in its log
    av.logging.set_skip_repeated(False)  # each time: PyAV drops a line the same as the last it logged
    try:
        with av.logging.Capture() as logs, av.open(ffmpeg_url(src)) as inp, \
                av.open(io.BytesIO(), "w", format=OUTPUT_FORMATS[dst.suffix.lower()]) as out:
            video = inp.streams.video[0]
            encoder = add_video_stream(out, video, info, scale, crf)
            copies = copy_streams(inp, out, video, say=False) if copy else {}
            for index, frame in zip(range(2), decoded_frames(inp, out, video, copies)):
                blank = av.VideoFrame(info.width * scale, info.height * scale, "yuv420p")
                blank.pts, blank.time_base = index if frame.pts is None else frame.pts, video.time_base
                out.mux(encoder.encode(blank))
            out.mux(encoder.encode(None))
    except av.FFmpegError as e:
        said = [text for level, _, text in logs if level <= av.logging.ERROR]
        why = shown((said[-1] if said else ffmpeg_message(e)).strip())
        raise UserError(f"{shown(src)}: {shown(dst.suffix)} can't hold its streams ({why}){container_hint(dst, copy)}; "
                        f"nothing was written") from None
    finally:
        av.logging.set_level(level)
        av.logging.set_skip_repeated(skip)


def container_hint(dst: Path, copy: bool) -> str:
    """What to try when the output's container refuses the streams: Matroska, which holds most,
    where it is not already that; leaving out the copied audio and subtitles, where there are any."""
    hints = [] if dst.suffix.lower() == ".mkv" else ["-o NAME.mkv holds most"]
    if copy:
        hints.append("--frames 0: upscales every frame and leaves the audio and subtitles out")
    return f": {', or '.join(hints)}" if hints else ""


def copy_streams(inp, out, video, say: bool = True) -> dict:
    """Output streams for the input's audio and subtitles (input stream index -> output stream),
    their packets copied as they are; the streams the output can't hold, and others (data, a
    second video, cover art), are left out with a warning."""
    copies, left_out = {}, []
    for s in inp.streams:
        if s.type in ("audio", "subtitle") and s.codec_context.name in out.supported_codecs:
            copies[s.index] = out.add_stream_from_template(s)
        elif s.index != video.index:
            left_out.append(f"#{s.index} {s.type} ({s.codec_context.name if s.codec_context else '?'})")
    if left_out and say:
        warn(f"{plural(len(left_out), 'stream')} left out, not copied: {', '.join(left_out)}")
    return copies


def decoded_frames(inp, out, video, copies: dict):
    """The video's frames in order; the packets of the streams in `copies` are muxed as they come."""
    for packet in inp.demux(video, *(inp.streams[i] for i in copies)):
        if packet.stream.index == video.index:
            yield from packet.decode()
        elif packet.dts is not None:  # not the empty packet that ends each stream
            packet.stream = copies[packet.stream.index]
            out.mux(packet)


def upscaled_frame(model, frame, info: VideoInfo, pts: int, time_base: Fraction, options: dict):
    """One decoded frame through upscale.upscale (as infer.py upscales an image), back in
    yuv420p with the matrix and range it was decoded with, at `pts`."""
    sr = upscale(model, frame.to_ndarray(format="rgb24"), **options)
    colorspace, colour_range = info.colour["colorspace"], info.colour["color_range"]
    out = av.VideoFrame.from_ndarray(sr, format="rgb24").reformat(
        format="yuv420p", dst_colorspace=SWS_COLORSPACES.get(colorspace),
        dst_color_range=JPEG_RANGE if colour_range == JPEG_RANGE else MPEG_RANGE)
    out.pts, out.time_base, out.duration = pts, time_base, frame.duration
    return out
