"""One small class per meta-learning algorithm, MLflow-free (learn2learn's `algorithms/maml.py` is the model).

`MetaLearner` holds what every algorithm shares: the functional calls of a timm classifier, the inner loop
(`adapt_task`, through `adapt`), meta-validation (`evaluate`) and gradient accumulation. Each algorithm is a
subclass that says how a meta-batch's gradient is made (`_meta_backward`) and, where it differs, its outer
optimizer. Variants are flags (`MAML(first_order=True)` is first-order MAML). Adding an algorithm is one class
plus one entry in `ALGORITHMS`.
"""
from __future__ import annotations

from contextlib import ExitStack
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from .inner import Params, adapt, adapt_vjp, hvp
from .layers import batch_stats_only, depthwise_double_backward


def _same_strides(fn: Callable, strides: dict[str, tuple[int, ...]]) -> Callable:
    """Call `fn` with every parameter-dict argument (parameters, tangents) in the strides `strides` holds for each
    name, the first ones seen. torch.compile guards on strides, size-1 dimensions included: an inner step
    `θ - lr·g` hands back a channels-last depthwise weight (C, 1, 3, 3) with contiguous strides, which recompiled
    MAML's gradient and Hessian-vector-product functions; sharing `strides` among a learner's compiled functions
    keeps them all on the model's own memory format."""
    def call(*args):
        return fn(*({k: _restride(v, strides.setdefault(k, v.stride())) for k, v in a.items()}
                    if isinstance(a, dict) else a for a in args))
    return call


def _restride(v: Tensor, stride: tuple[int, ...]) -> Tensor:
    if v.stride() == stride:
        return v
    return torch.empty_strided(v.shape, stride, dtype=v.dtype, device=v.device).copy_(v)


