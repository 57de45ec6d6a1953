"""Data layer: real npz files, k-shot sampling, own folders/CSVs, and bad input with clear errors."""
import numpy as np
import pytest
from PIL import Image

from pipeline.config import load_config
from pipeline.data import (DataError, load_csv, load_folder, load_npz, load_sources, load_target, read_image,
                           sample_kshot)


def cfg_for(root, *overrides):
    return load_config(None, [f"data.root={root}", *overrides])


def test_real_target_loads(real_data):
    t = load_target(cfg_for(real_data))
    assert [len(t.splits[s]) for s in ("train", "val", "test")] == [4684, 532, 624]
    assert t.counts("test") == [234, 390]
    assert t.splits["train"].images.shape[1:] == (64, 64, 3)
    t3 = load_target(cfg_for(real_data, "target.label_key=labels3"))
    assert t3.counts("test") == [234, 242, 148]


def test_grey_28px_and_rgb_sources_become_three_channels(real_data):
    srcs = load_sources(cfg_for(real_data))
    assert {d.name for d in srcs} == {"brain_tumor_mri_64", "knee_oa_64", "busi_64", "blood_wbc_64",
                                      "lc25000_lung_64", "ham10000_derm_64", "breastmnist"}
    for d in srcs:
        im = d.splits["train"].images
        assert im.shape[-1] == 3 and im.dtype == np.uint8
    grey = next(d for d in srcs if d.name == "breastmnist").splits["train"].images
    assert np.array_equal(grey[..., 0], grey[..., 2])


def test_target_never_a_source(real_data):
    with pytest.raises(DataError, match="is the target"):
        load_sources(cfg_for(real_data, "data.sources=[busi_64,kermany_pneumonia_64]"))


def test_kshot_is_seeded_nested_and_balanced():
    labels = np.repeat([0, 1, 2], [30, 50, 40])
    a, b = sample_kshot(labels, 5, seed=3), sample_kshot(labels, 5, seed=3)
    assert np.array_equal(a, b)
    assert np.bincount(labels[a]).tolist() == [5, 5, 5]
    assert set(a) <= set(sample_kshot(labels, 10, seed=3))
    assert not np.array_equal(a, sample_kshot(labels, 5, seed=4))
    with pytest.raises(DataError, match="fewer than k=31"):
        sample_kshot(labels, 31, seed=0)


