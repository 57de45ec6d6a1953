"""The meta-training loop of the meta stage, with its resume; logs to the active MLflow run.

Resumable: every `checkpoint_every` iterations the full training state (weights, optimizer, schedule, RNG,
best-so-far) goes to the run's `state/last.pt`; a rerun of an interrupted run with the same stage key continues
from there and ends with the same weights as an uninterrupted run (on CPU; docs/design.md).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlflow
import torch
from torch import nn
from tqdm import tqdm

from .. import distributed
from ..backbone import build_from_checkpoint, head_prefix, resolve_data_info, zero_head
from ..config import MetaConfig, PipelineConfig
from ..data import load_sources
from ..device import autocast, use_channels_last, use_compile
from ..tasks import EpisodeSampler, split_classes
from ..tracking import download, main_client
from ..transforms import build_transform
from .algorithms import MetaLearner, create_learner
from .layers import recalibrate_bn


@dataclass
class MetaResult:
    """What meta-training hands the stage: the model at the best meta-validation step, BatchNorm recalibrated."""

    model: nn.Module
    learner: MetaLearner
    best_acc: float
    start_acc: float | None  # meta-validation accuracy before any meta-training (None: resumed from an older state)
    resumed_from: str  # run id of the interrupted run continued, or ""


def find_resume_state(stage_key: str) -> tuple[str, dict] | None:
    """The training state of the latest interrupted (KILLED/FAILED) meta run with the same stage key."""
    client = main_client()
    exp = client.get_experiment_by_name(mlflow.get_experiment(mlflow.active_run().info.experiment_id).name)
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`pipeline.stage` = 'meta' and tags.`pipeline.stage_key` = '{stage_key}' "
                      f"and attributes.status != 'FINISHED' "
                      f"and attributes.run_id != '{mlflow.active_run().info.run_id}'",
        order_by=["attributes.start_time DESC"], max_results=5)
    for r in runs:
        if r.info.status == "RUNNING":
            continue
        if any(a.path == "state/last.pt" for a in client.list_artifacts(r.info.run_id, "state")):
            path = download(f"{r.info.artifact_uri}/state/last.pt")
            return r.info.run_id, torch.load(path, map_location="cpu", weights_only=False)
    return None


def lr_lambda(schedule: str, iterations: int) -> Callable[[int], float]:
    if schedule == "cosine":
        return lambda i: 0.5 * (1 + math.cos(math.pi * min(i, iterations) / max(iterations, 1)))
    return lambda i: 1.0


def atomic_save(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def build_samplers(cfg: PipelineConfig, dinfo: dict) -> tuple[EpisodeSampler, EpisodeSampler]:
    """Meta-train tasks from the sources' train splits, meta-validation tasks from their val splits (disjoint
    images; `meta.disjoint_classes` also holds out classes). The episode at index i depends only on (seed, i).
    Raises DataError when a source cannot be read or no task can be drawn."""
    m, size = cfg.meta, cfg.data.image_size
    pool = load_sources(cfg)
    train_cls = val_cls = None
    if m.disjoint_classes:
        train_cls, val_cls = split_classes(pool, 0.25, cfg.seed)
    tr = EpisodeSampler(pool, "train", m.ways, m.shots, m.queries,
                        build_transform(size, dinfo["mean"], dinfo["std"], train=m.augment, seed=cfg.seed),
                        m.task_mode, seed=cfg.seed, classes=train_cls)
    va = EpisodeSampler(pool, "val", m.ways, m.shots, m.queries,
                        build_transform(size, dinfo["mean"], dinfo["std"], train=False),
                        m.task_mode, seed=cfg.seed + 10_000, classes=val_cls)
    return tr, va


def validate(learner: MetaLearner, va: EpisodeSampler, m: MetaConfig, dev: torch.device, cl: bool
             ) -> tuple[float, float]:
    """Mean loss and accuracy over the fixed validation tasks; under torchrun each process adapts to its share of
    them and the sums are all-reduced, so every process keeps the same best checkpoint."""
    tot = torch.zeros(2, dtype=torch.float64)
    for i in range(0, m.val_tasks, m.meta_batch):
        n = min(m.meta_batch, m.val_tasks - i)
        mine = distributed.task_share(n)
        if len(mine):
            b = va.batch(i, n, mine).to(dev, cl)
            with autocast(dev):
                vl, vacc = learner.evaluate(b.xs, b.ys, b.xq, b.yq)
            tot += torch.tensor([vl * len(mine), vacc * len(mine)], dtype=torch.float64)
    distributed.all_reduce_sum([tot])
    return tot[0].item() / m.val_tasks, tot[1].item() / m.val_tasks


def meta_train(cfg: PipelineConfig, ckpt: dict, dev: torch.device, work: Path, resume_key: str = "") -> MetaResult:
    """Meta-train the checkpoint's body on source tasks; keep the iteration best on meta-validation.

    `resume_key`: the stage key under which an interrupted run's state is looked for ("" starts afresh). Logs
    metrics per iteration (step 0: before meta-training) and the state every `checkpoint_every` iterations."""
    m = cfg.meta
    rank, world = distributed.world()
    share = distributed.task_share(m.meta_batch)
    torch.manual_seed(cfg.seed)  # dropout inside the model draws from torch's generator; saved on checkpoints
    # No dropout while meta-learning: adaptation is then a deterministic function of the task, the same
    # whether tasks run in one process or are split across ranks.
    model = build_from_checkpoint(ckpt, num_classes=m.ways, seed=cfg.seed, drop_rate=0.0).to(dev)
    if m.zero_head:  # labels are permuted per task, so a random head only injects noise into the body
        zero_head(model)
    tr, va = build_samplers(cfg, resolve_data_info(model))
    print(f"[meta] {m.algorithm}: meta-train {tr.describe()}; meta-val {va.describe()}"
          + (f"; rank {rank}/{world} takes tasks {list(share)} of each meta-batch" if world > 1 else ""), flush=True)
    mlflow.log_text(f"meta-train: {tr.describe()}\nmeta-val: {va.describe()}\n", "tasks.txt")

    compiled = use_compile(m.compile, m.iterations, dev)
    mlflow.set_tag("meta.compiled", str(compiled))
    learner = create_learner(model, m.algorithm, m.inner_lr, m.inner_steps, head=head_prefix(model),
                             unroll=m.unroll, compile=compiled, source_classes=tr.n_classes,
                             head_init=m.resolved_head_init(), reptile_outer=m.reptile_outer,
                             reptile_query=m.reptile_query).to(dev)
    cl = use_channels_last(cfg.channels_last, dev, second_order=learner.double_backward(m.batched))
    if cl:
        model.to(memory_format=torch.channels_last)
    mlflow.set_tag("channels_last", str(cl))
    opt = learner.outer_optimizer(m.resolved_outer_lr(), m.reptile_epsilon)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(m.lr_schedule, m.iterations))
    batched = m.batched

    start, best_acc, best_state, resumed_from, seconds_before = 0, -1.0, None, "", 0.0
    start_acc, start_loss = None, None
    found = find_resume_state(resume_key) if resume_key else None
    if found:
        resumed_from, st = found
        learner.load_state_dict(st["learner"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        torch.set_rng_state(st["rng"])
        start, best_acc, best_state = st["iteration"], st["best_acc"], st["best_state"]
        # states written before these keys existed resume without them
        start_acc, start_loss, seconds_before = st.get("start_acc"), st.get("start_loss"), st.get("seconds", 0.0)
        mlflow.set_tag("resumed_from", resumed_from)
        print(f"[meta] resuming run {resumed_from} at iteration {start}/{m.iterations}", flush=True)
        # this run is the one a user reads: it carries the step-0 reference and the best so far, which it
        # would otherwise log only if a later step beat it
        if best_acc >= 0:  # -1: no validation before the state was written
            mlflow.log_metric("meta_val_best_acc", best_acc, step=start)

    if start == 0 and m.iterations:
        # the same validation tasks before any meta-training: the reference the checkpoints are read against
        # (reported, not a candidate: the meta arm stays a meta-trained initialisation); not in meta_seconds
        start_loss, start_acc = validate(learner, va, m, dev, cl)
        print(f"[meta] before meta-training: meta-val accuracy {start_acc:.3f}", flush=True)
    if start_acc is not None:  # a fresh run's step 0, or a resumed run's from its state (None: older states)
        step0 = {"meta_val_acc": start_acc, "meta_val_start_acc": start_acc}
        mlflow.log_metrics(step0 | ({} if start_loss is None else {"meta_val_loss": start_loss}), step=0)
    t0 = time.time()
    bar = tqdm(range(start, m.iterations), desc=f"meta/{m.algorithm}", initial=start, total=m.iterations,
               dynamic_ncols=True)
    for it in bar:
        b = tr.batch(it * m.meta_batch, m.meta_batch, share).to(dev, cl)
        opt.zero_grad(set_to_none=True)
        try:
            with autocast(dev):
                loss, acc = learner.meta_backward(b.xs, b.ys, b.xq, b.yq, batched=batched, classes=b.classes)
        except RuntimeError as e:
            if not batched or "vmap" not in str(e).lower():
                raise
            batched = False  # modules that vmap cannot batch: fall back to the per-task loop
            print(f"[meta] vmap not supported by this model ({e}); using the per-task loop", flush=True)
            opt.zero_grad(set_to_none=True)
            with autocast(dev):
                loss, acc = learner.meta_backward(b.xs, b.ys, b.xq, b.yq, batched=False, classes=b.classes)
        if world > 1:  # this rank's mean over its tasks -> its share of the global mean, then sum over ranks
            frac = len(share) / m.meta_batch
            grads = [p.grad for p in learner.meta_parameters() if p.grad is not None]
            for g in grads:
                g.mul_(frac)
            stats = torch.tensor([loss * frac, acc * frac], dtype=torch.float64)
            distributed.all_reduce_sum(grads + [stats])
            loss, acc = stats.tolist()
        opt.step()
        sched.step()
        if m.rezero_head:  # a meta-learned head init carries no class information under permuted labels
            zero_head(model)
        metrics = {"meta_train_loss": loss, "meta_train_acc": acc, "outer_lr": sched.get_last_lr()[0]}
        last = it + 1 == m.iterations
        if (it + 1) % m.val_every == 0 or last:
            vl, va_acc = validate(learner, va, m, dev, cl)
            metrics |= {"meta_val_loss": vl, "meta_val_acc": va_acc}
            if va_acc > best_acc:  # model selection on meta-validation tasks only
                best_acc = va_acc
                best_state = {k: v.detach().cpu().clone() for k, v in learner.state_dict().items()}
                metrics["meta_val_best_acc"] = best_acc
            bar.set_postfix(loss=f"{loss:.3f}", val_acc=f"{va_acc:.3f}")
        mlflow.log_metrics(metrics, step=it + 1)
        if ((it + 1) % m.checkpoint_every == 0 or last) and rank == 0:
            state = {"learner": learner.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                     "rng": torch.get_rng_state(), "iteration": it + 1, "best_acc": best_acc,
                     "best_state": best_state, "start_acc": start_acc, "start_loss": start_loss,
                     "seconds": seconds_before + time.time() - t0}
            atomic_save(state, work / "last.pt")
            mlflow.log_artifact(str(work / "last.pt"), "state")
    elapsed, done = time.time() - t0, m.iterations - start
    if m.iterations:  # every attempt's checkpointed time plus this one's; the rate is this attempt's
        mlflow.log_metric("meta_seconds", seconds_before + elapsed)
    if done:
        mlflow.log_metric("meta_tasks_per_s", done * m.meta_batch / max(elapsed, 1e-9))

    if best_state is not None:
        learner.load_state_dict(best_state)
    # The one place running statistics are written: averaged over source meta-train images.
    model.to(dev)
    n = recalibrate_bn(model, (torch.cat([e.xs[0], e.xq[0]]).to(dev)
                               for e in (tr.batch(10**6 + i, 1) for i in range(m.bn_recalibration_batches))))
    mlflow.log_metric("bn_recalibration_batches", n)
    return MetaResult(model, learner, best_acc, start_acc, resumed_from)
