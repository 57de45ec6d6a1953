import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if os.environ.get("PIPELINE_DATA_ROOT"):  # the README's `../shared/data` is relative to the checkout; the pipeline
    # processes the tests start run in temporary folders, so they get it absolute
    os.environ["PIPELINE_DATA_ROOT"] = str(Path(os.environ["PIPELINE_DATA_ROOT"]).resolve())


def data_root() -> Path:
    return Path(os.environ.get("PIPELINE_DATA_ROOT") or REPO.parent / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def real_data() -> Path:
    root = data_root()
    if not (root / "kermany_pneumonia_64.npz").is_file():
        pytest.fail(f"real data not found under {root}; set PIPELINE_DATA_ROOT (see README)")
    return root


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh MLflow store for one test."""
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    (tmp_path / "mlruns").mkdir()
    return uri
