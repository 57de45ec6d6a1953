"""The one inner loop, `adapt`, a pure function of a parameter dict, and its reverse sweep `adapt_vjp`: the exact
second-order meta-gradient from the recorded θ_0..θ_K by Hessian-vector products, without keeping K graphs.
Meta-training, meta-validation and few-shot adaptation all go through `adapt` (docs/design.md)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import Tensor
from torch.func import grad, jvp

Params = dict[str, Tensor]


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