def test_missing_and_malformed_npz(tmp_path):
    with pytest.raises(DataError, match="nope.npz not found"):
        load_npz(tmp_path / "nope.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="junk.npz is not a readable npz"):
        load_npz(tmp_path / "junk.npz")
    imgs = np.zeros((4, 8, 8), np.uint8)
    np.savez(tmp_path / "nokey.npz", train_images=imgs, train_labels=np.zeros((4, 1), np.uint8))
    with pytest.raises(DataError, match="lacks key"):
        load_npz(tmp_path / "nokey.npz")
    arrays = {f"{s}_images": imgs for s in ("train", "val", "test")}
    np.savez(tmp_path / "floatlab.npz", **arrays, **{f"{s}_labels": np.zeros((4, 1), np.float32)
                                                     for s in ("train", "val", "test")})
    with pytest.raises(DataError, match="integer class ids"):
        load_npz(tmp_path / "floatlab.npz")


def _png(path, arr, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path)


def make_folder(root, n=6, classes=("normal", "pneumonia"), size=16):
    rng = np.random.default_rng(0)
    for c in classes:
        for i in range(n):
            _png(root / c / f"{i}.png", rng.integers(0, 255, (size, size), dtype=np.uint8))
    return root


def test_image_modes_are_read(tmp_path):
    rng = np.random.default_rng(0)
    a16 = (rng.integers(0, 4000, (10, 12))).astype(np.uint16)
    Image.fromarray(a16).save(tmp_path / "g16.png")
    im16 = read_image(tmp_path / "g16.png")
    assert im16.shape == (10, 12, 3) and im16.max() == 255 and im16.min() == 0
    Image.new("RGBA", (5, 7), (200, 10, 10, 255)).save(tmp_path / "rgba.png")
    assert read_image(tmp_path / "rgba.png")[0, 0].tolist() == [200, 10, 10]
    Image.new("P", (5, 5), 3).save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png").shape == (5, 5, 3)
    # EXIF orientation 6 (rotate 90 deg CW when shown): a 4x2 stored image is shown 2 wide 4 high ...
    im = Image.fromarray(np.zeros((2, 4, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(tmp_path / "o.jpg", exif=exif.tobytes())
    assert read_image(tmp_path / "o.jpg").shape[:2] == (4, 2)


def test_folder_with_and_without_splits(tmp_path):
    d = load_folder(make_folder(tmp_path / "plain", n=10), [], 0.2, 0.2, 0)
    assert d.class_names == ["normal", "pneumonia"]
    assert sum(len(d.splits[s]) for s in ("train", "val", "test")) == 20
    assert all(len(set(d.splits[s].labels)) == 2 for s in ("train", "val", "test"))
    root = tmp_path / "split"
    for s in ("train", "val", "test"):
        make_folder(root / s, n=4)
    d2 = load_folder(root, [], 0.1, 0.2, 0)
    assert [len(d2.splits[s]) for s in ("train", "val", "test")] == [8, 8, 8]


@pytest.mark.parametrize("breakage,msg", [
    ("empty_class", "holds no images"),
    ("one_class", "only one class"),
    ("corrupt", "cannot read image .*bad.png.*skip_corrupt"),
    ("small", "smaller than data.min_image_size"),
    ("missing", "not found"),
])
def test_bad_folders(tmp_path, breakage, msg):
    root = make_folder(tmp_path / "d")
    if breakage == "empty_class":
        (root / "viral").mkdir()
    elif breakage == "one_class":
        import shutil
        shutil.rmtree(root / "pneumonia")
    elif breakage == "corrupt":
        (root / "normal" / "bad.png").write_bytes(b"\x89PNG garbage")
    elif breakage == "small":
        _png(root / "normal" / "tiny.png", np.zeros((4, 4), np.uint8))
    elif breakage == "missing":
        root = tmp_path / "absent"
    with pytest.raises(DataError, match=msg):
        load_folder(root, [], 0.2, 0.2, 0)


def test_corrupt_skipped_and_non_images_ignored_with_counts(tmp_path):
    root = make_folder(tmp_path / "d")
    (root / "normal" / "bad.png").write_bytes(b"garbage")
    (root / "normal" / "notes.txt").write_text("hello")
    d = load_folder(root, [], 0.2, 0.2, 0, skip_corrupt=True)
    assert "skipped 1 unreadable image(s)" in d.notes and "ignored 1 non-image file(s)" in d.notes
    assert sum(len(d.splits[s]) for s in ("train", "val", "test")) == 12


def test_csv_groups_stay_in_one_split_and_bad_csvs(tmp_path):
    make_folder(tmp_path / "img", n=20)
    rows = ["path,label,group"] + [f"img/{c}/{i}.png,{c},p{c}{i // 2}" for c in ("normal", "pneumonia")
                                   for i in range(20)]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    d = load_csv(tmp_path / "d.csv", [], 0.2, 0.2, 0)
    where = {}
    for s in ("train", "val", "test"):
        for f in d.splits[s].files:
            c, i = f.split("/")[-2], int(f.split("/")[-1][:-4])
            where.setdefault(f"{c}{i // 2}", set()).add(s)
    assert all(len(v) == 1 for v in where.values()) and len(where) == 20
    (tmp_path / "nolabel.csv").write_text("path\nimg/normal/0.png\n")
    with pytest.raises(DataError, match=r"missing column\(s\) \['label'\]"):
        load_csv(tmp_path / "nolabel.csv", [], 0.2, 0.2, 0)
    (tmp_path / "escape.csv").write_text("path,label\n../../etc/passwd,normal\n")
    with pytest.raises(DataError, match="escapes the CSV's folder"):
        load_csv(tmp_path / "escape.csv", [], 0.2, 0.2, 0)
    with pytest.raises(DataError, match="not among the configured classes"):
        load_csv(tmp_path / "d.csv", ["normal", "covid"], 0.2, 0.2, 0)


def kermany_style_folder(root, split_of=None):
    """Kermany file names: pneumonia images carry the patient (person<N>_...), normal ones do not."""
    rng = np.random.default_rng(0)
    names = []
    for person in range(12):
        for j in range(3):
            names.append(("pneumonia", f"person{person}_bacteria_{person * 10 + j}.jpeg", person))
    names += [("normal", f"IM-{i:04d}-0001.jpeg", None) for i in range(30)]
    for cls, name, person in names:
        split = split_of(person, name) if split_of else None
        p = root / (split or "") / cls / name
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(p)


def test_group_pattern_keeps_each_patient_in_one_split(tmp_path):
    kermany_style_folder(tmp_path / "x")
    data = load_folder(tmp_path / "x", [], 0.2, 0.3, 0, group_pattern=r"person(\d+)_")
    where = {}
    for split in ("train", "val", "test"):
        for f in data.splits[split].files:
            if "person" in f:
                where.setdefault(f.split("person")[1].split("_")[0], set()).add(split)
    assert len(where) == 12 and all(len(v) == 1 for v in where.values())
    assert len({next(iter(v)) for v in where.values()}) == 3  # patients do land in every split
    assert any("12 patients" in n and "30 file(s) match no pattern" in n for n in data.notes)
    # without the pattern the same folder splits one patient's images across splits (so the test can fail)
    plain = load_folder(tmp_path / "x", [], 0.2, 0.3, 0)
    spread = {}
    for split in ("train", "val", "test"):
        for f in plain.splits[split].files:
            if "person" in f:
                spread.setdefault(f.split("person")[1].split("_")[0], set()).add(split)
    assert any(len(v) > 1 for v in spread.values())


def test_data_check_reports_patients_across_given_split_folders(tmp_path):
    def split_of(person, name):  # person 3 has an image in train and one in test
        if person == 3 and name.endswith("_31.jpeg"):
            return "test"
        return "test" if person is not None and person >= 9 else ("test" if "IM-002" in name else "train")
    kermany_style_folder(tmp_path / "x", split_of)
    data = load_folder(tmp_path / "x", [], 0.2, 0.3, 0, group_pattern=r"person(\d+)_")
    leak = [n for n in data.notes if n.startswith("LEAK")]
    assert len(leak) == 1 and "1 patient(s)" in leak[0] and "3 in train+test" in leak[0]


@pytest.mark.parametrize("pattern,msg", [("person(", "is not a regular expression"), (r"person\d+", "has no group")])
def test_bad_group_pattern_is_a_config_error(pattern, msg):
    from pipeline.config import ConfigError
    with pytest.raises(ConfigError, match=msg):
        load_config(None, [f"target.group_pattern={pattern}"])