class _Features(nn.Module):
    """View of a timm model that returns pooled pre-logit features (for ANIL's body)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.m = model

    def forward(self, x: Tensor) -> Tensor:
        return self.m.forward_head(self.m.forward_features(x), pre_logits=True)


class MetaLearner(nn.Module):
    """What every algorithm shares, around a classifier `model` whose head parameters start with `head`.

    `meta_parameters()` are what the outer optimizer updates. `unroll`: backpropagate through the inner loop's
    graphs (all K steps alive at once) instead of the leaner per-task reverse sweep; `compile`: run the pure
    torch.func functions through torch.compile. `prototype_head`: every task's inner loop starts its head from the
    support set's class means (`task_init`) instead of the meta-learned head.
    """

    name = ""
    first_order = True

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 5, head: str = "classifier",
                 unroll: bool = False, compile: bool = False, prototype_head: bool = False):
        super().__init__()
        self.model, self.inner_lr, self.inner_steps = model, inner_lr, inner_steps
        self.head = head.rstrip(".") + "."
        self.unroll, self.compile = unroll, compile
        self.prototype_head = prototype_head
        self.fast_depthwise = True  # autograd's double backward: depthwise convs through `_DepthwiseConv2d`
        self._fns: dict[str, Callable] = {}
        self._strides: dict[str, tuple[int, ...]] = {}  # one layout per parameter for every compiled function
        # an unregistered view (the model is already a submodule): pooled features for prototype heads
        object.__setattr__(self, "_view", _Features(model))

    # -- parameters -------------------------------------------------------------------------------
    def params(self) -> Params:
        return dict(self.model.named_parameters())

    def lr_dict(self) -> float | Params:
        return self.inner_lr

    def meta_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def outer_optimizer(self, outer_lr: float, reptile_epsilon: float) -> torch.optim.Optimizer:
        """The optimizer of the outer loop (Adam on the meta-gradient)."""
        return torch.optim.Adam(self.meta_parameters(), lr=outer_lr)

    def summary(self) -> dict[str, float]:
        """Figures worth logging once training ends (none by default)."""
        return {}

    def prototype_params(self, head: Params, fs: Tensor, ys: Tensor) -> Params:
        """The head set from the class means c_k of support features `fs` (labels `ys`): W_k = 2 c_k,
        b_k = -||c_k||^2, whose logits are -||f - c_k||^2 + ||f||^2 (Proto-MAML, Triantafillou et al. 2020). Held
        fixed (first order: no gradient flows into the means), so the head parameter itself is not meta-learned."""
        w, b = head[f"{self.head}weight"], head[f"{self.head}bias"]
        pw, pb = prototype_linear(fs.detach(), ys, w.shape[0])
        return {**head, f"{self.head}weight": pw.to(w.dtype), f"{self.head}bias": pb.to(b.dtype)}

    def task_init(self, params: Params, xs: Tensor, ys: Tensor) -> Params:
        """Where a task's inner loop starts: `params`, or with `prototype_head` the same body and a prototype head
        from the support set (`prototype_params`)."""
        if not self.prototype_head:
            return params
        return {**params, **self.prototype_params(self.split(params)[1], self.features(params, xs), ys)}

    def _no_head_grad(self, g: Params) -> Params:
        """With `prototype_head` every task's head is rebuilt from its support set: the head parameter gets no
        meta-gradient (zeros, as autograd's paths leave it)."""
        if not self.prototype_head:
            return g
        return {k: torch.zeros_like(v) if k.startswith(self.head) else v for k, v in g.items()}

    def split(self, params: Params) -> tuple[Params, Params]:
        head = {k: v for k, v in params.items() if k.startswith(self.head)}
        if not head:
            raise ValueError(f"no parameters under head prefix {self.head!r}")
        return {k: v for k, v in params.items() if k not in head}, head

    # -- functional calls -------------------------------------------------------------------------
    def logits(self, params: Params, x: Tensor) -> Tensor:
        return functional_call(self.model, params, (x,))

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
            f = {"grad": lambda: grad(self.loss), "hvp": lambda: hvp(self.loss),
                 "query": lambda: grad(self._loss_out, has_aux=True),
                 "anil": lambda: grad(self._task_loss_out, has_aux=True)}[name]()
            self._fns[name] = (_same_strides(torch.compile(f, dynamic=False, options={"fallback_random": True}),
                                             self._strides)
                               if self.compile else f)
        return self._fns[name]

    # -- the inner loop and the meta-objective ----------------------------------------------------
    def adapt_task(self, params: Params, xs: Tensor, ys: Tensor, first_order: bool | None = None
                   ) -> Callable[[Tensor], Tensor]:
        """Adapt to one task's support set; returns the adapted classifier `x -> logits`."""
        fo = self.first_order if first_order is None else first_order
        params = self.task_init(params, xs, ys)
        fast = adapt(lambda p: F.cross_entropy(self.logits(p, xs), ys), params, self.lr_dict(), self.inner_steps, fo)
        return lambda x: self.logits(fast, x)

    def _task_loss_out(self, params: Params, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor
                       ) -> tuple[Tensor, Tensor]:
        out = self.adapt_task(params, xs, ys)(xq)
        return F.cross_entropy(out, yq), out

    def task_loss(self, params: Params, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> tuple[Tensor, Tensor]:
        """Query loss and accuracy after adapting on the support set (the MAML-family meta-objective)."""
        loss, out = self._task_loss_out(params, xs, ys, xq, yq)
        return loss, (out.argmax(-1) == yq).float().mean()

    def double_backward(self, batched: bool) -> bool:
        """Whether `meta_backward` differentiates autograd's own backward through the whole network."""
        return False

    def meta_backward(self, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor, batched: bool = True,
                      classes: Tensor | None = None) -> tuple[float, float]:
        """Accumulate the meta-gradient of a meta-batch (tasks on dim 0) into `.grad`; return loss, accuracy.
        `batched`: all tasks at once under `vmap` (with the exact composite BatchNorm); else one task at a time.
        `classes` (T, N): the pool-wide class of each task label (`Episodes.classes`; only `Multitask` reads it)."""
        with ExitStack() as stack:
            stack.enter_context(batch_stats_only(self.model, composite_bn=batched))
            if self._autograd_second_order(batched) and self.fast_depthwise:
                stack.enter_context(depthwise_double_backward(self.model))
            return self._meta_backward(self.params(), xs, ys, xq, yq, batched)

    def _autograd_second_order(self, batched: bool) -> bool:
        """Whether autograd differentiates through inner steps (then the depthwise swap pays)."""
        return False

    def _meta_backward(self, params: Params, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor, batched: bool
                       ) -> tuple[float, float]:
        raise NotImplementedError

    def _backward_task_losses(self, params: Params, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor, batched: bool
                              ) -> tuple[float, float]:
        """Autograd through `task_loss`: all tasks at once under `vmap`, or one task's graph at a time."""
        if batched:
            losses, accs = vmap(self.task_loss, in_dims=(None, 0, 0, 0, 0), randomness="different")(
                params, xs, ys, xq, yq)
            losses.mean().backward()
            return losses.mean().item(), accs.mean().item()
        T, tot_l, tot_a = xs.shape[0], 0.0, 0.0
        for t in range(T):
            loss, acc = self.task_loss(params, xs[t], ys[t], xq[t], yq[t])
            (loss / T).backward()
            tot_l, tot_a = tot_l + loss.item() / T, tot_a + acc.item() / T
        return tot_l, tot_a

    def features(self, params: Params, x: Tensor) -> Tensor:
        """Pooled pre-logit features of the body under `params`."""
        return functional_call(self._view, {f"m.{k}": v for k, v in params.items()}, (x,))

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


class MAML(MetaLearner):
    """MAML (Finn et al. 2017): the meta-gradient of the query loss after inner SGD on the support set.

    Second order by default: the per-task loop pulls the query gradient back through the recorded inner steps with
    Hessian-vector products (`adapt_vjp`), exact like backpropagating through the unrolled loop (`unroll=True`),
    which `vmap` (`batched`) does too. `first_order=True`: the query gradient at the adapted weights (FOMAML).
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 5, head: str = "classifier",
                 first_order: bool = False, unroll: bool = False, compile: bool = False, prototype_head: bool = False):
        super().__init__(model, inner_lr, inner_steps, head, unroll, compile, prototype_head)
        self.first_order = first_order
        self.name = "fomaml" if first_order else "maml"

    def double_backward(self, batched: bool) -> bool:
        return self._autograd_second_order(batched)

    def _autograd_second_order(self, batched: bool) -> bool:
        return not self.first_order and (batched or self.unroll)

    def _meta_backward(self, params: Params, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor, batched: bool
                       ) -> tuple[float, float]:
        if batched or self.unroll:  # autograd through the inner steps (per task: one task's graph alive)
            return self._backward_task_losses(params, xs, ys, xq, yq, batched)
        T, tot_l, tot_a = xs.shape[0], 0.0, 0.0
        theta = {k: v.detach() for k, v in params.items()}
        lr = self.lr_dict()
        lr = {k: v.detach() for k, v in lr.items()} if isinstance(lr, dict) else lr
        for t in range(T):
            v, lr_grad, out = self._task_meta_gradient(theta, lr, xs[t], ys[t], xq[t], yq[t])
            self._accumulate(params, v, lr_grad, 1 / T)
            tot_l, tot_a = self._tally(out, yq[t], tot_l, tot_a, T)
        return tot_l, tot_a

    def _task_meta_gradient(self, theta: Params, lr: float | Params, x_s: Tensor, y_s: Tensor, x_q: Tensor,
                            y_q: Tensor) -> tuple[Params, Params | None, Tensor]:
        """One task's meta-gradient with no graph over the inner loop: first-order inner steps that record θ_i, the
        query gradient at θ_K, then (second order) `adapt_vjp`'s reverse sweep back to θ_0."""
        traj = None if self.first_order else []
        theta = self.task_init(theta, x_s, y_s)
        fast = adapt(None, theta, lr, self.inner_steps, first_order=True,
                     grad_fn=lambda p: self.fn("grad")(p, x_s, y_s), trajectory=traj)
        v, out = self.fn("query")(fast, x_q, y_q)
        lr_grad = None
        if traj is not None:
            v, lr_grad = adapt_vjp(lambda p, u: self.fn("hvp")(p, u, x_s, y_s), traj, lr, v)
        return self._no_head_grad(v), lr_grad, out


class MetaSGD(MAML):
    """Meta-SGD (Li et al. 2017): MAML with one learned inner learning rate per parameter entry, initialised to
    `inner_lr` and meta-learned with θ."""

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 5, head: str = "classifier",
                 first_order: bool = False, unroll: bool = False, compile: bool = False, prototype_head: bool = False):
        super().__init__(model, inner_lr, inner_steps, head, first_order, unroll, compile, prototype_head)
        self.name = "metasgd"
        self.lrs = nn.ParameterDict({k.replace(".", "__"): nn.Parameter(torch.full_like(p, inner_lr))
                                     for k, p in model.named_parameters()})

    def lr_dict(self) -> Params:
        return {k.replace("__", "."): v for k, v in self.lrs.items()}

    def summary(self) -> dict[str, float]:
        lrs = torch.cat([p.detach().flatten() for p in self.lrs.parameters()])
        return {"metasgd_lr_mean": lrs.mean().item(), "metasgd_lr_std": lrs.std().item()}


class ANIL(MAML):
    """ANIL (Raghu et al. 2020): the inner loop adapts only the head on the body's features; the body is
    meta-learned in the outer loop. Second order through the head steps, by one functional `grad`."""

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 5, head: str = "classifier",
                 first_order: bool = False, unroll: bool = False, compile: bool = False, prototype_head: bool = False):
        super().__init__(model, inner_lr, inner_steps, head, first_order, unroll, compile, prototype_head)
        self.name = "anil"

    def meta_parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def double_backward(self, batched: bool) -> bool:
        return False  # the second derivatives are the head's only

    def head_logits(self, head: Params, f: Tensor) -> Tensor:
        n = len(self.head)
        return functional_call(self.model.get_submodule(self.head[:-1]), {k[n:]: v for k, v in head.items()}, (f,))

    def adapt_task(self, params: Params, xs: Tensor, ys: Tensor, first_order: bool | None = None
                   ) -> Callable[[Tensor], Tensor]:
        fo = self.first_order if first_order is None else first_order
        _, head = self.split(params)
        fs = self.features(params, xs)
        if self.prototype_head:
            head = self.prototype_params(head, fs, ys)
        fast = adapt(lambda h: F.cross_entropy(self.head_logits(h, fs), ys), head, self.lr_dict(), self.inner_steps, fo)
        return lambda x: self.head_logits(fast, self.features(params, x))

    def _task_meta_gradient(self, theta: Params, lr: float | Params, x_s: Tensor, y_s: Tensor, x_q: Tensor,
                            y_q: Tensor) -> tuple[Params, Params | None, Tensor]:
        v, out = self.fn("anil")(theta, x_s, y_s, x_q, y_q)
        return self._no_head_grad(v), None, out


