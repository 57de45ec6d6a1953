"""Runs stages in order as MLflow runs; stages hand each other run ids and artifact URIs, never objects.

A stage is reused when a FINISHED run with the same stage key exists: the key hashes the config sections the
stage depends on, the code version and the upstream run ids.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
from contextlib import nullcontext
from typing import Any

import mlflow
import torch

from . import distributed
from .device import resolve_device
from .config import PipelineConfig, backbone_models, parse_arm, parse_merge_run, speed_only_keys
from .preflight import check_inputs
from .scratch import clean_scratch
from .tracking import (close_dead_runs, code_version, find_finished_run, git_commit, log_config, main_client,
                       main_store_uri, run_outputs, setup_tracking, tracked_run)

log = logging.getLogger(__name__)

STAGES = ("backbone", "meta", "finetune", "evaluate")
MAIN_ONLY = ("backbone", "evaluate")  # under torchrun, rank 0 alone runs these (all ranks join meta and finetune)
# Config sections each stage's result depends on (speed-only settings are left out, `speed_only_keys`).
SECTIONS = {
    "backbone": ("backbone", "data"),
    "meta": ("data", "target", "meta", "seed"),
    "finetune": ("data", "target", "finetune", "seed"),
    "evaluate": ("evaluate",),
}


class PipelineError(RuntimeError):
    """A stage cannot run (e.g. its upstream run is missing)."""


def parse_stages(text: str) -> list[str]:
    names = list(STAGES) if text.strip() == "all" else [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in STAGES]
    if bad or not names:
        raise PipelineError(f"unknown stage(s) {bad or text!r}; use 'all' or a comma list of {', '.join(STAGES)}")
    return sorted(set(names), key=STAGES.index)


def upstream_of(stage: str, cfg: PipelineConfig) -> list[str]:
    if stage == "meta":
        return ["backbone"]
    if stage == "finetune":
        return ["backbone", "meta"] if any(parse_arm(a)[0] == "meta" for a in cfg.finetune.arms) else ["backbone"]
    if stage == "evaluate":
        return ["finetune"]
    return []


def explicit_upstream(stage: str, up: str, cfg: PipelineConfig) -> str:
    return {("meta", "backbone"): cfg.meta.from_run, ("finetune", "meta"): cfg.finetune.from_run,
            ("finetune", "backbone"): cfg.finetune.backbone_run,
            ("evaluate", "finetune"): cfg.evaluate.from_run}.get((stage, up), "")


def stage_key(stage: str, cfg: PipelineConfig, upstream_ids: dict[str, str], code: str) -> str:
    """Hash of what a stage's result depends on: its config sections without the speed-only settings, the code
    version and the upstream runs."""
    d = cfg.to_dict()
    for key in speed_only_keys():
        section, _, name = key.rpartition(".")
        (d[section] if section else d).pop(name, None)
    payload = {"stage": stage, "config": {s: d[s] for s in SECTIONS[stage]}, "code": code,
               "upstream": dict(sorted(upstream_ids.items()))}
    if stage == "backbone" and len(backbone_models(cfg)) > 1:  # the other bodies the arms name
        payload["models"] = backbone_models(cfg)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def upstream_ids(stage: str, inputs: dict[str, dict[str, str]]) -> dict[str, str]:
    """What a stage's key takes of each upstream run: its run id, except that meta-training depends on the weights
    of `backbone.model` alone (their sha256), so adding an arm on another backbone does not redo meta-training."""
    out = {}
    for up, o in inputs.items():
        sha = o.get("checkpoint_sha256") if (stage, up) == ("meta", "backbone") else None
        out[up] = f"sha256:{sha}" if sha else o["run_id"]
    return out


def load_stage_run(rid: str, stage: str, named_by: str) -> dict[str, str]:
    """Outputs of run `rid`, which must be a finished `stage` run; `named_by` (who asked for it) leads errors."""
    try:
        run = main_client().get_run(rid)
    except Exception as e:
        raise PipelineError(f"{named_by}: {stage} run {rid} not found in the store ({e}); name a finished {stage} "
                            f"run id") from e
    if run.info.status != "FINISHED" or run.data.tags.get("pipeline.stage") != stage:
        raise PipelineError(f"{named_by}: run {rid} is not a finished '{stage}' run")
    return run_outputs(run)


class Runner:
    def __init__(self, cfg: PipelineConfig, force: bool = False, resume: bool = True):
        self.cfg, self.force, self.resume = cfg, force, resume
        self.exp_id = setup_tracking(cfg.experiment)
        if distributed.is_main():  # runs left RUNNING by processes that were killed outright (SIGKILL, OOM)
            for rid in close_dead_runs():
                print(f"[pipeline] marked run {rid} KILLED: its process no longer exists", flush=True)
        self.code = code_version()
        self.outputs: dict[str, dict[str, str]] = {}

    def find(self, stage: str) -> dict[str, str]:
        """Outputs of the latest finished run of `stage` that matches the current config (recursively)."""
        if stage in self.outputs:
            return self.outputs[stage]
        ups = {u: self.resolve(stage, u) for u in upstream_of(stage, self.cfg)}
        key = stage_key(stage, self.cfg, upstream_ids(stage, ups), self.code)
        run = find_finished_run(self.exp_id, stage, key)
        if run is None:
            raise PipelineError(
                f"no finished '{stage}' run matches this config and code version in experiment "
                f"'{self.cfg.experiment}'; run `--stage {stage}` first, or name a run explicitly "
                f"(meta.from_run, finetune.backbone_run, finetune.from_run, evaluate.from_run)")
        self.outputs[stage] = run_outputs(run)
        return self.outputs[stage]

    def resolve(self, stage: str, up: str) -> dict[str, str]:
        rid = explicit_upstream(stage, up, self.cfg)
        return load_stage_run(rid, up, stage) if rid else self.find(up)

    def run(self, stages: list[str]) -> dict[str, dict[str, str]]:
        rank, world = distributed.world()
        if world > 1:  # torchrun: every rank joins meta and finetune; rank 0 alone runs backbone and evaluate
            if "meta" in stages and self.cfg.meta.meta_batch < world:
                raise PipelineError(f"meta.meta_batch={self.cfg.meta.meta_batch} is smaller than the {world} torchrun "
                                    f"processes, and every process needs a task of each meta-batch; raise "
                                    f"meta.meta_batch or start fewer processes")
            distributed.watch_launcher()
            distributed.init(distributed.local_device(resolve_device(self.cfg.device)))
            if rank > 0:  # read the project's store, write to a private one
                side = distributed.side_store()
                mlflow.set_tracking_uri(f"sqlite:///{side / 'mlflow.db'}")
                # set_tracking_uri also exports the side store as $MLFLOW_TRACKING_URI; a later run_pipeline in this
                # process (benchmarks chain several) must still find the project's store there
                os.environ["MLFLOW_TRACKING_URI"] = main_store_uri()
                mlflow.set_experiment(experiment_id=mlflow.create_experiment(
                    self.cfg.experiment, artifact_location=(side / "artifacts").as_uri()))
        multi = len(stages) > 1
        tags = {"pipeline.code_version": self.code, "mlflow.source.git.commit": git_commit(),
                "pipeline.config_hash": self.cfg.hash()}
        parent = tracked_run("pipeline", {**tags, "pipeline.stage": "pipeline",
                                          "pipeline.stages": ",".join(stages)}) if multi else nullcontext()
        with parent as prun:
            if multi:
                log_config(self.cfg.to_dict())
            for stage in stages:
                if rank == 0 or stage not in MAIN_ONLY:
                    self._run_stage(stage, tags, nested=multi, parent_id=prun.info.run_id if multi else None)
                # every rank goes on with rank 0's run ids, so stage keys and upstream runs agree
                self.outputs[stage] = distributed.from_main(self.outputs.get(stage))
        return self.outputs

    def _run_stage(self, stage: str, tags: dict[str, str], nested: bool, parent_id: str | None) -> None:
        inputs: dict[str, Any] = {u: self.resolve(stage, u) for u in upstream_of(stage, self.cfg)}
        key = stage_key(stage, self.cfg, upstream_ids(stage, inputs), self.code)
        if not self.force:
            prev = find_finished_run(self.exp_id, stage, key) if distributed.is_main() else None
            if stage not in MAIN_ONLY:  # every rank reuses, or none (rank 0 alone runs the others)
                prev = distributed.from_main(prev)
            if prev is not None:
                print(f"[{stage}] reusing finished run {prev.info.run_id} (same config, code and upstream runs; "
                      f"--force recomputes)", flush=True)
                self.outputs[stage] = run_outputs(prev)
                if nested:
                    mlflow.set_tag(f"reused.{stage}", prev.info.run_id)
                return
        if stage == "evaluate":  # further finetune runs scored with the upstream one, checked before any run starts
            inputs["merge"] = [{**load_stage_run(rid, "finetune", "evaluate.merge_runs"), "tag": tag}
                               for tag, rid in map(parse_merge_run, self.cfg.evaluate.merge_runs)]
        inputs["parent_run_id"] = parent_id
        inputs["resume"] = self.resume
        stage_tags = {**tags, "pipeline.stage": stage, "pipeline.stage_key": key,
                      **{f"pipeline.upstream.{u}": o["run_id"] for u, o in inputs.items() if isinstance(o, dict)}}
        module = importlib.import_module(f"stages.{stage}")
        print(f"[{stage}] starting", flush=True)
        with tracked_run(stage, stage_tags, nested=nested) as run:
            log_config(self.cfg.to_dict())
            if torch.cuda.is_initialized():  # else the stage starts CUDA itself and the peak starts at zero
                torch.cuda.reset_peak_memory_stats()
            out = module.run(self.cfg, inputs) or {}
            if torch.cuda.is_initialized():
                mlflow.log_metric("peak_gpu_memory_mib", torch.cuda.max_memory_allocated() / 2**20)
            mlflow.set_tags({f"out.{k}": v for k, v in out.items()})
        self.outputs[stage] = {**out, "run_id": run.info.run_id}
        print(f"[{stage}] finished run {run.info.run_id}", flush=True)


def run_pipeline(cfg: PipelineConfig, stages: list[str], force: bool = False, resume: bool = True
                 ) -> dict[str, dict[str, str]]:
    """Run `stages` (in pipeline order); returns each stage's outputs (run_id plus artifact URIs)."""
    try:
        check_inputs(cfg, stages)  # bad input stops here, before any stage spends time or a run is opened
        return Runner(cfg, force, resume).run(stages)
    finally:
        clean_scratch()  # outputs are run ids and artifact URIs, never scratch paths
