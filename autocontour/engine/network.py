"""The same UniverSeg, computed with less work: exact algebra, no approximation.

Three identities, all following from the cross conv being linear (the model
has no nonlinearity between a cross conv and the mean over the support set):

1. Split: conv(concat(q, s_j), W) + b = conv(q, W_q) + b + conv(s_j, W_s).
   The query half is computed once per query instead of once per pair.
2. The last decoder block's support stream is never used, so its per-stream
   conv is skipped.
3. For that same block only the mean over pairs is needed, and
   mean_j conv(s_j, W_s) = conv(mean_j s_j, W_s): its cross conv also becomes a
   per-query conv. Likewise the enc-0 skip of the support stream is kept only
   as its mean, since the last decoder block is its only reader.

At 128x128 this lowers the per-(query, support) cost from 10.4 to about 3.2
GFLOP. `tests/test_engine.py` checks equality with `UniverSeg.forward`.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autocontour.model.universeg import LEAKY_SLOPE, CrossBlock, UniverSeg, check_input_shapes


def _conv(stream: nn.Module) -> nn.Conv2d:
    """The 2D conv of a `Vmap(ConvOp)` stream (nn.Module attributes are untyped)."""
    return cast(nn.Conv2d, cast(nn.Module, stream.vmapped).conv)


class SplitBlock(nn.Module):
    """A CrossBlock computed with its cross-conv weight split into query and support halves.

    The halves are views of the block's own weight, so the split network
    shares its parameters with the plain one and can be trained.
    """

    def __init__(self, block: CrossBlock, query_channels: int):
        super().__init__()
        self.block = block
        self.query_channels = query_channels

    def _halves(self) -> tuple[Tensor, Tensor, Tensor | None]:
        conv = self.block.cross.cross_conv
        return conv.weight[:, : self.query_channels], conv.weight[:, self.query_channels:], conv.bias

    def forward(self, query: Tensor, support: Tensor, s: int) -> tuple[Tensor, Tensor]:
        """query (B, Cq, H, W), support (B*S, Cs, H, W) -> the block's two outputs."""
        w_query, w_support, bias = self._halves()
        zq = F.conv2d(query, w_query, bias, padding=1)
        zs = F.conv2d(support, w_support, padding=1)
        new_query = zq + support_mean(zs, s)
        per_query = zs.unflatten(0, (-1, s))
        # In place when nothing records gradients: a new pair stream costs 6x more than the add itself.
        pairs = (per_query.add_(zq.unsqueeze(1)) if not torch.is_grad_enabled() else per_query + zq.unsqueeze(1))
        pairs = pairs.flatten(0, 1)
        return _act(_conv(self.block.target)(new_query)), _act(_conv(self.block.support)(pairs))

    def forward_mean_only(self, query: Tensor, support_mean: Tensor) -> Tensor:
        """The query output alone, from the mean of the support inputs (identity 3)."""
        w_query, w_support, bias = self._halves()
        z = F.conv2d(query, w_query, bias, padding=1) + F.conv2d(support_mean, w_support, padding=1)
        return _act(_conv(self.block.target)(z))


class SplitUniverSeg(nn.Module):
    """Equal to `UniverSeg.forward` (to float rounding), with about 3x fewer FLOPs."""

    def __init__(self, model: UniverSeg):
        super().__init__()
        self.enc = nn.ModuleList()
        query_ch = 1
        for width, block in zip(model.encoder_blocks, model.enc_blocks, strict=True):
            self.enc.append(SplitBlock(cast(CrossBlock, block), query_ch))
            query_ch = width
        self.dec = nn.ModuleList()
        skip_widths = model.encoder_blocks[-2::-1]
        for skip_width, width, block in zip(skip_widths, model.decoder_blocks, model.dec_blocks, strict=True):
            self.dec.append(SplitBlock(cast(CrossBlock, block), query_ch + skip_width))
            query_ch = width
        self.out_conv = model.out_conv.conv
        self.factor = model.downsampling_factor

    def forward(self, target_image: Tensor, support_images: Tensor, support_labels: Tensor) -> Tensor:
        check_input_shapes(target_image, support_images, support_labels, self.factor)
        return self.forward_pairs(target_image, torch.cat([support_images, support_labels], dim=2))

    def forward_pairs(self, query: Tensor, support: Tensor) -> Tensor:
        """query (B, 1, H, W); support (B, S, 2, H, W) = [image, label]; -> logits (B, 1, H, W)."""
        s = support.shape[1]
        support = support.flatten(0, 1)
        support = support.contiguous(memory_format=torch.channels_last)  # oneDNN's and cuDNN's preferred layout
        skips: list[tuple[Tensor, Tensor]] = []
        last = len(self.enc) - 1
        for i, block in enumerate(self.enc):
            query, support = block(query, support, s)
            if i < last:
                kept = support_mean(support, s) if i == 0 else support  # identity 3
                skips.append((query, kept))
                query, support = _max_pool(query), _max_pool(support)

        for j, block in enumerate(self.dec):
            query_skip, support_skip = skips.pop()
            query = torch.cat([_up(query), query_skip], dim=1)
            if j < len(self.dec) - 1:
                support = torch.cat([_up(support), support_skip], dim=1)
                query, support = block(query, support, s)
            else:  # identities 2 and 3: only the mean of the support stream matters
                mean = torch.cat([_up(support_mean(support, s)), support_skip], dim=1)
                query = cast(SplitBlock, block).forward_mean_only(query, mean)
        return self.out_conv(query)


def support_mean(x: Tensor, s: int) -> Tensor:
    """Mean over each query's S pairs of a (B*S, C, H, W) stream.

    Taken as a batched matrix product with a row of ones: it reads the stream
    once and accumulates in float32 even for a bfloat16 stream, where a plain
    reduction over the S axis first copies the whole stream to float32 (a
    quarter of the CPU time at S = 16, bench/RESULTS.md). In channels-last
    memory the S maps of one query are S contiguous blocks, so no copy is made.
    """
    n, c, h, w = x.shape
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    flat = (x.permute(0, 2, 3, 1) if channels_last else x).reshape(n // s, s, -1)
    total = torch.bmm(flat.new_ones(n // s, 1, s), flat).div_(s)
    if channels_last:
        return total.view(n // s, h, w, c).permute(0, 3, 1, 2)
    return total.view(n // s, c, h, w)


def _act(x: Tensor) -> Tensor:
    return F.leaky_relu(x, LEAKY_SLOPE, inplace=not torch.is_grad_enabled())


def _max_pool(x: Tensor) -> Tensor:
    """2x2 max pooling as three elementwise maxima of strided views: equal to
    `F.max_pool2d(x, 2)`, and about 3.5x faster on a bfloat16 channels-last CPU stream."""
    return torch.maximum(torch.maximum(x[..., 0::2, 0::2], x[..., 0::2, 1::2]),
                         torch.maximum(x[..., 1::2, 0::2], x[..., 1::2, 1::2]))


def _up(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
