import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from moco_engine.config.loading import from_dict, load_config, to_dict, to_yaml
from moco_engine.config.schema import Config, ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_yaml_and_overrides_merge_in_order(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("optim:\n  lr: 0.5\nqueue:\n  size: 100\n")
    cfg = load_config([str(f)], ["queue.size=8192", "loss.symmetric=true"])
    assert cfg.optim.lr == 0.5  # from the file
    assert cfg.queue.size == 8192  # the override wins over the file
    assert cfg.loss.symmetric is True
    assert cfg.model.momentum == Config().model.momentum  # untouched default


def test_the_keys_users_type_most_exist():
    keys = ["data.name", "data.root", "model.arch", "model.dim", "model.momentum", "loss.temperature",
            "loss.symmetric", "queue.size", "optim.lr", "optim.batch_size", "train.epochs", "train.out_dir",
            "train.resume"]
    cfg = OmegaConf.structured(Config)
    for key in keys:
        assert OmegaConf.select(cfg, key, default="missing") != "missing", key


@pytest.mark.fault("syntax")
def test_unknown_key_names_it_and_the_closest_valid_one():
    with pytest.raises(ConfigError, match=r"unknown config key 'queue.sise'.*did you mean 'queue.size'"):
        load_config([], ["queue.sise=5"])


@pytest.mark.fault("syntax")
def test_unknown_key_in_a_file_names_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  momentun: 0.9\n")
    with pytest.raises(ConfigError, match=r"'model.momentun' in .*bad.yaml.*'model.momentum'"):
        load_config([str(f)])


@pytest.mark.fault("syntax")
def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match=r"'optim.lr'.*'fast'"):
        load_config([], ["optim.lr=fast"])


@pytest.mark.fault("config")
@pytest.mark.parametrize(
    "override,key",
    [("queue.size=0", "queue.size"), ("loss.temperature=0", "loss.temperature"), ("model.momentum=1.5", "model.momentum"),
     ("optim.batch_size=0", "optim.batch_size"), ("train.epochs=0", "train.epochs"), ("model.arch=vgg", "model.arch"),
     ("loss.name=nce", "loss.name")],
)
def test_invalid_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config([], [override])


def test_config_round_trips_through_dict_and_yaml(tmp_path):
    cfg = load_config([], ["queue.size=77", "optim.milestones=[3,4]"])
    assert from_dict(to_dict(cfg)) == cfg
    f = tmp_path / "saved.yaml"
    f.write_text(to_yaml(cfg))
    assert load_config([str(f)]) == cfg


def test_base_yaml_mirrors_the_schema():
    assert load_config([str(ROOT / "configs" / "base.yaml")]) == Config()


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    if "sweeps" in path.parts:
        pytest.skip("sweep files are read by the sweep runner")
    needs = {"contriever_ccnet.yaml": ["data.root=/data/ccnet.jsonl", "model.params.pretrained=/models/bert-base-uncased"]}
    under = {"scifact_contriever_gpu.yaml": [str(path.with_name("scifact_contriever.yaml"))]}  # overlays of a recipe
    cfg = load_config([*under.get(path.name, []), str(path)],
                      ["data.root=/where/the/data/is"] if "imagenet" in path.name else needs.get(path.name, []))
    if path.name == "scifact_contriever_gpu.yaml":  # layered on the CPU recipe, as its header says
        gpu = load_config([str(path.with_name("scifact_contriever.yaml")), str(path)], ["train.device=cpu"])
        assert gpu.model.params["length_buckets"] == 1 and gpu.train.cuda_graphs and gpu.model.params["layers"] == 2
        assert gpu.optim.lr == 4.0e-3 and gpu.data.text.chunk_length == 128
    if path.name == "moco_v2_imagenet.yaml":  # layered on v1, as its header says
        v2 = load_config([str(path.with_name("moco_v1_imagenet.yaml")), str(path)], ["data.root=/data"])
        assert (v2.model.arch, v2.model.head, v2.loss.temperature, v2.optim.schedule) == ("resnet50", "mlp", 0.2, "cosine")
    assert cfg is not None


def test_contrievers_recipe_is_its_example_script_and_asks_for_its_data_and_model():
    """example_scripts/contriever.sh as Issue 27 lists it: 500k steps of 64 chunks on 32 GPUs."""
    path = str(ROOT / "configs" / "experiment" / "contriever_ccnet.yaml")
    with pytest.raises(ConfigError, match="model.params.pretrained"):
        load_config([path], ["data.root=/data/ccnet.jsonl"])
    cfg = load_config([path], ["data.root=/data/ccnet.jsonl", "model.params.pretrained=/models/bert-base-uncased"])
    t, o = cfg.data.text, cfg.optim
    assert (t.tokenizer, t.chunk_length, t.ratio_min, t.ratio_max, t.deletion) == ("/models/bert-base-uncased", 256, 0.05, 0.5, 0.1)
    assert (cfg.model.arch, cfg.model.params["pooling"], cfg.model.head, cfg.model.normalize) == ("bert", "mean", "none", False)
    assert (cfg.loss.temperature, cfg.model.momentum, cfg.queue.size) == (0.05, 0.9995, 131072)
    assert (o.name, o.lr, list(o.betas), o.eps, o.weight_decay, o.schedule, o.batch_size) == (
        "adamw", 5e-5, [0.9, 0.98], 1e-6, 0.01, "linear", 64)
    steps = cfg.train.epochs * cfg.train.steps_per_epoch
    assert steps == 500_000 and o.warmup_epochs * cfg.train.steps_per_epoch == 20_000


