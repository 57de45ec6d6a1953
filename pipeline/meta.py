"""Meta-learning with torch.func: MAML (second order), first-order MAML, ANIL, Reptile and Meta-SGD.

MLflow-free and CLI-free. The one inner loop is `adapt`, a pure function of a parameter dict; meta-training,
meta-validation and few-shot adaptation all go through it. `adapt_vjp` is its reverse sweep: the exact
second-order meta-gradient from the recorded θ_0..θ_K by Hessian-vector products, without keeping K graphs.
BatchNorm policy: inside functional calls the model uses the statistics of the batch at hand and never writes its
running buffers (`batch_stats_only`); running statistics are re-estimated in one defined place, `recalibrate_bn`,
before a checkpoint is saved.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap

Params = dict[str, Tensor]
ALGORITHMS = ("maml", "fomaml", "anil", "reptile", "metasgd")


def adapt(loss_fn: Callable[[Params], Tensor], params: Params, lr: float | Params, steps: int,
          first_order: bool = False, grad_fn: Callable[[Params], Params] | None = None,
          trajectory: list | None = None) -> Params:
    """`steps` SGD steps on `loss_fn` from `params`; `lr` is a float or one LR tensor per parameter.

    Second order unless `first_order`: the returned tensors stay differentiable w.r.t. `params` (and `lr`)
    through every step, so an outer backward gives the exact MAML meta-gradient. `grad_fn` stands in for
    `grad(loss_fn)` (e.g. a compiled one). A `trajectory` list receives (θ_i, RNG state) before every step,
    which is all `adapt_vjp` needs to give the same exact meta-gradient without keeping the steps' graphs.
    """
    grad_fn = grad_fn or grad(loss_fn)
    fast = params
    for _ in range(steps):
        if trajectory is not None:
            trajectory.append((fast, _rng_state(fast)))
        g = grad_fn(fast)
        if first_order:
            g = {k: v.detach() for k, v in g.items()}
        fast = {k: fast[k] - (lr[k] if isinstance(lr, dict) else lr) * g[k] for k in fast}
    return fast


def hvp(loss_fn: Callable[..., Tensor]) -> Callable[..., tuple[Params, Params]]:
    """(θ, u, *args) -> (∇L(θ), ∇²L(θ)·u) by forward-over-reverse differentiation, for `adapt_vjp`.

    Always in full precision, whatever autocast encloses it: on CUDA, forward-mode AD through an autocast
    convolution's backward fails ("Input type (torch.cuda.FloatTensor) and weight type (CUDABFloat16Type)
    should be the same", torch 2.11 on an H200), and the product is the exact Hessian of the fp32 loss."""
    def f(params: Params, u: Params, *args) -> tuple[Params, Params]:
        dev = next(iter(params.values())).device.type
        with torch.autocast(dev, enabled=False):
            return jvp(lambda p: grad(loss_fn)(p, *args), (params,), (u,))
    return f


def adapt_vjp(hvp_fn: Callable[[Params, Params], tuple[Params, Params]], trajectory: list,
              lr: float | Params, v: Params) -> tuple[Params, Params | None]:
    """The reverse sweep of `adapt`: given v = ∂L/∂θ_K, return ∂L/∂θ_0 and, for per-parameter LRs, ∂L/∂lr.

    Exact second order, like backpropagating through the unrolled steps: θ_{i+1} = θ_i − lr⊙g_i gives
    ∂L/∂θ_i = v − H_i(lr⊙v) and ∂L/∂lr −= g_i⊙v, with H_i·u from `hvp_fn(θ_i, u) -> (g_i, H_i u)` at the
    stored θ_i. Each step's forward is recomputed under its recorded RNG state (same dropout masks), so only
    one step's graph is alive at a time instead of all of them.
    """
    per_param = isinstance(lr, dict)
    lr_grad = {k: torch.zeros_like(t) for k, t in lr.items()} if per_param else None
    for theta, state in reversed(trajectory):
        u = {k: (lr[k] if per_param else lr) * v[k] for k in v}
        with _restored_rng(theta, state):
            g, hu = hvp_fn(theta, u)
        if per_param:
            for k in lr_grad:
                lr_grad[k] -= g[k] * v[k]
        v = {k: v[k] - hu[k] for k in v}
    return v, lr_grad


