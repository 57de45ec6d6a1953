"""Stage 2: meta-pretrain the backbone on N-way K-shot tasks from the source pool (never the target).

Resumable: every `checkpoint_every` iterations the full training state (weights, optimizer, schedule, RNG,
best-so-far) goes to the run's `state/last.pt`; a rerun of an interrupted run with the same stage key
continues from there and ends with the same weights as an uninterrupted run (on CPU).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import mlflow
import torch
from tqdm import tqdm

from pipeline.backbone import (build_from_checkpoint, head_prefix, load_checkpoint, resolve_data_info, save_checkpoint,
                               zero_head)
from pipeline.config import PipelineConfig
from pipeline.data import load_sources
from pipeline.device import autocast, configure, device_name, resolve_device, use_channels_last
from pipeline.meta import MetaLearner, recalibrate_bn
from pipeline.scratch import scratch_dir
from pipeline.tasks import EpisodeSampler, split_classes
from pipeline import distributed
from pipeline.tracking import download, main_client
from pipeline.transforms import build_transform


def _atomic_save(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


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


def lr_lambda(schedule: str, iterations: int):
    if schedule == "cosine":
        return lambda i: 0.5 * (1 + math.cos(math.pi * min(i, iterations) / max(iterations, 1)))
    return lambda i: 1.0


def run(cfg: PipelineConfig, inputs: dict) -> dict[str, str]:
    m = cfg.meta
    dev = resolve_device(cfg.device)
    distributed.init(dev)
    dev = distributed.local_device(dev)
    rank, world = distributed.world()
    share = distributed.task_share(m.meta_batch)
    configure(dev, cfg.cudnn_benchmark)
    mlflow.set_tags({"device": device_name(dev), "algorithm": m.algorithm, "backbone": cfg.backbone.model})
    torch.manual_seed(cfg.seed)  # dropout inside the model draws from torch's generator; saved on checkpoints

    ckpt = load_checkpoint(download(inputs["backbone"]["checkpoint_uri"]))
    # No dropout while meta-learning: adaptation is then a deterministic function of the task, the same
    # whether tasks run in one process or are split across ranks.
    model = build_from_checkpoint(ckpt, num_classes=m.ways, seed=cfg.seed, drop_rate=0.0).to(dev)

    if m.zero_head:  # labels are permuted per task, so a random head only injects noise into the body
        zero_head(model)
    dinfo = resolve_data_info(model)
    pool = load_sources(cfg)
    train_cls = val_cls = None
    if m.disjoint_classes:
        train_cls, val_cls = split_classes(pool, 0.25, cfg.seed)
    size = cfg.data.image_size
    tr = EpisodeSampler(pool, "train", m.ways, m.shots, m.queries,
                        build_transform(size, dinfo["mean"], dinfo["std"], train=m.augment, seed=cfg.seed),
                        m.task_mode, seed=cfg.seed, classes=train_cls)
    va = EpisodeSampler(pool, "val", m.ways, m.shots, m.queries,
                        build_transform(size, dinfo["mean"], dinfo["std"], train=False),
                        m.task_mode, seed=cfg.seed + 10_000, classes=val_cls)
    print(f"[meta] {m.algorithm}: meta-train {tr.describe()}; meta-val {va.describe()}"
          + (f"; rank {rank}/{world} takes tasks {list(share)} of each meta-batch" if world > 1 else ""), flush=True)
    mlflow.log_text(f"meta-train: {tr.describe()}\nmeta-val: {va.describe()}\n", "tasks.txt")

    learner = MetaLearner(model, m.algorithm, m.inner_lr, m.inner_steps, head=head_prefix(model), unroll=m.unroll,
                          compile=m.compile).to(dev)
    cl = use_channels_last(cfg.channels_last, dev, second_order=learner.double_backward(m.batched))
    if cl:
        model.to(memory_format=torch.channels_last)
    mlflow.set_tag("channels_last", str(cl))
    if m.algorithm == "reptile":  # SGD on the pseudo-gradient -(θ̃-θ) is θ <- θ + ε(θ̃-θ)
        opt = torch.optim.SGD(learner.meta_parameters(), lr=m.reptile_epsilon)
    else:
        opt = torch.optim.Adam(learner.meta_parameters(), lr=m.outer_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(m.lr_schedule, m.iterations))
    batched = m.batched

    start, best_acc, best_state = 0, -1.0, None
    key = mlflow.active_run().data.tags.get("pipeline.stage_key", "")
    found = find_resume_state(key) if key and inputs.get("resume", True) else None
    if found:
        rid, st = found
        learner.load_state_dict(st["learner"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        torch.set_rng_state(st["rng"])
        start, best_acc, best_state = st["iteration"], st["best_acc"], st["best_state"]
        mlflow.set_tag("resumed_from", rid)
        print(f"[meta] resuming run {rid} at iteration {start}/{m.iterations}", flush=True)

    work = scratch_dir("meta-")

    def validate() -> tuple[float, float]:
        """Mean loss and accuracy over the fixed validation tasks; under torchrun each process adapts to its share
        of them and the sums are all-reduced, so every process keeps the same best checkpoint."""
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

    start_acc = None
    if start == 0 and m.iterations:
        # the same validation tasks before any meta-training: the reference the checkpoints are read against
        # (reported, not a candidate: the meta arm stays a meta-trained initialisation); not in meta_seconds
        vl0, start_acc = validate()
        mlflow.log_metrics({"meta_val_loss": vl0, "meta_val_acc": start_acc, "meta_val_start_acc": start_acc}, step=0)
        print(f"[meta] before meta-training: meta-val accuracy {start_acc:.3f}", flush=True)
    t0 = time.time()
    bar = tqdm(range(start, m.iterations), desc=f"meta/{m.algorithm}", initial=start, total=m.iterations,
               dynamic_ncols=True)
    for it in bar:
        try:
            b = tr.batch(it * m.meta_batch, m.meta_batch, share).to(dev, cl)
            opt.zero_grad(set_to_none=True)
            with autocast(dev):
                loss, acc = learner.meta_backward(b.xs, b.ys, b.xq, b.yq, batched=batched)
        except RuntimeError as e:
            if not batched or "vmap" not in str(e).lower():
                raise
            batched = False  # modules that vmap cannot batch: fall back to the per-task loop
            print(f"[meta] vmap not supported by this model ({e}); using the per-task loop", flush=True)
            opt.zero_grad(set_to_none=True)
            with autocast(dev):
                loss, acc = learner.meta_backward(b.xs, b.ys, b.xq, b.yq, batched=False)
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
            vl, va_acc = validate()
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
                     "best_state": best_state}
            _atomic_save(state, work / "last.pt")
            mlflow.log_artifact(str(work / "last.pt"), "state")
    elapsed = time.time() - t0
    done = m.iterations - start
    if done:
        mlflow.log_metrics({"meta_seconds": elapsed, "meta_tasks_per_s": done * m.meta_batch / max(elapsed, 1e-9)})

    if best_state is not None:
        learner.load_state_dict(best_state)
    # The one place running statistics are written: averaged over source meta-train images.
    model.to(dev)
    n = recalibrate_bn(model, (torch.cat([e.xs[0], e.xq[0]]).to(dev)
                               for e in (tr.batch(10**6 + i, 1) for i in range(m.bn_recalibration_batches))))
    mlflow.log_metric("bn_recalibration_batches", n)
    path = work / "model.pt"
    save_checkpoint(path, model, ckpt["model_name"], {"info": ckpt.get("info", {}), "meta_algorithm": m.algorithm,
                                                        "meta_val_best_acc": best_acc})
    mlflow.log_artifact(str(path), "checkpoint")
    if m.algorithm == "metasgd":
        lrs = torch.cat([p.detach().flatten() for p in learner.lrs.parameters()])
        mlflow.log_metrics({"metasgd_lr_mean": lrs.mean().item(), "metasgd_lr_std": lrs.std().item()})
    print(f"[meta] done: best meta-val accuracy {best_acc:.3f}"
          + (f" (before meta-training {start_acc:.3f})" if start_acc is not None else ""), flush=True)
    return {"checkpoint_uri": mlflow.get_artifact_uri("checkpoint/model.pt"), "algorithm": m.algorithm}
