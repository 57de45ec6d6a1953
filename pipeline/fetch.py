"""`python -m pipeline data fetch`: download the official MedMNIST files a config names, with the `medmnist` package,
into the data root, and check their MD5s against medmnist's own table (`medmnist.INFO`).

`configs/medmnist.yaml` names PneumoniaMNIST as the target and MedMNIST's other single-label 2-D sets as the source
pool. Names follow medmnist's files: `<flag>.npz` at 28 px, `<flag>_<size>.npz` at 64, 128 and 224 px.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Callable

from .config import PipelineConfig
from .data import DataError, resolve_data_root

SIZES = (28, 64, 128, 224)
NAME_RE = re.compile(r"^([a-z0-9]+mnist)(?:_(64|128|224))?$")


def file_name(flag: str, size: int) -> str:
    """medmnist's file for `flag` at `size` px: 'pneumoniamnist.npz' (28), 'pneumoniamnist_64.npz', ..."""
    if size not in SIZES:
        raise DataError(f"MedMNIST comes in sizes {SIZES}, not {size}")
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def parse_name(name: str) -> tuple[str, int]:
    """A config's data set name -> (medmnist flag, size): 'pathmnist_64' -> ('pathmnist', 64)."""
    m = NAME_RE.match(name)
    if not m:
        raise DataError(f"{name!r} is not a MedMNIST file name (<flag> or <flag>_<64|128|224>, e.g. pathmnist_64)")
    return m.group(1), int(m.group(2) or 28)


def expected_md5(info: dict, flag: str, size: int) -> str:
    """The MD5 medmnist publishes for `flag` at `size` px."""
    if flag not in info:
        raise DataError(f"{flag!r} is not a MedMNIST data set; known: {', '.join(sorted(info))}")
    return info[flag]["MD5" if size == 28 else f"MD5_{size}"]


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_file(path: Path, md5: str) -> None:
    """Raise a DataError naming the file unless it exists with MD5 `md5`."""
    if not path.is_file():
        raise DataError(f"{path} not found after the download")
    got = md5sum(path)
    if got != md5:
        raise DataError(f"{path}: MD5 {got}, expected {md5} (medmnist.INFO); delete it and fetch again")


def medmnist_download(flag: str, size: int, root: Path, info: dict) -> None:
    """Download one MedMNIST file with the `medmnist` package (needs a network)."""
    import medmnist
    getattr(medmnist, info[flag]["python_class"])(split="train", download=True, size=size, root=str(root))


def fetch(cfg: PipelineConfig, size: int, info: dict | None = None,
          download: Callable[[str, int, Path, dict], None] | None = None) -> list[Path]:
    """Every MedMNIST file the config's target and sources name, at `size` px, in the data root; files already there
    with the right MD5 are kept, others (re)downloaded and checked. Returns the files."""
    if info is None or download is None:
        try:
            import medmnist
        except ImportError as e:
            raise DataError("data fetch needs the medmnist package: pip install medmnist") from e
        info, download = info or medmnist.INFO, download or medmnist_download
    root = resolve_data_root(cfg.data.root)
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for name in [cfg.target.name, *cfg.data.sources]:
        flag, _ = parse_name(name)
        path, md5 = root / file_name(flag, size), expected_md5(info, flag, size)
        if path.is_file() and md5sum(path) == md5:
            print(f"{path}: present, MD5 ok")
        else:
            path.unlink(missing_ok=True)
            print(f"{path}: downloading {flag} at {size} px", flush=True)
            download(flag, size, root, info)
            check_file(path, md5)
            print(f"{path}: MD5 ok")
        out.append(path)
    return out


def size_overrides(cfg: PipelineConfig, size: int) -> list[str]:
    """The `--set`s that point the config at the files of another size than the names it holds."""
    names = [cfg.target.name, *cfg.data.sources]
    if all(parse_name(n)[1] == size for n in names):
        return []
    stem = lambda n: file_name(parse_name(n)[0], size)[:-4]  # noqa: E731
    sources = ",".join(stem(n) for n in cfg.data.sources)
    return [f"target.name={stem(cfg.target.name)}", f"data.sources=[{sources}]"]