@pytest.mark.fault("syntax")
@pytest.mark.parametrize("args", [["queue.sise=5"], ["optim.lr=fast"], ["nonexistent.yaml"], ["queue.size"]])
def test_cli_config_errors_exit_2_with_one_line(args, tmp_path):
    r = subprocess.run([sys.executable, "-m", "moco_engine", *args], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr


# ============================================================================ every setting's domain
@pytest.mark.fault("config")
@pytest.mark.parametrize("override, key", [
    ("optim.lr=inf", "optim.lr"), ("optim.lr=nan", "optim.lr"), ("loss.temperature=-inf", "loss.temperature"),
    ("model.momentum=nan", "model.momentum"), ("eval.knn_t=inf", "eval.knn_t"), ("linear.lr=inf", "linear.lr"),
    ("optim.momentum=-0.9", "optim.momentum"), ("optim.weight_decay=-1e-4", "optim.weight_decay"),
    ("linear.weight_decay=-1", "linear.weight_decay"), ("optim.gamma=0", "optim.gamma"),
    ("train.seed=-1", "train.seed"), ("train.device=banana", "train.device"), ("train.device=cuda:x", "train.device"),
    ("loss.triplet_margin=-0.2", "loss.triplet_margin"), ("optim.milestones=[-3]", "optim.milestones"),
])
def test_every_setting_out_of_its_domain_names_its_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config([], [override])
    assert f"'{key}'" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.fault("config")
def test_stored_negatives_that_cannot_fit_are_refused_naming_their_size(tmp_path):
    from moco_engine.config.schema import UserError
    from moco_engine.run.trainer import Trainer

    cfg = load_config([], ["data.name=synthetic", "data.synthetic_size=64", "data.num_workers=0", "optim.batch_size=16",
                           "queue.size=10000000000",
                           f"train.out_dir={tmp_path}"])
    with pytest.raises(UserError, match=r"'queue.size': the queue of K=10000000000 keys of D=128 needs [\d.]+ GiB, and cpu has"):
        Trainer(cfg)


@pytest.mark.fault("config")
def test_settings_the_method_ignores_are_named_in_a_warning():
    from moco_engine.config.rules import ignored_settings

    assert ignored_settings(load_config([], ["method=byol", "negatives.kind=memory_bank", "queue.size=4096"])) == [
        "negatives.kind=memory_bank", "queue.size=4096"]
    assert ignored_settings(load_config([], ["negatives.kind=in_batch", "queue.size=4096"])) == ["queue.size=4096"]
    assert ignored_settings(load_config([], ["queue.size=4096"])) == []


# ============================================================================ config syntax
@pytest.mark.fault("syntax")
@pytest.mark.parametrize("args, expected", [
    (["optim=5"], "config key 'optim' in the command-line overrides is a group of settings"),
    (["track.wandb=offline"], "config key 'track.wandb' in the command-line overrides is a group of settings"),
    (["train.out_dir=${oc.env:MOCO_TEST_UNSET_VARIABLE}"], "config key 'train.out_dir': environment variable "
                                                           "MOCO_TEST_UNSET_VARIABLE is not set"),
    (["dup.yaml"], "dup.yaml, line 3: found duplicate key lr"),
    (["group.yaml"], "config key 'optim' in group.yaml is a group of settings"),
])
def test_config_syntax_mistakes_are_one_line_naming_key_file_and_line(args, expected, tmp_path):
    (tmp_path / "dup.yaml").write_text("optim:\n  lr: 0.1\n  lr: 0.2\n")
    (tmp_path / "group.yaml").write_text("optim: 5\n")
    r = subprocess.run([sys.executable, "-m", "moco_engine", *args], capture_output=True, text=True, cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert expected in lines[0]


@pytest.mark.parametrize("command", ["train_main", "eval_main", "export_main"])
def test_every_command_has_version_and_its_help_names_the_groups(command, capsys):
    import moco_engine
    from moco_engine.tools import cli

    with pytest.raises(SystemExit) as e:
        getattr(cli, command)(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip().endswith(moco_engine.__version__)
    with pytest.raises(SystemExit):
        getattr(cli, command)(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert command == "export_main" or ("configs/base.yaml" in out and "memory_bank" in out and "track" in out)
