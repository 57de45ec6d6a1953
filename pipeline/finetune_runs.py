"""The MLflow side of the finetune stage: arms from upstream runs, one nested run per job with its curves, test
metrics, predictions CSV and model, the stage's `predictions/index.json`, and the model registry."""
from __future__ import annotations

import contextlib
import json
import shutil
import socket
from functools import partial
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pytorch
from mlflow.entities import Run
import numpy as np
import pandas as pd
import torch

from .backbone import load_checkpoint
from .config import ConfigError, FinetuneConfig, PipelineConfig, mlflow_key, parse_arm, replica_name
from . import distributed
from .finetune import Arm, Job, JobResult, TargetInputs, queue_order, train_job
from .job_state import JobState
from .metrics import classification_metrics
from .predict import PREPROCESS_FILE, preprocess_spec
from .tracking import compute_tags, download, local_state_dir, main_client, tracked_run


def load_arms(cfg: PipelineConfig, inputs: dict) -> tuple[dict[str, Arm], dict[str, dict]]:
    """Arm name -> its initial weights, replica number and model, from the upstream backbone and meta runs (and
    `finetune.meta_from_runs`); and each backbone checkpoint the arms use, by timm model name."""
    up = inputs["backbone"]
    backbones = {cfg.backbone.model: load_checkpoint(download(up["checkpoint_uri"]))}
    meta = None
    arms: dict[str, Arm] = {}
    for spec in cfg.finetune.arms:
        kind, rep, model = parse_arm(spec)
        if model and model not in backbones:
            if f"checkpoint_uri.{model}" not in up:
                raise ConfigError(f"config key 'finetune.arms' names {spec!r}, but backbone run {up['run_id']} did "
                                  f"not build {model}; run the backbone stage with this config (it builds every "
                                  f"model the arms name)")
            backbones[model] = load_checkpoint(download(up[f"checkpoint_uri.{model}"]))
        body = model or cfg.backbone.model
        if kind == "scratch":
            name, ckpt = "scratch", None
        elif kind == "transfer":
            name, ckpt = "transfer", backbones[body]
        else:
            meta = meta or load_checkpoint(download(inputs["meta"]["checkpoint_uri"]))
            name, ckpt = f"meta-{inputs['meta'].get('algorithm', 'meta')}", meta
        arms[replica_name(f"{name}@{model}" if model else name, rep)] = Arm(ckpt, rep, body)
    for rid in cfg.finetune.meta_from_runs:
        run = main_client().get_run(rid)  # under torchrun, ranks > 0 track elsewhere but read the main store
        name = f"meta-{run.data.tags.get('algorithm', rid[:8])}-{rid[:6]}"
        ckpt = load_checkpoint(download(f"{run.info.artifact_uri}/checkpoint/model.pt"))
        backbones.setdefault(ckpt["model_name"], ckpt)  # its preprocessing: the body's own
        arms[name] = Arm(ckpt, 0, ckpt["model_name"])
    return arms, backbones


JOB_FILE = "job.json"  # a job run's index entry, logged last: a FINISHED job run holding it is complete


def job_run(job: Job, model_name: str, dataset: str, stage_key: str, parent_run_id: str | None = None,
            trainer: dict[str, str] | None = None) -> contextlib.AbstractContextManager[Run]:
    """The job's nested MLflow run, named `finetune/<arm>/k<k>/seed<s>`, tagged with its stage's key and the logging
    process; under the active run, or under `parent_run_id` (from a thread with no active run of its own).
    `trainer`: the `trainer_tags` of the process that trained the job, when another one did. Ends like a stage run
    (`tracked_run`): KILLED on Ctrl-C or SIGTERM, FAILED on an error."""
    return tracked_run(job.name, {"pipeline.stage": "finetune-run", "pipeline.stage_key": stage_key, "arm": job.arm,
                                  "k": str(job.k), "seed": str(job.seed), "backbone": model_name, "dataset": dataset,
                                  **(trainer or {})},
                       nested=True, system_metrics=None, parent_run_id=parent_run_id)


