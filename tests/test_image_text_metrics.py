"""Image–text recall, its chance level, CLIP's prompt templates and the zero-shot metrics against
values worked out by hand, a brute-force sort, and an exact count of random rankings."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
import torch

from moco_engine.config.schema import UserError
from moco_engine.evaluation import image_text
from moco_engine.evaluation.image_text import (
    CIFAR_TEMPLATES,
    chance_recalls,
    class_embeddings,
    pair_recalls,
    read_templates,
    zeroshot_metrics,
)

# Three images on the axes, so a caption's score against image i is its i-th component; each
# caption is a unit vector. text_image: captions 0-1 are image 0's, 2-3 image 1's, 4-5 image 2's.
IMAGES = torch.eye(3)
TEXTS = torch.tensor([[0.8, 0.6, 0.0], [0.0, 0.6, 0.8], [0.6, 0.0, 0.8],
                      [0.0, 0.8, 0.6], [0.8, 0.0, 0.6], [1.0, 0.0, 0.0]])
OWNER = torch.tensor([0, 0, 1, 1, 2, 2])
# Scores, image rows against caption columns (TEXTS.T):
#   image 0: 0.8  0    0.6  0    0.8  1.0    positives t0, t1
#   image 1: 0.6  0.6  0    0.8  0    0      positives t2, t3
#   image 2: 0    0.8  0.8  0.6  0.6  0      positives t4, t5
# image→text, the best positive's rank (negatives scored as high or higher: a tie counts against it):
#   image 0: best t0 = 0.8; t5 = 1.0 above it, t4 ties at 0.8 -> rank 2
#   image 1: best t3 = 0.8; no negative as high -> rank 0
#   image 2: best t4 = 0.6; t1, t2 (0.8) above it, t3 ties at 0.6 -> rank 3
# text→image, the own image's rank in the caption's column:
#   t0 (0.8 .6 0) own 0.8 -> 0 · t1 (0 .6 .8) own 0 -> 2 · t2 (.6 0 .8) own 0 -> 2
#   t3 (0 .8 .6) own 0.8 -> 0 · t4 (.8 0 .6) own 0.6 -> 1 · t5 (1 0 0) own 0 -> 2 (image 1 ties at 0)
# So i2t ranks [2, 0, 3] and t2i ranks [0, 2, 2, 0, 1, 2].


def test_recalls_of_a_hand_worked_example():
    r = pair_recalls(IMAGES, TEXTS, OWNER, ks=(1, 2, 3))
    assert list(r) == ["i2t_R@1", "i2t_R@2", "i2t_R@3", "t2i_R@1", "t2i_R@2", "t2i_R@3", "rsum"]
    expected = {"i2t_R@1": 100 / 3, "i2t_R@2": 100 / 3, "i2t_R@3": 200 / 3,
                "t2i_R@1": 200 / 6, "t2i_R@2": 300 / 6, "t2i_R@3": 100.0}
    for key, value in expected.items():
        assert r[key] == pytest.approx(value), key
    assert r["rsum"] == pytest.approx(sum(expected.values()))


def test_default_keys_and_every_rank_below_five():
    r = pair_recalls(IMAGES, TEXTS, OWNER)
    assert list(r) == ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum"]
    assert [r[k] for k in ("i2t_R@5", "i2t_R@10", "t2i_R@5", "t2i_R@10")] == [100.0] * 4
    assert r["rsum"] == pytest.approx(100 / 3 + 100 / 3 + 400)


def test_ties_count_against_the_positive():
    """Every score tied (towers collapsed to one output): every negative is as high as a
    positive, so every rank is last and every recall 0, never 100."""
    same = torch.nn.functional.normalize(torch.ones(4, 8), dim=1)
    r = pair_recalls(same, same[:1].expand(6, 8), torch.tensor([0, 1, 2, 3, 3, 0]), ks=(1,))
    assert r == {"i2t_R@1": 0.0, "t2i_R@1": 0.0, "rsum": 0.0}
    # Image 0 scores its caption t0 0.6, t1 (image 1's) 0.6, t2 (image 1's) 0.8: one negative
    # above, one tied, so rank 2. Image 1's best, t1 at 0.8, ties t0 (a negative): rank 1.
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[0.6, 0.8], [0.6, 0.8], [0.8, 0.6]])
    r = pair_recalls(images, texts, torch.tensor([0, 1, 1]), ks=(1, 2, 3))
    assert r["i2t_R@1"] == 0.0 and r["i2t_R@2"] == pytest.approx(50.0) and r["i2t_R@3"] == 100.0
    # t0's column (0.6, 0.8): image 1 above its image 0, rank 1; t1 (0.6, 0.8) rank 0; t2 (0.8, 0.6) rank 1.
    assert r["t2i_R@1"] == pytest.approx(100 / 3) and r["t2i_R@2"] == 100.0
    r = pair_recalls(images[:1], texts[:2], torch.tensor([0, 0]), ks=(1,))
    assert r["i2t_R@1"] == 100.0  # t0 and t1 tie at 0.6, both image 0's


def brute_force(images, texts, owner, ks):
    """Recalls by full sorts (no ties among random floats): the reference for chunking."""
    s = images @ texts.T
    i2t_order = s.argsort(dim=1, descending=True)
    t2i_order = s.T.argsort(dim=1, descending=True)
    out = {}
    for k in ks:
        hit = (owner[i2t_order[:, :k]] == torch.arange(len(images))[:, None]).any(1)
        out[f"i2t_R@{k}"] = 100.0 * hit.double().mean().item()
    for k in ks:
        hit = (t2i_order[:, :k] == owner[:, None]).any(1)
        out[f"t2i_R@{k}"] = 100.0 * hit.double().mean().item()
    out["rsum"] = sum(out.values())
    return out


def test_chunks_give_the_one_chunk_result_and_a_full_sorts():
    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(50, 16, generator=g), dim=1)
    texts = torch.nn.functional.normalize(torch.randn(130, 16, generator=g), dim=1)
    # Every image at least one caption, the other 80 anywhere, the order shuffled.
    owner = torch.cat([torch.arange(50), torch.randint(0, 50, (80,), generator=g)])[torch.randperm(130, generator=g)]
    ks = (1, 5, 10, 50)
    whole = pair_recalls(images, texts, owner, ks=ks, chunk=1024)
    assert whole == pytest.approx(brute_force(images, texts, owner, ks))
    for chunk in (1, 7, 49, 50, 129):
        assert pair_recalls(images, texts, owner, ks=ks, chunk=chunk) == whole, chunk
    assert 0 < whole["i2t_R@1"] < whole["i2t_R@10"] < 100 and whole["t2i_R@50"] == 100.0


def test_an_image_without_captions_and_bad_shapes_are_value_errors():
    with pytest.raises(ValueError, match="no caption, e.g. image 2"):
        pair_recalls(IMAGES, TEXTS[:4], OWNER[:4])
    with pytest.raises(ValueError, match="no caption"):
        chance_recalls(torch.tensor([0, 0, 2]), 3)
    with pytest.raises(ValueError, match="outside"):
        pair_recalls(IMAGES, TEXTS, OWNER + 1)
    with pytest.raises(ValueError, match="text_image must be"):
        pair_recalls(IMAGES, TEXTS, OWNER[:5])
    with pytest.raises(ValueError, match="NaN"):
        pair_recalls(IMAGES, TEXTS.clone().fill_(float("nan")), OWNER)
    with pytest.raises(ValueError, match="ks"):
        pair_recalls(IMAGES, TEXTS, OWNER, ks=(0, 5))


def exact_i2t_chance(counts, m, k):
    """The share of all k-subsets of m texts (a random ranking's top k) holding one of an
    image's c captions, averaged over images: counted, not computed by formula."""
    total = 0
    for c in counts:
        subsets = list(itertools.combinations(range(m), k))
        total += Fraction(sum(any(t < c for t in s) for s in subsets), len(subsets))
    return 100 * total / len(counts)


@pytest.mark.parametrize("terms", [10_000, 0], ids=["product", "lgamma"])
def test_chance_recalls_equal_an_exact_count_of_random_top_ks(terms, monkeypatch):
    monkeypatch.setattr(image_text, "PRODUCT_TERMS", terms)  # both ways of computing the miss
    owner = torch.tensor([0, 0, 1, 2, 2, 2, 3])  # 4 images with 2, 1, 3, 1 captions among M = 7
    ks = (1, 2, 3, 5, 9)
    r = chance_recalls(owner, 4, ks=ks)
    assert list(r) == [f"{d}_R@{k}" for d in ("i2t", "t2i") for k in ks] + ["rsum"]
    for k in ks:
        assert r[f"i2t_R@{k}"] == pytest.approx(float(exact_i2t_chance([2, 1, 3, 1], 7, min(k, 7)))), k
        assert r[f"t2i_R@{k}"] == pytest.approx(100 * min(k, 4) / 4), k
    assert r["i2t_R@9"] == pytest.approx(100.0) and r["t2i_R@5"] == 100.0
    assert r["rsum"] == pytest.approx(sum(v for key, v in r.items() if key != "rsum"))


def test_chance_for_a_thousand_images_of_five_captions():
    owner = torch.arange(1000).repeat_interleave(5)
    r = chance_recalls(owner, 1000)
    m, c = 5000, 5
    for k in (1, 5, 10):
        product = math.prod((m - c - j) / (m - j) for j in range(k))
        assert r[f"i2t_R@{k}"] == pytest.approx(100 * (1 - product), rel=1e-9)
        assert r[f"t2i_R@{k}"] == pytest.approx(k / 10)
    # About k / N both ways: 5 draws in 5000 each hit with 1/1000, ten of them ~1 %, not 5 %.
    assert r["i2t_R@10"] == pytest.approx(0.996, abs=1e-3)
    assert r["i2t_R@1"] == pytest.approx(0.1)


def test_chance_matches_random_embeddings_on_average():
    """Independent random embeddings rank the candidates of each query uniformly at random."""
    g = torch.Generator().manual_seed(1)
    owner = torch.cat([torch.arange(20), torch.arange(20)])  # 2 captions each, M = 40
    trials = [pair_recalls(torch.nn.functional.normalize(torch.randn(20, 8, generator=g), dim=1),
                           torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=1), owner)
              for _ in range(200)]
    chance = chance_recalls(owner, 20)
    for key in ("i2t_R@5", "t2i_R@5", "i2t_R@10"):
        assert sum(t[key] for t in trials) / len(trials) == pytest.approx(chance[key], abs=3.0), key


