import math

import pytest
import torch

from moco_engine.method.losses import blend_log_z, info_nce, info_nce_logits
from moco_engine.method.memory_bank import MemoryBank
from moco_engine.method.negatives import InBatch, Queue


class ReferenceRing:
    """The slow, obviously right ring buffer: one key at a time."""

    def __init__(self, keys: torch.Tensor):
        self.keys = keys.clone()
        self.ptr = 0

    def push(self, batch: torch.Tensor) -> None:
        for key in batch:
            self.keys[self.ptr] = key
            self.ptr = (self.ptr + 1) % self.keys.shape[0]


@pytest.mark.parametrize(
    "size,batches",
    [
        (10, [3, 3, 3, 3, 2]),  # K % B != 0, wrap-around, ragged last batch
        (7, [13, 2, 9]),  # B > K: only the last K keys of a batch survive
        (8, [4, 4, 4]),  # the classic K % B == 0 case
        (1, [3, 1]),  # K = 1
    ],
)
def test_queue_matches_reference_ring_buffer(size, batches):
    torch.manual_seed(0)
    dim = 4
    queue = Queue(size, dim)
    ref = ReferenceRing(queue.keys)
    for b in batches:
        keys = torch.randn(b, dim)
        queue.update(keys, torch.arange(b))
        ref.push(keys)
        assert torch.equal(queue.negatives().embeddings, ref.keys)
        assert int(queue.ptr) == ref.ptr


def test_queue_starts_with_random_unit_vectors():
    queue = Queue(64, 16)
    assert torch.allclose(queue.keys.norm(dim=1), torch.ones(64), atol=1e-5)
    assert queue.keys.std() > 0.1


def test_snapshot_is_unchanged_by_a_later_update_and_backward_works():
    torch.manual_seed(0)
    queue = Queue(6, 3)
    q = torch.randn(4, 3, requires_grad=True)
    k = torch.randn(4, 3)
    snapshot = queue.negatives().embeddings
    before = snapshot.clone()
    loss = info_nce(info_nce_logits(q, k, snapshot, 0.1))
    queue.update(torch.randn(5, 3), torch.arange(5))  # before backward, on purpose
    assert torch.equal(snapshot, before)
    assert not torch.equal(queue.negatives().embeddings, before)
    loss.backward()  # autograd's saved copy of the negatives was not modified in place
    expected = torch.autograd.grad(info_nce(info_nce_logits(q, k, before, 0.1)), q)[0]
    assert torch.allclose(q.grad, expected)


def test_queue_state_dict_round_trip():
    queue = Queue(9, 5)
    queue.update(torch.randn(4, 5), torch.arange(4))
    other = Queue(9, 5)
    other.load_state_dict(queue.state_dict())
    assert torch.equal(other.keys, queue.keys)
    assert int(other.ptr) == 4
    assert set(queue.state_dict()) == {"keys", "index", "written", "clock", "ptr"}


def test_queue_rejects_bad_sizes():
    with pytest.raises(ValueError, match="K=0"):
        Queue(0, 4)
    with pytest.raises(ValueError, match="dimension 4"):
        Queue(3, 4).update(torch.randn(2, 5), torch.arange(2))


# ----------------------------------------------------------------------------- queue bookkeeping
def test_queue_bookkeeping_and_same_instance_mask():
    queue = Queue(5, 2, mask_same_instance=True)
    queue.update(torch.randn(3, 2), torch.tensor([10, 11, 12]))
    queue.update(torch.randn(3, 2), torch.tensor([13, 14, 15]))  # wraps: slot 0 now holds item 15
    assert queue.index.tolist() == [15, 11, 12, 13, 14]
    m = queue.metrics(torch.tensor([11, 15, 99, 98]))
    assert m["queue_fill"].item() == 1.0
    assert m["queue_age_max"].item() == 2 and m["queue_age_mean"].item() == pytest.approx((1 + 2 + 2 + 1 + 1) / 5)
    assert m["queue_same_instance"].item() == 0.5
    neg = queue.negatives(None, None, torch.tensor([11, 15, 99]))
    assert neg.drop.tolist() == [
        [False, True, False, False, False],
        [True, False, False, False, False],
        [False, False, False, False, False],
    ]
    logits = info_nce_logits(torch.randn(3, 2), torch.randn(3, 2), neg.embeddings, 0.1, neg.drop)
    assert torch.isinf(logits[:, 1:]).equal(neg.drop)  # exactly the same-instance entries removed