class Reptile(MetaLearner):
    """Reptile (Nichol et al. 2018): inner SGD on the support set, then θ ← θ + ε·mean(θ̃ − θ), i.e. plain SGD with
    lr ε on the pseudo-gradient −mean(θ̃ − θ) that `meta_backward` accumulates. `outer="adam"`: Adam at the outer
    learning rate on that pseudo-gradient instead (its size no longer sets the step). `use_query`: the inner loop
    trains on the support and query images together (meta-training only; `adapt_task` adapts on the support set), so
    the logged query loss and accuracy are then on images the inner loop saw."""

    name = "reptile"

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 5, head: str = "classifier",
                 unroll: bool = False, compile: bool = False, prototype_head: bool = False, outer: str = "sgd",
                 use_query: bool = False):
        super().__init__(model, inner_lr, inner_steps, head, unroll, compile, prototype_head)
        if outer not in ("sgd", "adam"):
            raise ValueError(f"Reptile's outer loop is 'sgd' or 'adam', not {outer!r}")
        self.outer, self.use_query = outer, use_query

    def outer_optimizer(self, outer_lr: float, reptile_epsilon: float) -> torch.optim.Optimizer:
        if self.outer == "adam":
            return torch.optim.Adam(self.meta_parameters(), lr=outer_lr)
        return torch.optim.SGD(self.meta_parameters(), lr=reptile_epsilon)

    def reptile_delta(self, params: Params, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor, loop: bool = False
                      ) -> tuple[Params, Tensor, Tensor]:
        """θ̃ − θ after inner SGD on the support set (with `use_query`, support and query), plus query loss/accuracy
        of θ̃ (for logging).
        `loop`: called per task (not under vmap), so the possibly compiled `fn("grad")` may serve."""
        params = self.task_init({k: v.detach() for k, v in params.items()}, xs, ys)  # the head from the support
        x, y = (torch.cat([xs, xq]), torch.cat([ys, yq])) if self.use_query else (xs, ys)
        fast = adapt(lambda p: self.loss(p, x, y), params, self.inner_lr, self.inner_steps, first_order=True,
                     grad_fn=(lambda p: self.fn("grad")(p, x, y)) if loop else None)
        fast = {k: v.detach() for k, v in fast.items()}
        out = self.logits(fast, xq).detach()
        return (self._no_head_grad({k: fast[k] - params[k] for k in params}), F.cross_entropy(out, yq),
                (out.argmax(-1) == yq).float().mean())

    def _meta_backward(self, params: Params, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor, batched: bool
                       ) -> tuple[float, float]:
        if batched:
            deltas, losses, accs = vmap(self.reptile_delta, in_dims=(None, 0, 0, 0, 0), randomness="different")(
                params, xs, ys, xq, yq)
            mean_delta = {k: v.mean(0) for k, v in deltas.items()}
        else:
            T = xs.shape[0]
            outs = [self.reptile_delta(params, xs[t], ys[t], xq[t], yq[t], loop=True) for t in range(T)]
            mean_delta = {k: sum(o[0][k] for o in outs) / T for k in params}
            losses, accs = torch.stack([o[1] for o in outs]), torch.stack([o[2] for o in outs])
        self._accumulate(params, {k: -d for k, d in mean_delta.items()})
        return losses.mean().item(), accs.mean().item()


