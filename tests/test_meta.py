"""Mathematics of the meta-learning algorithms on a tiny model in float64."""
import copy

import pytest
import torch
import torch.nn.functional as F

from pipeline.meta import create_learner, _DepthwiseConv2d, adapt, batch_stats_only, hvp, recalibrate_bn
from tests.tiny import make_tasks, tiny


def query_loss_at(learner, params, task):
    xs, ys, xq, yq = task
    with batch_stats_only(learner.model):
        return learner.task_loss(params, xs[0], ys[0], xq[0], yq[0])[0]


def meta_grad(learner, task, batched=True):
    learner.zero_grad(set_to_none=True)
    learner.meta_backward(*task, batched=batched)
    return {k: p.grad.clone() for k, p in learner.model.named_parameters()}


@pytest.mark.parametrize("depthwise", [False, True])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("algorithm", ["maml", "anil", "metasgd"])
def test_second_order_meta_gradient_matches_finite_differences(algorithm, batched, depthwise):
    learner = create_learner(tiny(depthwise=depthwise), algorithm, inner_lr=0.3, inner_steps=3)
    task = make_tasks(T=1)
    g = meta_grad(learner, task, batched)
    params = {k: v.detach() for k, v in learner.params().items()}
    gen = torch.Generator().manual_seed(1)
    eps = 1e-6
    for trial in range(3):
        v = {k: torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in params.items()}
        plus = query_loss_at(learner, {k: params[k] + eps * v[k] for k in params}, task)
        minus = query_loss_at(learner, {k: params[k] - eps * v[k] for k in params}, task)
        fd = ((plus - minus) / (2 * eps)).item()
        an = sum((g[k] * v[k]).sum() for k in params).item()
        assert abs(fd - an) / max(abs(fd), 1e-12) < 1e-4, (trial, fd, an)