def test_queue_stores_low_precision_and_forms_float32_logits():
    queue = Queue(8, 4, dtype="bfloat16")
    queue.update(torch.randn(3, 4), torch.arange(3))
    assert queue.keys.dtype == torch.bfloat16
    assert info_nce_logits(torch.randn(2, 4), torch.randn(2, 4), queue.negatives().embeddings, 0.2).dtype == torch.float32


# ----------------------------------------------------------------------------- memory bank
def test_bank_momentum_update_equals_its_formula():
    bank = MemoryBank(6, 3, num_negatives=4, update="momentum", momentum=0.5)
    before = bank.bank.clone()
    keys = torch.nn.functional.normalize(torch.randn(2, 3), dim=1)
    bank.update(keys, torch.tensor([1, 4]))
    expected = torch.nn.functional.normalize(0.5 * before[[1, 4]] + 0.5 * keys, dim=1)
    assert torch.allclose(bank.bank[[1, 4]], expected, atol=1e-6)
    assert torch.equal(bank.bank[[0, 2, 3, 5]], before[[0, 2, 3, 5]])
    refresh_only = MemoryBank(6, 3, num_negatives=4, update="refresh")
    kept = refresh_only.bank.clone()
    refresh_only.update(keys, torch.tensor([1, 4]))
    assert torch.equal(refresh_only.bank, kept)  # refresh mode writes only at the epoch's end


def test_bank_update_of_a_repeated_item_takes_the_mean_of_its_keys():
    # The symmetric loss updates every item twice in one call (both views' keys).
    bank = MemoryBank(6, 3, num_negatives=4, update="momentum", momentum=0.5)
    before = bank.bank.clone()
    k1, k2, k3 = torch.nn.functional.normalize(torch.randn(3, 3), dim=1)
    bank.update(torch.stack([k1, k3, k2]), torch.tensor([2, 5, 2]))
    expected_2 = torch.nn.functional.normalize(0.5 * before[2] + 0.5 * (k1 + k2) / 2, dim=0)
    expected_5 = torch.nn.functional.normalize(0.5 * before[5] + 0.5 * k3, dim=0)
    assert torch.allclose(bank.bank[2], expected_2, atol=1e-6)
    assert torch.allclose(bank.bank[5], expected_5, atol=1e-6)
    assert bank.written[2] == bank.written[5] == 0 and bank.clock == 1


def test_bank_sampling_is_uniform_and_can_exclude_own_items():
    torch.manual_seed(0)
    n, k, draws = 20, 50, 400
    bank = MemoryBank(n, 4, num_negatives=k)
    counts = torch.zeros(n)
    for _ in range(draws):
        counts += torch.bincount(bank.sample(torch.device("cpu")), minlength=n)
    expected = draws * k / n
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 43.8  # chi-square, 19 degrees of freedom, p = 0.001
    own = torch.tensor([3, 7])
    neg = bank.negatives(None, None, own)
    sampled_own = (neg.embeddings[None] == bank.bank[own][:, None]).all(-1)  # (B, K)
    assert torch.equal(neg.drop, sampled_own)
    without = MemoryBank(n, 4, num_negatives=n, replacement=False)
    assert sorted(without.sample(torch.device("cpu")).tolist()) == list(range(n))
    with pytest.raises(ValueError, match="K=21.*N=20"):
        MemoryBank(n, 4, num_negatives=21, replacement=False)


def test_bank_positive_is_the_items_entry():
    bank = MemoryBank(5, 3, num_negatives=2, positive="bank")
    assert torch.equal(bank.positives(torch.tensor([4, 0])), bank.bank[[4, 0]])
    assert MemoryBank(5, 3, num_negatives=2, positive="key").positives(torch.tensor([1])) is None


# ----------------------------------------------------------------------------- all kinds
@pytest.mark.parametrize(
    "source",
    [Queue(7, 3, mask_same_instance=True), MemoryBank(9, 3, num_negatives=4, update="both"), InBatch()],
    ids=["queue", "memory_bank", "in_batch"],
)
def test_every_source_round_trips_through_state_dict(source):
    source.update(torch.randn(4, 3), torch.arange(4))
    state = source.state_dict()
    clone = type(source).__new__(type(source))
    clone.__dict__ = {**source.__dict__, "_buffers": {k: torch.zeros_like(v) for k, v in source._buffers.items()}}
    clone.load_state_dict(state)
    for name, value in source.state_dict().items():
        assert torch.allclose(clone.state_dict()[name], value, equal_nan=True), name