def class_means(fs: Tensor, ys: Tensor, n_ways: int) -> Tensor:
    """(N, D) means of features `fs` per label `ys` in 0..n_ways-1 (the prototypes)."""
    onehot = F.one_hot(ys, n_ways).to(fs.dtype)  # (S, N): class means without data-dependent shapes (vmap)
    return onehot.T @ fs / onehot.sum(0)[:, None]


def prototype_linear(fs: Tensor, ys: Tensor, n_ways: int) -> tuple[Tensor, Tensor]:
    """The linear head (W, b) with W_k = 2 c_k, b_k = -||c_k||^2 for the class means c_k of `fs` per label `ys`: its
    logits W f + b = -||f - c_k||^2 + ||f||^2 are a prototypical classifier up to a per-image constant."""
    protos = class_means(fs, ys, n_ways)
    return 2 * protos, -(protos ** 2).sum(1)


def prototype_logits(fs: Tensor, ys: Tensor, fq: Tensor, n_ways: int) -> Tensor:
    """Negative squared Euclidean distances from query features `fq` to the class means of support features `fs`
    (labels `ys` in 0..n_ways-1): the logits of a prototypical network."""
    return -((fq[:, None, :] - class_means(fs, ys, n_ways)[None]) ** 2).sum(-1)


class ProtoNet(MetaLearner):
    """Prototypical networks (Snell et al. 2017): no inner loop; a query is classified by the squared Euclidean
    distance of its body features to the class means (prototypes) of the support features, and the body is trained
    on the episodic cross-entropy of those distances. The classifier head is not used (it stays as it is)."""

    name = "protonet"

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 5, head: str = "classifier",
                 unroll: bool = False, compile: bool = False):
        super().__init__(model, inner_lr, inner_steps, head, unroll, compile)

    def meta_parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def adapt_task(self, params: Params, xs: Tensor, ys: Tensor, first_order: bool | None = None
                   ) -> Callable[[Tensor], Tensor]:
        n = self.split(params)[1][f"{self.head}weight"].shape[0]  # the N-way head's size: N classes per task
        fs = self.features(params, xs)
        return lambda x: prototype_logits(fs, ys, self.features(params, x), n)

    def _meta_backward(self, params: Params, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor, batched: bool
                       ) -> tuple[float, float]:
        return self._backward_task_losses(params, xs, ys, xq, yq, batched)


