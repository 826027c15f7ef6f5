"""The networks, by name: ResShuffle (EDSR-style residual blocks with ESPCN's PixelShuffle
upsampling) and its two ancestors, ESPCN and EDSR-baseline, to compare against.

    from model import build_network
    net = build_network({"arch": "resshuffle", "scale": 4})  # 1,545,219 parameters
    sr = net(lr)                       # (N, 3, H, W) in [0, 1] -> (N, 3, 4H, 4W)

`NETWORKS` is the one place a name becomes a class: every script builds its network from a
checkpoint's `model_args` through `build_network`. A network is an nn.Module whose
constructor takes `scale` (and keyword options, kept in `model_args`) and whose forward maps
(N, 3, H, W) in [0, 1] to (N, 3, scale*H, scale*W). It may also state `receptive_radius()`
(LR pixels an output pixel sees: tiled inference pads by it, exactly) and
`untiled_bytes(h, w)` (memory of a whole image); ResShuffle's `features`/`reconstruct` split
lets tiling run its HR stages in small blocks.

The networks here are drawn as their papers draw them. The scripts run them through
machinery/fast.py, which swaps in faster forms of some layers (the same computation, the same
parameters and state_dict); a network copied from this file carries none of that.
"""
import inspect
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# x4 and x8 are built from x2 stages, as in the original; x3 is a single stage.
UPSAMPLE_STAGES = {2: (2,), 3: (3,), 4: (2, 2), 8: (2, 2, 2)}

# Mean RGB of DIV2K_train_HR, the values EDSR's MeanShift subtracts.
DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)


