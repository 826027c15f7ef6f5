"""The flags of the scripts that run a trained network (infer.py, evaluate.py, app.py), declared once."""
import argparse

from model import DEFAULT_ARCH, NETWORKS, UPSAMPLE_STAGES
from utils import non_negative_int

from .checkpoint import shipped_names
from .precision import PRECISIONS
from .upscale import DEFAULT_TILE

DEFAULT_CHECKPOINT_HELP = "the network and its weights; None: checkpoints/<arch>_x<scale>.safetensors"


def add_inference_flags(parser: argparse.ArgumentParser, *, shipped: bool = True, several: bool = False,
                        how_it_runs: bool = True, precision: str = "auto",
                        checkpoint_help: str = DEFAULT_CHECKPOINT_HELP) -> None:
    """Declare the flags that choose a network and say how it runs, each with one name, type and help.

    Args:
        shipped: --scale, --arch and --real, which pick a shipped checkpoint (app.py serves them all).
        several: --scale, --arch and --precision take several values, a table row each (evaluate.py).
        how_it_runs: --raw_weights, --self_ensemble, --tile, --tile_pad and --precision.
        precision: --precision's default: "auto" (the fastest the device runs natively) or "fp32"
            (the same figures on every machine).
        checkpoint_help: what --checkpoint is for in this script.
    """
    if shipped:
        add_shipped_flags(parser, several)
    if several:
        parser.add_argument("--checkpoint", default=None, nargs="+",
                            help=checkpoint_help + "; several: a table row each, and each one's paired "
                                 "differences against the first (mean, 95%% t-interval over images)")
    else:
        parser.add_argument("--checkpoint", default=None, help=checkpoint_help)
    if how_it_runs:
        parser.add_argument("--raw_weights", action="store_true", help="use the raw weights of an --ema checkpoint")
        parser.add_argument("--self_ensemble", action="store_true",
                            help="average the outputs for the 8 flips/rotations (EDSR's x8; 8 times slower)")
        parser.add_argument("--tile", type=non_negative_int, default=DEFAULT_TILE, help="LR tile size (0: whole image)")
        parser.add_argument("--tile_pad", type=non_negative_int, default=None,
                            help="LR context around each tile; None: the receptive-field radius, same result as whole")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    if how_it_runs:
        rows = "; several: a table row each" if several else ""
        # nargs without action="extend": extending would add to the default list, not replace it.
        parser.add_argument("--precision", choices=PRECISIONS, default=[precision] if several else precision,
                            nargs="+" if several else None,
                            help="autocast precision; auto: bf16 where the device runs it natively (CUDA 8.0+, a CPU "
                                 "with AVX512-BF16 or AMX), fp16 on older GPUs, else fp32 (exact: the same result on "
                                 f"every machine; bf16 moves a few output values by one level){rows}")


def add_shipped_flags(parser: argparse.ArgumentParser, several: bool) -> None:
    """--scale, --arch and --real: which shipped checkpoint to use, or what --checkpoint's network must be."""
    many = {"nargs": "+", "action": "extend"} if several else {}
    which = "each {} given, one table row each" if several else "this {}"
    must = "one {0}, which the checkpoint's must be" if several else "the checkpoint's {0} must be this one"
    parser.add_argument("--scale", type=int, choices=sorted(UPSAMPLE_STAGES), default=None, **many,
                        help=f"use the shipped checkpoint of {which.format('scale')} (shipped: {shipped_names()}); "
                             f"None: x4; beside --checkpoint, {must.format('scale')}")
    parser.add_argument("--arch", choices=NETWORKS, default=None, **many,
                        help=f"use the shipped checkpoint of {which.format('network')} (shipped: "
                             f"{shipped_names(None)}); None: {DEFAULT_ARCH}; beside --checkpoint, "
                             f"{must.format('network')}")
    parser.add_argument("--real", action="store_true",
                        help="use the shipped checkpoint trained on real inputs (blur, noise and JPEG: phone and web "
                             f"photos; shipped: {shipped_names(None, real=True)}); without it, the one trained on "
                             "clean bicubic downscales")