class Multitask(MetaLearner):
    """The supervised control (no "meta"): the body with one head over every source class pooled, trained by plain
    cross-entropy on the pool-wide labels of each meta-batch's images (support and query: the images a meta run
    sees per step). Meta-validation adapts it like every other learner (the inner loop on the N-way head), so its
    accuracy is comparable; the pooled head is training scaffolding and is not saved with the body."""

    name = "multitask"

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 5, head: str = "classifier",
                 unroll: bool = False, compile: bool = False, source_classes: int = 2):
        super().__init__(model, inner_lr, inner_steps, head, unroll, compile)
        n_features = getattr(model, "num_features", None) or model.get_classifier().in_features
        self.pooled_head = nn.Linear(n_features, source_classes)
        nn.init.zeros_(self.pooled_head.weight)  # as the meta head: no random-head gradients into the body
        nn.init.zeros_(self.pooled_head.bias)

    def meta_parameters(self) -> list[nn.Parameter]:
        body = [p for n, p in self.model.named_parameters() if not n.startswith(self.head)]
        return body + list(self.pooled_head.parameters())

    def meta_backward(self, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor, batched: bool = True,
                      classes: Tensor | None = None) -> tuple[float, float]:
        if classes is None:
            raise ValueError("multitask needs each task's pool-wide classes (Episodes.classes)")
        x = torch.cat([xs.flatten(0, 1), xq.flatten(0, 1)])
        y = torch.cat([classes.gather(1, ys).flatten(), classes.gather(1, yq).flatten()])
        with batch_stats_only(self.model, composite_bn=False):  # running statistics: recalibrated at the end
            out = self.pooled_head(self._view(x))
        loss = F.cross_entropy(out.float() if out.dtype in (torch.float16, torch.bfloat16) else out, y)
        loss.backward()
        return loss.item(), (out.argmax(-1) == y).float().mean().item()