@pytest.mark.parametrize("stride,padding,dilation,k", [(2, 1, 1, 3), (1, 2, 1, 5), (1, 0, 2, 3), (2, 0, 1, 5)])
def test_depthwise_conv_first_and_second_derivatives(stride, padding, dilation, k):
    """The depthwise conv whose backward is made of convolutions: same output as F.conv2d, and its first and
    second derivatives pass torch's numerical checks."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 9, 9, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 1, k, k, generator=g, dtype=torch.float64, requires_grad=True)
    conf = ((stride,) * 2, (padding,) * 2, (dilation,) * 2)

    def f(x, w):
        return _DepthwiseConv2d.apply(x, w, *conf)
    torch.testing.assert_close(f(x, w), F.conv2d(x, w, None, *conf, groups=4), rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(f, (x, w)) and torch.autograd.gradgradcheck(f, (x, w))


@pytest.mark.parametrize("batched", [True, False])
def test_fast_depthwise_path_equals_torch_double_backward(batched):
    task = make_tasks(T=2)
    fast, slow = (create_learner(tiny(depthwise=True), "maml", inner_lr=0.3, inner_steps=3) for _ in range(2))
    slow.fast_depthwise = False
    assert fast.fast_depthwise
    gf, gs = meta_grad(fast, task, batched), meta_grad(slow, task, batched)
    for k in gs:
        torch.testing.assert_close(gf[k], gs[k], rtol=1e-9, atol=1e-12, msg=k)
    for m in fast.model.modules():  # the per-model swap is undone
        assert "forward" not in m.__dict__


NATIVE = (F.conv2d, F.batch_norm)


def test_layer_swaps_touch_only_the_meta_trained_model():
    """The exact BatchNorm and the fast depthwise double backward replace the `forward` of the meta-trained model's
    modules while a meta-gradient is computed, never `torch.nn.functional`: another model in the process computes
    exactly as before while they are in place, and the swaps are really there on the meta-trained model."""
    learner = create_learner(tiny(depthwise=True), "maml", inner_lr=0.3, inner_steps=2)
    other = tiny(seed=1, depthwise=True).eval()  # eval: no buffer writes inside the grad transform
    x = make_tasks(T=1)[0][0]
    before = other(x).detach()
    seen = {}

    def probe(module, args, output):  # runs inside the meta-trained model's forward, under the swaps
        seen["F"] = (F.conv2d, F.batch_norm)
        seen["bn_forward"] = "forward" in learner.model.bn.__dict__
        seen["dw_forward"] = "forward" in learner.model.dw.__dict__
        seen["other_patched"] = [n for n, m in other.named_modules() if "forward" in m.__dict__]
        seen["other_out"] = other(x).detach()
    handle = learner.model.classifier.register_forward_hook(probe)
    learner.meta_backward(*make_tasks(T=2), batched=True)
    handle.remove()
    assert seen["F"] == NATIVE and seen["bn_forward"] and seen["dw_forward"] and seen["other_patched"] == []
    torch.testing.assert_close(seen["other_out"], before, rtol=0, atol=0)
    assert (F.conv2d, F.batch_norm) == NATIVE
    assert not any("forward" in m.__dict__ for m in learner.model.modules())


def seeded_meta_grad(learner, task, seed=5):
    learner.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # same dropout masks for both paths
    learner.meta_backward(*task, batched=False)
    return {k: p.grad.clone() for k, p in learner.named_parameters()}


@pytest.mark.parametrize("algorithm", ["maml", "metasgd", "fomaml", "anil"])
def test_reverse_sweep_equals_unrolled_backprop_with_dropout(algorithm):
    """`adapt_vjp`'s reverse sweep of Hessian-vector products gives the gradient of backpropagating through
    the unrolled inner loop (model and Meta-SGD LRs), dropout included: each step's masks are replayed."""
    task = make_tasks(T=2)
    sweep, unrolled = (create_learner(tiny(dropout=0.5), algorithm, inner_lr=0.3, inner_steps=3, unroll=u)
                       for u in (False, True))
    gs, gu = seeded_meta_grad(sweep, task), seeded_meta_grad(unrolled, task)
    assert not sweep.double_backward(False) and unrolled.double_backward(False) == (algorithm in ("maml", "metasgd"))
    assert set(gs) == set(gu) and len(gs) >= (12 if algorithm == "metasgd" else 6)
    for k in gu:
        torch.testing.assert_close(gs[k], gu[k], rtol=1e-9, atol=1e-12, msg=k)
    if algorithm != "anil":  # ANIL's head sees pre-logit features, before timm's dropout
        # without the replay the masks differ and so do the gradients: the test can fail
        other = seeded_meta_grad(unrolled, task, seed=6)
        assert max((other[k] - gu[k]).abs().max().item() for k in gu) > 1e-6


def test_hvp_is_full_precision_under_autocast():
    """The reverse sweep's Hessian-vector products ignore an enclosing autocast (on CUDA, forward-mode AD through
    an autocast convolution's backward failed with mixed dtypes on an H200): under CPU bf16 autocast they equal the
    fp32 products exactly, while the same loss under that autocast does change (so the test can fail)."""
    learner = create_learner(tiny().float(), "maml", inner_lr=0.3, inner_steps=2)
    xs, ys, _, _ = make_tasks(T=1, dtype=torch.float32)
    params = {k: v.detach() for k, v in learner.params().items()}
    gen = torch.Generator().manual_seed(3)
    u = {k: torch.randn(p.shape, generator=gen) for k, p in params.items()}
    f = hvp(learner.loss)
    with batch_stats_only(learner.model):
        g32, hu32 = f(params, u, xs[0], ys[0])
        loss32 = learner.loss(params, xs[0], ys[0])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            g, hu = f(params, u, xs[0], ys[0])
            loss16 = learner.loss(params, xs[0], ys[0])
    assert (loss16.float() - loss32).abs().item() > 1e-5
    for k in params:
        assert hu[k].dtype == torch.float32 and torch.equal(hu[k], hu32[k]) and torch.equal(g[k], g32[k]), k


