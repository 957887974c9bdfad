"""UniverSeg, the in-context segmentation network of Butoi et al. (ICCV 2023).

Read this file next to the paper (Section 3, Fig. 3). The network segments a
query image the way a *support set* of S labelled example images shows:

    logits = UniverSeg(query (B,1,H,W), support images (B,S,1,H,W), support labels (B,S,1,H,W))

Two streams run through a U-Net. The query stream holds one feature map per
query; the support stream one per (query, support) pair. In every block a
*CrossConv* mixes them: each pair [query features, support_j features] goes
through one 3x3 convolution, the support stream keeps the S pair outputs and
the query stream takes their mean. Each stream then has its own 3x3 conv +
LeakyReLU. There is no nonlinearity between the cross conv and the mean,
which the fast engine (`autocontour.engine`) exploits; this file is the faithful,
plain version that the engine is tested against.

The module names and parameter shapes are those of the reference code, so the
official checkpoint `universeg_v1_nf64_ss64_STA.pt` loads with strict=True.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LEAKY_SLOPE = 0.01


class ConvOp(nn.Module):
    """3x3 convolution (zero padding 1) followed by LeakyReLU(0.01)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(self.conv(x), LEAKY_SLOPE)


class OutConv(nn.Module):
    """The output 1x1 conv: features -> one logit, no activation."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 1, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Vmap(nn.Module):
    """Apply a 2D module to every map of a (B, N, C, H, W) stream.

    Kept as a module (rather than a reshape in the caller) because the
    reference stores the per-stream convs under `<stream>.vmapped.conv`.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.vmapped = module

    def forward(self, x: Tensor) -> Tensor:
        b, n = x.shape[:2]
        y = self.vmapped(x.flatten(0, 1))
        return y.unflatten(0, (b, n))


class CrossOp(nn.Module):
    """The cross convolution: one conv over every (query, support_j) pair.

    Returns the query stream's new value (the mean of the S pair outputs,
    shape (B,1,C,H,W)) and the support stream's (the pair outputs, (B,S,C,H,W)).
    Deliberately linear: the reference builds it without a nonlinearity.
    """

    def __init__(self, query_channels: int, support_channels: int, out_channels: int):
        super().__init__()
        self.cross_conv = nn.Conv2d(query_channels + support_channels, out_channels, kernel_size=3, padding=1)

    def forward(self, query: Tensor, support: Tensor) -> tuple[Tensor, Tensor]:
        s = support.shape[1]
        pairs = torch.cat([query.expand(-1, s, -1, -1, -1), support], dim=2)  # query channels first
        b = pairs.shape[0]
        out = self.cross_conv(pairs.flatten(0, 1)).unflatten(0, (b, s))
        return out.mean(dim=1, keepdim=True), out


class CrossBlock(nn.Module):
    """CrossOp, then a separate ConvOp per stream (weights are not shared)."""

    def __init__(self, query_channels: int, support_channels: int, cross_features: int, conv_features: int):
        super().__init__()
        self.cross = CrossOp(query_channels, support_channels, cross_features)
        self.target = Vmap(ConvOp(cross_features, conv_features))
        self.support = Vmap(ConvOp(cross_features, conv_features))

    def forward(self, query: Tensor, support: Tensor) -> tuple[Tensor, Tensor]:
        query, support = self.cross(query, support)
        return self.target(query), self.support(support)