# meta.algorithm -> how to build it; the config accepts exactly these names
ALGORITHMS: dict[str, Callable[..., MetaLearner]] = {
    "maml": MAML,
    "fomaml": lambda model, **kw: MAML(model, first_order=True, **kw),
    "anil": ANIL,
    "reptile": Reptile,
    "metasgd": MetaSGD,
    "protonet": ProtoNet,
    "multitask": Multitask,
}


# the algorithms with an inner loop on the N-way head, where `meta.head_init=prototype` applies
PROTOTYPE_HEAD_ALGORITHMS = ("maml", "fomaml", "anil", "metasgd", "reptile")


def create_learner(model: nn.Module, algorithm: str, inner_lr: float = 0.01, inner_steps: int = 5,
                   head: str = "classifier", unroll: bool = False, compile: bool = False,
                   source_classes: int = 0, head_init: str = "default", reptile_outer: str = "sgd",
                   reptile_query: bool = False) -> MetaLearner:
    """The `MetaLearner` of `algorithm` (a key of `ALGORITHMS`) around `model`; `source_classes`: the meta-train
    pool's class count, the size of `multitask`'s pooled head; `head_init="prototype"`: each task's head starts from
    its support prototypes (`MetaLearner.task_init`; algorithms of `PROTOTYPE_HEAD_ALGORITHMS`); `reptile_outer`:
    Reptile's outer optimizer ("sgd" or "adam"); `reptile_query`: Reptile's inner loop also trains on the query set."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose from {sorted(ALGORITHMS)}")
    if head_init == "prototype" and algorithm not in PROTOTYPE_HEAD_ALGORITHMS:
        raise ValueError(f"head_init='prototype' needs an inner loop on the head; {algorithm!r} has none "
                         f"(choose from {list(PROTOTYPE_HEAD_ALGORITHMS)})")
    extra = {"source_classes": source_classes} if ALGORITHMS[algorithm] is Multitask else {}
    if head_init == "prototype":
        extra["prototype_head"] = True
    if algorithm == "reptile":
        extra["outer"], extra["use_query"] = reptile_outer, reptile_query
    return ALGORITHMS[algorithm](model, inner_lr=inner_lr, inner_steps=inner_steps, head=head, unroll=unroll,
                                 compile=compile, **extra)