@pytest.mark.parametrize("algorithm,fns", [("maml", {"grad", "query", "hvp"}), ("anil", {"anil"})])
def test_compiled_sweep_equals_eager(algorithm, fns):
    """torch.compile'd gradient, query and Hessian-vector-product functions (ANIL: its one meta-gradient
    function) give the eager unrolled meta-gradient, dropout replayed through torch's own random op."""
    task = make_tasks(T=2)
    compiled = create_learner(tiny(dropout=0.5), algorithm, inner_lr=0.3, inner_steps=2, compile=True)
    eager = create_learner(tiny(dropout=0.5), algorithm, inner_lr=0.3, inner_steps=2, unroll=True)
    gc, ge = seeded_meta_grad(compiled, task), seeded_meta_grad(eager, task)
    for k in ge:
        torch.testing.assert_close(gc[k], ge[k], rtol=1e-7, atol=1e-10, msg=k)
    assert set(compiled._fns) == fns


def test_compiled_functions_see_the_first_calls_strides_and_do_not_recompile():
    """An inner step hands back a (C, 1, 3, 3) channels-last weight with contiguous strides (same values, another
    stride on the size-1 dimension); torch.compile guards on that. `_same_strides` restrides it to the first
    call's layout, so dynamo compiles once (counted by a backend of our own) and the values are unchanged."""
    from pipeline.meta.algorithms import _same_strides
    compiles = []

    def counting_backend(gm, inputs):
        compiles.append(1)
        return gm.forward

    def f(params, x):
        return F.conv2d(x, params["w"], groups=4).sum()

    w = torch.randn(4, 1, 3, 3).clone(memory_format=torch.channels_last)  # strides (9, 1, 3, 1)
    w2 = torch.randn(4, 1, 3, 3)  # (9, 9, 3, 1), as an inner step hands it back
    assert w.stride() != w2.stride()
    x = torch.randn(2, 4, 6, 6)
    torch._dynamo.reset()
    raw = torch.compile(f, backend=counting_backend, dynamic=False)
    raw({"w": w}, x), raw({"w": w2}, x)
    assert len(compiles) == 2  # without the wrapper: a recompile for the stride alone
    compiles.clear()
    torch._dynamo.reset()
    pinned = _same_strides(torch.compile(f, backend=counting_backend, dynamic=False), {})
    out = [pinned({"w": v}, x) for v in (w, w2, w2.clone(), w)]
    assert len(compiles) == 1
    torch.testing.assert_close(out[1], f({"w": w2}, x))
    torch._dynamo.reset()


def test_second_order_differs_from_first_order():
    task = make_tasks(T=1)
    g2 = meta_grad(create_learner(tiny(), "maml", inner_lr=0.3, inner_steps=3), task)
    g1 = meta_grad(create_learner(tiny(), "fomaml", inner_lr=0.3, inner_steps=3), task)
    diff = max((g2[k] - g1[k]).abs().max().item() for k in g1)
    assert diff > 1e-4  # the Hessian terms are really there


