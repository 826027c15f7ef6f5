"""Training losses by name, and --loss: a weighted sum of them ("l1", "charbonnier", "l1+0.05*fft").

`LOSSES` is the one place a loss name becomes a function: add one there and `train.py --loss`,
its log.csv columns and benchmark.py take it. Each function maps (sr, hr), float32
(N, 3, H, W) in [0, 1], to a scalar tensor.
"""
import argparse
import re
import sys

import torch
import torch.nn.functional as F

CHARBONNIER_EPS = 1e-3  # LapSRN's and BasicSR's


def l1(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """Mean absolute error: the original's loss, and EDSR's."""
    return F.l1_loss(sr, hr)


def l2(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """Mean squared error: what PSNR measures (ESPCN's and SRCNN's loss)."""
    return F.mse_loss(sr, hr)


def charbonnier(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """sqrt(d^2 + eps^2), a differentiable L1 (LapSRN)."""
    return torch.sqrt((sr - hr).square() + CHARBONNIER_EPS ** 2).mean()


def fft(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """L1 of the real and imaginary parts of the 2D spectrum's difference, orthonormal (so, by
    Parseval, on the scale of pixel errors): it weighs fine detail as much as smooth regions."""
    return torch.view_as_real(torch.fft.rfft2(sr - hr, norm="ortho")).abs().mean()


LOSSES = {"l1": l1, "l2": l2, "charbonnier": charbonnier, "fft": fft}


class WeightedLoss:
    """A --loss spec as a callable: `terms(sr, hr)` gives each term's unweighted value, `total`
    their weighted sum. Names in `names`, weights in `weights`, both in the spec's order."""

    def __init__(self, spec: str):
        pairs = parse_loss(spec)
        self.spec = format_loss(pairs)
        self.weights = [w for w, _ in pairs]
        self.names = [n for _, n in pairs]

    def terms(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        sr, hr = sr.float(), hr.float()  # losses in fp32 whatever precision the network ran in
        return torch.stack([LOSSES[n](sr, hr) for n in self.names])

    def total(self, terms: torch.Tensor) -> torch.Tensor:
        return sum(w * t for w, t in zip(self.weights, terms))


# A "+" that joins two terms: not the sign of a weight's exponent ("2e+07*fft").
TERM_SEPARATOR = re.compile(r"(?<![0-9.][eE])\+")


def parse_loss(spec: str) -> list[tuple[float, str]]:
    """'l1+0.05*fft' -> [(1.0, 'l1'), (0.05, 'fft')]. ValueError names what is wrong."""
    pairs = []
    for term in TERM_SEPARATOR.split(spec.replace(" ", "")):
        weight, _, name = term.rpartition("*")
        if name not in LOSSES:
            raise ValueError(f"{name or term!r} is not a loss (known: {', '.join(LOSSES)})")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"{weight!r} in {term!r} is not a number") from None
        if not w > 0 or w == float("inf"):
            raise ValueError(f"the weight of {name} must be a positive number, got {weight}")
        if w < sys.float_info.min:  # below it floats lose precision, and the term its meaning
            raise ValueError(f"the weight of {name}, {weight}, is subnormal (below {sys.float_info.min:.4g}): "
                             f"too small to count")
        if name in [n for _, n in pairs]:
            raise ValueError(f"{name} appears twice; give it once, with its weight")
        pairs.append((w, name))
    return pairs


def format_loss(pairs: list[tuple[float, str]]) -> str:
    """The spec in one spelling, so that 'l1 + 1*fft' and 'l1+fft' are the same run's. Each weight
    exactly (repr: the shortest spelling that reads back as the same float), and with no "+" in it."""
    return "+".join(name if w == 1 else f"{format_weight(w)}*{name}" for w, name in pairs)


def format_weight(w: float) -> str:
    """2e7 -> '20000000', 1e16 -> '1e16', 0.05 -> '0.05': exact, and read back by float()."""
    return repr(w).replace("e+", "e").removesuffix(".0")


def loss_spec(text: str) -> str:
    """--loss (train.py, benchmark.py) in one spelling, so that a resume compares like with like."""
    try:
        return WeightedLoss(text).spec
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
