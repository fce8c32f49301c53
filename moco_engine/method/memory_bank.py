"""Wu et al. 2018's memory bank (``negatives.kind=memory_bank``): one stored embedding per
data-set item, K of them sampled per step, refreshed each epoch or updated by momentum. A
:class:`~moco_engine.method.negatives.NegativeSource` like the others, registered in their
registry from here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from moco_engine.config.schema import Config, ConfigError
from moco_engine.method.negatives import Negatives, NegativeSource, register_negatives


class MemoryBank(NegativeSource):
    """Wu et al. 2018's memory bank: one unit vector v_i per data-set item.

    Each step draws K item indices uniformly (with replacement unless told otherwise), shared by
    the whole batch; with ``exclude_own`` a query's own item is dropped from its negatives. The
    positive is the item's bank entry v_i (``positive="bank"``, as in Wu et al.) or the key
    encoder's output (``"key"``). Entries are updated by ``momentum``, Wu et al.'s proximal step
    v_i <- normalize(m v_i + (1 - m) f_i) for the batch's items, by ``refresh``, a re-encoding of
    the whole data set at the end of every epoch, or by ``both``. It starts as random unit vectors,
    or (``init="encode"``) as the untrained encoder's embeddings of every item.

    Buffers (persistent, in ``state_dict``):
        bank: (N, D) the stored embeddings.
        written: (N,) int64 value of ``clock`` at each entry's last write.
        clock: () int64, the number of updates so far.
    """

    stored = True

    def __init__(self, num_items: int, dim: int, num_negatives: int, positive: str = "bank",
                 update: str = "refresh", momentum: float = 0.5, exclude_own: bool = True,
                 replacement: bool = True, generator: torch.Generator | None = None, init: str = "random") -> None:
        super().__init__()
        if not replacement and num_negatives > num_items:
            raise ValueError(
                f"cannot draw K={num_negatives} negatives without replacement from N={num_items} items"
            )
        self.num_items, self.dim, self.num_negatives = num_items, dim, num_negatives
        self.positive, self.update_mode, self.momentum = positive, update, momentum
        self.exclude_own, self.replacement, self.init = exclude_own, replacement, init
        self.register_buffer("bank", F.normalize(torch.randn(num_items, dim, generator=generator), dim=1))
        self.register_buffer("written", torch.zeros(num_items, dtype=torch.long))
        self.register_buffer("clock", torch.zeros((), dtype=torch.long))
        # NCE's normalising constant (log Z): NaN until the first batch estimates it; kept by
        # objectives.NCEObjective after each optimizer step.
        self.register_buffer("log_z", torch.full((), float("nan")))

    def sample(self, device: torch.device) -> Tensor:
        """K item indices (K,), uniform over the N items."""
        if self.replacement:
            return torch.randint(0, self.num_items, (self.num_negatives,), device=device)
        return torch.randperm(self.num_items, device=device)[: self.num_negatives]

    def negatives(self, queries: Tensor | None = None, keys: Tensor | None = None,
                  indices: Tensor | None = None) -> Negatives:
        """K sampled entries (K, D) (a copy: gathering by index never aliases the bank)."""
        sampled = self.sample(self.bank.device)
        drop = None
        if self.exclude_own and indices is not None:
            drop = sampled[None, :] == indices[:, None]
        return Negatives(self.bank[sampled], drop)

    def positives(self, indices: Tensor) -> Tensor | None:
        return self.bank[indices] if self.positive == "bank" else None

    @torch.no_grad()
    def update(self, keys: Tensor, indices: Tensor) -> None:
        """The proximal update of the batch's entries (``momentum`` or ``both``).

        keys: (B, D) unit vectors; indices: (B,) their items, repeats allowed (their mean key counts).
        """
        if self.update_mode == "refresh":
            self.clock += 1
            return
        keys = keys.detach().float()
        # An item can come twice in one update (the symmetric loss's two views, DDP's padded
        # shares): each occurrence is given its item's mean key, so duplicates write the same
        # value (index_copy_ keeps an unspecified one of them on CUDA). Sums by index_add_ into
        # the item's first occurrence: exact for a lone key (a matmul by the (B, B) match matrix
        # would round keys under TF32), and no host sync (torch.unique would need one).
        first = (indices[:, None] == indices[None, :]).int().argmax(1)  # (B,) first equal position
        total = torch.zeros_like(keys).index_add_(0, first, keys)
        count = torch.zeros(len(keys), device=keys.device).index_add_(0, first, torch.ones(len(keys), device=keys.device))
        keys = total[first] / count[first, None]
        mixed = self.momentum * self.bank[indices].float() + (1 - self.momentum) * keys
        self.bank.index_copy_(0, indices, F.normalize(mixed, dim=1).to(self.bank.dtype))
        self.written.index_fill_(0, indices, self.clock)
        self.clock += 1

    @torch.no_grad()
    def on_start(self, encode: Callable[[], Tensor]) -> None:
        """``init="encode"``: the bank starts as every item's embedding by the untrained encoder."""
        if self.init == "encode":
            self.refresh(encode())

    @torch.no_grad()
    def on_epoch_end(self, epoch: int, encode: Callable[[], Tensor]) -> None:
        """The per-epoch refresh: every entry replaced by the current encoder's embedding."""
        if self.update_mode in ("refresh", "both"):
            self.refresh(encode())

    @torch.no_grad()
    def refresh(self, embeddings: Tensor) -> None:
        """Replace the whole bank with embeddings (N, D)."""
        if embeddings.shape != self.bank.shape:
            raise ValueError(f"bank holds {tuple(self.bank.shape)}, refresh gave {tuple(embeddings.shape)}")
        self.bank.copy_(F.normalize(embeddings.float(), dim=1))
        self.written.fill_(self.clock)

    @torch.no_grad()
    def metrics(self, indices: Tensor) -> dict[str, Tensor]:
        """Staleness: updates since the batch's own entries, and on average over the bank, were written."""
        return {
            "bank_staleness_batch": (self.clock - self.written[indices]).float().mean(),
            "bank_staleness_mean": (self.clock - self.written).float().mean(),
        }


def bank_bytes(cfg: Config, num_items: int) -> tuple[str, str, int]:
    """The bank's buffers, the float32 draw of its start included."""
    d = cfg.model.dim
    return "negatives.kind", f"the memory bank of N={num_items} items of D={d}", 2 * num_items * d * 4 + num_items * 8


@register_negatives("memory_bank", reads=("queue.size", "memory_bank"), planned=bank_bytes)
def build_bank(cfg: Config, num_items: int) -> MemoryBank:
    """Raises ConfigError: K larger than N where the bank samples without replacement."""
    bank, k = cfg.memory_bank, cfg.queue.size
    if not bank.replacement and k > num_items:
        raise ConfigError(
            f"config key 'queue.size' = {k}: the memory bank samples without replacement "
            f"(memory_bank.replacement=false) and the data set has only N={num_items} items"
        )
    return MemoryBank(num_items, cfg.model.dim, k, bank.positive, bank.update, bank.momentum, bank.exclude_own,
                      bank.replacement, init=bank.init)