def test_first_order_gradient_is_query_gradient_at_adapted_params():
    learner = create_learner(tiny(), "fomaml", inner_lr=0.3, inner_steps=3)
    xs, ys, xq, yq = task = make_tasks(T=1)
    g = meta_grad(learner, task)
    params = {k: v.detach() for k, v in learner.params().items()}
    with batch_stats_only(learner.model):
        # adapt independently with plain autograd SGD
        fast = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        for _ in range(3):
            loss = F.cross_entropy(torch.func.functional_call(learner.model, fast, (xs[0],)), ys[0])
            gr = torch.autograd.grad(loss, list(fast.values()))
            fast = {k: (v - 0.3 * gi).detach().requires_grad_(True) for (k, v), gi in zip(fast.items(), gr)}
        ql = F.cross_entropy(torch.func.functional_call(learner.model, fast, (xq[0],)), yq[0])
        expected = dict(zip(fast, torch.autograd.grad(ql, list(fast.values()))))
    for k in params:
        torch.testing.assert_close(g[k], expected[k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("use_query,batched", [(False, True), (True, True), (True, False)])
def test_reptile_update_is_closed_form(use_query, batched):
    """θ ← θ + ε·mean(θ̃ − θ), θ̃ from inner SGD on the support set, or (`reptile_query`) on support and query."""
    model = tiny()
    learner = create_learner(model, "reptile", inner_lr=0.2, inner_steps=4, reptile_query=use_query)
    xs, ys, xq, yq = task = make_tasks(T=3)
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    # θ̃ per task with an independent plain-autograd SGD loop on the support set (and query set)
    tilde = []
    for t in range(3):
        x, y = (torch.cat([xs[t], xq[t]]), torch.cat([ys[t], yq[t]])) if use_query else (xs[t], ys[t])
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.2)
        with batch_stats_only(m):
            for _ in range(4):
                opt.zero_grad()
                F.cross_entropy(m(x), y).backward()
                opt.step()
        tilde.append({k: v.detach() for k, v in m.named_parameters()})
    eps = 0.7
    opt = torch.optim.SGD(learner.meta_parameters(), lr=eps)
    opt.zero_grad()
    learner.meta_backward(*task, batched=batched)
    opt.step()
    for k, p in model.named_parameters():
        expected = theta[k] + eps * (sum(tl[k] for tl in tilde) / 3 - theta[k])
        torch.testing.assert_close(p.detach(), expected, rtol=1e-9, atol=1e-11)


def test_anil_inner_loop_leaves_body_unchanged_and_changes_output():
    learner = create_learner(tiny(), "anil", inner_lr=0.5, inner_steps=3)
    xs, ys, xq, yq = make_tasks(T=1)
    params = {k: v.detach() for k, v in learner.params().items()}
    body, head = learner.split(params)
    with batch_stats_only(learner.model):
        fs = learner.features(params, xs[0])
        fast = adapt(lambda h: F.cross_entropy(learner.head_logits(h, fs), ys[0]), head, 0.5, 3)
        assert set(fast) == set(head)  # only the head is adapted; the body is not even an input
        adapted = learner.adapt_task(params, xs[0], ys[0])(xq[0])
        before = learner.logits(params, xq[0])
    assert (adapted - before).abs().max() > 1e-3
    for k in head:
        assert (fast[k] - head[k]).abs().max() > 0
    # and the adapted classifier equals body features + adapted head
    with batch_stats_only(learner.model):
        torch.testing.assert_close(adapted, learner.head_logits(fast, learner.features(params, xq[0])))


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "anil", "reptile", "metasgd"])
def test_batched_equals_per_task_loop(algorithm):
    task = make_tasks(T=3)
    a = create_learner(tiny(), algorithm, inner_lr=0.2, inner_steps=2)
    b = create_learner(tiny(), algorithm, inner_lr=0.2, inner_steps=2)
    la, aa = a.meta_backward(*task, batched=True)
    lb, ab = b.meta_backward(*task, batched=False)
    assert abs(la - lb) < 1e-10 and abs(aa - ab) < 1e-10
    for (k, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-8, atol=1e-10, msg=k)


def test_metasgd_learns_inner_lrs_and_adaptation_uses_them():
    learner = create_learner(tiny(), "metasgd", inner_lr=0.2, inner_steps=2)
    task = make_tasks(T=2)
    learner.meta_backward(*task, batched=True)
    grads = [p.grad for p in learner.lrs.parameters()]
    assert all(g is not None for g in grads) and max(g.abs().max().item() for g in grads) > 0
    # a zero learning rate for every entry means no adaptation at all
    xs, ys, xq, yq = task
    with torch.no_grad():
        for p in learner.lrs.parameters():
            p.zero_()
    params = {k: v.detach() for k, v in learner.params().items()}
    with batch_stats_only(learner.model):
        torch.testing.assert_close(learner.adapt_task(params, xs[0], ys[0])(xq[0]), learner.logits(params, xq[0]))