def test_cifar_templates_are_clips_eighteen():
    assert len(CIFAR_TEMPLATES) == 18 == len(set(CIFAR_TEMPLATES))
    assert all(t.count("{}") == 1 for t in CIFAR_TEMPLATES)
    assert CIFAR_TEMPLATES[0] == "a photo of a {}." and CIFAR_TEMPLATES[-1] == "a photo of the big {}."


def test_read_templates_skips_comments_and_names_the_bad_line(tmp_path):
    good = tmp_path / "t.txt"
    good.write_text("# CLIP's\n\na photo of a {}.\n  a {} in the snow.  \n#x {}\n")
    assert read_templates(str(good)) == ["a photo of a {}.", "a {} in the snow."]
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a {}.\n\na photo\n")
    with pytest.raises(UserError, match=r"bad\.txt, line 3: a template needs \{\} for the class name: 'a photo'$"):
        read_templates(str(bad))
    bad.write_text("# one\na {c} photo of a {}.\n")
    with pytest.raises(UserError, match=r"bad\.txt, line 2: a template takes one \{\}"):
        read_templates(str(bad))
    bad.write_text("# only a comment\n\n")
    with pytest.raises(UserError, match=r"bad\.txt: no templates"):
        read_templates(str(bad))
    with pytest.raises(UserError, match="missing.txt: cannot read"):
        read_templates(str(tmp_path / "missing.txt"))


