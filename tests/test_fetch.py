"""`data fetch`: MedMNIST file names, MD5 checks and what is (re)downloaded, on local files. The download itself needs
a network and the medmnist package, which these machines do not have, so it is replaced here by a function that
writes the file (the code under test is the naming and the checking around it)."""
import hashlib
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.data import DataError
from pipeline.fetch import check_file, expected_md5, fetch, file_name, parse_name, size_overrides

REPO = Path(__file__).resolve().parent.parent
CONTENT = {"pneumoniamnist": b"pneu", "pathmnist": b"path", "bloodmnist": b"blood"}


def fake_info():
    info = {}
    for flag, body in CONTENT.items():
        info[flag] = {"python_class": flag, **{("MD5" if s == 28 else f"MD5_{s}"):
                                               hashlib.md5(body + str(s).encode()).hexdigest() for s in (28, 64, 128)}}
    return info


def writer(log):
    def download(flag, size, root, info):
        log.append((flag, size))
        (root / file_name(flag, size)).write_bytes(CONTENT[flag] + str(size).encode())
    return download


def test_medmnist_file_names_and_their_md5s():
    assert file_name("pathmnist", 28) == "pathmnist.npz" and file_name("pathmnist", 64) == "pathmnist_64.npz"
    assert parse_name("pathmnist_128") == ("pathmnist", 128) and parse_name("breastmnist") == ("breastmnist", 28)
    with pytest.raises(DataError, match="not a MedMNIST file name"):
        parse_name("kermany_pneumonia_64")
    with pytest.raises(DataError, match="sizes"):
        file_name("pathmnist", 96)
    info = fake_info()
    assert expected_md5(info, "pathmnist", 64) == info["pathmnist"]["MD5_64"]
    with pytest.raises(DataError, match="not a MedMNIST data set"):
        expected_md5(info, "nosuchmnist", 64)


def test_shipped_medmnist_config_names_medmnist_files():
    cfg = load_config(REPO / "configs" / "medmnist.yaml")
    flags = [parse_name(n) for n in [cfg.target.name, *cfg.data.sources]]
    assert flags[0] == ("pneumoniamnist", 64) and all(size == 64 for _, size in flags)
    assert "chestmnist" not in {f for f, _ in flags} and len(flags) == 11


def test_fetch_downloads_missing_files_keeps_good_ones_and_refuses_bad_md5(tmp_path):
    cfg = load_config(None, [f"data.root={tmp_path}", "target.name=pneumoniamnist_64",
                             "data.sources=[pathmnist_64,bloodmnist_64]"])
    (tmp_path / "pathmnist_64.npz").write_bytes(b"path64")  # already there, right MD5
    (tmp_path / "bloodmnist_64.npz").write_bytes(b"stale")  # there, wrong MD5: fetched again
    log = []
    files = fetch(cfg, 64, fake_info(), writer(log))
    assert [f.name for f in files] == ["pneumoniamnist_64.npz", "pathmnist_64.npz", "bloodmnist_64.npz"]
    assert log == [("pneumoniamnist", 64), ("bloodmnist", 64)]
    assert (tmp_path / "bloodmnist_64.npz").read_bytes() == b"blood64"
    assert fetch(cfg, 64, fake_info(), writer(log)) == files and len(log) == 2  # nothing left to fetch

    def corrupting(flag, size, root, info):
        (root / file_name(flag, size)).write_bytes(b"truncated")
    with pytest.raises(DataError, match=r"pneumoniamnist_128\.npz: MD5 .* expected"):
        fetch(cfg, 128, fake_info(), corrupting)
    assert size_overrides(cfg, 128) == ["target.name=pneumoniamnist_128", "data.sources=[pathmnist_128,bloodmnist_128]"]
    assert size_overrides(cfg, 64) == []


def test_check_file_names_the_file(tmp_path):
    f = tmp_path / "x.npz"
    with pytest.raises(DataError, match="x.npz not found"):
        check_file(f, "0" * 32)
    f.write_bytes(b"abc")
    check_file(f, hashlib.md5(b"abc").hexdigest())
