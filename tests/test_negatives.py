import pytest
import torch

from moco_engine.losses import info_nce, info_nce_logits
from moco_engine.negatives import Queue


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
        assert torch.equal(queue.negatives(), ref.keys)
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
    snapshot = queue.negatives()
    before = snapshot.clone()
    loss = info_nce(info_nce_logits(q, k, snapshot, 0.1))
    queue.update(torch.randn(5, 3), torch.arange(5))  # before backward, on purpose
    assert torch.equal(snapshot, before)
    assert not torch.equal(queue.negatives(), before)
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
    assert set(queue.state_dict()) == {"keys", "ptr"}


def test_queue_rejects_bad_sizes():
    with pytest.raises(ValueError, match="K=0"):
        Queue(0, 4)
    with pytest.raises(ValueError, match="dimension 4"):
        Queue(3, 4).update(torch.randn(2, 5), torch.arange(2))