def finished_jobs(stage_key: str, out_dir: Path, log_models: bool) -> dict[Job, dict]:
    """Jobs that finished under this stage key in an earlier finetune stage run that did not finish (a process that
    was killed, or failed): their index entries, with their prediction CSVs downloaded into `out_dir`. Such a job
    is kept as it is (its run, predictions and model), not trained again. Jobs of a FINISHED stage run are not
    taken: that run is reused whole, or `--force` recomputes everything."""
    if not stage_key:
        return {}
    client = main_client()
    active = mlflow.active_run()
    exp = client.get_experiment_by_name(mlflow.get_experiment(active.info.experiment_id).name)
    query = (f"tags.`pipeline.stage` = 'finetune-run' and tags.`pipeline.stage_key` = '{stage_key}' "
             f"and attributes.status = 'FINISHED'")
    runs = client.search_runs([exp.experiment_id], filter_string=query, order_by=["attributes.start_time DESC"],
                              max_results=10000)
    parents: dict[str, str] = {}
    out: dict[Job, dict] = {}
    for r in runs:
        parent = r.data.tags.get("mlflow.parentRunId", "")
        if parent not in parents:
            parents[parent] = client.get_run(parent).info.status if parent else "FINISHED"
        if parents[parent] not in ("KILLED", "FAILED"):  # a finished stage, or a live process's
            continue
        job = Job(int(r.data.tags["k"]), int(r.data.tags["seed"]), r.data.tags["arm"])
        if job in out or not any(a.path == JOB_FILE for a in client.list_artifacts(r.info.run_id)):
            continue
        entry = json.loads(download(f"{r.info.artifact_uri}/{JOB_FILE}").read_text())
        if log_models and not entry.get("model_uri"):
            continue
        download(f"{r.info.artifact_uri}/predictions/{entry['file']}", str(out_dir))
        download(f"{r.info.artifact_uri}/val_predictions/{entry['file']}", str(out_dir.parent / "val_predictions"))
        out[job] = entry
    return out


def job_states_root() -> Path:
    """The folder beside the store that holds every finetune stage key's saved job progress."""
    return local_state_dir() / "job-states"


def job_states_dir(stage_key: str) -> Path:
    """Where the jobs of a finetune stage save their progress: one folder per stage key beside the store, shared
    by every process of this host (a torchrun job goes to whichever rank is free)."""
    return job_states_root() / stage_key


def remove_job_states(stage_key: str) -> None:
    """The stage key's saved progress, and the `job-states` folder itself once no other key has any."""
    shutil.rmtree(job_states_dir(stage_key), ignore_errors=True)
    with contextlib.suppress(OSError):  # not empty: another stage key's jobs were cut off
        job_states_root().rmdir()


def note_other_job_states() -> None:
    """Say where progress of other finetune configurations' cut-off jobs lies (kept for when their command runs
    again), so that a user who changed the configuration for good knows what to delete."""
    root = job_states_root()
    files = sorted(root.glob("*/*.pt"))
    if files:
        mib = sum(f.stat().st_size for f in files) / 2**20
        print(f"[finetune] {len(files)} job(s) cut off under other finetune configurations kept their progress "
              f"({mib:.0f} MiB) in {root}, a folder per configuration: its command run again continues them; "
              f"delete the folder of one you will not run again", flush=True)


def job_state(job: Job, stage_key: str, ft: FinetuneConfig) -> JobState:
    """The job's `JobState` (nothing saved without a stage key or with `finetune.checkpoint_seconds` < 0)."""
    if not stage_key or ft.checkpoint_seconds < 0:
        return JobState(None)
    return JobState(job_states_dir(stage_key) / f"{job.arm}_k{job.k}_seed{job.seed}.pt", ft.checkpoint_seconds)


def write_predictions(path: Path, labels: np.ndarray, prob: np.ndarray, class_names: list[str]) -> None:
    """A predictions CSV: `index,label,prob_<class>...`, one row per image of the split."""
    df = pd.DataFrame(prob, columns=[f"prob_{c}" for c in class_names])
    df.insert(0, "label", labels)
    df.insert(0, "index", np.arange(len(labels)))
    df.to_csv(path, index=False)


def log_epoch(epoch: int, record: dict[str, float]) -> None:
    """One point of a job's curves, logged live (epochs count from 1)."""
    mlflow.log_metrics(record, step=epoch + 1)


def log_model(model: torch.nn.Module, spec: dict, example: np.ndarray, work: Path) -> str:
    """mlflow.pytorch model with signature, input example and the preprocessing spec; returns its URI."""
    import timm
    from mlflow.models import infer_signature
    (work / PREPROCESS_FILE).write_text(json.dumps(spec, indent=1))
    model = model.cpu().eval()
    with torch.no_grad():
        out = model(torch.from_numpy(example)).softmax(-1).numpy()
    reqs = [f"torch=={torch.__version__.split('+')[0]}", f"timm=={timm.__version__}"]  # skips slow inference
    info = mlflow.pytorch.log_model(model, name="model", signature=infer_signature(example, out),
                                    input_example=example, extra_files=[str(work / PREPROCESS_FILE)],
                                    pip_requirements=reqs, serialization_format="pickle")
    return info.model_uri


