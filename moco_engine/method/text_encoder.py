"""Text encoders: ``model.arch=bert``, a Hugging Face ``transformers`` BERT without its pooler.

Built from the sizes in ``model.params`` (from scratch), or loaded from a local model folder
(``model.params.pretrained``, e.g. the bert-base-uncased Contriever starts from:
``from_pretrained(folder, local_files_only=True)``; nothing is downloaded). BERT's pooler is
dropped, as Contriever drops it (``src/contriever.py``): its parameters would get no gradient,
which DDP refuses. transformers is imported only by text runs.

The embedding of a text is its tokens' last hidden states pooled: the mean over the attention
mask (Contriever's ``average`` pooling) or the [CLS] token's.

``model.params.length_buckets`` > 1 encodes a batch in that many groups of texts of similar
length, each padded only to its own longest: a text's embedding does not depend on the others in
its batch (BERT has no batch statistics), so this changes the embeddings by float rounding alone
and saves the padded tokens' work (BENCHMARKS.md has what it buys on CPU).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import Tensor, nn

from moco_engine.config.schema import ConfigError, ModelConfig
from moco_engine.method.backbones import Backbone, register_backbone

POOLINGS = ("mean", "cls")
BERT_PARAMS = {"layers": 4, "hidden": 256, "heads": 4, "intermediate": 1024, "dropout": 0.1, "pooling": "mean",
               "pretrained": "", "max_positions": 512, "length_buckets": 1}


class TextEncoder(nn.Module):
    """A transformers encoder and a pooling: {"input_ids": (B, W), "attention_mask": (B, W)} ->
    (B, hidden).

    Attributes:
        model: the transformers model (``save_pretrained`` writes it as Hugging Face does).
        pooling: "mean" or "cls".
        length_buckets: groups of similar length a batch is encoded in (1: the batch at once).
    """

    def __init__(self, model: nn.Module, pooling: str, length_buckets: int = 1):
        super().__init__()
        self.model = model
        self.pooling = pooling
        self.length_buckets = length_buckets

    def forward(self, x: dict[str, Any]) -> Tensor:
        ids, mask = x["input_ids"], x["attention_mask"]
        if self.length_buckets <= 1 or len(ids) < 2:
            return self.encode(ids, mask)
        columns = torch.arange(1, mask.shape[1] + 1, device=mask.device)
        extent = ((mask != 0) * columns).amax(1).clamp(min=1)  # (B,) each text's last unpadded column + 1
        order = torch.argsort(extent, stable=True)  # shortest first; ties in batch order
        groups = order.chunk(self.length_buckets)
        widths = bucket_widths(x.get("lengths"), [len(g) for g in groups], extent, groups)
        parts = [self.encode(ids[group, :width], mask[group, :width]) for group, width in zip(groups, widths)]
        return torch.cat(parts)[torch.argsort(order)]  # back in batch order

    def encode(self, ids: Tensor, mask: Tensor) -> Tensor:
        """(B, W) token ids and attention mask -> (B, hidden)."""
        # The mask as the (B, 1, 1, W) boolean transformers takes as it is: from a 2-D one it
        # would first ask whether every token counts (a host read each call) to drop the mask.
        attend = mask[:, None, None, :].bool()
        hidden = self.model(input_ids=ids, attention_mask=attend).last_hidden_state  # (B, W, H)
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


def bucket_widths(lengths: list[int] | None, sizes: list[int], extent: Tensor, groups: tuple[Tensor, ...]) -> list[int]:
    """Each length bucket's width: the longest text of the group of ``sizes[k]`` texts that
    comes k-th in order of length.

    From the view's host ``lengths`` when the loader gives them (the same multiset as
    ``extent``'s, whatever order shuffle-BN put the batch in, so the k-th group's longest is the
    same): no host read. Else from ``extent`` (B,) on the device: one host read.
    """
    if lengths is None:
        return extent[torch.stack([group[-1] for group in groups])].tolist()  # indexed by a tensor: no read each
    ordered = sorted(lengths)
    return [ordered[end - 1] for end in itertools.accumulate(sizes)]


def token_inputs(cfg: ModelConfig, input_shape: Any) -> int:
    """V, the vocabulary size token inputs declare (``{"input_ids": (W,), ..., "vocab_size": (V,)}``).

    Raises:
        ConfigError: the data are not token ids.
    """
    if not isinstance(input_shape, dict) or "input_ids" not in input_shape or "vocab_size" not in input_shape:
        raise ConfigError(f"config key 'model.arch' = {cfg.arch!r}: a text encoder takes token ids "
                          f"(data.name=text); the data give items of shape {input_shape}")
    return int(input_shape["vocab_size"][0])


@register_backbone("bert", params=BERT_PARAMS)
def bert(cfg: ModelConfig, input_shape: Any) -> Backbone:
    vocab = token_inputs(cfg, input_shape)
    p = cfg.params
    if p["pooling"] not in POOLINGS:
        raise ConfigError(f"config key 'model.params.pooling' = {p['pooling']!r}: must be one of {', '.join(POOLINGS)}")
    from transformers import AutoModel, BertConfig, BertModel

    if p["pretrained"]:
        model = load_pretrained(AutoModel, str(p["pretrained"]))
        if model.get_input_embeddings().num_embeddings < vocab:
            raise ConfigError(f"config key 'model.params.pretrained' = {p['pretrained']!r}: its vocabulary has "
                              f"{model.get_input_embeddings().num_embeddings} tokens, the tokenizer {vocab}: "
                              "use the folder's own tokenizer (text.tokenizer=<the folder>)")
    else:
        for key in ("layers", "hidden", "heads", "intermediate", "max_positions"):
            if int(p[key]) < (0 if key == "layers" else 1):  # 0 layers: a bag of token embeddings, pooled
                raise ConfigError(f"config key 'model.params.{key}' = {p[key]!r}: must be >= {0 if key == 'layers' else 1}")
        if int(p["hidden"]) % int(p["heads"]):
            raise ConfigError(f"config key 'model.params.heads' = {p['heads']!r}: must divide model.params.hidden ({p['hidden']})")
        config = BertConfig(vocab_size=vocab, hidden_size=int(p["hidden"]), num_hidden_layers=int(p["layers"]),
                            num_attention_heads=int(p["heads"]), intermediate_size=int(p["intermediate"]),
                            hidden_dropout_prob=float(p["dropout"]), attention_probs_dropout_prob=float(p["dropout"]),
                            max_position_embeddings=int(p["max_positions"]), pad_token_id=0)
        model = BertModel(config, add_pooling_layer=False)
    width, positions = int(input_shape["input_ids"][0]), int(model.config.max_position_embeddings)
    if width > positions:
        raise ConfigError(f"config key 'model.params.max_positions' = {positions}: the inputs reach {width} tokens "
                          "(a whole chunk with [CLS] and [SEP], data.text.max_length or query_max_length): "
                          "shorten those or give the model more positions")
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    if int(p["length_buckets"]) < 1:
        raise ConfigError(f"config key 'model.params.length_buckets' = {p['length_buckets']!r}: must be >= 1")
    return Backbone(TextEncoder(model, p["pooling"], int(p["length_buckets"])), int(model.config.hidden_size))


def load_pretrained(auto: Any, folder: str) -> nn.Module:
    """A local Hugging Face model folder's model, never downloaded.

    Raises:
        ConfigError: no model there (one line).
    """
    from pathlib import Path

    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(f"config key 'model.params.pretrained' = {folder!r}: not a local model folder (no config.json)")
    try:
        with torch.device("cpu"):
            return auto.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"config key 'model.params.pretrained' = {folder!r}: {str(e).splitlines()[0]}") from None