def test_fed_the_same_negatives_the_three_kinds_give_the_same_logits():
    torch.manual_seed(0)
    b, d = 3, 4
    q = torch.nn.functional.normalize(torch.randn(b, d), dim=1)
    k = torch.nn.functional.normalize(torch.randn(b, d), dim=1)
    idx = torch.tensor([5, 1, 7])
    entries = torch.cat([k, q])  # (2B, D): in-batch's negatives are the batch's keys and queries

    # In-batch against a queue holding the same entries under the same items, masked alike.
    queue = Queue(2 * b, d, mask_same_instance=True)
    queue.update(entries, torch.cat([idx, idx]))
    def logits(neg):
        return info_nce_logits(q, k, neg.embeddings, 0.2, neg.drop)

    from_queue = logits(queue.negatives(q, k, idx))
    from_batch = logits(InBatch().negatives(q, k, idx))
    assert torch.equal(from_queue, from_batch)
    assert torch.isinf(from_batch[:, 1:]).sum() == 2 * b  # each query's own key and own query

    # The memory bank against a queue, both holding the entries, no masking.
    plain_queue = Queue(2 * b, d)
    plain_queue.update(entries, torch.arange(2 * b))
    bank = MemoryBank(2 * b, d, num_negatives=2 * b, exclude_own=False)
    bank.refresh(entries)
    bank.sample = lambda device: torch.arange(2 * b)  # the draw, fixed to slot order
    assert torch.equal(logits(bank.negatives(q, k, idx)), logits(plain_queue.negatives(q, k, idx)))


def test_log_z_is_the_first_estimate_then_a_moving_average_of_z():
    bank = MemoryBank(10, 3, num_negatives=2)
    assert torch.isnan(bank.log_z)  # NCE's normaliser, until the first batch estimates it
    first = blend_log_z(bank.log_z, torch.tensor(2.0))
    assert first.item() == pytest.approx(2.0)
    expected = math.log(0.99 * math.exp(2.0) + 0.01 * math.exp(3.0))
    assert blend_log_z(first, torch.tensor(3.0)).item() == pytest.approx(expected)


@pytest.mark.slow  # slow: this session's run passed 12 min; -m slow runs it
def test_the_same_instance_mask_is_on_when_the_queue_is_large_against_an_epoch(tmp_path, recwarn):
    """Issue 35: queue.mask_same_instance=auto masks once K >= half an epoch's items; a K above
    them is said in one line before the first step; queue_same_instance_scored is the share of
    queries whose own older key is among the negatives scored: 0 with the mask."""
    from conftest import TINY

    from moco_engine.config.loading import load_config
    from moco_engine.run.tracking import METRICS_FILE, read_metrics
    from moco_engine.run.trainer import Trainer

    def build(name: str, *extra: str) -> Trainer:
        return Trainer(load_config([], [*TINY, "data.synthetic_size=48", "train.epochs=3", "eval.knn_every=0",
                                        f"train.out_dir={tmp_path / name}", *extra]))

    def run(name: str, *extra: str) -> tuple[Trainer, list[dict]]:
        trainer = build(name, *extra)
        trainer.fit()
        return trainer, read_metrics(tmp_path / name / METRICS_FILE, "epoch")

    small, epochs = run("small", "queue.size=200")  # 48 items, K 200: each item's key held about four times
    assert small.negatives.mask_same_instance
    (line,) = [str(w.message) for w in recwarn if "queue.size" in str(w.message)]
    assert line == ("queue.size K=200 is more than an epoch's 48 items: the queue holds items' own older keys, "
                    "masked from their own queries")
    assert epochs[-1]["queue_same_instance"] > 0.5 and all(r["queue_same_instance_scored"] == 0 for r in epochs)
    off, epochs = run("off", "queue.size=200", "queue.mask_same_instance=false")
    assert not off.negatives.mask_same_instance
    assert all(r["queue_same_instance_scored"] == r["queue_same_instance"] for r in epochs)
    assert build("half", "queue.size=24").negatives.mask_same_instance  # K = half an epoch's items
    assert not build("large", "queue.size=23").negatives.mask_same_instance


def test_old_configs_boolean_mask_setting_still_loads(tmp_path):
    from moco_engine.config.loading import load_config
    from moco_engine.config.schema import ConfigError

    for value, expected in (("false", "false"), ("true", "true"), ("auto", "auto"), ("False", "false")):
        f = tmp_path / "old.yaml"
        f.write_text(f"queue:\n  mask_same_instance: {value}\n")
        assert load_config([str(f)]).queue.mask_same_instance == expected
    with pytest.raises(ConfigError, match="'queue.mask_same_instance' = 'sometimes': must be one of auto, true, false"):
        load_config([], ["queue.mask_same_instance=sometimes"])