def test_class_embeddings_average_the_normalised_prompts():
    vectors = {"a cat.": [3.0, 4.0], "the cat!": [0.0, 2.0], "a big dog.": [2.0, 0.0], "the big dog!": [0.0, -5.0]}
    seen = []

    def encode_text(prompts):
        seen.append(prompts)
        return torch.tensor([vectors[p] for p in prompts])

    emb = class_embeddings(encode_text, ["cat", "big_dog"], ["a {}.", "the {}!"])
    assert seen == [["a cat.", "the cat!"], ["a big dog.", "the big dog!"]]  # '_' read as a space
    # cat: (0.6, 0.8) and (0, 1) average (0.3, 0.9), i.e. (1, 3) / sqrt(10) once normalised;
    # big dog: (1, 0) and (0, -1) average (0.5, -0.5), i.e. (1, -1) / sqrt(2).
    expected = torch.tensor([[1 / math.sqrt(10), 3 / math.sqrt(10)], [1 / math.sqrt(2), -1 / math.sqrt(2)]])
    assert torch.allclose(emb, expected, atol=1e-6)
    with pytest.raises(ValueError, match=r"must return \(2, D\)"):
        class_embeddings(lambda p: torch.ones(1, 2), ["cat"], ["a {}.", "the {}!"])


def test_zeroshot_metrics_of_a_hand_example_with_absent_classes():
    logits = torch.tensor([[0.9, 0.1, 0.0, 0.0, 0.0, 0.0],   # target 0, rank 0
                           [0.2, 0.5, 0.3, 0.1, 0.0, 0.0],   # target 0, rank 2
                           [0.1, 0.7, 0.2, 0.0, 0.0, 0.0],   # target 1, rank 0
                           [0.6, 0.5, 0.1, 0.4, 0.3, 0.2],   # target 2, rank 5: outside the top 5
                           [0.3, 0.3, 0.3, 0.1, 0.0, 0.0]])  # target 2, tied with 0 and 1: rank 2
    m = zeroshot_metrics(logits, torch.tensor([0, 0, 1, 2, 2]))
    assert m["top1"] == pytest.approx(40.0) and m["top5"] == pytest.approx(80.0)
    # Classes 0, 1, 2 recall 1/2, 1/1, 0/2; classes 3-5 have no sample and are left out (not 0).
    assert m["mean_per_class_recall"] == pytest.approx(100 * (0.5 + 1 + 0) / 3)
    assert m["chance_top1"] == m["chance_mean_per_class_recall"] == pytest.approx(100 / 6)
    assert m["chance_top5"] == pytest.approx(500 / 6)
    small = zeroshot_metrics(logits[:3, :3], torch.tensor([0, 0, 1]))  # C = 3: top-5 is top-3
    assert small["top5"] == 100.0 and small["chance_top5"] == 100.0
    with pytest.raises(ValueError, match="outside"):
        zeroshot_metrics(logits, torch.tensor([0, 0, 1, 2, 6]))
