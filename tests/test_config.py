from pathlib import Path

import pytest
import yaml

from pipeline.config import (ConfigError, PipelineConfig, load_config, parse_arm, parse_ensemble, parse_merge_run,
                             parse_override, tagged_arm)

REPO = Path(__file__).resolve().parent.parent


def test_default_yaml_is_the_builtin_default():
    assert yaml.safe_load((REPO / "configs/default.yaml").read_text()) == PipelineConfig().to_dict()


@pytest.mark.parametrize("name", ["default", "smoke", "gpu", "selftrain", "medmnist", "cpu_results", "best"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert isinstance(cfg, PipelineConfig)


def test_overrides_are_typed():
    cfg = load_config(None, ["meta.iterations=7", "finetune.shots=[5,20]", "meta.inner_lr=1",
                             "finetune.augment=false", "finetune.seeds=3"])
    assert cfg.meta.iterations == 7 and cfg.finetune.shots == [5, 20]
    assert isinstance(cfg.meta.inner_lr, float) and cfg.meta.inner_lr == 1.0
    assert cfg.finetune.augment is False
    assert load_config(None, ["finetune.shots=20"]).finetune.shots == [20]


@pytest.mark.parametrize("override,msg", [
    ("meta.iteratons=5", "unknown config key 'meta.iteratons'"),
    ("nosuch.x=1", "unknown config key 'nosuch'"),
    ("meta.iterations=ten", "config key 'meta.iterations'"),
    ("finetune.augment=3", "expected true/false"),
    ("finetune.shots=[5,x]", "finetune.shots[1]"),
    ("meta.algorithm=prototypical", "is not one of"),
    ("meta=3", "is a section"),
    ("novalue", "key=value"),
    ("finetune.arms=[transfer,imagenet21k]", "unknown arm"),
    ("finetune.image_size=-1", "finetune.image_size' must be >= 0"),
    ("finetune.label_smoothing=-0.1", "finetune.label_smoothing' must be in [0, 1"),
    ("finetune.pseudo_per_class=-1", "finetune.pseudo_per_class' must be >= 0"),
    ("finetune.pseudo_rounds=0", "finetune.pseudo_rounds' must be >= 1"),
    ("finetune.pseudo_augment=randaugment", "finetune.pseudo_augment': 'randaugment' is not one of"),
    ("finetune.first_seed=-1", "finetune.first_seed' must be >= 0"),
    ("finetune.arms=[transfer.r0]", "unknown arm 'transfer.r0'"),
    ("finetune.arms=[transfer.rx]", "unknown arm 'transfer.rx'"),
    ("finetune.arms=[transfer,transfer]", "names an arm twice"),
    ("evaluate.ensembles=[pair=transfer]", "at least two different arms"),
    ("evaluate.ensembles=[transfer+meta-reptile]", "is not 'name=arm"),
    ("evaluate.ensembles=[ensemble=transfer+meta-reptile]", "repeat"),
    ("evaluate.merge_runs=[lite.2=abc]", "'<tag>=<run id>'"),
    ("evaluate.merge_runs=[2lite=abc]", "'<tag>=<run id>'"),
    ("evaluate.merge_runs=[lite2=]", "'<tag>=<run id>'"),
    ("meta.head_init=prototypes", "meta.head_init': 'prototypes' is not one of"),
    ("meta.reptile_outer=rmsprop", "meta.reptile_outer': 'rmsprop' is not one of"),
    ("meta.outer_lr=fast", "meta.outer_lr': 'fast' is neither a number nor 'auto'"),
    ("meta.outer_lr=0", "meta.outer_lr' must be > 0"),
])
def test_bad_overrides_are_clear_errors(override, msg):
    with pytest.raises(ConfigError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, [override])


def test_unknown_key_in_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("meta:\n  algoritm: maml\n")
    with pytest.raises(ConfigError, match="meta.algoritm"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_parse_override_nesting_and_hash_changes():
    assert parse_override("a.b.c=1") == {"a": {"b": {"c": 1}}}
    assert PipelineConfig().hash() != load_config(None, ["seed=1"]).hash()


def test_replica_arms_and_named_ensembles_parse():
    cfg = load_config(None, ["finetune.arms=[transfer,transfer.r1,meta.r2]",
                             "evaluate.ensembles=[ensemble-2transfer=transfer+transfer.r1]"])
    assert [parse_arm(a) for a in cfg.finetune.arms] == [("transfer", 0, ""), ("transfer", 1, ""), ("meta", 2, "")]
    assert parse_ensemble(cfg.evaluate.ensembles[0]) == ("ensemble-2transfer", ["transfer", "transfer.r1"])


def test_arms_on_other_backbones_parse_and_name_every_model_once():
    from pipeline.config import backbone_models
    cfg = load_config(None, ["finetune.arms=[transfer,transfer@tf_efficientnet_lite2,scratch@resnet50.a1_in1k.r1,"
                             "transfer@tf_efficientnet_lite2.r1,meta]"])
    assert [parse_arm(a) for a in cfg.finetune.arms] == [
        ("transfer", 0, ""), ("transfer", 0, "tf_efficientnet_lite2"), ("scratch", 1, "resnet50.a1_in1k"),
        ("transfer", 1, "tf_efficientnet_lite2"), ("meta", 0, "")]
    assert backbone_models(cfg) == ["tf_efficientnet_lite0", "tf_efficientnet_lite2", "resnet50.a1_in1k"]


@pytest.mark.parametrize("arm,says", [("transfer@tf_efficientnet_lite0", "write 'transfer'"),
                                      ("meta@tf_efficientnet_lite2", "finetune.meta_from_runs"),
                                      ("transfer@", "unknown arm"), ("transfer@lite2.r0", "unknown arm")])
def test_bad_backbone_arms_are_clear_errors(arm, says):
    with pytest.raises(ConfigError, match="finetune.arms") as e:
        load_config(None, [f"finetune.arms=[{arm}]"])
    assert says in str(e.value)


def test_another_backbone_arm_rebuilds_the_backbone_run_but_not_meta_training():
    """The backbone stage's key names every model it builds; meta's key takes the primary body's weights (sha256),
    so adding `transfer@<model>` (a new backbone run) leaves a finished meta run reusable."""
    from pipeline.orchestrate import stage_key, upstream_ids
    base = load_config(None, [])
    more = load_config(None, ["finetune.arms=[transfer,transfer@tf_efficientnet_lite2,meta]"])
    assert stage_key("backbone", base, {}, "c") != stage_key("backbone", more, {}, "c")
    fewer = load_config(None, ["finetune.arms=[transfer]"])
    assert stage_key("backbone", base, {}, "c") == stage_key("backbone", fewer, {}, "c")
    run_a = {"run_id": "a", "checkpoint_sha256": "f00"}
    run_b = {"run_id": "b", "checkpoint_sha256": "f00"}
    assert upstream_ids("meta", {"backbone": run_a}) == upstream_ids("meta", {"backbone": run_b})
    assert upstream_ids("finetune", {"backbone": run_a}) != upstream_ids("finetune", {"backbone": run_b})
    assert upstream_ids("meta", {"backbone": {"run_id": "a"}}) == {"backbone": "a"}  # runs from before the sha


def test_merge_runs_take_an_optional_tag():
    cfg = load_config(None, ["evaluate.merge_runs=[abc123,lite2=def456]"])
    assert [parse_merge_run(m) for m in cfg.evaluate.merge_runs] == [("", "abc123"), ("lite2", "def456")]
    assert tagged_arm("lite2", "meta-reptile") == "lite2.meta-reptile" and tagged_arm("", "transfer") == "transfer"


def test_cudnn_benchmark_switch_reaches_cudnn():
    """`cudnn_benchmark` is a typed key and `configure` applies it for CUDA devices (flags only, no GPU needed)."""
    import torch

    from pipeline.device import configure
    assert load_config(None, ["cudnn_benchmark=false"]).cudnn_benchmark is False
    before = torch.backends.cudnn.benchmark
    try:
        configure(torch.device("cuda"), cudnn_benchmark=False)
        assert torch.backends.cudnn.benchmark is False
        configure(torch.device("cuda"), cudnn_benchmark=True)
        assert torch.backends.cudnn.benchmark is True
        torch.backends.cudnn.benchmark = False
        configure(torch.device("cpu"), cudnn_benchmark=True)  # CPU leaves cuDNN alone
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = before


def test_code_version_ignores_docstrings_and_comments_but_not_code():
    from pipeline.tracking import _code_ast
    src = 'def f(x):\n    """Add one."""\n    return x + 1  # why\n'
    edited_docs = '"""A module."""\n\n\ndef f(x):\n    """Add one to x, documented at length."""\n    # a new comment\n    return x + 1\n'
    assert _code_ast(src) == _code_ast(edited_docs)
    assert _code_ast(src) != _code_ast(src.replace("x + 1", "x + 2"))
    assert _code_ast(src) != _code_ast(src.replace("def f", "def g"))


def test_speed_only_settings_leave_the_reuse_key_and_others_change_it():
    from pipeline.config import speed_only_keys
    from pipeline.orchestrate import stage_key
    assert {"meta.batched", "meta.unroll", "meta.compile", "num_workers", "device"} <= speed_only_keys()
    base = load_config(None, [])
    key = stage_key("meta", base, {"backbone": "abc"}, "code")
    fast = load_config(None, ["meta.batched=true", "meta.unroll=true", "meta.compile=true", "num_workers=2",
                              "channels_last=off"])
    assert stage_key("meta", fast, {"backbone": "abc"}, "code") == key
    for other in (["meta.iterations=7"], ["meta.algorithm=maml"], ["seed=1"]):
        assert stage_key("meta", load_config(None, other), {"backbone": "abc"}, "code") != key, other
    assert stage_key("meta", base, {"backbone": "abd"}, "code") != key
    assert stage_key("meta", base, {"backbone": "abc"}, "code2") != key


@pytest.mark.parametrize("text,value", [("on", "on"), ("off", "off"), ("auto", "auto")])
def test_channels_last_on_off_survive_yaml(text, value):
    assert load_config(None, [f"channels_last={text}"]).channels_last == value


def test_configuration_reference_is_current_and_documents_every_key():
    """docs/configuration.md is what `python -m pipeline.config_docs` writes (regenerate it after changing the
    config); every key of every section is in it."""
    from pipeline.config import PipelineConfig
    from pipeline.config_docs import DOC, render
    from pipeline.tracking import flatten
    text = render()
    assert DOC.read_text() == text, "docs/configuration.md is stale: run `python -m pipeline.config_docs`"
    for key in flatten(PipelineConfig().to_dict()):
        assert f"| `{key}` |" in text, key


def test_shots_all_is_every_train_label():
    """`finetune.shots: [all]` is k=0, the full-label reference: every train index, and no self-training (nothing
    is left unlabelled)."""
    import numpy as np

    from pipeline.data import sample_kshot
    assert load_config(None, ["finetune.shots=[20,all]"]).finetune.shots == [20, 0]
    assert load_config(None, ["finetune.shots=all"]).finetune.shots == [0]
    labels = np.array([0, 1, 1, 0, 1, 1, 1])
    assert sample_kshot(labels, 0, seed=3).tolist() == list(range(7))
    with pytest.raises(ConfigError, match="finetune.shots"):
        load_config(None, ["finetune.shots=[all,all]"])


def test_meta_compile_auto_compiles_long_cpu_runs_when_a_compiler_is_there(tmp_path, monkeypatch):
    """`meta.compile: auto`: on for CPU runs of >= 50 iterations with a C++ compiler on PATH, off for short runs, on
    GPUs (not measured there) and without a compiler; on/off (and YAML true/false) as said."""
    import torch

    from pipeline.device import use_compile
    cpu = torch.device("cpu")
    assert load_config(None, ["meta.compile=true"]).meta.compile == "on"
    assert load_config(None, []).meta.compile == "auto"
    with pytest.raises(ConfigError, match="meta.compile"):
        load_config(None, ["meta.compile=fast"])
    assert use_compile("on", 1, cpu) and not use_compile("off", 10**6, cpu)
    assert not use_compile("auto", 300, torch.device("cuda"))
    fake = tmp_path / "bin"
    fake.mkdir()
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(fake))  # no compiler anywhere on PATH
    assert not use_compile("auto", 300, cpu)
    (fake / "c++").write_text("#!/bin/sh\n")
    (fake / "c++").chmod(0o755)
    assert use_compile("auto", 300, cpu) and use_compile("auto", 50, cpu) and not use_compile("auto", 49, cpu)


def test_meta_prototype_head_needs_an_inner_loop_algorithm():
    assert load_config(None, ["meta.head_init=prototype"]).meta.head_init == "prototype"  # reptile, the default
    with pytest.raises(ConfigError, match="meta.head_init.*'protonet' has no such loop"):
        load_config(None, ["meta.head_init=prototype", "meta.algorithm=protonet"])
    # the default, auto: the prototype head for reptile only, so every algorithm runs with the defaults
    resolved = {a: load_config(None, [f"meta.algorithm={a}"]).meta.resolved_head_init()
                for a in ("reptile", "anil", "maml", "protonet", "multitask")}
    assert resolved == {"reptile": "prototype", "anil": "default", "maml": "default", "protonet": "default",
                        "multitask": "default"}
    assert load_config(None, ["meta.head_init=default"]).meta.resolved_head_init() == "default"


def test_meta_outer_lr_auto_is_per_algorithm_and_a_number_wins():
    # auto: ProtoNet's higher rate (experiment 21), 0.001 for every other algorithm
    resolved = {a: load_config(None, [f"meta.algorithm={a}"]).meta.resolved_outer_lr()
                for a in ("reptile", "anil", "maml", "protonet", "multitask")}
    assert resolved == {"reptile": 1e-3, "anil": 1e-3, "maml": 1e-3, "protonet": 3e-3, "multitask": 1e-3}
    for a in ("protonet", "anil"):
        assert load_config(None, [f"meta.algorithm={a}", "meta.outer_lr=0.0005"]).meta.resolved_outer_lr() == 5e-4
    assert load_config(None, ["meta.outer_lr=1"]).meta.resolved_outer_lr() == 1.0  # an integer is a rate too
