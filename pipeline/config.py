"""One typed dataclass per stage inside one pipeline config, loaded from YAML with `--set` overrides.

Unknown keys and wrong types are errors (`ConfigError`) that name the key and what was expected.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml


class ConfigError(ValueError):
    """A config file or override that cannot be used."""


# Field metadata of settings that change speed, not results: they are not part of the keys that decide whether a
# finished stage is reused (`speed_only_keys`).
SPEED = {"speed_only": True}

SOURCE_POOL = [
    "brain_tumor_mri_64",
    "knee_oa_64",
    "busi_64",
    "blood_wbc_64",
    "lc25000_lung_64",
    "ham10000_derm_64",
    "breastmnist",
]


@dataclass
class DataConfig:
    """Where data sets live and how images are brought to the backbone."""

    root: str = ""  # "" -> $PIPELINE_DATA_ROOT, else ./data
    sources: list[str] = field(default_factory=lambda: list(SOURCE_POOL))  # source pool for meta-training (npz names)
    image_size: int = 64  # side length fed to the backbone (images are resized, small ones upsampled)
    skip_corrupt: bool = False  # skip unreadable images with a warning instead of failing
    min_image_size: int = 8  # images smaller than this (either side) are an error


@dataclass
class TargetConfig:
    """The few-shot target data set (never used for meta-training)."""

    name: str = "kermany_pneumonia_64"  # npz in the data root, used when `path` is empty
    path: str = ""  # npz file, CSV (path,label[,split,group]) or folder of class sub-folders
    label_key: str = "labels"  # npz label key stem: `labels` -> train_labels, `labels3` -> train_labels3
    class_names: list[str] = field(default_factory=list)  # expected classes; [] accepts what the data has
    val_fraction: float = 0.1  # for data without given splits
    test_fraction: float = 0.2  # for data without given splits
    split_seed: int = 0  # seed of the splits the pipeline makes for data without given splits
    # folders: a regex whose first group, searched in each file name, is the patient id (e.g. 'person(\d+)_'): the
    # splits the pipeline makes keep a patient's images together; `data check` reports patients across given splits
    group_pattern: str = ""


@dataclass
class BackboneConfig:
    """The timm model and where its ImageNet weights come from."""

    model: str = "tf_efficientnet_lite0"  # any timm model name; Lite0-2 weights install offline
    weights: str = "imagenet"  # imagenet | none
    weights_file: str = ""  # explicit state_dict / checkpoint file; wins over every other source


# `meta.outer_lr: auto`: Adam's outer rate per algorithm (experiment 21: 0.001 under-trains ProtoNet in 300 iterations)
AUTO_OUTER_LR: dict[str, float] = {"protonet": 3e-3}
AUTO_OUTER_LR_OTHERS = 1e-3


def describe_auto_outer_lr() -> str:
    """The rates "auto" picks, in words for messages: '0.003 for protonet, else 0.001'."""
    return ", ".join(f"{lr:g} for {a}" for a, lr in AUTO_OUTER_LR.items()) + f", else {AUTO_OUTER_LR_OTHERS:g}"


@dataclass
class MetaConfig:
    """Meta-training on N-way K-shot tasks from the source pool (the meta stage)."""

    # maml | fomaml | anil | reptile | metasgd | protonet | multitask (pipeline/meta/algorithms.py)
    algorithm: str = "reptile"
    ways: int = 3  # 3-way keeps six of the seven source sets usable for within-data-set tasks
    shots: int = 5  # support images per class in a task
    queries: int = 15  # query images per class in a task
    inner_steps: int = 5  # inner-loop SGD steps per task (training and validation)
    inner_lr: float = 0.01  # inner-loop learning rate (Meta-SGD: the initial per-entry rate)
    meta_batch: int = 4  # tasks per outer step
    iterations: int = 300  # outer steps
    # Adam LR of the outer loop (MAML family, protonet, multitask, reptile_outer=adam; Reptile's sgd step is
    # `reptile_epsilon`); "auto": 0.003 for protonet, else 0.001 (`AUTO_OUTER_LR`, experiment 21); the meta run logs
    # the rate it used as the parameter `meta.resolved_outer_lr`
    outer_lr: float | str = "auto"
    reptile_epsilon: float = 0.5  # Reptile outer step size: θ ← θ + ε·mean(θ̃ − θ)
    # Reptile's outer loop: "sgd" is the paper's θ ← θ + ε·mean(θ̃ − θ); "adam": Adam at outer_lr on the
    # pseudo-gradient −mean(θ̃ − θ), which normalises its scale (inner SGD barely moves a pretrained body)
    reptile_outer: str = "adam"
    # Reptile's inner loop trains on a task's support and query images (Reptile has no other use for the query
    # set; Nichol et al. 2018 meta-trained with more shots than they tested with); meta-validation still adapts on
    # the support set alone and scores the query set
    reptile_query: bool = True
    lr_schedule: str = "cosine"  # cosine | constant
    task_mode: str = "within"  # within: a task's classes come from one data set; across: from any
    disjoint_classes: bool = False  # meta-validation on classes held out of meta-training
    val_every: int = 50  # meta-validate every this many iterations (and at the end)
    val_tasks: int = 20  # fixed meta-validation tasks from the sources' val splits
    checkpoint_every: int = 50  # write the resumable training state every this many iterations
    # vmap over a meta-batch's tasks; the per-task loop is faster and far leaner on CPU (benchmark)
    batched: bool = field(default=False, metadata=SPEED)
    # MAML/Meta-SGD: backprop through all inner steps' graphs instead of the leaner reverse sweep
    unroll: bool = field(default=False, metadata=SPEED)
    # torch.compile the per-task gradient/HVP functions: "auto" compiles when meta.iterations is long enough to repay
    # the first meta-batch's compile time (`pipeline.device.use_compile`) and a compiler is there; "on" or "off"
    compile: str = field(default="auto", metadata=SPEED)
    augment: bool = False  # augment meta-training task images
    bn_recalibration_batches: int = 20  # source batches that re-estimate BatchNorm statistics before saving
    zero_head: bool = True  # start the N-way head at zero: initial loss log(N), no random-head gradients into the body
    rezero_head: bool = False  # zero the head again after every outer step: only the body is meta-learned
    # "prototype": every task's inner loop starts its head from the support set's class means, W_k = 2 c_k,
    # b_k = -||c_k||^2 (first-order Proto-MAML; maml, fomaml, anil, metasgd, reptile); "default": the meta-learned
    # head; "auto": prototype for reptile (where it was measured to help), default for the others
    head_init: str = "auto"
    from_run: str = ""  # explicit backbone run id

    def resolved_outer_lr(self) -> float:
        """`outer_lr` with "auto" resolved for `algorithm` (`AUTO_OUTER_LR`)."""
        if self.outer_lr != "auto":
            return float(self.outer_lr)
        return AUTO_OUTER_LR.get(self.algorithm, AUTO_OUTER_LR_OTHERS)

    def resolved_head_init(self) -> str:
        """`head_init` with "auto" resolved for `algorithm`: "prototype" for reptile, else "default"."""
        if self.head_init != "auto":
            return self.head_init
        return "prototype" if self.algorithm == "reptile" else "default"


@dataclass
class FinetuneConfig:
    """The few-shot fine-tune of every arm on paired k-shot subsets (the finetune stage)."""

    # scratch, transfer, meta; `<arm>@<timm model>` (scratch or transfer) is that arm on another backbone, built by
    # the backbone stage beside backbone.model, on the same paired subsets; `<arm>.r<n>` (n >= 1) is replica n of an
    # arm: the same initial weights and k-shot subsets, another seed for the head, augmentation, batch order and
    # dropout (e.g. an ensemble control)
    arms: list[str] = field(default_factory=lambda: ["scratch", "transfer", "meta"])
    # k: labelled images per class; "all" (stored as 0) trains on every train label, the full-label ceiling
    shots: list[int] = field(default_factory=lambda: [5, 10, 20, 50, 100])
    seeds: int = 5  # paired k-shot subsets (seed numbers) per k
    first_seed: int = 0  # seeds first_seed .. first_seed + seeds - 1 (add seeds to an experiment without redoing any)
    val_per_class: int = 50  # labelled validation images per class for model selection (0 = whole split)
    image_size: int = 128  # side length for fine-tuning and test (0 = data.image_size): upsampled for ImageNet bodies
    # fine-tuning epochs (early stopping may end sooner); 0 with head_init=prototype: no training, the frozen body
    # with the nearest-class-mean classifier of the k labelled images (ProtoNet's test-time rule)
    epochs: int = 30
    warmup_epochs: int = 5  # linear probe (body frozen) before the full fine-tune
    batch_size: int = 32  # training batch size (at most the training set)
    lr_head: float = 3e-3  # AdamW learning rate of the head (cosine decay after the warm-up)
    lr_body: float = 1e-3  # AdamW learning rate of the body (0 during the warm-up)
    weight_decay: float = 1e-4  # AdamW weight decay
    augment: bool = True  # small rotations, shifts, zooms, brightness/contrast/gamma, slight blur
    hflip: bool = False  # add horizontal flips to the augmentation (off: chest anatomy is left-right asymmetric)
    tta: bool = False  # average logits over the image and its horizontal flip at validation and test
    class_balance: bool = True  # class-weighted loss against imbalance
    label_smoothing: float = 0.0  # cross-entropy label smoothing (against over-confident few-shot models)
    # start every fine-tune's head at zero (initial loss log(C)) instead of timm's init, which for a 2-class head on
    # 1280 features draws weights up to +-0.71: initial logits 23-34 apart, loss 11-15 (benchmarks/head_init.py)
    zero_head: bool = True
    # "prototype": the head starts from the k-shot class means c_k of the body's features, W_k = 2 c_k,
    # b_k = -||c_k||^2 (a prototypical classifier; Proto-MAML); "default": zero_head decides
    head_init: str = "default"
    patience: int = 10  # early stopping on validation AUC
    # Semi-supervised self-training (off at 0): the fine-tuned model (teacher) pseudo-labels unlabelled images of the
    # target's train split, then a fresh copy of the arm's initial model (student) is fine-tuned on the k labelled
    # images plus the `pseudo_per_class` most confident pseudo-labelled ones per class; selection stays on validation.
    pseudo_per_class: int = 0
    pseudo_pool: int = 2000  # unlabelled train images the teacher scores (0 = every one outside the k-shot subset)
    pseudo_epochs: int = 10  # the student's epochs (each one pass over labelled + pseudo-labelled images)
    pseudo_warmup_epochs: int = 2  # the student's linear-probe epochs
    pseudo_rounds: int = 1  # rounds of self-training: from the second on, the last student is the teacher
    # the student's augmentation: "strong" (noisy student: wider ranges, CLAHE, noise, cut-out; pipeline/transforms.py;
    # chosen on validation at k=20 and k=100, docs/experiments/09-noisy-student.md) or "recipe" (the teacher's)
    pseudo_augment: str = "strong"
    min_steps_per_epoch: int = 4  # tiny k: repeat the set so an epoch has a few steps
    # write a job's progress at the end of an epoch at most every this many seconds, so that a run killed mid-job
    # continues from there (pipeline/job_state.py); 0: every epoch; negative: never (a cut-off job starts again)
    checkpoint_seconds: float = field(default=60.0, metadata=SPEED)
    log_models: bool = True  # log every final model with mlflow.pytorch (signature, input example, preprocessing)
    registry_name: str = "fewshot-medmeta"  # register each arm's best-by-validation model as <name>-<arm>; "" = off
    meta_from_runs: list[str] = field(default_factory=list)  # extra meta runs, one arm each
    from_run: str = ""  # explicit meta run id (else found by config)
    backbone_run: str = ""  # explicit backbone run id (else found by config)


@dataclass
class EvaluateConfig:
    """Scoring the test predictions: intervals, paired comparisons, ensembles, merged runs."""

    bootstrap: int = 1000  # bootstrap resamples of the test split per run (0: none)
    ci: float = 0.95  # confidence level of every interval
    reference_arm: str = "transfer"  # other arms are compared to this one, paired by (k, seed)
    from_run: str = ""  # explicit finetune run id
    ensemble: bool = True  # add an `ensemble` arm: mean probabilities of the transfer, transfer@<model> and meta-* arms
    # further ensemble arms, each "name=arm+arm[+...]", e.g. "ensemble-2transfer=transfer+transfer.r1"
    ensembles: list[str] = field(default_factory=list)
    # further finetune runs whose predictions join the upstream run's (e.g. seeds 3-4 run after seeds 0-2); they must
    # score the same test split and add only (arm, k, seed) combinations the others lack. "tag=<run id>" scores the
    # run's arms as "<tag>.<arm>" (e.g. "lite2=<id>" -> lite2.transfer: another backbone's arm beside this one's)
    merge_runs: list[str] = field(default_factory=list)
    # choosing among candidates on the whole validation split, by a rule fixed before the run: "log_loss" (lower is
    # better; keeps separating models whose validation AUC is saturated near 1) or "auc"; the mean over seeds, ties to
    # the earlier candidate (selection.json)
    selection_metric: str = "log_loss"
    candidates: list[str] = field(default_factory=list)  # arms and ensembles to choose among ([] = every one)
    # the chosen candidate's decision threshold, picked on validation: "youden" (max sensitivity + specificity - 1) or
    # "sensitivity=<s>" (the highest threshold with validation sensitivity >= s, e.g. sensitivity=0.95)
    operating_point: str = "youden"


@dataclass
class PipelineConfig:
    """The whole pipeline's config: one section per stage plus run-wide settings."""

    experiment: str = "fewshot-medmeta"  # MLflow experiment the runs go to
    seed: int = 0  # pipeline seed: meta-training episodes, k-shot subsets (split seed = 1000 * seed + seed number)
    device: str = field(default="auto", metadata=SPEED)  # auto | cpu | cuda | cuda:N | mps
    num_workers: int = field(default=0, metadata=SPEED)  # DataLoader worker processes
    # auto | on | off (auto: on for GPUs, and on CPU except for second-order MAML)
    channels_last: str = field(default="auto", metadata=SPEED)
    # torch.compile the fine-tuning model; off unless it measures faster (benchmarks/)
    compile: bool = field(default=False, metadata=SPEED)
    # cuDNN autotuning on CUDA; off skips the per-shape search (docs/gpu.md)
    cudnn_benchmark: bool = field(default=True, metadata=SPEED)
    data: DataConfig = field(default_factory=DataConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self, *sections: str) -> str:
        """Stable short hash of the whole config, or of the named sections only."""
        d = self.to_dict()
        if sections:
            d = {s: d[s] for s in sections}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def speed_only_keys(obj: Any = None, prefix: str = "") -> set[str]:
    """Dotted names of the settings marked speed-only (e.g. 'meta.compile', 'num_workers')."""
    obj = PipelineConfig() if obj is None else obj
    out = set()
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out |= speed_only_keys(value, f"{prefix}{f.name}.")
        elif f.metadata.get("speed_only"):
            out.add(prefix + f.name)
    return out