class JobLogger:
    """Logs finished jobs into their nested runs (rank 0 only) and collects the stage's prediction index."""

    def __init__(self, inputs: dict[str, TargetInputs], ft: FinetuneConfig, arms: dict[str, Arm], out_dir: Path):
        """`inputs`: each model's shared inputs (`prepare_inputs`), by timm model name; an arm's are `arm.model`'s."""
        self.inputs, self.ft, self.arms, self.out_dir = inputs, ft, arms, out_dir
        self.data = next(iter(inputs.values()))  # the splits and labels every model shares
        self.val_dir = out_dir.parent / "val_predictions"  # the whole validation split, for choosing candidates
        self.val_dir.mkdir(exist_ok=True)
        self.index: list[dict] = []

    def log(self, res: JobResult, live: bool) -> None:
        """The job's params, curves (unless logged live), test metrics, predictions CSV and model."""
        ft, job, te = self.ft, res.job, self.data.split("test")
        if not live:
            for e, rec in enumerate(res.history):
                log_epoch(e, rec)
        mlflow.log_params({"arm": job.arm, "model": self.arms[job.arm].model, "k": job.k, "seed": job.seed,
                           "replica": self.arms[job.arm].replica,
                           "n_train": res.n_train, "n_val": res.n_val, "epochs": ft.epochs, "lr_body": ft.lr_body,
                           "lr_head": ft.lr_head, "warmup_epochs": ft.warmup_epochs, "image_size": self.data.size,
                           "hflip": ft.hflip, "tta": ft.tta, "label_smoothing": ft.label_smoothing,
                           "pseudo_per_class": ft.pseudo_per_class, "pseudo_rounds": ft.pseudo_rounds,
                           "pseudo_augment": ft.pseudo_augment})
        fname = f"{job.arm}_k{job.k}_seed{job.seed}.csv"
        write_predictions(self.out_dir / fname, te.labels, res.prob, self.data.target.class_names)
        write_predictions(self.val_dir / fname, self.data.split("val").labels, res.val_prob,
                          self.data.target.class_names)
        test = classification_metrics(te.labels, res.prob)
        mlflow.log_metrics({"best_epoch": res.best_epoch + 1, "best_val_auc": res.best_val_auc,
                            "seconds": res.seconds, "train_images_per_s": res.train_images / res.seconds,
                            **res.extra, **{f"test_{m}": v for m, v in test.items()}})
        mlflow.log_artifact(str(self.out_dir / fname), "predictions")
        mlflow.log_artifact(str(self.val_dir / fname), "val_predictions")
        model_uri = ""
        if ft.log_models:  # with the preprocessing of the arm's own model
            data = self.inputs[self.arms[job.arm].model]
            spec = preprocess_spec(data.size, data.dinfo["mean"], data.dinfo["std"], data.target.class_names,
                                   data.model_name, tta=ft.tta)
            example = data.eval_t(data.split("test").images[0])[None].numpy()
            model_uri = log_model(res.model, spec, example, self.out_dir.parent)
        entry = {"arm": job.arm, "k": job.k, "seed": job.seed, "file": fname, "run_id": mlflow.active_run().info.run_id,
                 "best_epoch": res.best_epoch + 1, "best_val_auc": res.best_val_auc, "test_auc": test["auc"],
                 "model_uri": model_uri}
        mlflow.log_dict(entry, JOB_FILE)  # last: the job is complete (`finished_jobs`)
        self.index.append(entry)
        print(f"[finetune] {job.name}: val AUC {res.best_val_auc:.3f} (epoch {res.best_epoch + 1}), "
              f"test AUC {test['auc']:.3f}, {res.seconds:.1f}s", flush=True)

    def keep(self, job: Job, entry: dict) -> None:
        """A job finished by an earlier, interrupted stage run (`finished_jobs`): its entry joins the index as it is."""
        self.index.append(entry)
        print(f"[finetune] {job.name}: kept from run {entry['run_id']} (finished before the stage was interrupted), "
              f"test AUC {entry['test_auc']:.3f}", flush=True)

    def write_index(self, jobs: list[Job]) -> None:
        """`predictions/index.json` (its runs in the order of `jobs`, however they were trained) and every CSV into
        the stage run: the full set the evaluate stage reads."""
        ft, t = self.ft, self.data.target
        self.index.sort(key=lambda r: jobs.index(Job(r["k"], r["seed"], r["arm"])))
        meta = {"class_names": t.class_names, "dataset": t.name, "source": t.source, "arms": list(self.arms),
                "shots": ft.shots, "seeds": ft.seeds, "first_seed": ft.first_seed, "runs": self.index}
        (self.out_dir / "index.json").write_text(json.dumps(meta, indent=1))
        mlflow.log_artifacts(str(self.out_dir), "predictions")
        mlflow.log_artifacts(str(self.val_dir), "val_predictions")


