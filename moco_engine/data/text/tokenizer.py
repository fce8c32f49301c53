"""The text runs' tokenizer: a WordPiece vocabulary trained on the training corpus, or one a user
names (a ``tokenizer.json``, or a local Hugging Face model folder holding one or a ``vocab.txt``).

Training uses the ``tokenizers`` library (BERT's normaliser and pre-tokeniser, WordPiece's
trainer); the same corpus and settings give the same vocabulary (tested), and the run keeps its
tokenizer as JSON in the run folder and in every checkpoint, so a resume and ``moco-eval`` use
the very one training used. Nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moco_engine.data.errors import DataError

SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
TOKENIZER_FILE = "tokenizer.json"


@dataclass
class TextTokenizer:
    """A tokenizer and BERT's special ids.

    Attributes:
        json: the whole tokenizer as the ``tokenizers`` library serialises it (what checkpoints hold).
        vocab_size: V; ids lie in [0, V).
        pad_id, cls_id, sep_id, mask_id: the special tokens' ids.
        special_ids: every special id (never drawn by the replacement augmentation).
    """

    json: str
    vocab_size: int
    pad_id: int
    cls_id: int
    sep_id: int
    mask_id: int
    special_ids: tuple[int, ...]
    cached: Any = field(default=None, repr=False, compare=False)  # the library's tokenizer, built once

    @classmethod
    def from_json(cls, json: str, label: str = "tokenizer") -> TextTokenizer:
        """Raises: DataError: not a tokenizer, or one without BERT's special tokens."""
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_str(json)
        except Exception as e:  # the library raises its own untyped exceptions
            raise DataError(f"{label}: not a tokenizers JSON file ({str(e).splitlines()[0][:120]})") from None
        ids = {name: tok.token_to_id(name) for name in SPECIAL}
        missing = [name for name in ("[PAD]", "[CLS]", "[SEP]", "[MASK]") if ids[name] is None]
        if missing:
            raise DataError(f"{label}: no {missing[0]} token (a BERT-style vocabulary is needed)")
        return cls(json, tok.get_vocab_size(), ids["[PAD]"], ids["[CLS]"], ids["[SEP]"], ids["[MASK]"],
                   tuple(i for i in ids.values() if i is not None))

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens."""
        tok = self.backend()
        return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]

    def backend(self):
        if self.cached is None:
            from tokenizers import Tokenizer

            self.cached = Tokenizer.from_str(self.json)
            self.cached.no_truncation()
            self.cached.no_padding()
        return self.cached

    def save(self, folder: Path) -> Path:
        path = Path(folder) / TOKENIZER_FILE
        path.write_text(self.json, encoding="utf-8")
        return path


def train_wordpiece(texts: list[str], vocab_size: int, lowercase: bool = True) -> TextTokenizer:
    """A WordPiece vocabulary of at most ``vocab_size`` tokens trained on ``texts`` (BERT's
    normalisation: accents stripped and, with ``lowercase``, lower case).

    The library's trainer gives a continuation token ("##e") its id in hash-map order, and breaks
    ties between equally frequent merges by id, so two trainings on the same corpus can differ
    (huggingface/tokenizers issue #1794). Every character's continuation token is therefore
    registered before training, in sorted order, and made an ordinary vocabulary entry after it:
    then no id, and no tie, depends on hash order.
    """
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    normalised = (tok.normalizer.normalize_str(char) for char in distinct_chars(texts))
    chars = sorted({c for piece in normalised for c in piece if not c.isspace()})
    continuations = [f"##{c}" for c in chars]
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=[*SPECIAL, *continuations],
                                        show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in SPECIAL]
    return TextTokenizer.from_json(json.dumps(spec, ensure_ascii=False))


def distinct_chars(texts: list[str]) -> set[str]:
    """The characters ``texts`` hold, each once.

    BERT's normaliser acts on each character alone (control characters dropped, CJK ones spaced,
    NFD with accents stripped, lower case one character at a time), so the corpus's normalised
    characters are those of its distinct ones: a few hundred characters to normalise instead of
    the whole corpus (BENCHMARKS.md, "The recipe on a corpus twelve times SciFact's").
    """
    seen: set[str] = set()
    for text in texts:
        seen.update(text)
    return seen


def load_tokenizer(path: str | Path, lowercase: bool = True) -> TextTokenizer:
    """A ``tokenizer.json`` file, or a model folder holding ``tokenizer.json`` or ``vocab.txt``.

    Raises:
        DataError: no such file, or a folder with neither file.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        if (path / TOKENIZER_FILE).is_file():
            path = path / TOKENIZER_FILE
        elif (path / "vocab.txt").is_file():
            from tokenizers import BertWordPieceTokenizer

            tok = BertWordPieceTokenizer(str(path / "vocab.txt"), lowercase=lowercase)
            return TextTokenizer.from_json(tok.to_str(), str(path / "vocab.txt"))
        else:
            raise DataError(f"{path}: neither {TOKENIZER_FILE} nor vocab.txt (config key 'text.tokenizer')")
    if not path.is_file():
        raise DataError(f"config key 'text.tokenizer' = '{path}': no such file or folder")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text (a tokenizer.json is expected)") from None
    return TextTokenizer.from_json(text, str(path))
