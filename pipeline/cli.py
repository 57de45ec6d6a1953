"""Command line: `python -m pipeline run|data check|ui`."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from .config import ConfigError, PipelineConfig, load_config

EXAMPLES = """examples:
  python -m pipeline run --stage all                         # the default experiment
  python -m pipeline run --stage all --config configs/smoke.yaml
  python -m pipeline run --stage finetune,evaluate --set finetune.shots=[10,20] --set finetune.seeds=3
  python -m pipeline run --stage meta --set meta.algorithm=maml --set meta.iterations=500
  python -m pipeline data check --set target.path=/path/to/my_xrays
  python -m pipeline data fetch --size 64                    # MedMNIST files of configs/medmnist.yaml (network)
  python -m pipeline ui --port 5000
"""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE", help="YAML config (default: built-in defaults = "
                   "configs/default.yaml)")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. meta.iterations=100 or finetune.shots=[5,20]; repeatable")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Few-shot medical image classification: ImageNet transfer plus meta-learning (MAML, "
                    "first-order MAML, ANIL, Reptile, Meta-SGD, ProtoNet; a supervised multitask control), every stage "
                    "tracked in MLflow.",
        epilog=EXAMPLES)
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="debug logging, with MLflow's progress bars and INFO lines (hidden otherwise)")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="run pipeline stages", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run stages in order: backbone -> meta -> finetune -> evaluate. With more than "
                                   "one stage, a parent MLflow run holds one nested run per stage. Finished "
                                   "stages with the same config, code version and upstream runs are reused.")
    r.add_argument("--stage", default="all", metavar="STAGES",
                   help="'all' or a comma list of backbone,meta,finetune,evaluate (default: all)")
    _add_config_args(r)
    r.add_argument("--force", action="store_true", help="recompute the named stages even if a finished run matches")
    r.add_argument("--resume", dest="resume", action="store_true", default=True,
                   help="continue an interrupted meta run from its last checkpoint (the default)")
    r.add_argument("--no-resume", dest="resume", action="store_false", help="start meta-training afresh")

    d = sub.add_parser("data", help="inspect data sets")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    chk = dsub.add_parser("check", help="validate the configured target and source data sets and print a table")
    _add_config_args(chk)
    fe = dsub.add_parser("fetch", help="download the MedMNIST files a config names (needs a network and the "
                                       "medmnist package), MD5-checked, into the data root")
    fe.add_argument("--size", type=int, default=64, choices=[28, 64, 128, 224], help="image size (default 64)")
    fe.add_argument("--config", "-c", metavar="FILE", default=str(Path(__file__).resolve().parent.parent / "configs"
                                                                  / "medmnist.yaml"),
                    help="config naming the files (default: configs/medmnist.yaml)")
    fe.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. data.root=/data/medmnist")

    pr = sub.add_parser("predict", help="class probabilities for images from a logged or registered model")
    pr.add_argument("--model", required=True, metavar="URI",
                    help="models:/<name>/<version>, models:/<name>@<alias>, runs:/<run_id>/model or a local path")
    pr.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER")

    u = sub.add_parser("ui", help="start the MLflow UI on the project's store")
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--port", type=int, default=5000)
    return ap


# MLflow warnings that every logged model repeats, known and intended here: whole-model pickles, a Python pyfunc
_MLFLOW_REPEATS = {"mlflow.pytorch": "Saving pytorch model by Pickle", "mlflow.pyfunc": "Passing a Python object as"}


def quiet_mlflow() -> None:
    """Keep the console to the stages' own lines and the results: no artifact progress bars, no MLflow INFO lines
    (system-metrics start/stop, signature inference), not the warnings each logged model repeats. Set before
    MLflow is imported (it reads MLFLOW_LOGGING_LEVEL then); `-v`, or either variable set by the user, keeps them."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for name, prefix in _MLFLOW_REPEATS.items():
        logging.getLogger(name).addFilter(lambda record, p=prefix: not str(record.msg).startswith(p))


def _sigterm(signum, frame):  # SIGTERM ends runs as KILLED, like Ctrl-C
    raise KeyboardInterrupt(f"signal {signum}")


def cmd_run(args: argparse.Namespace) -> int:
    from .orchestrate import parse_stages, run_pipeline

    cfg = load_config(args.config, args.overrides)
    outputs = run_pipeline(cfg, parse_stages(args.stage), force=args.force, resume=args.resume)
    for stage, out in outputs.items():
        print(f"{stage}: run {out['run_id']}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.data_command == "fetch":
        from .fetch import fetch, size_overrides
        files = fetch(cfg, args.size)
        sets = " ".join(f"--set '{o}'" for o in size_overrides(cfg, args.size))
        run = f"python -m pipeline run --stage all --config {args.config} {sets}".rstrip()
        print(f"{len(files)} files ready; run: {run}")
        return 0
    from .datacheck import check_all
    return check_all(cfg)


def cmd_predict(args: argparse.Namespace) -> int:
    import mlflow

    from .predict import expand_inputs, load_predictor
    from .tracking import default_tracking_uri

    mlflow.set_tracking_uri(default_tracking_uri())
    files = expand_inputs(args.images)
    predict, note = load_predictor(args.model)
    df = predict(files)
    print(f"# {args.model}: {note}", file=sys.stderr)
    print(",".join(["image", *df.columns]))
    for f, row in zip(files, df.itertuples(index=False)):
        *probs, predicted = row
        print(",".join([str(f), *[f"{v:.4f}" for v in probs], str(predicted)]))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from .tracking import default_tracking_uri

    uri = default_tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    print(f"MLflow UI on http://{args.host}:{args.port} (store {uri}); Ctrl-C stops it", flush=True)
    return subprocess.call([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                            "--host", args.host, "--port", str(args.port)])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        quiet_mlflow()
    signal.signal(signal.SIGTERM, _sigterm)
    from .backbone import WeightsError
    from .data import DataError
    from .orchestrate import PipelineError

    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "data":
            return cmd_data(args)
        if args.command == "predict":
            return cmd_predict(args)
        if args.command == "ui":
            return cmd_ui(args)
    except (ConfigError, DataError, WeightsError, PipelineError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the MLflow run was ended as KILLED", file=sys.stderr)
        return 130
    return 1


__all__ = ["main", "build_parser", "PipelineConfig"]