def _rng_state(params: Params) -> tuple:
    dev = next(iter(params.values())).device
    return (torch.get_rng_state(), torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None)


@contextmanager
def _restored_rng(params: Params, state: tuple) -> Iterator[None]:
    dev = next(iter(params.values())).device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], dev)
        yield


_native_batch_norm = F.batch_norm


def _composite_batch_norm(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                          weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
                          momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """Batch-statistics BatchNorm from plain ops. torch's fused kernel gives a wrong second derivative
    under vmap (measured: 5e-4 relative error in the MAML meta-gradient, tests/test_meta.py); this is exact."""
    if not training or running_mean is not None or running_var is not None:
        return _native_batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
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


_native_conv2d = F.conv2d


def _dw_input_grad(g: Tensor, w: Tensor, x_shape: torch.Size, stride, padding, dilation) -> Tensor:
    out_pad = [x_shape[2 + i] - ((g.shape[2 + i] - 1) * stride[i] - 2 * padding[i]
                                 + dilation[i] * (w.shape[2 + i] - 1) + 1) for i in (0, 1)]
    return F.conv_transpose2d(g, w, None, stride, padding, out_pad, w.shape[0], dilation)


def _dw_weight_grad(x: Tensor, g: Tensor, w_shape: torch.Size, stride, padding, dilation) -> Tensor:
    # Sum over the batch as a grouped conv: input channel c*N+n holds x[n, c], filter c holds g[:, c].
    n, c = x.shape[:2]
    xr = x.transpose(0, 1).reshape(1, c * n, *x.shape[2:])
    gr = g.transpose(0, 1).reshape(c, n, *g.shape[2:])
    gw = _native_conv2d(xr, gr, None, dilation, padding, stride, c)  # stride and dilation swap roles
    return gw.transpose(0, 1)[:, :, :w_shape[2], :w_shape[3]]


class _DepthwiseConv2d(torch.autograd.Function):
    """Depthwise conv2d whose backward is itself made of (grouped) convolutions. torch's double backward of a
    grouped conv runs one small convolution per channel (`_convolution_double_backward`), which dominates
    second-order MAML on EfficientNet-style depthwise layers, on CPU and even more on GPU."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, w: Tensor, stride, padding, dilation) -> Tensor:
        return _native_conv2d(x, w, None, stride, padding, dilation, w.shape[0])

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


def _conv2d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1,
            groups: int = 1) -> Tensor:
    if (groups > 1 and weight.dim() == 4 and weight.shape[1] == 1 and groups == weight.shape[0] == input.shape[-3]
            and not isinstance(padding, str)):
        out = _DepthwiseConv2d.apply(input, weight, _pair(stride), _pair(padding), _pair(dilation))
        return out if bias is None else out + bias.view(-1, 1, 1)
    return _native_conv2d(input, weight, bias, stride, padding, dilation, groups)


@contextmanager
def depthwise_double_backward() -> Iterator[None]:
    """Route depthwise convolutions through `_DepthwiseConv2d` (same values and gradients, fast second
    derivatives). Modules (torch's and timm's) call F.conv2d, so swapping it reaches them."""
    F.conv2d = _conv2d
    try:
        yield
    finally:
        F.conv2d = _native_conv2d


@contextmanager
def batch_stats_only(model: nn.Module, composite_bn: bool = True) -> Iterator[None]:
    """Normalise with batch statistics and leave BatchNorm running buffers untouched (train mode).

    `composite_bn` swaps in the exact-under-vmap BatchNorm; the per-task loop can keep torch's fused kernel."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.track_running_stats, m.training) for m in bns]
    for m in bns:
        m.track_running_stats = False
        m.train()
    if composite_bn:
        F.batch_norm = _composite_batch_norm  # BatchNorm modules (torch's and timm's) call F.batch_norm
    try:
        yield
    finally:
        F.batch_norm = _native_batch_norm
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


class _Features(nn.Module):
    """View of a timm model that returns pooled pre-logit features (for ANIL's body)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.m = model

    def forward(self, x: Tensor) -> Tensor:
        return self.m.forward_head(self.m.forward_features(x), pre_logits=True)


class MetaLearner(nn.Module):
    """A thin wrapper (learn2learn-style) around a classifier with `adapt`, `task_loss` and `meta_backward`.

    `meta_parameters()` are what the outer optimizer updates: the model's parameters, plus the per-parameter
    inner learning rates for Meta-SGD.
    """

    def __init__(self, model: nn.Module, algorithm: str = "maml", inner_lr: float = 0.01, inner_steps: int = 5,
                 head: str = "classifier", first_order: bool | None = None, unroll: bool = False,
                 compile: bool = False):
        super().__init__()
        # Per-task path: `unroll` backpropagates through the inner loop's graphs (all K steps alive at once);
        # otherwise MAML/FOMAML/Meta-SGD get the same gradient from `adapt_vjp`'s reverse sweep, which keeps only
        # θ_0..θ_K, and ANIL from one functional grad. `compile` runs those pure torch.func functions through
        # torch.compile.
        self.unroll, self.compile = unroll, compile
        self._fns: dict[str, Callable] = {}
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {algorithm!r}; choose from {ALGORITHMS}")
        self.model, self.algorithm, self.inner_steps = model, algorithm, inner_steps
        self.inner_lr = inner_lr
        self.first_order = algorithm in ("fomaml", "reptile") if first_order is None else first_order
        self.fast_depthwise = True  # second-order: depthwise convs through `_DepthwiseConv2d`
        self.head = head.rstrip(".") + "."
        self._features = _Features(model) if algorithm == "anil" else None
        self.lrs = nn.ParameterDict()
        if algorithm == "metasgd":  # one learned LR per parameter entry, initialised to inner_lr
            for k, p in model.named_parameters():
                self.lrs[k.replace(".", "__")] = nn.Parameter(torch.full_like(p, inner_lr))

    # -- parameters -------------------------------------------------------------------------------
    def params(self) -> Params:
        return dict(self.model.named_parameters())

    def lr_dict(self) -> float | Params:
        if self.algorithm != "metasgd":
            return self.inner_lr
        return {k.replace("__", "."): v for k, v in self.lrs.items()}

    def meta_parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters()) + list(self.lrs.parameters())

    def split(self, params: Params) -> tuple[Params, Params]:
        head = {k: v for k, v in params.items() if k.startswith(self.head)}
        if not head:
            raise ValueError(f"no parameters under head prefix {self.head!r}")
        return {k: v for k, v in params.items() if k not in head}, head

    # -- functional calls -------------------------------------------------------------------------
    def logits(self, params: Params, x: Tensor) -> Tensor:
        return functional_call(self.model, params, (x,))

    def features(self, params: Params, x: Tensor) -> Tensor:
        return functional_call(self._features, {f"m.{k}": v for k, v in params.items()}, (x,))

    def head_logits(self, head: Params, f: Tensor) -> Tensor:
        n = len(self.head)
        return functional_call(self.model.get_submodule(self.head[:-1]), {k[n:]: v for k, v in head.items()}, (f,))

    def _loss_out(self, params: Params, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        out = self.logits(params, x)
        return F.cross_entropy(out, y), out

    def loss(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        return self._loss_out(params, x, y)[0]

    def fn(self, name: str) -> Callable:
        """`grad`, `hvp` or `query` (gradient plus logits) of the full model's loss, or `anil` (ANIL's whole
        meta-gradient plus query logits), as pure functions of (params, ..., x, y); compiled once when `compile`
        (torch.compile traces torch.func transforms, while it cannot trace autograd's double backward). Dropout
        stays torch's own op, so `adapt_vjp` can replay it."""
        if name not in self._fns:
            f = {"grad": grad(self.loss), "hvp": hvp(self.loss), "query": grad(self._loss_out, has_aux=True),
                 "anil": grad(self._task_loss_out, has_aux=True)}[name]
            self._fns[name] = (torch.compile(f, dynamic=False, options={"fallback_random": True}) if self.compile
                               else f)
        return self._fns[name]

    # -- the algorithms ---------------------------------------------------------------------------
    def adapt_task(self, params: Params, xs: Tensor, ys: Tensor, first_order: bool | None = None
                   ) -> Callable[[Tensor], Tensor]:
        """Adapt to one task's support set; returns the adapted classifier `x -> logits`."""
        fo = self.first_order if first_order is None else first_order
        lr = self.lr_dict()
        if self.algorithm == "anil":
            body, head = self.split(params)
            fs = self.features(params, xs)
            fast = adapt(lambda h: F.cross_entropy(self.head_logits(h, fs), ys), head,
                         lr, self.inner_steps, fo)
            return lambda x: self.head_logits(fast, self.features(params, x))
        fast = adapt(lambda p: F.cross_entropy(self.logits(p, xs), ys), params, lr, self.inner_steps, fo)
        return lambda x: self.logits(fast, x)

    def _task_loss_out(self, params: Params, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor
                       ) -> tuple[Tensor, Tensor]:
        out = self.adapt_task(params, xs, ys)(xq)
        return F.cross_entropy(out, yq), out

    def task_loss(self, params: Params, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> tuple[Tensor, Tensor]:
        """Query loss and accuracy after adapting on the support set (the MAML-family meta-objective)."""
        loss, out = self._task_loss_out(params, xs, ys, xq, yq)
        return loss, (out.argmax(-1) == yq).float().mean()

    def reptile_delta(self, params: Params, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor, loop: bool = False
                      ) -> tuple[Params, Tensor, Tensor]:
        """θ̃ − θ after inner SGD on the support set, plus query loss/accuracy of θ̃ (for logging).
        `loop`: called per task (not under vmap), so the possibly compiled `fn("grad")` may serve."""
        params = {k: v.detach() for k, v in params.items()}
        fast = adapt(lambda p: self.loss(p, xs, ys), params, self.inner_lr, self.inner_steps, first_order=True,
                     grad_fn=(lambda p: self.fn("grad")(p, xs, ys)) if loop else None)
        fast = {k: v.detach() for k, v in fast.items()}
        out = self.logits(fast, xq).detach()
        return ({k: fast[k] - params[k] for k in params}, F.cross_entropy(out, yq),
                (out.argmax(-1) == yq).float().mean())

    def double_backward(self, batched: bool) -> bool:
        """Whether `meta_backward` differentiates autograd's own backward through the whole network: second-order
        MAML/Meta-SGD on the vmapped or unrolled path (the reverse sweep and ANIL's head-only steps do not)."""
        return self.algorithm in ("maml", "metasgd") and not self.first_order and (batched or self.unroll)

    def meta_backward(self, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor, batched: bool = True
                      ) -> tuple[float, float]:
        """Accumulate the meta-gradient of a meta-batch (tasks on dim 0) into `.grad`; return loss, accuracy.

        MAML-family: grad of the mean query loss. Reptile: the pseudo-gradient −mean(θ̃ − θ), so a plain
        SGD step with lr ε gives θ ← θ + ε·mean(θ̃ − θ).
        """
        params, T = self.params(), xs.shape[0]
        sweep = not batched and not self.unroll and self.algorithm in ("maml", "fomaml", "metasgd", "anil")
        # the depthwise swap serves autograd's double backward; the sweep differentiates forward-over-reverse
        fast_dw = not self.first_order and self.fast_depthwise and not sweep
        with batch_stats_only(self.model, composite_bn=batched), \
                (depthwise_double_backward() if fast_dw else nullcontext()):
            if self.algorithm == "reptile":
                if batched:
                    deltas, losses, accs = vmap(self.reptile_delta, in_dims=(None, 0, 0, 0, 0),
                                                randomness="different")(params, xs, ys, xq, yq)
                    mean_delta = {k: v.mean(0) for k, v in deltas.items()}
                else:
                    outs = [self.reptile_delta(params, xs[t], ys[t], xq[t], yq[t], loop=True) for t in range(T)]
                    mean_delta = {k: sum(o[0][k] for o in outs) / T for k in params}
                    losses, accs = torch.stack([o[1] for o in outs]), torch.stack([o[2] for o in outs])
                self._accumulate(params, {k: -d for k, d in mean_delta.items()})
                return losses.mean().item(), accs.mean().item()
            if batched:
                losses, accs = vmap(self.task_loss, in_dims=(None, 0, 0, 0, 0),
                                    randomness="different")(params, xs, ys, xq, yq)
                losses.mean().backward()
                return losses.mean().item(), accs.mean().item()
            if sweep:
                return self._sweep_backward(params, xs, ys, xq, yq)
            tot_l = tot_a = 0.0
            for t in range(T):  # per-task backward keeps only one task's graph alive
                loss, acc = self.task_loss(params, xs[t], ys[t], xq[t], yq[t])
                (loss / T).backward()
                tot_l, tot_a = tot_l + loss.item() / T, tot_a + acc.item() / T
            return tot_l, tot_a

    def _sweep_backward(self, params: Params, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> tuple[float, float]:
        """Per-task meta-gradients with no graph over the inner loop: first-order inner steps that record θ_i,
        the query gradient at θ_K, then (second order) `adapt_vjp`'s reverse sweep back to θ_0. ANIL's inner
        loop is a few head steps, so its meta-gradient is one functional `grad` through them."""
        T = xs.shape[0]
        theta = {k: v.detach() for k, v in params.items()}
        lr = self.lr_dict()
        lr = {k: v.detach() for k, v in lr.items()} if isinstance(lr, dict) else lr
        tot_l = tot_a = 0.0
        for t in range(T):
            x_s, y_s = xs[t], ys[t]
            if self.algorithm == "anil":  # second order through the head only: one functional gradient
                v, out = self.fn("anil")(theta, x_s, y_s, xq[t], yq[t])
                self._accumulate(params, v, scale=1 / T)
                tot_l, tot_a = self._tally(out, yq[t], tot_l, tot_a, T)
                continue
            traj = None if self.first_order else []
            fast = adapt(None, theta, lr, self.inner_steps, first_order=True,
                         grad_fn=lambda p: self.fn("grad")(p, x_s, y_s), trajectory=traj)
            v, out = self.fn("query")(fast, xq[t], yq[t])
            lr_grad = None
            if traj is not None:
                v, lr_grad = adapt_vjp(lambda p, u: self.fn("hvp")(p, u, x_s, y_s), traj, lr, v)
            self._accumulate(params, v, lr_grad, 1 / T)
            tot_l, tot_a = self._tally(out, yq[t], tot_l, tot_a, T)
        return tot_l, tot_a

    def _accumulate(self, params: Params, g: Params, lr_grad: Params | None = None, scale: float = 1.0) -> None:
        """Add scale·g into the parameters' `.grad` (and Meta-SGD's LR gradients), as `backward` would."""
        pairs = [(p, g[k]) for k, p in params.items()]
        pairs += [(self.lrs[k.replace(".", "__")], gl) for k, gl in (lr_grad or {}).items()]
        for p, gk in pairs:
            p.grad = scale * gk if p.grad is None else p.grad + scale * gk

    @staticmethod
    def _tally(out: Tensor, y: Tensor, tot_l: float, tot_a: float, T: int) -> tuple[float, float]:
        out = out.detach()
        out = out.float() if out.dtype in (torch.float16, torch.bfloat16) else out
        return (tot_l + F.cross_entropy(out, y).item() / T, tot_a + (out.argmax(-1) == y).float().mean().item() / T)

    def evaluate(self, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> tuple[float, float]:
        """Few-shot accuracy on held-out tasks: first-order adaptation, no meta-gradient, no buffer writes."""
        tot_l = tot_a = 0.0
        T = xs.shape[0]
        with batch_stats_only(self.model, composite_bn=False), torch.no_grad():
            params = {k: v.detach() for k, v in self.params().items()}
            for t in range(T):
                out = self.adapt_task(params, xs[t], ys[t], first_order=True)(xq[t])
                tot_l += F.cross_entropy(out, yq[t]).item() / T
                tot_a += (out.argmax(-1) == yq[t]).float().mean().item() / T
        return tot_l, tot_a
