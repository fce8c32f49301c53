"""Text runs end to end on the embedded SciFact sample: the retrieval monitor, the tokenizer kept
with the run, exact resume (one process, a SIGTERM, torchrun), moco-eval retrieval and sts, the
sentence-transformers export, and a local model folder as the starting point."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch
from conftest import TINY

from moco_engine.config.loading import load_config
from moco_engine.config.schema import UserError
from moco_engine.run.checkpoint import latest_checkpoint
from moco_engine.run.tracking import read_metrics
from moco_engine.run.trainer import Trainer
from moco_engine.tools.cli import eval_main, export_main, train_main
from moco_engine.tools.opcount import count_ops

TEXT = ["data.name=text", "data.text.vocab_size=400", "data.text.chunk_length=32", "data.text.max_length=48",
        "model.arch=bert", "model.params.layers=1", "model.params.hidden=32",
        "model.params.heads=2", "model.params.intermediate=64", "model.params.max_positions=64", "eval.batch_size=256",
        "model.bn=plain", "model.bn_splits=1"]


def text_cfg(tmp_path, *overrides):
    return load_config([], [*TINY, *TEXT, f"train.out_dir={tmp_path / 'run'}", *overrides])


def test_a_text_run_monitors_retrieval_on_the_train_qrels_and_keeps_its_tokenizer(tmp_path):
    trainer = Trainer(text_cfg(tmp_path, "eval.at_start=true"))
    final = trainer.fit()
    assert set(final) >= {"ndcg@10", "recall@100", "mrr@10"} and 0 <= final["ndcg@10"] <= 1
    evals = read_metrics(tmp_path / "run" / "metrics.jsonl", "eval")
    assert [r["epoch"] for r in evals] == [-1, 1]  # the random network's, then the last epoch's
    saved = (tmp_path / "run" / "tokenizer.json").read_text()
    assert saved == trainer.loaders.source_state()["tokenizer"] and latest_checkpoint(tmp_path / "run")[1]["tokenizer"] == saved
    assert (tmp_path / "run" / "knn.png").exists()
    (q, k), targets, idx = next(iter(trainer.loaders.train))
    assert q["input_ids"].dtype == torch.long and (targets == -1).all() and len(idx) == 16


def test_the_monitor_never_reads_the_test_qrels(tmp_path, monkeypatch):
    import moco_engine.data.text.corpus as corpus

    asked = []
    original = corpus.TextData.split
    monkeypatch.setattr(corpus.TextData, "split", lambda self, name: asked.append(name) or original(self, name))
    Trainer(text_cfg(tmp_path, "eval.at_start=true")).fit()
    assert asked and set(asked) == {"train"}


@pytest.mark.parametrize("kind", ["queue", pytest.param("memory_bank", marks=pytest.mark.slow)])
def test_a_resumed_text_run_ends_bit_identical_to_a_straight_one(tmp_path, monkeypatch, kind):
    import moco_engine.data.text.source as text_source

    run = [f"negatives.kind={kind}", "data.text.chunk_length=62"]  # longer chunks: fewer for the bank to encode
    straight = Trainer(text_cfg(tmp_path / "a", *run))
    straight.fit()
    stopped = Trainer(text_cfg(tmp_path / "b", *run))
    stopped.prepare_run_dir()
    stopped.train_epoch()
    stopped.save()
    del stopped

    def no_training(*args):
        raise AssertionError("a resume trained its tokenizer again")

    monkeypatch.setattr(text_source, "train_wordpiece", no_training)  # the resume reads the checkpoint's
    resumed = Trainer(text_cfg(tmp_path / "b", "train.resume=auto", *run))
    assert resumed.loaders.source_state() == straight.loaders.source_state()
    resumed.fit()
    for a, b in zip(straight.encoder_q.state_dict().values(), resumed.encoder_q.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(straight.encoder_k.state_dict().values(), resumed.encoder_k.state_dict().values()):
        assert torch.equal(a, b)
    held = straight.negatives.state_dict()
    assert held
    for name, value in held.items():  # bit for bit (NCE's log Z is a NaN sentinel in both)
        torch.testing.assert_close(resumed.negatives.state_dict()[name], value, rtol=0, atol=0, equal_nan=True)


@pytest.mark.slow  # a subprocess stopped for real; the in-process resume stays in the default run
@pytest.mark.fault("signals")
def test_sigterm_mid_epoch_saves_and_the_resumed_text_run_matches_a_straight_one(tmp_path):
    extra = ["train.steps_per_epoch=24", "train.log_every=1"]  # room for the signal to land mid-epoch on a busy machine
    straight = Trainer(text_cfg(tmp_path / "a", *extra))
    straight.fit()
    run = tmp_path / "b" / "run"
    cmd = [sys.executable, "-m", "moco_engine", *TINY, *TEXT, *extra, f"train.out_dir={run}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "2"})
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "metrics.jsonl").exists() and len(read_metrics(run / "metrics.jsonl", "step")) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    state = latest_checkpoint(run)[1]
    assert state["epoch"] == 0 and 0 < state["step_in_epoch"] < 24
    resumed = Trainer(text_cfg(tmp_path / "b", *extra, "train.resume=auto"))
    resumed.fit()
    assert resumed.step == straight.step == 48
    for a, b in zip(straight.encoder_q.state_dict().values(), resumed.encoder_q.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(straight.negatives.keys, resumed.negatives.keys)


@pytest.mark.slow  # a run then a subprocess; -m fault runs it
@pytest.mark.fault("resume")
def test_a_resume_with_another_tokenizer_is_refused_in_one_line(tmp_path):
    Trainer(text_cfg(tmp_path, "train.epochs=1")).fit()
    r = subprocess.run([sys.executable, "-m", "moco_engine", *TINY, *TEXT, f"train.out_dir={tmp_path / 'run'}",
                        "train.resume=auto", "train.epochs=2", "data.text.lowercase=false"], capture_output=True, text=True)
    lines = [x for x in r.stderr.strip().splitlines() if not x.startswith("warning:")]
    assert r.returncode == 2 and len(lines) == 1 and "another tokenizer" in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_a_resume_with_other_tokenizer_settings_is_refused_naming_them(tmp_path):
    Trainer(text_cfg(tmp_path, "train.epochs=1")).fit()
    with pytest.raises(UserError, match=r"another tokenizer .*data.text.vocab_size 400 \(checkpoint\) vs 300 \(config\)"):
        Trainer(text_cfg(tmp_path, "train.resume=auto", "train.epochs=2", "data.text.vocab_size=300"))


def test_moco_eval_retrieval_and_sts_report_the_run_bm25_and_the_untrained_encoder(tmp_path, capsys):
    Trainer(text_cfg(tmp_path, "train.epochs=1")).fit()
    run = tmp_path / "run"
    capsys.readouterr()
    assert eval_main(["retrieval", str(run), "eval.split=test"]) == 0
    out = capsys.readouterr().out
    path, _ = latest_checkpoint(run)
    report = json.loads(path.with_name(f"{path.stem}.retrieval.json").read_text())
    assert report["split"] == "test" and report["queries"] == 150
    for system in ("run", "bm25", "untrained"):
        assert set(report[system]) == {"ndcg@10", "recall@100", "mrr@10"}
    assert report["bm25"]["ndcg@10"] > 0.5  # BM25 on the sample's test claims
    assert "bm25" in out and "untrained" in out
    (tmp_path / "sts").mkdir()
    rows = [f"g\tf\t2017\t{i:04d}\t{i % 6}\tA man plays {'a guitar' if i % 2 else 'the piano'}.\tA man plays music {i}."
            for i in range(30)]
    (tmp_path / "sts" / "sts-test.csv").write_text("\n".join(rows) + "\n")
    assert eval_main(["sts", str(run), f"data.root={tmp_path / 'sts'}"]) == 0
    report = json.loads(path.with_name(f"{path.stem}.sts.json").read_text())
    assert report["pairs"] == 30 and -100 <= report["run"]["spearman"] <= 100 and "untrained" in report


def test_the_sentence_transformers_export_gives_the_embeddings_retrieval_uses(tmp_path, capfd):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    from moco_engine.data.text.views import TextPlain
    from moco_engine.evaluation.retrieval import encode_texts

    trainer = Trainer(text_cfg(tmp_path, "train.epochs=1"))
    trainer.fit()
    out = tmp_path / "st"
    assert export_main([str(tmp_path / "run"), "--format", "sentence-transformers", "--out", str(out)]) == 0
    assert export_main([str(tmp_path / "run"), "--format", "sentence-transformers", "--out", str(out)]) == 2  # no overwrite
    # Issue 35: a query longer than the documents' cut is cut alike by the folder and by
    # moco-eval (queries at data.text.query_max_length=0: max_length, 48 tokens here).
    long = " ".join(["vitamin d deficiency in mice fed a high fat diet"] * 12)
    texts = ["Mice fed a high-fat diet gain weight.", "Vitamin D deficiency is common in winter.", "short", long]
    corpus = trainer.loaders.source.corpus
    assert len(corpus.tokenizer.encode([long])[0]) + 2 > corpus.lengths[1] == 48
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = SentenceTransformer(str(out), device="cpu")
    # transformers writes its load report (a pooler "MISSING") through its own handler, to stderr.
    printed = capfd.readouterr()
    assert not caught and "LOAD REPORT" not in printed.err + printed.out and "MISSING" not in printed.err, printed.err
    theirs = torch.from_numpy(model.encode(texts))
    batches = TextPlain(corpus.tokenizer.encode(texts), corpus.spec, 8, corpus.lengths[1], torch.device("cpu"))
    ours = torch.nn.functional.normalize(encode_texts(trainer.encoder_q.backbone, batches, 4, torch.device("cpu")), dim=1)
    assert torch.allclose(theirs, ours, atol=1e-5)
    assert AutoModel.from_pretrained(str(out)).config.hidden_size == 32
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()}
    assert len(set(modes.values())) == 1, modes  # model.safetensors as readable as the rest



def test_a_run_starts_from_a_local_model_folder_and_its_tokenizer(tmp_path):
    from transformers import BertConfig, BertModel

    folder = tmp_path / "tiny_bert"
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789")
    words = sorted({w for w in "the of and in to is with for was that by".split()} - set(letters))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words + [f"##{c}" for c in letters] + letters
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    torch.manual_seed(1)
    model = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=64))
    model.save_pretrained(str(folder))
    trainer = Trainer(text_cfg(tmp_path, f"model.params.pretrained={folder}", f"data.text.tokenizer={folder}",
                               "train.epochs=1"))
    start = trainer.encoder_q.backbone.model.embeddings.word_embeddings.weight.detach().clone()
    assert torch.equal(start, model.embeddings.word_embeddings.weight)
    assert trainer.loaders.source.corpus.tokenizer.vocab_size == len(vocab)
    trainer.fit()
    assert not torch.equal(start, trainer.encoder_q.backbone.model.embeddings.word_embeddings.weight)
    with pytest.raises(UserError, match="not a local model folder"):
        Trainer(text_cfg(tmp_path / "x", f"model.params.pretrained={tmp_path / 'absent'}"))
    with pytest.raises(UserError, match="'model.params.max_positions' = 64: the inputs reach 102 tokens"):
        Trainer(text_cfg(tmp_path / "y", "data.text.chunk_length=100"))  # the bank's refresh encodes whole chunks


@pytest.mark.parametrize("kind", ["memory_bank", "in_batch"])
def test_the_memory_bank_and_in_batch_negatives_train_on_text_chunks(tmp_path, kind):
    """The three negative sources behind one interface on text too: the bank holds a row per
    chunk (the items), refreshed from the key encoder each epoch; in-batch needs no store."""
    trainer = Trainer(text_cfg(tmp_path, f"negatives.kind={kind}", "queue.size=64", "train.epochs=1",
                               "data.text.chunk_length=62"))
    final = trainer.fit()
    assert "ndcg@10" in final
    steps = read_metrics(tmp_path / "run" / "metrics.jsonl", "step")
    assert steps and all(math.isfinite(r["loss"]) for r in steps)
    if kind == "memory_bank":
        bank = trainer.negatives.bank
        assert bank.shape == (trainer.loaders.num_items, trainer.cfg.model.dim) and trainer.loaders.num_items == trainer.loaders.source.corpus.stream.num_chunks
        assert bool((trainer.negatives.written > 0).all())  # every chunk's row written by the epoch's refresh
        # ... from the chunks as the next epoch cuts them (the stream moves its offset each epoch)
        stream, plain = trainer.loaders.source.corpus.stream, trainer.loaders.plain_train
        assert plain.epoch == 1 and plain.docs == stream.chunk_tokens(trainer.cfg.train.seed, 1)
        assert plain.docs != stream.chunk_tokens(trainer.cfg.train.seed, 0)
        trainer.encoder_k.train()
        with torch.no_grad():
            rows = torch.cat([trainer.encoder_k(x) for x, _, _ in plain])
        assert torch.allclose(bank, torch.nn.functional.normalize(rows, dim=1), atol=1e-5)


def test_length_buckets_give_the_whole_batchs_embeddings_and_gradients_to_rounding():
    """model.params.length_buckets: each group of similar length padded only to its own longest;
    BERT has no batch statistics, so the embeddings and gradients are the batch's own."""
    from transformers import BertConfig, BertModel

    from moco_engine.method.text_encoder import TextEncoder

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
                      add_pooling_layer=False)
    lengths = torch.tensor([3, 17, 9, 40, 9, 2, 25, 33, 12, 40, 5])
    mask = (torch.arange(40)[None] < lengths[:, None]).long()  # right-padded, as the text views are
    ids = torch.randint(5, 50, (len(lengths), 40)) * mask
    grads, outs = [], []
    for buckets in (1, 3, 4, 11, 20):
        model.zero_grad()
        encoder = TextEncoder(model, "mean", buckets)
        out = encoder({"input_ids": ids, "attention_mask": mask})
        (out * torch.arange(32.0)).sum().backward()  # a loss that tells the rows apart
        outs.append(out.detach())
        grads.append(model.embeddings.word_embeddings.weight.grad.clone())
    for out, grad in zip(outs[1:], grads[1:]):
        assert torch.allclose(out, outs[0], atol=1e-5) and torch.allclose(grad, grads[0], atol=1e-4)
    # With the loader's host lengths (in any order: shuffle-BN permutes the tensors, not the list)
    # the widths are the same and the device is never read (Issue 34).
    encoder = TextEncoder(model, "mean", 4)
    view, host = {"input_ids": ids, "attention_mask": mask}, lengths.flip(0).tolist()
    assert count_ops(lambda: encoder({**view, "lengths": host})).host_reads == {}
    assert count_ops(lambda: encoder(view)).host_reads == {"tolist": 1}
    assert torch.equal(encoder({**view, "lengths": host}), encoder(view))
    with pytest.raises(UserError, match="'model.params.length_buckets' = 0"):
        Trainer(load_config([], [*TINY, *TEXT, "model.params.length_buckets=0"]))