class ResidualBlock(nn.Module):
    """conv3x3 -> ReLU -> conv3x3, plus the block's input (EDSR's, without residual scaling).

    Args:
        num_features: channels in and out of each conv.
    """

    def __init__(self, num_features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(num_features, num_features, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(num_features, num_features, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(self.relu(self.conv1(x)))


class ResShuffle(nn.Module):
    """Single-image super-resolution network of the original ResShuffle README.

    9x9 conv + ReLU -> `num_residuals` residual blocks -> conv3x3, added to the 9x9 conv's
    features (global skip) -> upsampling stages (conv3x3 to r^2 x channels, PixelShuffle(r))
    -> 9x9 conv to 3 channels.

    Choices the original leaves open, made here:
    - no activation after PixelShuffle (as EDSR's upsampler);
    - PyTorch's default weight init (Kaiming-uniform), no residual scaling;
    - input and output are RGB in [0, 1]; the output is not clamped (the loss sees it raw,
      conversion to uint8 clamps and rounds).

    Two options, both off by default so that the default is the original network. Both are
    stored in the checkpoint's `model_args`, change no parameter and no state_dict key:
    - `mean_shift`: subtract DIV2K's mean RGB from the input and add it back to the output
      (EDSR's MeanShift). Without it Adam has to move the output bias from 0 to ~0.44,
      about `lr` per step, which leaves short runs with a colour cast.
    - `image_skip`: add the bicubic-upsampled input to the output, so the network learns
      only the residual detail (as Real-ESRGAN's compact net adds its upsampled input).

    Args:
        scale: upscaling factor, one of 2, 3, 4, 8.
        num_features: channels of every hidden conv.
        num_residuals: number of residual blocks.
        mean_shift: subtract/add DIV2K's mean RGB around the network.
        image_skip: add the bicubic-upsampled input to the output.
    """

    def __init__(self, scale: int = 4, num_features: int = 64, num_residuals: int = 16,
                 mean_shift: bool = False, image_skip: bool = False):
        super().__init__()
        check_scale(scale)
        check_size(num_features, num_residuals)
        self.scale, self.num_features = scale, num_features
        self.image_skip = image_skip
        mean = torch.tensor(DIV2K_RGB_MEAN if mean_shift else (0.0, 0.0, 0.0)).view(1, 3, 1, 1)
        # Not persistent: the state_dict stays that of the original network.
        self.register_buffer("rgb_mean", mean, persistent=False)

        self.head = nn.Sequential(nn.Conv2d(3, num_features, 9, padding=4), nn.ReLU(inplace=True))
        self.body = nn.Sequential(*[ResidualBlock(num_features) for _ in range(num_residuals)])
        self.body_conv = nn.Conv2d(num_features, num_features, 3, padding=1)
        self.upsample = upsampling_stages(scale, num_features)
        self.tail = nn.Conv2d(num_features, 3, 9, padding=4)

    def forward(self, x):
        features = self.features(x)           # head, residual body, global skip
        return self.reconstruct(features, x)  # upsampling stages, tail

    def features(self, x):
        """LR features: head, residual body, then the body conv plus the head's output (global skip)."""
        head = self.head(x - self.rgb_mean)
        return head + self.body_conv(self.body(head))

    def reconstruct(self, features, x):
        """The SR image from LR `features` and the LR input `x` they were computed from."""
        return self.tail(self.upsample(features)) + self.base(x)

    def base(self, x):
        """What the network's output is added to: the mean it took off, or with `image_skip` the
        bicubic-upsampled input (bicubic(x - mean) + mean == bicubic(x): the weights sum to one)."""
        if self.image_skip:
            return F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return self.rgb_mean

    def feature_radius(self) -> int:
        """LR pixels on each side that one feature depends on: 9x9 head, two 3x3 per block, body conv."""
        return 4 + 2 * len(self.body) + 1

    def reconstruct_radius(self) -> int:
        """LR pixels of features (or input) on each side that one output pixel depends on, rounded up."""
        radius = upsampling_radius(self.scale, tail_radius=4)  # tail 9x9 at HR resolution
        if self.image_skip:
            radius = max(radius, 2.0)  # bicubic reaches 2 LR pixels
        return math.ceil(radius)

    def receptive_radius(self) -> int:
        """LR pixels on each side that one output pixel depends on (an upper bound, within one pixel).

        A tile padded by at least this much gives the same output as the whole image.
        """
        return self.feature_radius() + self.reconstruct_radius()

    def untiled_bytes(self, height: int, width: int) -> int:
        """Roughly the peak memory of running the network on a whole height x width LR image.

        Float32 activations: the last upsampling conv's input and output, and two feature maps at
        LR size (machinery/fast.py runs the tail before the last PixelShuffle, so no larger map follows).
        """
        last_input = self.scale // UPSAMPLE_STAGES[self.scale][-1]  # the last stage's input, in LR sizes
        return 4 * self.num_features * height * width * (self.scale ** 2 + last_input ** 2 + 2)


def check_size(num_features: int, num_residuals: int = 0, min_features: int = 1) -> None:
    if num_features < min_features or num_residuals < 0:
        raise ValueError(f"num_features must be >= {min_features} and num_residuals >= 0, "
                         f"got {num_features} and {num_residuals}")


def upsampling_stages(scale: int, num_features: int) -> nn.Sequential:
    """Sub-pixel upsampling (ESPCN's, as EDSR stacks it): for each stage r of UPSAMPLE_STAGES,
    conv3x3 to r^2 x the channels, then PixelShuffle(r)."""
    return nn.Sequential(*[
        layer for r in UPSAMPLE_STAGES[scale]
        for layer in (nn.Conv2d(num_features, num_features * r * r, 3, padding=1), nn.PixelShuffle(r))
    ])


def upsampling_radius(scale: int, tail_radius: int) -> float:
    """LR pixels that one output pixel of the upsampling stages (3x3 conv, PixelShuffle) and a
    tail conv of `tail_radius` at HR sees of their LR input."""
    radius, factor = 0.0, 1
    for r in UPSAMPLE_STAGES[scale]:
        radius += 1 / factor  # the stage's 3x3 conv, at the current resolution
        factor *= r
    return radius + tail_radius / factor


def check_scale(scale: int) -> None:
    """A ValueError naming the supported scales, for any other (as BasicSR's upsampler does)."""
    if scale not in UPSAMPLE_STAGES:
        raise ValueError(f"unsupported scale {scale}: supported scales are {', '.join(map(str, UPSAMPLE_STAGES))}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class EDSRBaseline(nn.Module):
    """EDSR-baseline (Lim et al. 2017, "Enhanced Deep Residual Networks for Single Image
    Super-Resolution"), ResShuffle's ancestor: mean shift -> conv3x3 (no activation) ->
    `num_residuals` residual blocks (conv3x3, ReLU, conv3x3, plus the input; residual scaling 1)
    -> conv3x3, plus the head's output -> upsampling stages (conv3x3 to r^2 x channels,
    PixelShuffle(r); x4 as two x2) -> conv3x3 to RGB -> mean added back.

    The paper's baseline: 16 blocks of 64 features. Its inputs are in [0, 255]; here [0, 1],
    with the same DIV2K mean.

    Args:
        scale: upscaling factor, one of 2, 3, 4, 8.
        num_features: channels of every hidden conv.
        num_residuals: number of residual blocks.
        padding: how every conv pads the image's borders, as nn.Conv2d's padding_mode: "zeros"
            (the paper's code) or "replicate", with which a flat image stays flat up to its edges
            (docs/ancestors.md).
    """

    def __init__(self, scale: int = 4, num_features: int = 64, num_residuals: int = 16, padding: str = "zeros"):
        super().__init__()
        check_scale(scale)
        check_size(num_features, num_residuals)
        self.scale = scale
        self.register_buffer("rgb_mean", torch.tensor(DIV2K_RGB_MEAN).view(1, 3, 1, 1), persistent=False)
        self.head = nn.Conv2d(3, num_features, 3, padding=1)
        self.body = nn.Sequential(*[ResidualBlock(num_features) for _ in range(num_residuals)])
        self.body_conv = nn.Conv2d(num_features, num_features, 3, padding=1)
        self.upsample = upsampling_stages(scale, num_features)
        self.tail = nn.Conv2d(num_features, 3, 3, padding=1)
        set_padding(self, padding)

    def forward(self, x):
        head = self.head(x - self.rgb_mean)
        features = head + self.body_conv(self.body(head))
        return self.tail(self.upsample(features)) + self.rgb_mean

    def receptive_radius(self) -> int:
        """Head, two 3x3 per block, body conv; then the upsampling stages and the 3x3 tail."""
        return 1 + 2 * len(self.body) + 1 + math.ceil(upsampling_radius(self.scale, tail_radius=1))


class ESPCN(nn.Module):
    """ESPCN (Shi et al. 2016, "Real-Time Single Image and Video Super-Resolution Using an
    Efficient Sub-Pixel Convolutional Neural Network"): conv5x5 (64) -> tanh -> conv3x3 (32) ->
    tanh -> conv3x3 to r^2 channels -> PixelShuffle(r), all at LR resolution, on the luminance.

    As in the paper, only the luminance Y (BT.601, full range) is super-resolved; the chroma is
    bicubic. Adding a change of Y to R, G and B alike changes Y by that much and the chroma not at
    all, so the output is bicubic(x) + (ESPCN(Y) - Y of bicubic(x)). One sub-pixel stage for every
    scale, as in the paper. Input and output RGB in [0, 1].

    Args:
        scale: upscaling factor, one of 2, 3, 4, 8.
        num_features: channels of the first conv (the second has half as many).
        luminance: super-resolve Y only (the paper); False: the three RGB channels, no bicubic.
        padding: how every conv pads the image's borders, as EDSRBaseline's.
    """

    def __init__(self, scale: int = 4, num_features: int = 64, luminance: bool = True, padding: str = "zeros"):
        super().__init__()
        check_scale(scale)
        check_size(num_features, min_features=2)  # the middle conv has half as many
        self.scale, self.luminance = scale, luminance
        channels = 1 if luminance else 3
        self.body = nn.Sequential(
            nn.Conv2d(channels, num_features, 5, padding=2), nn.Tanh(),
            nn.Conv2d(num_features, num_features // 2, 3, padding=1), nn.Tanh(),
            nn.Conv2d(num_features // 2, channels * scale * scale, 3, padding=1), nn.PixelShuffle(scale))
        set_padding(self, padding)

    def forward(self, x):
        if not self.luminance:
            return self.body(x)
        base = F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return base + (self.body(luma(x)) - luma(base))

    def receptive_radius(self) -> int:
        return 2 + 1 + 1  # the three convs; the bicubic base reaches 2 LR pixels, within it


def luma(rgb: torch.Tensor) -> torch.Tensor:
    """BT.601 luma of (N, 3, H, W) RGB, full range: (N, 1, H, W)."""
    r, g, b = rgb.unbind(1)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


PADDINGS = ("zeros", "replicate")


def set_padding(model: nn.Module, padding: str) -> None:
    """Every conv of `model` pads its borders by `padding` (nn.Conv2d's padding_mode, one of PADDINGS)."""
    if padding not in PADDINGS:
        raise ValueError(f"unsupported padding {padding!r}: supported are {', '.join(PADDINGS)}")
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.padding_mode = padding


# The networks by name: add one here, and train.py --arch, checkpoints, infer.py, evaluate.py,
# export and torch.hub take it.
NETWORKS = {"resshuffle": ResShuffle, "edsr_baseline": EDSRBaseline, "espcn": ESPCN}
DEFAULT_ARCH = "resshuffle"  # what a checkpoint without "arch" in its model_args holds


def build_network(model_args: dict) -> nn.Module:
    """The network `model_args` describes: {"arch": name, "scale": s, ...the class's keyword options}.

    Raises ValueError for an unknown name or option, or a value the network refuses.
    """
    options = dict(model_args)
    arch = options.pop("arch", DEFAULT_ARCH)
    if arch not in NETWORKS:
        raise ValueError(f"unknown network {arch!r}: known are {', '.join(NETWORKS)}")
    unknown = [k for k in options if k not in network_options(arch) and k != "scale"]
    if unknown:
        raise ValueError(f"the {arch} network takes no option {unknown[0]!r} (it takes: "
                         f"{', '.join(['scale', *network_options(arch)])})")
    return NETWORKS[arch](**options)


def network_options(arch: str) -> dict:
    """The keyword options of NETWORKS[arch] besides `scale`, with their defaults, in the constructor's order."""
    return {name: p.default for name, p in inspect.signature(NETWORKS[arch]).parameters.items() if name != "scale"}