def trainer_tags() -> dict[str, str]:
    """Which torchrun process trained a job (`pipeline.trained_by`: rank and host), with what its figures depend on."""
    return {"pipeline.trained_by": f"rank {distributed.world()[0]} on {socket.gethostname()}", **compute_tags()}


def train_to_send(job: Job, logger: JobLogger, seed: int, speed: dict[str, Any], stage_key: str
                  ) -> tuple[JobResult, dict[str, str]]:
    """`train_job` for a torchrun rank: the result, its model on the CPU ready to travel to rank 0, and this
    process's `trainer_tags`. The job's saved progress stays until rank 0 has logged it."""
    res = train_job(logger.inputs[logger.arms[job.arm].model], logger.ft, job, logger.arms[job.arm], seed,
                    state=job_state(job, stage_key, logger.ft), **speed)
    res.model.cpu()
    return res, trainer_tags()


def log_job(trained: tuple[JobResult, dict[str, str]], logger: JobLogger, dataset: str, stage_key: str,
            parent_run_id: str) -> None:
    """A job trained under torchrun, logged into its nested run (rank 0, from `share_work`'s own thread)."""
    res, trainer = trained
    with job_run(res.job, logger.arms[res.job.arm].model, dataset, stage_key, parent_run_id, trainer):
        logger.log(res, live=False)
    job_state(res.job, stage_key, logger.ft).remove()


def run_jobs(jobs: list[Job], done: dict[Job, dict], logger: JobLogger, seed: int, speed: dict[str, Any],
             dataset: str, stage_key: str, resume: bool = True) -> bool:
    """Train every job of `jobs` not in `done` (`finished_jobs`) and log it into its nested run; keep the others.
    Under torchrun the ranks share the jobs as a queue (`distributed.share_work`: a rank takes the next job as soon
    as it is free) and rank 0 logs each job as it arrives, so a killed run keeps every job that finished; alone,
    jobs run in order with their curves logged live, epoch by epoch. `speed`: the device and speed options of
    `train_job`. A job cut off mid-way in an earlier attempt continues from its saved progress (`job_state`)
    unless `resume` is False. Returns False on ranks > 0, which only train."""
    rank, world = distributed.world()
    if rank == 0 and not resume:
        remove_job_states(stage_key)
    todo = distributed.from_main([job for job in jobs if job not in done])
    arms = logger.arms
    if world > 1:
        print(f"[finetune] rank {rank}/{world} on {speed['dev']}: takes the next of {len(todo)} runs whenever it is "
              f"free", flush=True)
        n = distributed.share_work(queue_order(todo),
                                   partial(train_to_send, logger=logger, seed=seed, speed=speed, stage_key=stage_key),
                                   partial(log_job, logger=logger, dataset=dataset, stage_key=stage_key,
                                           parent_run_id=mlflow.active_run().info.run_id))
        print(f"[finetune] rank {rank}/{world} trained {n} of {len(todo)} runs", flush=True)
        if rank > 0:
            return False
        todo = []
    for job in jobs:
        if job in done:
            logger.keep(job, done[job])
        elif job in todo:
            state = job_state(job, stage_key, logger.ft)
            with job_run(job, arms[job.arm].model, dataset, stage_key):
                logger.log(train_job(logger.inputs[arms[job.arm].model], logger.ft, job, arms[job.arm], seed,
                                     on_epoch=log_epoch, state=state, **speed), live=True)
            state.remove()
    logger.write_index(jobs)
    if stage_key:  # every job is logged: no progress left to keep
        remove_job_states(stage_key)
        note_other_job_states()
    return True


def register_best(index: list[dict], registry: str) -> dict[str, str]:
    """Register each arm's run with the best validation AUC (never test) as `<registry>-<arm>`."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient()
    out = {}
    for arm in dict.fromkeys(r["arm"] for r in index):
        best = max((r for r in index if r["arm"] == arm and r.get("model_uri")), key=lambda r: r["best_val_auc"],
                   default=None)
        if best is None:
            continue
        mv = mlflow.register_model(best["model_uri"], f"{registry}-{mlflow_key(arm)}")
        for key in ("k", "seed", "best_val_auc", "test_auc", "run_id"):
            client.set_model_version_tag(mv.name, mv.version, key, str(best[key]))
        client.set_model_version_tag(mv.name, mv.version, "arm", arm)
        out[mlflow_key(arm)] = f"models:/{mv.name}/{mv.version}"
        print(f"[finetune] registered {out[mlflow_key(arm)]} (k={best['k']}, seed={best['seed']}, "
              f"val AUC {best['best_val_auc']:.3f})", flush=True)
    return out
