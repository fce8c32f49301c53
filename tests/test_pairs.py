"""data.name=pairs (issue 42, item 1): image–caption pairs read in their layouts from generated
copies (never a download), bad input named in one line, method=moco on their images alone with
one warning, the caption draw and the tokenizer kept across a resume; tools/make_flickr8k.py."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile

import pytest
import torch
from conftest import ROOT, TINY
from PIL import Image

from moco_engine.config.loading import load_config
from moco_engine.config.schema import PairsDataConfig, UserError
from moco_engine.data.errors import DataError
from moco_engine.data.pairs.captions import CaptionTokens, caption_index
from moco_engine.data.pairs.read import read_pairs
from moco_engine.data.text.tokenizer import train_wordpiece
from moco_engine.run.checkpoint import latest_checkpoint
from moco_engine.run.trainer import Trainer

# TINY on pairs: its synthetic data's settings left out (they would draw the ignored-settings warning).
PAIRS_TINY = [*(o for o in TINY if not o.startswith("data.synthetic")), "data.name=pairs", "data.augmentation=cifar",
              "queue.size=16"]  # K under the 20 training images
WORDS = ("red", "green", "blue", "dog", "cat", "runs", "sits", "on", "the", "grass", "snow", "beach")


def jpeg(path, i, size=(40, 36)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, ((37 * i) % 256, (91 * i) % 256, (151 * i) % 256)).save(path, "JPEG")


def captions_of(i, n=3):
    return [f"a {WORDS[i % 3]} {WORDS[3 + i % 2]} {WORDS[5 + c % 2]} on the {WORDS[9 + (i + c) % 3]}" for c in range(n)]


def karpathy(root, splits=(("train", 20), ("val", 3), ("test", 3)), **entry_extra):
    """A Karpathy-split folder: dataset_fake.json and images/<i>.jpg, 3 captions an image."""
    images, i = [], 0
    for split, n in splits:
        for _ in range(n):
            jpeg(root / "images" / f"{i}.jpg", i)
            images.append({"filename": f"{i}.jpg", "split": split, "sentences": [{"raw": c} for c in captions_of(i)],
                           **entry_extra})
            i += 1
    (root / "dataset_fake.json").write_text(json.dumps({"images": images, "dataset": "fake"}))
    return root


def table(root, sep=","):
    """The same pairs as :func:`karpathy` (which it writes first) as a CSV or TSV, a row a caption."""
    karpathy(root)
    doc = json.loads((root / "dataset_fake.json").read_text())
    lines = [sep.join(["filepath", "title", "split"])]
    lines += [sep.join([f"images/{e['filename']}", s["raw"], e["split"]]) for e in doc["images"] for s in e["sentences"]]
    path = root / ("pairs.tsv" if sep == "\t" else "pairs.csv")
    path.write_text("\n".join(lines) + "\n")
    return path


def as_tar(folder, path, top="fake"):
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname=top)
    return path


def pairs_cfg(tmp_path, root, *extra):
    return load_config([], [*PAIRS_TINY, f"data.root={root}", "data.text.vocab_size=64", f"train.out_dir={tmp_path / 'run'}", *extra])


def summary(data, split):
    return [(p.name.split("images/")[-1], p.captions) for p in data.split(split)]


# ---------------------------------------------------------------------------------------------- reading
def test_both_layouts_read_the_same_items_from_a_folder_and_an_archive(tmp_path):
    folder = karpathy(tmp_path / "k")
    keys = PairsDataConfig()
    expected = summary(read_pairs(folder, keys, "train"), "train")
    assert len(expected) == 20 and all(len(c) == 3 for _, c in expected)
    tarred = read_pairs(as_tar(folder, tmp_path / "k.tar.gz"), keys, "train")
    assert summary(tarred, "train") == expected and isinstance(tarred.split("train")[0].image, bytes)
    assert [len(tarred.split(s)) for s in ("val", "test")] == [3, 3]
    for sep in (",", "\t"):  # rows of one image make one item, its captions in row order
        rows = read_pairs(table(tmp_path / f"t{len(sep)}", sep), keys, "train")
        assert summary(rows, "train") == expected and rows.named_splits


def test_a_table_without_a_split_column_is_the_split_it_is_read_for_and_keys_are_settable(tmp_path):
    folder = karpathy(tmp_path, (("train", 4),))
    (tmp_path / "t.csv").write_text('img,text\nimages/0.jpg,"a dog, on snow"\nimages/1.jpg,a cat\nimages/0.jpg,two\n')
    data = read_pairs(folder / "t.csv", PairsDataConfig(image_key="img", caption_key="text"), "train")
    assert not data.named_splits
    assert [p.captions for p in data.split("train")] == [("a dog, on snow", "two"), ("a cat",)]
    with pytest.raises(DataError, match=r"t.csv: no column 'filepath' \(data.pairs.image_key; its columns: img, text\)"):
        read_pairs(folder / "t.csv", PairsDataConfig(), "train")


def test_a_tables_test_split_comes_from_data_test_root(tmp_path):
    karpathy(tmp_path, (("train", 20),))
    rows = lambda ids: "filepath,title\n" + "".join(f"images/{i}.jpg,caption {i}\n" for i in ids)  # noqa: E731
    (tmp_path / "train.csv").write_text(rows(range(18)))
    (tmp_path / "test.csv").write_text(rows(range(18, 20)))
    from moco_engine.data.pairs.source import pair_splits

    cfg = pairs_cfg(tmp_path, tmp_path / "train.csv").data
    assert pair_splits(cfg)[1].test is None  # one file, no split column: the train split alone
    cfg = pairs_cfg(tmp_path, tmp_path / "train.csv", f"data.test_root={tmp_path / 'test.csv'}").data
    splits = pair_splits(cfg)[1]
    assert (len(splits.train), len(splits.test)) == (18, 2) and splits.test.captions == [("caption 18",), ("caption 19",)]


def test_coco_filepath_names_the_images_folder(tmp_path):
    root = karpathy(tmp_path, (("train", 2),), filepath="train2014")
    (root / "images").rename(root / "train2014")
    assert len(read_pairs(root, PairsDataConfig(), "train").split("train")) == 2


def bad_json(tmp_path, edit):
    root = karpathy(tmp_path / "bad", (("train", 3),))
    doc = json.loads((root / "dataset_fake.json").read_text())
    edit(doc)
    (root / "dataset_fake.json").write_text(json.dumps(doc))
    return root


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["images"][1].update(filename="gone.jpg"), r"images\[1\]: image .*images/gone.jpg not found"),
    (lambda d: d["images"][2].update(sentences=[]), r"images\[2\]: image images/2.jpg has no caption"),
    (lambda d: d["images"][0]["sentences"][1].update(raw="  "), r"images\[0\]: image images/0.jpg's caption 1 is empty"),
    (lambda d: d.pop("images"), r"dataset_fake.json: no 'images' list"),
])
def test_bad_json_is_one_line_naming_what_is_wrong(tmp_path, edit, message):
    with pytest.raises(DataError, match=message) as e:
        read_pairs(bad_json(tmp_path, edit), PairsDataConfig(), "train")
    assert "\n" not in str(e.value)


def test_bad_tables_and_splits_are_one_line_naming_the_file_and_line(tmp_path):
    karpathy(tmp_path, (("train", 2),))
    keys = PairsDataConfig()
    (tmp_path / "a.csv").write_text("filepath,title\nimages/0.jpg,a dog\nimages/7.jpg,a cat\n")
    with pytest.raises(DataError, match=r"a.csv, line 3: image .*images/7.jpg not found"):
        read_pairs(tmp_path / "a.csv", keys, "train")
    (tmp_path / "b.csv").write_text('filepath,title\nimages/0.jpg,a dog\nimages/1.jpg,""\n')
    with pytest.raises(DataError, match=r"b.csv, line 3: empty caption \(column 'title'\) for image images/1.jpg"):
        read_pairs(tmp_path / "b.csv", keys, "train")
    (tmp_path / "c.csv").write_text("filepath,title,split\nimages/0.jpg,a dog,train\nimages/0.jpg,a cat,test\n")
    with pytest.raises(DataError, match=r"c.csv: image .*0.jpg is in split 'train' and in split 'test'"):
        read_pairs(tmp_path / "c.csv", keys, "train")
    with pytest.raises(DataError, match=r"dataset_fake.json: no image in split 'val' \(its splits: train \(2\)\)"):
        read_pairs(tmp_path, keys, "train").split("val")


@pytest.mark.slow  # a subprocess; each message is checked in process in the default run
def test_bad_pairs_exit_2_in_one_line_through_moco_train(tmp_path):
    root = bad_json(tmp_path, lambda d: d["images"][1]["sentences"][0].update(raw=""))
    r = subprocess.run([sys.executable, "-m", "moco_engine", *PAIRS_TINY, f"data.root={root}",
                        f"train.out_dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=ROOT)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "caption 0 is empty" in lines[0], r.stderr
    assert "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------------- captions
def test_caption_index_is_a_hash_of_seed_epoch_and_item_within_range():
    items = torch.arange(500)
    counts = 1 + items % 7
    first = caption_index(0, 3, items, counts)
    assert torch.equal(first, caption_index(0, 3, items, counts))  # deterministic
    assert first.dtype == torch.long and bool((first >= 0).all()) and bool((first < counts).all())
    assert torch.equal(first[counts == 1], torch.zeros_like(first[counts == 1]))
    assert (first != caption_index(0, 4, items, counts)).float().mean() > 0.5  # another epoch, other captions
    assert (first != caption_index(1, 3, items, counts)).float().mean() > 0.5  # another seed too
    assert torch.equal(caption_index(0, 3, items[100:120], counts[100:120]), first[100:120])  # whatever batch
    counts7 = torch.full((7000,), 7)
    spread = torch.bincount(caption_index(0, 0, torch.arange(7000), counts7), minlength=7)
    assert spread.min() > 850  # each of 7 captions about 1,000 times


def test_caption_tokens_draw_an_items_captions_cut_at_max_length():
    captions = [("a red dog runs on the grass", "a dog"), ("the cat sits",)]
    tok = train_wordpiece([c for item in captions for c in item], 64)
    tokens = CaptionTokens.encode(tok, captions, max_length=5)
    assert tokens.ids.shape == (3, 5) and tokens.counts.tolist() == [2, 1] and tokens.first.tolist() == [0, 2]
    assert tokens.ids[0, 0] == tok.cls_id and tokens.ids[0, 4] == tok.sep_id  # cut at 5, [SEP] kept
    drawn = tokens.drawn(0, 0, torch.tensor([1, 1]))
    assert torch.equal(drawn["input_ids"][0], tokens.ids[2, : drawn["input_ids"].shape[1]])
    assert drawn["attention_mask"].sum(1).tolist() == [tokens.lengths[2].item()] * 2


# ---------------------------------------------------------------------------------------------- runs
def test_a_resumed_pairs_run_ends_bit_identical_and_keeps_its_tokenizer(tmp_path, monkeypatch):
    import moco_engine.data.pairs.captions as captions

    root = karpathy(tmp_path / "k")
    straight = Trainer(pairs_cfg(tmp_path / "a", root))
    straight.fit()
    stopped = Trainer(pairs_cfg(tmp_path / "b", root))
    stopped.prepare_run_dir()
    stopped.train_epoch()
    stopped.save()
    del stopped

    def no_training(*args):
        raise AssertionError("a resume trained its tokenizer again")

    monkeypatch.setattr(captions, "train_wordpiece", no_training)  # the resume reads the checkpoint's
    resumed = Trainer(pairs_cfg(tmp_path / "b", root, "train.resume=auto"))
    assert resumed.loaders.source_state() == straight.loaders.source_state()
    resumed.fit()
    for a, b in zip(straight.encoder_q.state_dict().values(), resumed.encoder_q.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(straight.encoder_k.state_dict().values(), resumed.encoder_k.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(straight.negatives.keys, resumed.negatives.keys)


def test_a_resume_with_another_tokenizer_is_refused(tmp_path):
    root = karpathy(tmp_path / "k")
    Trainer(pairs_cfg(tmp_path, root, "train.epochs=1")).fit()
    with pytest.raises(UserError, match=r"another tokenizer .*data.text.vocab_size 64 \(checkpoint\) vs 80 \(config\)"):
        Trainer(pairs_cfg(tmp_path, root, "train.epochs=2", "train.resume=auto", "data.text.vocab_size=80"))


# ---------------------------------------------------------------------------------------------- make_flickr8k
def fake_flickr8k(tmp_path):
    """Fake copies of the two repositories' folders: 6 JPEGs; a CRLF token file of 5 captions an
    image that also names one image the image copy lacks; the three split lists."""
    images = tmp_path / "Image-Text-Matching" / "data" / "images"
    names = [f"{1000 + i}_abc.jpg" for i in range(6)]
    for i, name in enumerate(names):
        jpeg(images / name, i, size=(96, 80))
    text = tmp_path / "Describiendo" / "Flickr8k_text"
    text.mkdir(parents=True)
    tokens = [f"{name}#{c}\t{captions_of(i, 5)[c]} ." for i, name in enumerate([*names, "999_missing.jpg"]) for c in range(5)]
    (text / "Flickr8k.token.txt").write_bytes(("\r\n".join(tokens) + "\r\n").encode())
    for file, part in (("trainImages", names[:3] + ["999_missing.jpg"]), ("devImages", names[3:4]), ("testImages", names[4:])):
        (text / f"Flickr_8k.{file}.txt").write_bytes(("\r\n".join(part) + "\r\n").encode())
    return images, text


def test_make_flickr8k_writes_what_the_reader_reads(tmp_path):
    images, text = fake_flickr8k(tmp_path)
    out = tmp_path / "flickr8k"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "make_flickr8k.py"), "--images", str(images),
                        "--text", str(text), "--side", "32", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "dropped 1 image" in r.stdout, r.stdout
    data = read_pairs(out, PairsDataConfig(), "train")
    assert [len(data.split(s)) for s in ("train", "val", "test")] == [3, 1, 2]
    first = data.split("train")[0]
    assert first.captions == tuple(f"{c} ." for c in captions_of(0, 5)) and not any("\r" in c for c in first.captions)
    assert min(Image.open(first.image).size) == 32 and Image.open(first.image).size == (38, 32)


def test_moco_on_pairs_trains_on_the_train_images_alone_with_one_warning(tmp_path):
    root = as_tar(karpathy(tmp_path / "k"), tmp_path / "k.tar.gz")
    r = subprocess.run([sys.executable, "-m", "moco_engine", *PAIRS_TINY, f"data.root={root}", "train.epochs=1",
                        "data.text.vocab_size=64", f"train.out_dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines() == [  # the whole of stderr
        "warning: data.name=pairs: method=moco trains on the 20 images of split 'train' alone; their 60 captions are unused"]
    assert "kNN monitor off: data.name=pairs gives no labelled test split" in r.stdout  # unlabelled
    saved = (tmp_path / "run" / "tokenizer.json").read_text()
    assert latest_checkpoint(tmp_path / "run")[1]["tokenizer"] == saved


def test_make_flickr8k_reads_git_directories_at_a_commit(tmp_path):
    images, text = fake_flickr8k(tmp_path)
    gits = []
    for folder, inside in ((images.parents[1], "data/images"), (text.parent, "Flickr8k_text")):
        run = lambda *a, cwd=folder: subprocess.run(["git", *a], cwd=cwd, check=True, capture_output=True)  # noqa: E731
        run("init", "-q")
        run("add", inside)
        run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "fake")
        gits.append(folder / ".git")
    commit = subprocess.run(["git", f"--git-dir={gits[0]}", "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    out = tmp_path / "flickr8k"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "make_flickr8k.py"), "--images", str(gits[0]),
                        "--images-commit", commit, "--text", str(gits[1]), "--side", "0", str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    first = read_pairs(out, PairsDataConfig(), "train").split("train")[0]
    assert first.image.read_bytes() == (images / "1000_abc.jpg").read_bytes()  # --side 0: the originals


@pytest.mark.slow  # two launches of two processes
@pytest.mark.distributed
def test_a_pairs_run_on_two_processes_stopped_mid_epoch_resumes_bit_identical(tmp_path):
    """Exact at scale too: the same run on 2 processes, SIGTERM'd in step 4 and resumed, ends with
    every rank's state bit-identical to the uninterrupted one (the tokenizer kept, not retrained)."""
    from test_distributed import EXACT, assert_same_ranks, stopped_and_resumed, torchrun

    root = karpathy(tmp_path / "data", splits=(("train", 96), ("test", 4)))  # 3 steps of 2 x 16 an epoch
    pairs = ["data.name=pairs", f"data.root={root}", "data.text.vocab_size=64", "data.augmentation=cifar"]
    straight, _ = torchrun(tmp_path / "straight", *EXACT, *pairs)
    assert straight[0]["world"] == 2 and straight[0]["step"] == 6
    assert_same_ranks(straight, stopped_and_resumed(tmp_path / "stopped", *pairs))
