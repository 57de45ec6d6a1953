"""The few-shot fine-tuning recipe: linear-probe warm-up, then full fine-tune with separate body/head LRs,
class-balanced loss, augmentation, and checkpoint choice by validation AUC (the test split is not seen here)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from .backbone import head_prefix, zero_head
from .config import FinetuneConfig
from .data import DataError, ImageDataset, Split
from .device import autocast, to_memory_format
from .job_state import JobState
from .meta.algorithms import prototype_linear
from .metrics import classification_metrics


@dataclass
class FitResult:
    best_epoch: int
    best_val_auc: float
    images_seen: int = 0  # training images passed through the model (fine-tune throughput)
    history: list[dict[str, float]] = field(default_factory=list)


def stack_inputs(ds: ImageDataset, num_workers: int = 0) -> torch.Tensor:
    """All of a deterministic (eval-transform) data set as one tensor, made once instead of every epoch."""
    return torch.cat([x for x, _ in DataLoader(ds, batch_size=256, shuffle=False, num_workers=num_workers)])


class FlipTTA(nn.Module):
    """Test-time augmentation: the mean of the logits for the image and its horizontal flip."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.model(x) + self.model(torch.flip(x, dims=[-1])))


@torch.no_grad()
def prototype_head(model: nn.Module, x: torch.Tensor, y: np.ndarray, n_classes: int, head: str, dev: torch.device,
                   channels_last: bool = False) -> None:
    """Initialise the linear head from the class means c_k of the body's pooled features on the labelled images:
    W_k = 2 c_k, b_k = -||c_k||^2, so that the logits are -||f - c_k||^2 + ||f||^2, a prototypical classifier up to a
    per-image constant (Proto-MAML, Triantafillou et al. 2020). BatchNorm uses its running statistics (eval mode)."""
    model.to(dev).eval()
    feats = torch.cat([model.forward_head(model.forward_features(to_memory_format(xb.to(dev), channels_last)),
                                          pre_logits=True) for xb in x.split(256)])
    feats = feats.float() if feats.dtype in (torch.float16, torch.bfloat16) else feats
    weight, bias = prototype_linear(feats, torch.as_tensor(y, device=feats.device, dtype=torch.long), n_classes)
    lin = model.get_submodule(head.rstrip("."))
    lin.weight.copy_(weight.to(lin.weight.dtype))
    lin.bias.copy_(bias.to(lin.bias.dtype))


@torch.no_grad()
def predict_proba(model: nn.Module, x_all: torch.Tensor, dev: torch.device, batch_size: int = 256,
                  channels_last: bool = False, tta: bool = False) -> np.ndarray:
    """Softmax probabilities for already transformed images (`stack_inputs`); `tta`: through `FlipTTA`."""
    model.eval()
    net = FlipTTA(model) if tta else model
    out = []
    for x in x_all.split(batch_size):
        with autocast(dev):
            logits = net(to_memory_format(x.to(dev, non_blocking=True), channels_last))
        out.append(logits.float().softmax(-1).cpu())
    return torch.cat(out).numpy()