def test_a_text_run_without_qrels_still_ends_with_what_comes_next(tmp_path, capsys):
    """Issue 35: no qrels/train.tsv, no monitor, and still the Next: lines."""
    words = "protein cell gene virus sample study patients effect trial dose brain tissue signal model".split()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(60)) for i in range(40)) + "\n")
    code = train_main([*TINY, *TEXT, f"data.root={corpus}", "train.epochs=1", f"train.out_dir={tmp_path / 'run'}"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"trained 1 epoch ({tmp_path / 'run'}); no retrieval monitor: the corpus has no qrels/train.tsv" in out
    assert "Next:" in out and f"moco-export {tmp_path / 'run'} --format sentence-transformers" in out


def test_a_beir_set_with_judged_empty_and_missing_documents_trains_and_evaluates(tmp_path, capsys):
    """Issue 35: the set BEIR reads is read: an empty document judged by the qrels is indexed and
    scored, a judged id missing from the corpus is a warning, and the run and moco-eval go on."""
    import tarfile

    from moco_engine.data.text.source import EMBEDDED_TEXT

    with tarfile.open(EMBEDDED_TEXT) as tar:
        tar.extractall(tmp_path / "set", filter="data")
    (root,) = [p.parent for p in (tmp_path / "set").rglob("corpus.jsonl")]
    with open(root / "corpus.jsonl", "a") as f:
        f.write(json.dumps({"_id": "995", "title": "", "text": ""}) + "\n")
    qid = json.loads((root / "queries.jsonl").read_text().splitlines()[0])["_id"]
    for split in ("train", "test"):
        with open(root / "qrels" / f"{split}.tsv", "a") as f:
            f.write(f"{qid}\t995\t1\n{qid}\t404\t1\n")
    run = tmp_path / "run"
    final = Trainer(text_cfg(tmp_path, f"data.root={root}", "train.epochs=1")).fit()
    assert 0 <= final["ndcg@10"] <= 1
    err = capsys.readouterr().err
    assert "1 empty document(s) kept" in err and "1 judgement(s) of documents not in corpus.jsonl" in err
    assert eval_main(["retrieval", str(run), "eval.split=test"]) == 0
    path, _ = latest_checkpoint(run)
    report = json.loads(path.with_name(f"{path.stem}.retrieval.json").read_text())
    assert report["queries"] >= 150 and all(0 <= report[s]["ndcg@10"] <= 1 for s in ("run", "bm25", "untrained"))


def test_a_bucketed_text_step_reads_nothing_from_the_device(tmp_path):
    """Issue 34: with length buckets the loader hands the views' lengths over on the host (read in
    the same sync that pads the batch), and the step reads nothing; without buckets the views
    carry no host list, which a compiled encoder would guard on."""
    from moco_engine.tools.opcount import step_counters

    trainer = Trainer(text_cfg(tmp_path, "model.params.length_buckets=3"))
    (x_q, x_k), _, idx = next(iter(trainer.loaders.train))
    assert x_q["lengths"] == (x_q["attention_mask"].sum(1)).tolist()
    step = lambda: trainer.train_step(x_q, x_k, idx)  # noqa: E731
    step()
    assert count_ops(step, step_counters(trainer.optimizer)).host_reads == {}
    (plain, _), _, _ = next(iter(Trainer(text_cfg(tmp_path / "plain")).loaders.train))
    assert "lengths" not in plain
