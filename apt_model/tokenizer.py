"""The APT tokenizer: one token per character, plus special tokens and HLBD Full's language tags.

Ids: ``[PAD]=0 [UNK]=1 [BOS]=2 [EOS]=3``, the tags ``[EMOJI] [PHRASE] [EN] [PY] [JP] [KR]`` = 4..9, then the sorted set
of characters of the build texts — so the same data gives the same ids whatever its order. A tag is one token; a
character the vocabulary lacks is ``[UNK]``. ``encode`` adds no BOS/EOS; ``decode`` drops PAD/BOS/EOS.

The vocabulary lives in a real Hugging Face ``tokenizers`` object (WordLevel model, a normaliser doing the
documented whitespace normalisation, a one-character pre-tokenizer, a ``Fuse`` decoder), so ``to_json()`` is a
``tokenizer.json`` that ``transformers.PreTrainedTokenizerFast(tokenizer_file=...)`` loads and encodes identically.
Python's own encode/decode use a dict built from the same vocabulary (several times faster on short texts); tests
check both paths agree.

Text literally containing ``[PAD]``/``[UNK]``/``[BOS]``/``[EOS]`` is split there first and each piece normalised on
its own (exactly what ``tokenizers`` does with special tokens); for all other text
``decode(encode(x)) == normalize_text(x)`` (for characters in the vocabulary).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from apt_model.data.pairs import TAGS, normalize_text
from apt_model.errors import CheckpointError
from apt_model.io import atomic_write_text, sha256_bytes

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
RESERVED: tuple[str, ...] = SPECIAL_TOKENS + TAGS
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

# Python's str.split() also splits on \x1c-\x1f, which the regex class \s does not cover.
_WHITESPACE_RE = r"[\s\x1c-\x1f]+"
_SPECIAL_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")
_TAG_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in TAGS) + ")")

__all__ = ["RESERVED", "SPECIAL_TOKENS", "TAGS", "AptTokenizer", "normalize_text"]


def _characters(texts: Iterable[str]) -> set[str]:
    chars: set[str] = set()
    for text in texts:
        for piece in _SPECIAL_SPLIT.split(text):
            if piece in SPECIAL_TOKENS:
                continue
            for sub in _TAG_SPLIT.split(normalize_text(piece)):
                if sub not in TAGS:
                    chars.update(sub)
    return chars


def _hf_tokenizer(tokens: Sequence[str]) -> Tokenizer:
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence(  # type: ignore[assignment]
        [normalizers.Replace(Regex(_WHITESPACE_RE), " "), normalizers.Strip()]
    )
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # type: ignore[assignment]
    tok.decoder = decoders.Fuse()  # type: ignore[assignment]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=True) for t in TAGS])
    return tok


class AptTokenizer:
    """Character-level tokenizer with single-token tags; see the module docstring."""

    pad_id = PAD_ID
    unk_id = UNK_ID
    bos_id = BOS_ID
    eos_id = EOS_ID

    def __init__(self, tokenizer: Tokenizer) -> None:
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        for i, token in enumerate(RESERVED):
            if vocab.get(token) != i:
                raise CheckpointError(f"tokenizer: {token} must have id {i}, found {vocab.get(token)}")
        id_to_token = [""] * len(vocab)
        for token, i in vocab.items():
            if not 0 <= i < len(vocab) or id_to_token[i]:
                raise CheckpointError(f"tokenizer: ids are not contiguous 0..{len(vocab) - 1}")
            id_to_token[i] = token
        for i, token in enumerate(id_to_token[len(RESERVED) :], start=len(RESERVED)):
            if len(token) != 1:
                raise CheckpointError(f"tokenizer: token {i} {token!r} is not a single character")
        self._tok = tokenizer
        self._vocab: dict[str, int] = vocab
        self._id_to_token: list[str] = id_to_token
        self._json = tokenizer.to_str()

    # ------------------------------------------------------------------ construction / persistence
    @classmethod
    def build(cls, texts: Iterable[str]) -> AptTokenizer:
        """Vocabulary = reserved tokens + the sorted characters of ``texts`` (order-independent)."""
        return cls(_hf_tokenizer([*RESERVED, *sorted(_characters(texts))]))

    def to_json(self) -> str:
        """The Hugging Face ``tokenizer.json`` text."""
        return self._json

    @classmethod
    def from_json(cls, text: str) -> AptTokenizer:
        try:
            tok = Tokenizer.from_str(text)
        except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
            raise CheckpointError(
                f"tokenizer: not a tokenizer.json ({str(exc).splitlines()[0][:120]})"
            ) from None
        if json.loads(text).get("model", {}).get("type") != "WordLevel":
            raise CheckpointError("tokenizer: not an APT tokenizer (model type is not WordLevel)")
        return cls(tok)

    def save(self, path: str | os.PathLike[str]) -> None:
        atomic_write_text(path, self._json)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> AptTokenizer:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{p}: cannot read tokenizer ({exc.__class__.__name__})") from None
        try:
            return cls.from_json(text)
        except CheckpointError as exc:
            raise CheckpointError(f"{p}: {exc}") from None

    @property
    def sha256(self) -> str:
        return sha256_bytes(self._json.encode("utf-8"))

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        return len(self._id_to_token)

    @property
    def vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    @property
    def tag_ids(self) -> dict[str, int]:
        return {t: self._vocab[t] for t in TAGS}

    @property
    def hf_tokenizer(self) -> Tokenizer:
        """The underlying ``tokenizers.Tokenizer`` (the reference implementation of encode)."""
        return self._tok

    def token_to_id(self, token: str) -> int:
        return self._vocab.get(token, UNK_ID)

    def id_to_token(self, i: int) -> str:
        return self._id_to_token[i]

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` (normalised); no BOS/EOS."""
        vocab, unk = self._vocab, UNK_ID
        if "[" not in text:  # the common case: no tag or special token can occur
            return [vocab.get(ch, unk) for ch in normalize_text(text)]
        ids: list[int] = []
        for piece in _SPECIAL_SPLIT.split(text):
            if piece in SPECIAL_TOKENS:
                ids.append(vocab[piece])
                continue
            for sub in _TAG_SPLIT.split(normalize_text(piece)):
                if sub in TAGS:
                    ids.append(vocab[sub])
                else:
                    ids.extend(vocab.get(ch, unk) for ch in sub)
        return ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; PAD, BOS and EOS are dropped, everything else (tags, [UNK]) is kept."""
        table, n = self._id_to_token, len(self._id_to_token)
        out: list[str] = []
        for i in ids:
            i = int(i)
            if i in (PAD_ID, BOS_ID, EOS_ID):
                continue
            if not 0 <= i < n:
                raise ValueError(f"token id {i} out of range for vocabulary of {n}")
            out.append(table[i])
        return "".join(out)

    def __len__(self) -> int:
        return self.vocab_size

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AptTokenizer) and other._json == self._json

    def __hash__(self) -> int:
        return hash(self._json)

    def __repr__(self) -> str:
        return f"AptTokenizer(vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"
