"""The ResShuffle network: EDSR-style residual blocks with ESPCN's PixelShuffle upsampling.

    from model import ResShuffle
    net = ResShuffle(scale=4)          # 1,545,219 parameters
    sr = net(lr)                       # (N, 3, H, W) in [0, 1] -> (N, 3, 4H, 4W)
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# x4 and x8 are built from x2 stages, as in the original; x3 is a single stage.
UPSAMPLE_STAGES = {2: (2,), 3: (3,), 4: (2, 2), 8: (2, 2, 2)}

# Mean RGB of DIV2K_train_HR, the values EDSR's MeanShift subtracts.
DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)


class ResidualBlock(nn.Module):
    """conv3x3 -> ReLU -> conv3x3, plus the block's input."""

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
      In short CPU runs this is what puts the network above bicubic at all (README).

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
        if scale not in UPSAMPLE_STAGES:
            raise ValueError(f"unsupported scale {scale}: supported scales are "
                             f"{', '.join(str(s) for s in UPSAMPLE_STAGES)}")
        if num_features < 1 or num_residuals < 0:
            raise ValueError(f"num_features must be >= 1 and num_residuals >= 0, "
                             f"got {num_features} and {num_residuals}")
        self.scale, self.num_features = scale, num_features
        self.image_skip = image_skip
        mean = torch.tensor(DIV2K_RGB_MEAN if mean_shift else (0.0, 0.0, 0.0)).view(1, 3, 1, 1)
        # Not persistent: the state_dict stays that of the original network.
        self.register_buffer("rgb_mean", mean, persistent=False)

        self.head = nn.Sequential(nn.Conv2d(3, num_features, 9, padding=4), nn.ReLU(inplace=True))
        self.body = nn.Sequential(*[ResidualBlock(num_features) for _ in range(num_residuals)])
        self.body_conv = nn.Conv2d(num_features, num_features, 3, padding=1)
        self.upsample = nn.Sequential(*[
            layer for r in UPSAMPLE_STAGES[scale]
            for layer in (nn.Conv2d(num_features, num_features * r * r, 3, padding=1), nn.PixelShuffle(r))
        ])
        self.tail = nn.Conv2d(num_features, 3, 9, padding=4)

    def forward(self, x):
        return self.reconstruct(self.features(x), x)

    def features(self, x):
        """LR features: the head and the residual body, with the global skip."""
        features = self.head(x - self.rgb_mean)
        return features + self.body_conv(self.body(features))

    def reconstruct(self, features, x):
        """The SR image from `features` and the LR input `x` they were computed from.

        The same as `self.tail(self.upsample(features))`, computed faster: the 9x9 tail conv
        runs before the last PixelShuffle, as an equivalent conv on its r*r-times-deeper input
        (`subpixel_conv_weight`). After the shuffle it has 3 output channels at full
        resolution, a shape that runs at under a third of a 3x3 64->64 conv's FLOP rate on
        this repository's CPU: shuffle and tail, forward and backward, batch 16 at x4, took
        1.12 s there (of a 3.4 s training step) and take 0.42 s this way.
        """
        z = self.upsample[:-1](features)
        r = self.upsample[-1].upscale_factor
        weight = subpixel_conv_weight(self.tail.weight, r)
        out = F.pixel_shuffle(F.conv2d(z, weight, self.tail.bias.repeat_interleave(r * r),
                                       padding=weight.shape[-1] // 2), r)
        if self.image_skip:
            # bicubic(x - mean) + mean == bicubic(x): the weights sum to one.
            return out + F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return out + self.rgb_mean

    def feature_radius(self) -> int:
        """LR pixels on each side that one feature depends on: 9x9 head, two 3x3 per block, body conv."""
        return 4 + 2 * len(self.body) + 1

    def reconstruct_radius(self) -> int:
        """LR pixels of features (or input) on each side that one output pixel depends on, rounded up."""
        radius, factor = 0.0, 1
        for r in UPSAMPLE_STAGES[self.scale]:
            radius += 1 / factor  # the stage's 3x3 conv, at the current resolution
            factor *= r
        radius += 4 / factor  # tail 9x9 at HR resolution
        if self.image_skip:
            radius = max(radius, 2.0)  # bicubic reaches 2 LR pixels
        return math.ceil(radius)

    def receptive_radius(self) -> int:
        """LR pixels on each side that one output pixel depends on (an upper bound, within one pixel).

        A tile padded by at least this much gives the same output as the whole image.
        """
        return self.feature_radius() + self.reconstruct_radius()


def subpixel_conv_weight(weight: torch.Tensor, r: int) -> torch.Tensor:
    """The kernel that, applied before PixelShuffle(r), equals `weight` (stride 1, same padding) after it.

    With u = pixel_shuffle(z, r), output pixel (r*I + p, r*J + q) of the conv on u reads
    u[c, r*I + p + dy - k, ...] = z[c*r*r + a*r + b, I + m, ...], where p + dy - k = r*m + a.
    So the conv on u equals pixel_shuffle(conv(z, w2), r), with w2[o*r*r + p*r + q, c*r*r + a*r + b,
    m, n] = weight[o, c, r*m + a - p + k, r*n + b - q + k] (0 where that tap is outside the
    kernel): an exact rearrangement, zero padding included.
    """
    out_ch, in_ch, size, _ = weight.shape
    k = size // 2
    m = torch.arange(-((k + r - 1) // r), (k + r - 1) // r + 1, device=weight.device)
    phase = torch.arange(r, device=weight.device)
    taps = r * m.view(1, 1, -1) + phase.view(1, -1, 1) - phase.view(-1, 1, 1) + k  # [p, a, m]
    # select[p, a, m, d] = 1 where that tap is row d of the kernel; taps outside it select nothing.
    # A product, not indexing: indexing's gradient adds with parallel atomics, in no fixed order.
    select = (taps.unsqueeze(-1) == torch.arange(size, device=weight.device)).to(weight.dtype)
    w2 = torch.einsum("pamy,qbnx,ocyx->opqcabmn", select, select, weight)
    return w2.reshape(out_ch * r * r, in_ch * r * r, len(m), len(m))
