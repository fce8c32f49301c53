"""A text run's encoder as a sentence-transformers folder (``moco-export --format sentence-transformers``).

The folder is what ``sentence_transformers.SentenceTransformer(folder)`` loads: the transformer
and its tokenizer at the root (``config.json``, ``model.safetensors``, ``tokenizer.json``, as
``transformers.AutoModel.from_pretrained(folder)`` reads them), ``sentence_bert_config.json``
with the evaluation's truncation (queries and documents at ``data.text.max_length``, the one
convention both keep), ``1_Pooling`` (mean or [CLS], as the run pools) and, for a run
of unit embeddings, ``2_Normalize``; ``modules.json`` lists them. Its embeddings are the ones
retrieval uses (the backbone's, before any projection head), equal to rounding (tested).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from moco_engine.config.schema import Config, UserError
from moco_engine.data.text.source import query_length
from moco_engine.data.text.tokenizer import SPECIAL
from moco_engine.method.encoders import Encoder
from moco_engine.method.text_encoder import TextEncoder

MODULES = {"transformer": "sentence_transformers.models.Transformer", "pooling": "sentence_transformers.models.Pooling",
           "normalize": "sentence_transformers.models.Normalize"}


def export_sentence_transformers(cfg: Config, encoder: Encoder, tokenizer_json: str, out: Path) -> Path:
    """Write the folder ``out``.

    Raises:
        UserError: the run's backbone is not a text encoder, or ``out`` exists.
    """
    backbone = encoder.backbone
    if not isinstance(backbone, TextEncoder):
        raise UserError(f"--format sentence-transformers writes a text encoder, and this run's backbone is "
                        f"model.arch={cfg.model.arch}")
    if out.exists():
        raise UserError(f"{out} exists; remove it or pass --out elsewhere")
    from transformers import PreTrainedTokenizerFast

    text = cfg.data.text
    if query_length(text) != text.max_length:  # one max_seq_length cuts queries and documents alike
        print(f"warning: data.text.query_max_length={text.query_max_length}: the folder cuts queries at "
              f"max_length={text.max_length} tokens, as documents; a longer query embeds otherwise than in moco-eval",
              file=sys.stderr, flush=True)
    out.mkdir(parents=True)
    with_pooler(backbone.model).save_pretrained(str(out))
    names = dict(zip(("pad_token", "unk_token", "cls_token", "sep_token", "mask_token"), SPECIAL))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer_from_json(tokenizer_json), **names,
                                        model_max_length=cfg.data.text.max_length)
    tokenizer.save_pretrained(str(out))
    write(out / "sentence_bert_config.json", {"max_seq_length": cfg.data.text.max_length, "do_lower_case": False})
    width = int(backbone.model.config.hidden_size)
    write(out / "1_Pooling" / "config.json", {
        "word_embedding_dimension": width, "pooling_mode_cls_token": backbone.pooling == "cls",
        "pooling_mode_mean_tokens": backbone.pooling == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False, "include_prompt": True})
    modules = [("0", "", "transformer"), ("1", "1_Pooling", "pooling")]
    if encoder.normalize:
        (out / "2_Normalize").mkdir()
        modules.append(("2", "2_Normalize", "normalize"))
    write(out / "modules.json", [{"idx": int(i), "name": i, "path": path, "type": MODULES[kind]} for i, path, kind in modules])
    readable = (out / "modules.json").stat().st_mode & 0o777  # safetensors writes its file 0600: all as this one
    for path in out.rglob("*"):
        if path.is_file():
            path.chmod(readable)
    return out


def with_pooler(model):
    """The run's BERT with a pooler, as ``AutoModel.from_pretrained`` builds one: the run drops
    it (Contriever's ``src/contriever.py`` does; its weights would get no gradient), and a folder
    without its weights makes every load print them as missing. Its weights are a fresh BERT
    initialisation that nothing reads: the folder pools the token states."""
    if getattr(model, "pooler", None) is not None:
        return model
    from transformers import BertModel

    full = BertModel(model.config, add_pooling_layer=True)
    missing, unexpected = full.load_state_dict(model.state_dict(), strict=False)
    if unexpected or not all(k.startswith("pooler.") for k in missing):
        raise RuntimeError(f"BERT with a pooler differs from the run's beyond it: {missing + unexpected}")
    return full



def tokenizer_from_json(text: str):
    """The run's tokenizer with BERT's template ([CLS] text [SEP]), which the run adds itself
    and a Hugging Face tokenizer adds through its post-processor."""
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_str(text)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok


def write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")
