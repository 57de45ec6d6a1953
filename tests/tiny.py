"""A tiny timm-shaped classifier (BatchNorm, forward_features/forward_head, `classifier`) for math tests."""
import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, n_classes: int = 3, in_ch: int = 3, width: int = 4, act=nn.Tanh, depthwise: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.act = act()
        # EfficientNet-style strided depthwise conv (exercises the meta module's depthwise double backward)
        self.dw = nn.Conv2d(width, width, 3, stride=2, padding=1, groups=width) if depthwise else nn.Identity()
        self.drop = nn.Dropout(dropout)  # timm's classifier dropout (drop_rate)
        self.classifier = nn.Linear(width, n_classes)

    def forward_features(self, x):
        return self.act(self.dw(self.act(self.bn(self.conv(x)))))

    def forward_head(self, x, pre_logits: bool = False):
        x = x.mean((2, 3))
        return x if pre_logits else self.classifier(self.drop(x))

    def get_classifier(self):
        return self.classifier

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def make_tasks(T=2, n=3, k=2, q=3, size=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(T, n * k, 3, size, size, generator=g, dtype=dtype)
    xq = torch.randn(T, n * q, 3, size, size, generator=g, dtype=dtype)
    ys = torch.arange(n).repeat_interleave(k).repeat(T, 1)
    yq = torch.arange(n).repeat_interleave(q).repeat(T, 1)
    return xs, ys, xq, yq


def tiny(seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    return TinyNet(**kw).to(dtype)