def log_loss(y: np.ndarray, prob: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (the tie-break when validation AUC saturates)."""
    return float(-np.mean(np.log(np.clip(prob[np.arange(len(y)), y], 1e-7, 1.0))))


def fit(model: nn.Module, train: ImageDataset, x_val: torch.Tensor, val_labels: np.ndarray,
        ft: FinetuneConfig, dev: torch.device, seed: int, head: str, n_classes: int,
        on_epoch: Callable[[int, dict], None] | None = None, num_workers: int = 0, channels_last: bool = False,
        compile: bool = False, head_inputs: tuple[torch.Tensor, np.ndarray] | None = None,
        state: JobState | None = None, phase: int = 0) -> FitResult:
    """Train in place; leaves `model` holding the weights of the best validation epoch: highest AUC, ties (a
    saturated AUC of 1.0 is common with 50 images per class) broken by the lower validation log loss.

    `x_val` holds the validation images already transformed (`stack_inputs`): one eval-transform pass per stage,
    not per epoch. `head_inputs`: the labelled images (eval-transformed) and labels that `finetune.head_init=prototype`
    builds the head from. `ft.epochs=0`: no gradient step; the model is scored on validation as it is.
    `state`: where this fit (`phase` of its job) saves its progress and, if it stopped part-way, continues from;
    the epochs done before are passed to `on_epoch` again."""
    model.to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if compile else model  # shares parameters with `model`
    head = head.rstrip(".") + "."
    head_p = [p for n, p in model.named_parameters() if n.startswith(head)]
    body_p = [p for n, p in model.named_parameters() if not n.startswith(head)]
    if ft.head_init == "prototype":
        if head_inputs is None:
            raise ValueError("finetune.head_init=prototype needs the labelled images (head_inputs)")
        prototype_head(model, *head_inputs, n_classes, head, dev, channels_last)
    elif ft.zero_head:
        zero_head(model, head)
    if ft.epochs == 0:  # no training: the model as initialised (with a prototype head, ProtoNet's test-time rule)
        vm = classification_metrics(val_labels, predict_proba(net, x_val, dev, channels_last=channels_last, tta=ft.tta))
        return FitResult(-1, vm["auc"])
    opt = torch.optim.AdamW([{"params": body_p, "lr": ft.lr_body}, {"params": head_p, "lr": ft.lr_head}],
                            weight_decay=ft.weight_decay)
    warm, total = min(ft.warmup_epochs, ft.epochs), ft.epochs

    def body_factor(epoch: int) -> float:  # 0 during the linear probe, then cosine decay
        if epoch < warm:
            return 0.0
        return 0.5 * (1 + math.cos(math.pi * (epoch - warm) / max(total - warm, 1)))

    def head_factor(epoch: int) -> float:
        return 1.0 if epoch < warm else body_factor(epoch)

    counts = np.bincount(train.labels, minlength=n_classes)
    weight = None
    if ft.class_balance:
        weight = torch.tensor(len(train) / (n_classes * np.maximum(counts, 1)), dtype=torch.float32, device=dev)
    g = torch.Generator().manual_seed(seed)
    bs = min(ft.batch_size, len(train))
    n_samples = max(len(train), ft.min_steps_per_epoch * bs)
    loader = DataLoader(train, batch_size=bs, sampler=RandomSampler(train, num_samples=n_samples, generator=g),
                        drop_last=len(train) >= 2 * bs, num_workers=num_workers, pin_memory=dev.type == "cuda",
                        persistent_workers=num_workers > 0)
    best = FitResult(-1, -math.inf)
    best_key: tuple[float, float] = (-math.inf, -math.inf)
    best_state = None
    since, start = 0, 0
    saved = state.fit_state(phase) if state else None
    if saved:  # a fit cut off part-way: everything the next epoch reads, as it was at the end of the last saved one
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        g.set_state(saved["g"])
        best, best_key, best_state, since, start = (saved["best"], saved["best_key"], saved["best_state"],
                                                    saved["since"], saved["epoch"])
        state.set_rng(saved["rng"])
        for e, rec in enumerate(best.history if on_epoch else []):
            on_epoch(e, rec)
    for epoch in range(start, total):
        opt.param_groups[0]["lr"] = ft.lr_body * body_factor(epoch)
        opt.param_groups[1]["lr"] = ft.lr_head * head_factor(epoch)
        # Linear probe: the body (BN statistics included) stays as initialised, dropout off.
        model.train(epoch >= warm)
        tot, n = 0.0, 0
        for x, y in loader:
            x, y = to_memory_format(x.to(dev, non_blocking=True), channels_last), y.to(dev, non_blocking=True)
            with autocast(dev):
                loss = F.cross_entropy(net(x).float(), y, weight=weight, label_smoothing=ft.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot, n = tot + loss.item() * len(y), n + len(y)
        best.images_seen += n
        prob = predict_proba(net, x_val, dev, channels_last=channels_last, tta=ft.tta)
        vm = classification_metrics(val_labels, prob)
        rec = {"train_loss": tot / max(n, 1), "val_auc": vm["auc"], "val_accuracy": vm["accuracy"],
               "val_loss": log_loss(val_labels, prob)}
        best.history.append(rec)
        if on_epoch:
            on_epoch(epoch, rec)
        if (vm["auc"], -rec["val_loss"]) > best_key:
            best.best_epoch, best.best_val_auc, since = epoch, vm["auc"], 0
            best_key = (vm["auc"], -rec["val_loss"])
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            since += 1
            if epoch >= warm and since >= ft.patience:
                break
        if state and state.due() and epoch + 1 < total:
            state.save_fit(phase, {"epoch": epoch + 1, "model": model.state_dict(), "opt": opt.state_dict(),
                                   "g": g.get_state(), "best": best, "best_key": best_key, "best_state": best_state,
                                   "since": since})
    if best_state is not None:
        model.load_state_dict(best_state)
    return best


def unlabelled_pool(n_train: int, labelled: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted train-split indices outside the k-shot subset for self-training: a seeded sample of `size` of them
    (0 = all). Their labels are never used to train; only their images, through the teacher's pseudo-labels."""
    rest = np.setdiff1d(np.arange(n_train), labelled)
    if size and size < len(rest):
        rest = np.random.default_rng(seed).choice(rest, size, replace=False)
    return np.sort(rest)


def select_confident(prob: np.ndarray, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions and hard pseudo-labels of the `per_class` most confident predictions of each predicted class
    (fewer where the teacher predicts a class less often): balanced, so a skewed teacher cannot flood one class."""
    pred, conf = prob.argmax(1), prob.max(1)
    pos = []
    for c in range(prob.shape[1]):
        members = np.flatnonzero(pred == c)
        pos.append(members[np.argsort(-conf[members], kind="stable")[:per_class]])
    pos = np.concatenate(pos).astype(np.int64)
    return pos, pred[pos]


def self_train(teacher: nn.Module, make_student: Callable[[], nn.Module], ft: FinetuneConfig, train: Split,
               labelled: np.ndarray, eval_t: Callable, train_t: Callable, x_val: torch.Tensor, val_labels: np.ndarray,
               dev: torch.device, seed: int, n_classes: int, channels_last: bool = False, num_workers: int = 0,
               **fit_kw) -> tuple[nn.Module, FitResult, dict[str, float]]:
    """One round of self-training: `teacher` pseudo-labels a seeded pool of unlabelled images of the `train` split,
    then a fresh student (`make_student()`, the arm's initial model) is fine-tuned on the `labelled` indices plus the
    `ft.pseudo_per_class` most confident pseudo-labelled images per class, selected on the same validation images
    (`ft.pseudo_epochs`, `ft.pseudo_warmup_epochs`). Returns the student, its fit, and diagnostics; the
    pseudo-labels' accuracy reads the pool's true labels for reporting only, nothing is chosen by it."""
    pool = unlabelled_pool(len(train.labels), labelled, ft.pseudo_pool, seed + 1)
    if not len(pool):
        raise DataError(f"self-training needs unlabelled train images, but the k-shot subset uses all {len(labelled)}; "
                        f"lower finetune.shots or set finetune.pseudo_per_class=0")
    x_pool = stack_inputs(ImageDataset([train.images[i] for i in pool], np.zeros(len(pool), np.int64), eval_t),
                          num_workers)
    pos, pseudo = select_confident(predict_proba(teacher, x_pool, dev, channels_last=channels_last, tta=ft.tta),
                                   ft.pseudo_per_class)
    del x_pool
    chosen = pool[pos]
    student = make_student()
    ds = ImageDataset([train.images[i] for i in np.concatenate([labelled, chosen])],
                      np.concatenate([train.labels[labelled], pseudo]), train_t)
    res = fit(student, ds, x_val, val_labels, replace(ft, epochs=ft.pseudo_epochs,
                                                      warmup_epochs=ft.pseudo_warmup_epochs),
              dev, seed=seed + 1, head=head_prefix(student), n_classes=n_classes, num_workers=num_workers,
              channels_last=channels_last, **fit_kw)
    acc = float(np.mean(pseudo == train.labels[chosen])) if len(chosen) else float("nan")
    return student, res, {"pseudo_images": float(len(chosen)), "pseudo_label_accuracy": acc}


@dataclass
class SelfTrained:
    """The final model of a job after `self_train_rounds` (the fine-tuned model itself when self-training is off)."""

    model: nn.Module
    fit: FitResult  # the final model's fit
    history: list[dict[str, float]]  # every fit's curve, continued across rounds
    images_seen: int  # training images of every fit
    first_epoch: int  # where the final fit's curve starts in `history`
    diagnostics: dict[str, float]  # the last round's pseudo-label figures
    teacher_val_aucs: list[float] = field(default_factory=list)  # each round's teacher's best validation AUC


def self_train_rounds(model: nn.Module, res: FitResult, make_student: Callable[[], nn.Module], ft: FinetuneConfig,
                      train: Split, labelled: np.ndarray, eval_t: Callable, train_t: Callable, x_val: torch.Tensor,
                      val_labels: np.ndarray, dev: torch.device, seed: int, n_classes: int,
                      before_round: Callable[[int, nn.Module, FitResult], None] | None = None,
                      on_epoch: Callable[[int, dict], None] | None = None, state: JobState | None = None,
                      **kw) -> SelfTrained:
    """`ft.pseudo_rounds` rounds of `self_train` after the fine-tune that gave (`model`, `res`); none when
    `ft.pseudo_per_class` is 0. Each round's student teaches the next; `before_round(rnd, teacher, its fit)` sees
    every teacher first. The curves continue across rounds (`on_epoch` gets continued epoch numbers).
    `state`: each finished round is saved there (phase rnd + 1); where its last finished phase is a round, (`model`,
    `res`) are that round's student and the rounds before it are not run again."""
    history, seen, first, diag, teachers, first_round = list(res.history), res.images_seen, 0, {}, [], 0
    done = state.done if state else None
    if done and done["phase"] > 0:
        history, seen, first, diag = list(done["history"]), done["seen"], done["first"], dict(done["diag"])
        teachers, first_round = list(done["teachers"]), done["phase"]
    for rnd in range(first_round, ft.pseudo_rounds if ft.pseudo_per_class else 0):
        if before_round:
            before_round(rnd, model, res)
        teachers.append(res.best_val_auc)
        first = len(history)
        model, res, diag = self_train(model, make_student, ft, train, labelled, eval_t, train_t, x_val, val_labels,
                                      dev, seed=seed + rnd, n_classes=n_classes,
                                      on_epoch=(lambda e, r, f=first: on_epoch(f + e, r)) if on_epoch else None,
                                      state=state, phase=rnd + 1, **kw)
        history, seen = history + res.history, seen + res.images_seen
        if state:
            state.finish_phase(rnd + 1, {"model": model.state_dict(), "fit": res, "history": history, "seen": seen,
                                         "first": first, "diag": diag, "teachers": teachers})
    return SelfTrained(model, res, history, seen, first, diag, teachers)
