"""moco-eval pairs and zeroshot (an image-text run's two towers): the JSON's keys and counts on
generated pairs, the run against its untrained towers and chance, zero-shot classification of a
generated 3-class image folder, bad input as one line; open_checkpoint rebuilding the towers."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch
from conftest import ROOT, TINY
from PIL import Image
from test_pairs import PAIRS_TINY, karpathy

from moco_engine.config.loading import load_config, to_dict
from moco_engine.data.pairs.read import read_pairs
from moco_engine.data.text.tokenizer import train_wordpiece
from moco_engine.evaluation.image_text import chance_recalls, recall_keys
from moco_engine.evaluation.pairs_eval import ZEROSHOT_KEYS
from moco_engine.evaluation.pretrained import image_encoder
from moco_engine.method.encoders import build_encoder
from moco_engine.method.itc import TwoTowers, build_two_towers
from moco_engine.run.checkpoint import save_checkpoint
from moco_engine.run.pretrained import open_checkpoint
from moco_engine.tools.cli import eval_main

TEXT_TOWER = ["text_model.params.layers=1", "text_model.params.hidden=32", "text_model.params.heads=2",
              "text_model.params.intermediate=64"]
# One BN statistic over the whole batch: 8 images split 4 ways give layer4's 1x1 maps 2 samples a
# statistic, and the first step's gradients blow the image tower up (NaN embeddings at eval).
ITC = [*PAIRS_TINY, "method=itc", "negatives.kind=in_batch", "data.text.vocab_size=64", "model.bn_splits=1",
       "optim.batch_size=8", *TEXT_TOWER]
TEST_IMAGES = 6  # karpathy() gives each 3 captions


def itc_cfg(root, out, *extra):
    return load_config([], [*ITC, f"data.root={root}", f"train.out_dir={out}", *extra])


@pytest.fixture(scope="module")
def pairs_root(tmp_path_factory):
    return karpathy(tmp_path_factory.mktemp("pairs"), splits=(("train", 8), ("test", TEST_IMAGES)))


@pytest.fixture(scope="module")
def run(tmp_path_factory, pairs_root):
    """A fake trained itc run: a checkpoint as the Trainer writes one (config, input shape,
    tokenizer, f_q's state), its towers drawn from another seed than the run's."""
    out = tmp_path_factory.mktemp("itc") / "run"
    cfg = itc_cfg(pairs_root, out)
    captions = [c for p in read_pairs(pairs_root, cfg.data.pairs, "train").split("train") for c in p.captions]
    tokenizer = train_wordpiece(captions, 64, True)
    shape = {"image": (3, 32, 32), "text": {"input_ids": (12,), "attention_mask": (12,),
                                             "vocab_size": (tokenizer.vocab_size,)}}
    torch.manual_seed(cfg.train.seed + 1)
    towers = build_two_towers(cfg, shape)
    save_checkpoint({"config": to_dict(cfg), "input_shape": shape, "tokenizer": tokenizer.json,
                     "encoder_q": towers.state_dict()}, out, 1, 1)
    return out


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """A fake one-tower image run (method=moco)."""
    out = tmp_path_factory.mktemp("moco") / "run"
    cfg = load_config([], [*TINY, f"train.out_dir={out}"])
    save_checkpoint({"config": to_dict(cfg), "input_shape": (3, 32, 32),
                     "encoder_q": build_encoder(cfg.model, (3, 32, 32)).state_dict()}, out, 1, 1)
    return out


def image_folder(root, classes=("red", "green", "blue"), per_class=4, split="test"):
    """``<root>/<split>/<class>/<i>.png``: images coloured like their class, a little apart."""
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 210)}
    for c in classes:
        (root / split / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            r, g, b = colours.get(c, (128, 128, 128))
            Image.new("RGB", (36, 36), (r, (g + 9 * i) % 256, b)).save(root / split / c / f"{i}.png")
    return root


def result_of(capsys):
    """The JSON the last moco-eval call wrote: the path on its last printed line."""
    out = capsys.readouterr().out
    return json.loads(open(out.strip().splitlines()[-1].strip("()")).read()), out


def one_line_error(capsys):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


# --------------------------------------------------------------------------------------------- pairs
@pytest.fixture(scope="module")
def pairs_result(run):
    """``moco-eval pairs RUN``'s JSON and what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert eval_main(["pairs", str(run)]) == 0
    lines = out.getvalue().strip().splitlines()
    return json.loads(open(lines[-1].strip("()")).read()), lines


def test_pairs_writes_its_json_with_the_splits_counts_run_chance_and_untrained(pairs_result):
    result, lines = pairs_result
    assert set(result) == {"checkpoint", "mode", "data", "split", "images", "captions", "run", "chance", "untrained"}
    assert (result["mode"], result["split"], result["images"], result["captions"]) == ("pairs", "test", TEST_IMAGES,
                                                                                       3 * TEST_IMAGES)
    keys = recall_keys((1, 5, 10))
    assert keys == ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum"]
    for name in ("run", "chance", "untrained"):
        assert list(result[name]) == keys
        assert all(0 <= result[name][k] <= 100 for k in keys[:-1])
        assert result[name]["rsum"] == pytest.approx(sum(result[name][k] for k in keys[:-1]))
    owners = torch.arange(TEST_IMAGES).repeat_interleave(3)
    assert result["chance"] == chance_recalls(owners, TEST_IMAGES)
    assert result["chance"]["t2i_R@1"] == pytest.approx(100 / TEST_IMAGES)
    assert result["chance"]["t2i_R@10"] == 100.0  # 6 images: all of them in the top 10
    # 3 positives among 18 captions: the top 1 holds one with probability 3/18
    assert result["chance"]["i2t_R@1"] == pytest.approx(100 * 3 / 18)
    assert result["run"] != result["untrained"]  # the checkpoint's towers, not the seed's
    assert "6 images, 18 captions" in lines[0] and [ln.split()[0] for ln in lines[2:5]] == ["run", "chance", "untrained"]


def test_pairs_encodes_in_eval_mode_and_keeps_earlier_results(run, pairs_result, capsys):
    # BatchNorm's running statistics: an image's embedding does not depend on its batch.
    assert eval_main(["pairs", str(run), "eval.batch_size=2"]) == 0
    result, _ = result_of(capsys)
    for name in ("run", "untrained"):
        assert result[name] == pytest.approx(pairs_result[0][name])
    assert pairs_result[0]["checkpoint"].endswith(".pt") and result["checkpoint"] == pairs_result[0]["checkpoint"]
    names = {p.name for p in (run / "checkpoints").glob("*.pairs*.json")}
    assert {"checkpoint_00000001.pairs.json", "checkpoint_00000001.pairs-1.json"} <= names


def test_open_checkpoint_rebuilds_the_two_towers_of_an_itc_run(run):
    cfg, towers, path = open_checkpoint(run)
    assert isinstance(towers, TwoTowers) and cfg.method == "itc"
    saved = torch.load(path, weights_only=True)["encoder_q"]
    assert all(torch.equal(v, saved[k]) for k, v in towers.state_dict().items())
    assert image_encoder(towers) is towers.image  # what moco-eval knn and linear judge of it


# --------------------------------------------------------------------------------------------- zeroshot
def test_zeroshot_on_a_three_class_folder_and_archive(run, tmp_path, capsys):
    folder = image_folder(tmp_path / "colours")
    archive = tmp_path / "colours.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder / "test", arcname="test")
    templates = tmp_path / "templates.txt"
    templates.write_text("# mine\na photo of {}.\n\nthe colour {}\n")
    results = []
    for root, extra, count in ((folder, [], 18), (archive, ["--templates", str(templates)], 2)):
        assert eval_main(["zeroshot", str(run), f"data.root={root}", *extra]) == 0
        result, out = result_of(capsys)
        results.append(result)
        assert (result["mode"], result["split"], result["images"], result["classes"], result["templates"]) == (
            "zeroshot", "test", 12, 3, count)
        assert list(result["run"]) == list(result["chance"]) == list(ZEROSHOT_KEYS)
        assert all(0 <= v <= 100 for v in result["run"].values())
        assert result["run"]["top5"] == 100.0  # top-min(5, C): every class
        assert result["chance"] == {"top1": pytest.approx(100 / 3), "top5": 100.0,
                                    "mean_per_class_recall": pytest.approx(100 / 3)}
        assert f"12 images, 3 classes, {count} templates" in out.splitlines()[0]
        assert [ln.split()[0] for ln in out.splitlines()[2:4]] == ["run", "chance"]


# --------------------------------------------------------------------------------------------- bad input
def test_not_an_itc_run_and_bad_templates_are_one_line_and_exit_2(run, image_run, tmp_path, capsys):
    folder = image_folder(tmp_path / "colours", per_class=1)
    for mode in ("pairs", "zeroshot"):
        assert eval_main([mode, str(image_run), f"data.root={folder}"]) == 2
        err = one_line_error(capsys)
        assert f"moco-eval {mode} judges an image-text run's two towers" in err and "method=moco" in err
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of {}.\na photo of a thing\n")
    assert eval_main(["zeroshot", str(run), f"data.root={folder}", "--templates", str(bad)]) == 2
    assert f"{bad}, line 2: a template needs {{}}" in one_line_error(capsys)
    assert eval_main(["pairs", str(run), "--templates", str(bad)]) == 2
    assert "--templates is for moco-eval zeroshot" in one_line_error(capsys)
    assert eval_main(["retrieval", str(run)]) == 2  # a pairs run keeps a tokenizer too
    assert "judges a text run's encoder" in one_line_error(capsys)


def test_too_few_classes_and_empty_splits_are_one_line_and_exit_2(run, tmp_path, capsys):
    before = sorted((run / "checkpoints").iterdir())
    one = image_folder(tmp_path / "one", classes=("red",), per_class=1)
    assert eval_main(["zeroshot", str(run), f"data.root={one}"]) == 2
    assert f"{one}: zero-shot classification needs at least two classes under 'test/'" in one_line_error(capsys)
    assert eval_main(["pairs", str(run), "eval.split=val"]) == 2  # the fake data have no val split
    assert "no image in split 'val'" in one_line_error(capsys)
    empty = tmp_path / "empty"
    for c in ("red", "green"):
        (empty / "test" / c).mkdir(parents=True)
    assert eval_main(["zeroshot", str(run), f"data.root={empty}"]) == 2
    assert "no images found" in one_line_error(capsys)
    assert eval_main(["zeroshot", str(run), f"data.root={empty}", "data.test_split=val"]) == 2
    assert "no 'val' sub-folder" in one_line_error(capsys)
    assert sorted((run / "checkpoints").iterdir()) == before  # no result written


# --------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_a_trained_itc_run_ranks_its_test_pairs_from_the_command_line(tmp_path):
    from moco_engine.run.trainer import Trainer

    root = karpathy(tmp_path / "pairs", splits=(("train", 16), ("test", TEST_IMAGES)))
    out = tmp_path / "run"
    Trainer(itc_cfg(root, out, "train.epochs=1", "train.steps_per_epoch=2", "eval.retrieval_split=test")).fit()
    code = "import sys; from moco_engine.tools.cli import eval_main; sys.exit(eval_main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, "pairs", str(out)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(next((out / "checkpoints").glob("*.pairs.json")).read_text())
    assert (result["images"], result["captions"]) == (TEST_IMAGES, 3 * TEST_IMAGES)
    assert result["run"] != result["untrained"]