ALL_SHOTS = 0  # `finetune.shots: [all]`: every train label (the full-label reference row)


def _check_type(value: Any, tp: Any, key: str) -> Any:
    """Return `value` converted to `tp` where that is lossless, else raise ConfigError."""
    if key.startswith("finetune.shots[") and value == "all":
        return ALL_SHOTS
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            value = [value]  # `--set finetune.shots=20` means [20]
        return [_check_type(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for t in typing.get_args(tp):
            try:
                return _check_type(value, t, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}': {value!r} is not a {tp}")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is str and value is None:
        return ""
    if tp is str and isinstance(value, bool):  # YAML reads on/off (channels_last) as booleans
        return "on" if value else "off"
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"config key '{key}': expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _merge(obj: Any, updates: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in updates.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(f"unknown config key '{key}'; valid keys here: {', '.join(sorted(names))}")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            if not isinstance(v, dict):
                raise ConfigError(f"config key '{key}' is a section; set its fields, e.g. {key}.<field>=...")
            _merge(cur, v, key + ".")
        else:
            setattr(obj, k, _check_type(v, hints[k], key))


def parse_override(text: str) -> dict[str, Any]:
    """`a.b=c` -> {'a': {'b': c}} with the value parsed as YAML (numbers, bools, lists)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value, e.g. meta.iterations=100")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': value is not valid YAML ({e})") from e
    out: dict[str, Any] = {}
    cur = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Defaults, then the YAML file, then each `key=value` override, all type-checked."""
    cfg = PipelineConfig()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} not found; ship one under configs/ or pass --config PATH")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections")
        _merge(cfg, data)
    for o in overrides or []:
        _merge(cfg, parse_override(o))
    validate(cfg)
    return cfg


