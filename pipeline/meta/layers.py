"""What the meta-objective changes about a network's layers, applied to that one model only.

BatchNorm policy (docs/design.md): inside functional calls the model normalises with the statistics of the batch at
hand and never writes its running buffers (`batch_stats_only`); running statistics are re-estimated in one place,
`recalibrate_bn`, before a checkpoint is saved. Two layer swaps serve the meta-gradient: an exact-under-vmap
BatchNorm and a depthwise convolution with a fast double backward. Both replace the `forward` of the modules of
the model being meta-trained, for the duration of a context, and never touch `torch.nn.functional`: any other
model or thread in the process keeps torch's own kernels.
"""
from __future__ import annotations

import types
from contextlib import AbstractContextManager, contextmanager
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:  # timm's TF-"SAME" convolution pads dynamically, then calls F.conv2d
    from timm.layers import Conv2dSame, pad_same
except ImportError:  # pragma: no cover - timm is a dependency
    Conv2dSame, pad_same = None, None


def composite_batch_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """Batch-statistics BatchNorm from plain ops. torch's fused kernel gives a wrong second derivative
    under vmap (measured: 5e-4 relative error in the MAML meta-gradient, tests/test_meta.py); this is exact."""
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, correction=0, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y


def _batch_stats_forward(self: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    """`forward` of a BatchNorm module under `batch_stats_only(composite_bn=True)`; timm's BatchNormAct2d keeps its
    dropout and activation after the normalisation."""
    if not self.training or self.track_running_stats:  # outside the policy: the module's own forward
        return type(self).forward(self, x)
    y = composite_batch_norm(x, self.weight, self.bias, self.eps)
    if hasattr(self, "act"):
        y = self.act(self.drop(y))
    return y


def _dw_input_grad(g: Tensor, w: Tensor, x_shape: torch.Size, stride, padding, dilation) -> Tensor:
    out_pad = [x_shape[2 + i] - ((g.shape[2 + i] - 1) * stride[i] - 2 * padding[i]
                                 + dilation[i] * (w.shape[2 + i] - 1) + 1) for i in (0, 1)]
    return F.conv_transpose2d(g, w, None, stride, padding, out_pad, w.shape[0], dilation)


def _dw_weight_grad(x: Tensor, g: Tensor, w_shape: torch.Size, stride, padding, dilation) -> Tensor:
    # Sum over the batch as a grouped conv: input channel c*N+n holds x[n, c], filter c holds g[:, c].
    n, c = x.shape[:2]
    xr = x.transpose(0, 1).reshape(1, c * n, *x.shape[2:])
    gr = g.transpose(0, 1).reshape(c, n, *g.shape[2:])
    gw = F.conv2d(xr, gr, None, dilation, padding, stride, c)  # stride and dilation swap roles
    return gw.transpose(0, 1)[:, :, :w_shape[2], :w_shape[3]]


class _DepthwiseConv2d(torch.autograd.Function):
    """Depthwise conv2d whose backward is itself made of (grouped) convolutions. torch's double backward of a
    grouped conv runs one small convolution per channel (`_convolution_double_backward`), which dominates
    second-order MAML on EfficientNet-style depthwise layers, on CPU and even more on GPU."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, w: Tensor, stride, padding, dilation) -> Tensor:
        return F.conv2d(x, w, None, stride, padding, dilation, w.shape[0])

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, w, stride, padding, dilation = inputs
        ctx.save_for_backward(x, w)
        ctx.conf = (stride, padding, dilation)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, w = ctx.saved_tensors
        conf = ctx.conf
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = _dw_input_grad(g, w.to(g.dtype), x.shape, *conf).to(x.dtype)
        if ctx.needs_input_grad[1]:
            gw = _dw_weight_grad(x.to(g.dtype), g, w.shape, *conf).to(w.dtype)
        return gx, gw, None, None, None


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def is_depthwise(m: nn.Module) -> bool:
    """A plain (or timm TF-"SAME") Conv2d with one input channel per group: what `_DepthwiseConv2d` computes."""
    plain = type(m).forward is nn.Conv2d.forward or (Conv2dSame is not None and isinstance(m, Conv2dSame))
    return (isinstance(m, nn.Conv2d) and plain and m.groups > 1 and m.weight.shape[1] == 1
            and m.groups == m.weight.shape[0] == m.in_channels and not isinstance(m.padding, str))


def _depthwise_forward(self: nn.Conv2d, x: Tensor) -> Tensor:
    """`forward` of a depthwise Conv2d under `depthwise_double_backward`: the same values and gradients."""
    padding = self.padding
    if Conv2dSame is not None and isinstance(self, Conv2dSame):
        x, padding = pad_same(x, self.weight.shape[-2:], self.stride, self.dilation), (0, 0)
    elif self.padding_mode != "zeros":
        x, padding = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode), (0, 0)
    out = _DepthwiseConv2d.apply(x, self.weight, _pair(self.stride), _pair(padding), _pair(self.dilation))
    return out if self.bias is None else out + self.bias.view(-1, 1, 1)


@contextmanager
def _forwards_replaced(modules: Iterable[nn.Module], forward: Callable) -> Iterator[None]:
    """Give each module an instance-level `forward` (the class's stays), removed again on exit."""
    done = []
    try:
        for m in modules:
            if "forward" not in m.__dict__:
                m.forward = types.MethodType(forward, m)
                done.append(m)
        yield
    finally:
        for m in done:
            del m.forward


def depthwise_double_backward(model: nn.Module) -> AbstractContextManager[None]:
    """Context: the depthwise convolutions of `model` (only) compute through `_DepthwiseConv2d` (same values and
    gradients, fast second derivatives); other models keep torch's kernels."""
    return _forwards_replaced([m for m in model.modules() if is_depthwise(m)], _depthwise_forward)


@contextmanager
def batch_stats_only(model: nn.Module, composite_bn: bool = True) -> Iterator[None]:
    """Normalise with batch statistics and leave BatchNorm running buffers untouched (train mode).

    `composite_bn` gives this model's BatchNorm modules the exact-under-vmap `composite_batch_norm`; the per-task
    loop can keep torch's fused kernel."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.track_running_stats, m.training) for m in bns]
    for m in bns:
        m.track_running_stats = False
        m.train()
    try:
        with _forwards_replaced(bns if composite_bn else [], _batch_stats_forward):
            yield
    finally:
        for m, (track, training) in zip(bns, saved):
            m.track_running_stats = track
            m.train(training)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterator[Tensor] | list[Tensor]) -> int:
    """Re-estimate BatchNorm running mean/var as the plain average over `batches`. Returns batches seen."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
        m.train()
    n = 0
    for x in batches:
        model(x)
        n += 1
    for m, (mom, training) in zip(bns, saved):
        m.momentum = mom
        m.train(training)
    return n