def test_functional_calls_do_not_touch_running_stats_and_recalibration_does():
    model = tiny()
    learner = create_learner(model, "maml", inner_lr=0.1, inner_steps=1)
    before = {k: v.clone() for k, v in model.named_buffers()}
    learner.meta_backward(*make_tasks(T=2), batched=True)
    learner.evaluate(*make_tasks(T=2))
    for k, v in model.named_buffers():
        assert torch.equal(v, before[k]), k
    assert model.bn.track_running_stats  # restored after the context
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(8, 3, 5, 5, generator=gen, dtype=torch.float64) + 2.0 for _ in range(4)]
    recalibrate_bn(model, batches)
    with torch.no_grad():
        acts = torch.cat([model.conv(b) for b in batches])
    torch.testing.assert_close(model.bn.running_mean, acts.mean((0, 2, 3)))
    # the average of per-batch unbiased variances, as a cumulative BatchNorm average computes it
    per_batch = torch.stack([model.conv(b).detach().transpose(0, 1).flatten(1).var(1) for b in batches])
    torch.testing.assert_close(model.bn.running_var, per_batch.mean(0))


def outer_steps(learner, task, lr, steps, batched):
    """`steps` Adam outer steps on one fixed meta-batch; the meta-loss of the first and of the last step."""
    opt = torch.optim.Adam(learner.meta_parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        losses.append(learner.meta_backward(*task, batched=batched)[0])
        opt.step()
    return losses[0], losses[-1]


def test_maml_step_reduces_query_loss_on_a_fixed_task():
    torch.manual_seed(0)
    learner = create_learner(tiny(), "maml", inner_lr=0.3, inner_steps=2)
    task = make_tasks(T=2)
    first, loss = outer_steps(learner, task, lr=0.05, steps=20, batched=True)
    assert loss < first * 0.8


def test_protonet_loss_is_the_prototypical_loss_by_hand():
    """Query loss of ProtoNet = cross-entropy of negative squared distances to the support class means, computed
    here with plain torch on the tiny model's features."""
    learner = create_learner(tiny(), "protonet")
    xs, ys, xq, yq = make_tasks(T=1)
    params = {k: v.detach() for k, v in learner.params().items()}
    with batch_stats_only(learner.model):
        loss, acc = learner.task_loss(params, xs[0], ys[0], xq[0], yq[0])
        fs = learner.model.forward_head(learner.model.forward_features(xs[0]), pre_logits=True)
        fq = learner.model.forward_head(learner.model.forward_features(xq[0]), pre_logits=True)
    protos = [fs[ys[0] == c].mean(0) for c in range(3)]
    logits = torch.stack([torch.stack([-((q - p) ** 2).sum() for p in protos]) for q in fq])
    by_hand = -torch.log_softmax(logits, 1)[torch.arange(len(yq[0])), yq[0]].mean()
    torch.testing.assert_close(loss, by_hand, rtol=1e-12, atol=1e-12)
    assert acc.item() == pytest.approx((logits.argmax(1) == yq[0]).double().mean().item())


def test_protonet_step_trains_the_body_only_and_lowers_the_loss():
    learner = create_learner(tiny(), "protonet")
    task = make_tasks(T=2)
    head = {k: v.clone() for k, v in learner.model.classifier.state_dict().items()}
    first, loss = outer_steps(learner, task, lr=0.1, steps=40, batched=False)
    assert loss < first * 0.85  # measured: 1.098 -> 0.869 on these random tasks
    for k, v in learner.model.classifier.state_dict().items():  # no gradient reaches the unused head
        assert torch.equal(v, head[k])
    la, _ = create_learner(tiny(), "protonet").meta_backward(*task, batched=True)
    lb, _ = create_learner(tiny(), "protonet").meta_backward(*task, batched=False)
    assert abs(la - lb) < 1e-10


def test_multitask_is_cross_entropy_of_one_head_over_every_pooled_class():
    """meta.algorithm=multitask: one head over all source classes; its loss is plain cross-entropy of that head on
    the pool-wide labels (`classes[t][y]`) of every support and query image, computed here by hand; the N-way head
    gets no gradient, and steps lower the loss."""
    learner = create_learner(tiny(), "multitask", source_classes=7).double()
    xs, ys, xq, yq = make_tasks(T=2)
    classes = torch.tensor([[4, 0, 6], [2, 5, 1]])  # task t's label j is pool class classes[t, j]
    with torch.no_grad():
        learner.pooled_head.weight.normal_(generator=torch.Generator().manual_seed(1))
    assert learner.pooled_head.out_features == 7
    loss, acc = learner.meta_backward(xs, ys, xq, yq, classes=classes)
    x = torch.cat([xs.flatten(0, 1), xq.flatten(0, 1)])
    y = torch.cat([torch.stack([classes[t][ys[t]] for t in range(2)]).flatten(),
                   torch.stack([classes[t][yq[t]] for t in range(2)]).flatten()])
    with batch_stats_only(learner.model):
        f = learner.model.forward_head(learner.model.forward_features(x), pre_logits=True)
        by_hand = F.cross_entropy(f @ learner.pooled_head.weight.T + learner.pooled_head.bias, y)
    assert loss == pytest.approx(by_hand.item(), rel=1e-12)
    assert learner.model.classifier.weight.grad is None  # the N-way head is not trained
    with pytest.raises(ValueError, match="classes"):
        learner.meta_backward(xs, ys, xq, yq)
    opt = torch.optim.Adam(learner.meta_parameters(), lr=0.05)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        losses.append(learner.meta_backward(xs, ys, xq, yq, classes=classes)[0])
        opt.step()
    assert losses[-1] < losses[0] * 0.8


def test_sampler_classes_number_every_pool_class_once():
    """`Episodes.classes`: a task's labels map to distinct pool-wide classes, the same (set, class) always to the
    same number, and the numbering covers the sampler's classes (the size of multitask's head)."""
    from tests.test_tasks import fake_pool, sampler
    s = sampler(fake_pool(), mode="across")
    b = s.batch(0, 20)
    assert s.n_classes == 9 and b.classes.shape == (20, 3)
    assert all(len(set(row.tolist())) == 3 for row in b.classes)
    assert set(b.classes.flatten().tolist()) <= set(range(9)) and len(set(b.classes.flatten().tolist())) > 3
    assert torch.equal(b.xs, torch.stack([s.episode(i)[0] for i in range(20)]))  # the episodes are unchanged


def test_prototype_task_head_is_the_prototypical_classifier():
    """meta.head_init=prototype: a task's inner loop starts from W_k = 2 c_k, b_k = -||c_k||^2 (c_k the support
    class means of the body's features), whose logits are the negative squared distances to c_k plus ||f||^2."""
    learner = create_learner(tiny(), "reptile", head_init="prototype")
    xs, ys, xq, yq = make_tasks(T=1)
    params = {k: v.detach() for k, v in learner.params().items()}
    with batch_stats_only(learner.model):
        start = learner.task_init(params, xs[0], ys[0])
        logits = learner.logits(start, xq[0])
        fs = learner.model.forward_head(learner.model.forward_features(xs[0]), pre_logits=True)
        fq = learner.model.forward_head(learner.model.forward_features(xq[0]), pre_logits=True)
    protos = torch.stack([fs[ys[0] == c].mean(0) for c in range(3)])
    torch.testing.assert_close(start["classifier.weight"], 2 * protos, rtol=1e-12, atol=1e-12)
    by_hand = -((fq[:, None] - protos[None]) ** 2).sum(-1) + (fq ** 2).sum(-1, keepdim=True)
    torch.testing.assert_close(logits, by_hand, rtol=1e-10, atol=1e-10)
    for k in params:  # the body is where it was
        if not k.startswith("classifier."):
            assert torch.equal(start[k], params[k])


def test_reptile_body_moves_at_the_first_inner_step_only_with_a_prototype_head():
    """Why a zero head starves Reptile's body: with one inner step from a zero head the body's gradient is exactly
    zero, so θ̃ - θ has no body part; a prototype head gives the body a gradient at once. Either way the head's
    pseudo-gradient with a prototype head is zero (the head is rebuilt per task, never meta-learned)."""
    task = make_tasks(T=2)
    grads = {}
    for init in ("default", "prototype"):
        model = tiny()
        torch.nn.init.zeros_(model.classifier.weight)
        torch.nn.init.zeros_(model.classifier.bias)
        learner = create_learner(model, "reptile", inner_lr=0.3, inner_steps=1, head_init=init)
        learner.meta_backward(*task, batched=False)
        grads[init] = {k: p.grad.clone() for k, p in model.named_parameters()}
    body = [k for k in grads["default"] if not k.startswith("classifier.")]
    assert all(grads["default"][k].abs().max() == 0 for k in body)
    assert max(grads["prototype"][k].abs().max().item() for k in body) > 1e-6
    assert grads["default"]["classifier.weight"].abs().max() > 0
    assert all(grads["prototype"][k].abs().max() == 0 for k in ("classifier.weight", "classifier.bias"))


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "anil", "reptile", "metasgd"])
def test_prototype_head_batched_equals_per_task_loop_and_leaves_the_head_alone(algorithm):
    """Every inner-loop algorithm with a prototype head: vmap and the per-task loop (with its reverse sweep) give the
    same meta-gradient, and the head parameter gets none."""
    task = make_tasks(T=3)
    a = create_learner(tiny(), algorithm, inner_lr=0.2, inner_steps=2, head_init="prototype")
    b = create_learner(tiny(), algorithm, inner_lr=0.2, inner_steps=2, head_init="prototype")
    la, aa = a.meta_backward(*task, batched=True)
    lb, ab = b.meta_backward(*task, batched=False)
    assert abs(la - lb) < 1e-10 and abs(aa - ab) < 1e-6  # accuracy: a float32 mean on one path
    for (k, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        ga = pa.grad if pa.grad is not None else torch.zeros_like(pa)
        torch.testing.assert_close(ga, pb.grad, rtol=1e-8, atol=1e-10, msg=k)
        if k.startswith("classifier."):
            assert pb.grad.abs().max() == 0
        else:
            assert pb.grad.abs().max() > 0, k


def test_prototype_head_needs_an_inner_loop():
    with pytest.raises(ValueError, match="protonet"):
        create_learner(tiny(), "protonet", head_init="prototype")


def test_reptile_adam_outer_step_is_adams_first_step_on_the_pseudo_gradient():
    """meta.reptile_outer=adam: the first outer step is Adam's, -lr·g/(|g| + eps) with g = -mean(θ̃ - θ) (bias
    correction makes m̂ = g and v̂ = g² at step 1), so every entry moves by about lr whatever Δ's scale."""
    task = make_tasks(T=2)
    ref = create_learner(tiny(), "reptile", inner_lr=0.2, inner_steps=2)
    ref.meta_backward(*task, batched=False)
    g = {k: p.grad.clone() for k, p in ref.model.named_parameters()}
    model = tiny()
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    learner = create_learner(model, "reptile", inner_lr=0.2, inner_steps=2, reptile_outer="adam")
    opt = learner.outer_optimizer(outer_lr=1e-3, reptile_epsilon=0.5)
    assert isinstance(opt, torch.optim.Adam)
    learner.meta_backward(*task, batched=False)
    opt.step()
    for k, p in model.named_parameters():
        expected = theta[k] - 1e-3 * g[k] / (g[k].abs() + 1e-8)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-9, atol=1e-12, msg=k)
    with pytest.raises(ValueError, match="'sgd' or 'adam'"):
        create_learner(tiny(), "reptile", reptile_outer="rmsprop")