# <kind>[@<timm model>][.r<n>]; the model part is lazy, so 'transfer@resnet50.a1_in1k.r1' keeps the model's own '.'
ARM_RE = re.compile(r"^(scratch|transfer|meta)(?:@([A-Za-z0-9][A-Za-z0-9_.-]*?))?(?:\.r(\d+))?$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ArmSpec(NamedTuple):
    """A parsed `finetune.arms` entry: its kind, replica number and timm model ('' = `backbone.model`)."""

    kind: str
    replica: int
    model: str = ""


def replica_name(arm: str, replica: int) -> str:
    """The name of replica `replica` of an arm ('transfer', 1 -> 'transfer.r1'); replica 0 is the arm itself."""
    return f"{arm}.r{replica}" if replica else arm


def is_replica(arm: str) -> bool:
    """Whether an arm name (e.g. 'meta-reptile.r2') is a replica."""
    return re.search(r"\.r\d+$", arm) is not None


def parse_arm(spec: str) -> ArmSpec:
    """'transfer' -> ('transfer', 0, ''); 'transfer.r1' -> replica 1 of the transfer arm;
    'transfer@tf_efficientnet_lite2' -> the transfer arm of another backbone (built by the backbone stage too)."""
    m = ARM_RE.match(spec)
    kind, model, rep = (m.group(1), m.group(2), m.group(3)) if m else (spec, "", "")
    if not m or (rep and int(rep) < 1):
        raise ConfigError(f"config key 'finetune.arms': unknown arm {spec!r}; use scratch, transfer, meta, "
                          f"<arm>@<timm model> for another backbone (e.g. transfer@tf_efficientnet_lite2), or "
                          f"<arm>.r<n> with n >= 1 for a replica (another training seed), e.g. transfer.r1")
    return ArmSpec(kind, int(rep or 0), model or "")


def backbone_models(cfg: PipelineConfig) -> list[str]:
    """Every timm model the run needs: `backbone.model` first (the one meta-training starts from), then each other
    model an arm names (`transfer@<model>`), in the arms' order."""
    models = [cfg.backbone.model]
    for spec in cfg.finetune.arms:
        model = parse_arm(spec).model
        if model and model not in models:
            models.append(model)
    return models


def mlflow_key(name: str) -> str:
    """An arm or candidate name as MLflow metric keys and registered-model names allow it: '@' (which neither
    takes, and which `models:/` URIs read as an alias) becomes '.'."""
    return name.replace("@", ".")


TAG_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")  # no '.', so '<tag>.<arm>' splits one way


def parse_merge_run(spec: str, named_by: str = "config key 'evaluate.merge_runs'") -> tuple[str, str]:
    """'<run id>' -> ('', id); 'lite2=<run id>' -> ('lite2', id): that run's arms are scored as 'lite2.<arm>'.
    `named_by` (where the spec came from) leads the error."""
    tag, eq, rid = spec.rpartition("=")
    tag, rid = tag.strip(), rid.strip()
    if not rid or (eq and not TAG_RE.match(tag)):
        raise ConfigError(f"{named_by}: {spec!r} is not '<run id>' or '<tag>=<run id>' with a "
                          f"tag of letters, digits, '_' and '-' that starts with a letter, e.g. 'lite2=<run id>'")
    return tag, rid


def tagged_arm(tag: str, arm: str) -> str:
    """The name a merged run's arm is scored under: 'transfer' with tag 'lite2' -> 'lite2.transfer'."""
    return f"{tag}.{arm}" if tag else arm


def parse_ensemble(spec: str) -> tuple[str, list[str]]:
    """'ens2=transfer+transfer.r1' -> ('ens2', ['transfer', 'transfer.r1'])."""
    name, eq, rest = spec.partition("=")
    members = [m.strip() for m in rest.split("+") if m.strip()]
    name = name.strip()
    if not eq or not NAME_RE.match(name) or len(members) < 2 or len(set(members)) != len(members):
        raise ConfigError(f"config key 'evaluate.ensembles': {spec!r} is not 'name=arm+arm[+...]' with a name of "
                          f"letters, digits, '_', '.', '-' and at least two different arms, e.g. "
                          f"'ensemble-2transfer=transfer+transfer.r1'")
    return name, members


def validate(cfg: PipelineConfig) -> None:
    """Value checks that types alone cannot express."""
    # the one list of algorithm names (imports torch, so not at the top)
    from .meta.algorithms import ALGORITHMS, PROTOTYPE_HEAD_ALGORITHMS
    choices = {
        "meta.algorithm": (cfg.meta.algorithm, set(ALGORITHMS)),
        "meta.lr_schedule": (cfg.meta.lr_schedule, {"cosine", "constant"}),
        "meta.task_mode": (cfg.meta.task_mode, {"within", "across"}),
        "backbone.weights": (cfg.backbone.weights, {"imagenet", "none"}),
        "channels_last": (cfg.channels_last, {"auto", "on", "off"}),
        "meta.compile": (cfg.meta.compile, {"auto", "on", "off"}),
        "finetune.pseudo_augment": (cfg.finetune.pseudo_augment, {"recipe", "strong"}),
        "evaluate.selection_metric": (cfg.evaluate.selection_metric, {"log_loss", "auc"}),
        "finetune.head_init": (cfg.finetune.head_init, {"default", "prototype"}),
        "meta.head_init": (cfg.meta.head_init, {"auto", "default", "prototype"}),
        "meta.reptile_outer": (cfg.meta.reptile_outer, {"sgd", "adam"}),
    }
    for key, (val, allowed) in choices.items():
        if val not in allowed:
            raise ConfigError(f"config key '{key}': {val!r} is not one of {sorted(allowed)}")
    if cfg.meta.head_init == "prototype" and cfg.meta.algorithm not in PROTOTYPE_HEAD_ALGORITHMS:
        raise ConfigError(f"config key 'meta.head_init': 'prototype' starts an inner loop's head from the support "
                          f"set, and meta.algorithm={cfg.meta.algorithm!r} has no such loop; use it with one of "
                          f"{list(PROTOTYPE_HEAD_ALGORITHMS)}")
    for arm in cfg.finetune.arms:
        spec = parse_arm(arm)
        if spec.model == cfg.backbone.model:
            raise ConfigError(f"config key 'finetune.arms': {arm!r} names backbone.model itself; that is the "
                              f"{spec.kind!r} arm, so write {replica_name(spec.kind, spec.replica)!r}")
        if spec.kind == "meta" and spec.model:
            raise ConfigError(f"config key 'finetune.arms': {arm!r}: meta-training starts from backbone.model "
                              f"({cfg.backbone.model}) only; meta-train another body in a run with "
                              f"backbone.model={spec.model} and add that meta run with finetune.meta_from_runs")
    if len(set(cfg.finetune.arms)) != len(cfg.finetune.arms):
        raise ConfigError(f"config key 'finetune.arms': {cfg.finetune.arms} names an arm twice; use <arm>.r<n> for a "
                          f"second copy with another seed")
    for spec in cfg.evaluate.merge_runs:
        parse_merge_run(spec)
    names = [parse_ensemble(e)[0] for e in cfg.evaluate.ensembles]
    if len(set(names)) != len(names) or (cfg.evaluate.ensemble and "ensemble" in names):
        raise ConfigError(f"config key 'evaluate.ensembles': names {names} repeat (or reuse 'ensemble' while "
                          f"evaluate.ensemble is on); give each ensemble its own name")
    positive = {
        "data.image_size": cfg.data.image_size, "meta.ways": cfg.meta.ways, "meta.shots": cfg.meta.shots,
        "meta.queries": cfg.meta.queries, "meta.meta_batch": cfg.meta.meta_batch,
        "finetune.seeds": cfg.finetune.seeds, "finetune.batch_size": cfg.finetune.batch_size,
    }
    positive |= {
        "finetune.patience": cfg.finetune.patience,
        "finetune.min_steps_per_epoch": cfg.finetune.min_steps_per_epoch, "meta.inner_steps": cfg.meta.inner_steps,
        "meta.val_every": cfg.meta.val_every, "meta.val_tasks": cfg.meta.val_tasks,
        "meta.checkpoint_every": cfg.meta.checkpoint_every, "data.min_image_size": cfg.data.min_image_size,
    }
    for key, val in positive.items():
        if val < 1:
            raise ConfigError(f"config key '{key}' must be >= 1, got {val}")
    non_negative = {
        "finetune.epochs": cfg.finetune.epochs, "finetune.warmup_epochs": cfg.finetune.warmup_epochs,
        "finetune.val_per_class": cfg.finetune.val_per_class,
        "finetune.lr_body": cfg.finetune.lr_body, "finetune.weight_decay": cfg.finetune.weight_decay,
        "meta.iterations": cfg.meta.iterations, "meta.bn_recalibration_batches": cfg.meta.bn_recalibration_batches,
        "evaluate.bootstrap": cfg.evaluate.bootstrap, "num_workers": cfg.num_workers,
    }
    for key, val in non_negative.items():
        if val < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {val}")
    if isinstance(cfg.meta.outer_lr, str) and cfg.meta.outer_lr != "auto":
        raise ConfigError(f"config key 'meta.outer_lr': {cfg.meta.outer_lr!r} is neither a number nor 'auto'; "
                          f"e.g. meta.outer_lr=0.001, or auto ({describe_auto_outer_lr()})")
    rates = {"finetune.lr_head": cfg.finetune.lr_head, "meta.inner_lr": cfg.meta.inner_lr,
             "meta.outer_lr": cfg.meta.resolved_outer_lr(), "meta.reptile_epsilon": cfg.meta.reptile_epsilon}
    for key, val in rates.items():
        if not val > 0:
            raise ConfigError(f"config key '{key}' must be > 0, got {val}")
    fractions = {"target.val_fraction": cfg.target.val_fraction, "target.test_fraction": cfg.target.test_fraction,
                 "evaluate.ci": cfg.evaluate.ci}
    for key, val in fractions.items():
        if not 0.0 < val < 1.0:
            raise ConfigError(f"config key '{key}' must be between 0 and 1, got {val}")
    op = re.fullmatch(r"youden|sensitivity=(0(?:\.\d+)?|1(?:\.0*)?)", cfg.evaluate.operating_point)
    if not op or (op.group(1) is not None and float(op.group(1)) <= 0):
        raise ConfigError(f"config key 'evaluate.operating_point': {cfg.evaluate.operating_point!r} is not 'youden' or "
                          f"'sensitivity=<s>' with 0 < s <= 1, e.g. sensitivity=0.95")
    if cfg.target.group_pattern:
        try:
            groups = re.compile(cfg.target.group_pattern).groups
        except re.error as e:
            raise ConfigError(f"config key 'target.group_pattern': {cfg.target.group_pattern!r} is not a regular "
                              f"expression ({e})") from e
        if groups < 1:
            raise ConfigError(f"config key 'target.group_pattern': {cfg.target.group_pattern!r} has no group; put the "
                              f"patient id in parentheses, e.g. 'person(\\d+)_'")
    if cfg.target.val_fraction + cfg.target.test_fraction >= 1.0:
        raise ConfigError(f"config keys 'target.val_fraction' + 'target.test_fraction' must be < 1 (the rest is "
                          f"train), got {cfg.target.val_fraction} + {cfg.target.test_fraction}")
    if cfg.finetune.first_seed < 0:
        raise ConfigError(f"config key 'finetune.first_seed' must be >= 0, got {cfg.finetune.first_seed}")
    if cfg.finetune.image_size < 0:
        raise ConfigError(f"config key 'finetune.image_size' must be >= 0 (0: data.image_size), got "
                          f"{cfg.finetune.image_size}")
    if not 0.0 <= cfg.finetune.label_smoothing < 1.0:
        raise ConfigError(f"config key 'finetune.label_smoothing' must be in [0, 1), got "
                          f"{cfg.finetune.label_smoothing}")
    for key in ("pseudo_per_class", "pseudo_pool", "pseudo_warmup_epochs"):
        if getattr(cfg.finetune, key) < 0:
            raise ConfigError(f"config key 'finetune.{key}' must be >= 0, got {getattr(cfg.finetune, key)}")
    if cfg.finetune.epochs == 0 and cfg.finetune.head_init != "prototype":
        raise ConfigError("config key 'finetune.epochs' is 0 (no training), which leaves the head as initialised; "
                          "set finetune.head_init=prototype (the nearest-class-mean classifier on the frozen body) "
                          "or finetune.epochs >= 1")
    if cfg.finetune.pseudo_rounds < 1:
        raise ConfigError(f"config key 'finetune.pseudo_rounds' must be >= 1, got {cfg.finetune.pseudo_rounds}")
    if cfg.finetune.pseudo_per_class and cfg.finetune.pseudo_epochs < 1:
        raise ConfigError(f"config key 'finetune.pseudo_epochs' must be >= 1 with self-training on, got "
                          f"{cfg.finetune.pseudo_epochs}")
    if cfg.meta.ways < 2:
        raise ConfigError("config key 'meta.ways' must be >= 2 (a task needs two classes)")
    if any(k < 0 for k in cfg.finetune.shots) or len(set(cfg.finetune.shots)) != len(cfg.finetune.shots):
        raise ConfigError(f"config key 'finetune.shots': every k must be >= 1 (or 'all'), each once, got "
                          f"{cfg.finetune.shots}")