class UniverSeg(nn.Module):
    """The UniverSeg U-Net. `encoder_blocks=[64, 64, 64, 64]` is v1.

    Encoder: one CrossBlock per entry; after all but the last, both streams
    are kept for the skip connection and max-pooled 2x2. Decoder: one
    CrossBlock per skip, after upsampling both streams by 2 (bilinear,
    align_corners=True) and concatenating [upsampled, skip]. A 1x1 conv maps
    the final query stream to one logit per pixel; no activation follows.
    H and W must be divisible by 2 ** (len(encoder_blocks) - 1).
    """

    def __init__(self, encoder_blocks: Sequence[int] = (64, 64, 64, 64), decoder_blocks: Sequence[int] | None = None):
        super().__init__()
        encoder_blocks = list(encoder_blocks)
        decoder_blocks = list(decoder_blocks) if decoder_blocks is not None else encoder_blocks[-2::-1]
        if len(decoder_blocks) != len(encoder_blocks) - 1:
            raise ValueError("need exactly one decoder block per skip connection (len(encoder_blocks) - 1)")
        self.encoder_blocks = encoder_blocks
        self.decoder_blocks = decoder_blocks

        self.enc_blocks = nn.ModuleList()
        query_ch, support_ch = 1, 2  # query image; support image + support label
        for width in encoder_blocks:
            self.enc_blocks.append(CrossBlock(query_ch, support_ch, width, width))
            query_ch = support_ch = width

        self.dec_blocks = nn.ModuleList()
        for skip_width, width in zip(encoder_blocks[-2::-1], decoder_blocks, strict=True):
            self.dec_blocks.append(CrossBlock(query_ch + skip_width, support_ch + skip_width, width, width))
            query_ch = support_ch = width

        self.out_conv = OutConv(query_ch)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference initialisation: Kaiming-normal (fan-in), zero biases.

        Gain sqrt(2) for the per-stream convs, 1 for the cross and output convs.
        """
        for module in self.modules():
            if isinstance(module, (CrossOp, OutConv)):
                conv = module.cross_conv if isinstance(module, CrossOp) else module.conv
                nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="linear")
            elif isinstance(module, ConvOp):
                conv = module.conv
                nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="leaky_relu", a=0.0)
            else:
                continue
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.encoder_blocks) - 1)

    def forward(self, target_image: Tensor, support_images: Tensor, support_labels: Tensor) -> Tensor:
        check_input_shapes(target_image, support_images, support_labels, self.downsampling_factor)
        query = target_image.unsqueeze(1)  # (B, 1, 1, H, W)
        support = torch.cat([support_images, support_labels], dim=2)  # (B, S, 2, H, W)

        skips: list[tuple[Tensor, Tensor]] = []
        last = len(self.enc_blocks) - 1
        for i, block in enumerate(self.enc_blocks):
            query, support = block(query, support)
            if i < last:
                skips.append((query, support))
                query, support = _stream(F.max_pool2d, query, 2), _stream(F.max_pool2d, support, 2)

        for block in self.dec_blocks:
            query_skip, support_skip = skips.pop()
            query = torch.cat([_upsample(query), query_skip], dim=2)
            support = torch.cat([_upsample(support), support_skip], dim=2)
            query, support = block(query, support)

        return self.out_conv(query.squeeze(1))


def _stream(fn, x: Tensor, *args) -> Tensor:
    """Apply a 2D function to a (B, N, C, H, W) stream."""
    b, n = x.shape[:2]
    return fn(x.flatten(0, 1), *args).unflatten(0, (b, n))


def _upsample(x: Tensor) -> Tensor:
    return _stream(lambda t: F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=True), x)


def check_input_shapes(target: Tensor, support_images: Tensor, support_labels: Tensor, factor: int) -> None:
    """Fail early with a message that names the offending shape."""
    if target.ndim != 4 or target.shape[1] != 1:
        raise ValueError(f"target_image must be (B, 1, H, W), got {tuple(target.shape)}")
    b, _, h, w = target.shape
    for name, t in (("support_images", support_images), ("support_labels", support_labels)):
        if t.ndim != 5 or t.shape[0] != b or t.shape[2] != 1 or t.shape[3:] != (h, w):
            raise ValueError(f"{name} must be (B={b}, S, 1, {h}, {w}), got {tuple(t.shape)}")
    if support_images.shape[1] != support_labels.shape[1] or support_images.shape[1] < 1:
        raise ValueError("support_images and support_labels need the same support size S >= 1")
    if h % factor or w % factor:
        raise ValueError(f"H and W must be divisible by {factor}, got {h}x{w}")
