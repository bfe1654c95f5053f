"""AptTokenizer: reserved ids, single-token tags, round trips, and agreement with tokenizers / transformers."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apt_model.data import generate, load_dataset, write_dataset
from apt_model.data.full import record_pairs
from apt_model.errors import CheckpointError
from apt_model.tokenizer import RESERVED, SPECIAL_TOKENS, TAGS, AptTokenizer, normalize_text


@pytest.fixture(scope="module")
def raw_texts() -> list[str]:
    """Every input and output of both default datasets, as written in the documents (not normalised)."""
    texts: list[str] = []
    for rows in generate("hardcore")["data"].values():
        for r in rows:
            texts += [r["input"], r["output"]]
    for record in generate("full")["samples"]:
        for _, i, o in record_pairs(record):
            texts += [i, o]
    return texts


@pytest.fixture(scope="module")
def tok(raw_texts: list[str]) -> AptTokenizer:
    return AptTokenizer.build(raw_texts)


TRICKY = [
    "",
    "   ",
    "a  b\tc\nd",
    "  leading and trailing  ",
    "[EN]Video chat[JP]ビデオ通話",
    "x [EMOJI]  📹  [PHRASE] y",
    "[[EN]]",
    "[EN",
    "literal [BOS] and [EOS] and [PAD] and [UNK]",
    "  [BOS]  spaced  ",
    "未知的字符 ☃ 𝔘",
    "👩‍🏫 teacher",
    "unit\x1cseparator\u3000ideographic space\u00a0nbsp",
]


def test_reserved_ids(tok: AptTokenizer) -> None:
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert [tok.token_to_id(t) for t in RESERVED] == list(range(10))
    assert tok.tag_ids == {t: 4 + i for i, t in enumerate(TAGS)}
    chars = [tok.id_to_token(i) for i in range(len(RESERVED), tok.vocab_size)]
    assert chars == sorted(chars) and all(len(c) == 1 for c in chars)


def test_each_tag_encodes_to_exactly_one_id(tok: AptTokenizer) -> None:
    for tag in TAGS:
        assert tok.encode(tag) == [tok.tag_ids[tag]]
        assert tok.encode(f"a{tag}b") == [tok.token_to_id("a"), tok.tag_ids[tag], tok.token_to_id("b")]
        assert tok.decode(tok.encode(tag)) == tag


def test_decode_encode_round_trips_both_default_datasets(tok: AptTokenizer, raw_texts: list[str]) -> None:
    assert len(raw_texts) > 10_000
    for text in raw_texts:
        ids = tok.encode(text)
        assert tok.unk_id not in ids, text
        assert tok.decode(ids) == normalize_text(text), text


def test_loaded_pairs_round_trip(tmp_path: Path, tok: AptTokenizer) -> None:
    for kind in ("hardcore", "full"):
        path = tmp_path / f"{kind}.json"
        write_dataset(generate(kind), path)
        for p in load_dataset(path).pairs:
            assert tok.decode(tok.encode(p.input)) == p.input
            assert tok.decode(tok.encode(p.output)) == p.output


def test_unknown_characters_become_unk(tok: AptTokenizer) -> None:
    ids = tok.encode("☃1")
    assert ids == [tok.unk_id, tok.token_to_id("1")]
    assert tok.decode(ids) == "[UNK]1"


def test_decode_drops_pad_bos_eos_only(tok: AptTokenizer) -> None:
    body = tok.encode("[EN] Cat")
    assert tok.decode([tok.bos_id, *body, tok.eos_id, tok.pad_id, tok.pad_id]) == "[EN] Cat"
    assert tok.decode([tok.unk_id]) == "[UNK]"
    with pytest.raises(ValueError):
        tok.decode([tok.vocab_size])


def test_ids_do_not_depend_on_text_order(raw_texts: list[str]) -> None:
    shuffled = list(raw_texts)
    random.Random(1).shuffle(shuffled)
    a, b = AptTokenizer.build(raw_texts), AptTokenizer.build(shuffled)
    assert a.to_json() == b.to_json() and a.sha256 == b.sha256


def test_fast_path_agrees_with_tokenizers(tok: AptTokenizer, raw_texts: list[str]) -> None:
    texts = raw_texts + TRICKY
    reference = [e.ids for e in tok.hf_tokenizer.encode_batch(texts, add_special_tokens=False)]
    assert [tok.encode(t) for t in texts] == reference
    for text, ids in zip(texts, reference, strict=True):
        assert tok.hf_tokenizer.decode(ids, skip_special_tokens=False).replace("[BOS]", "").replace(
            "[EOS]", ""
        ).replace("[PAD]", "") == tok.decode(ids), text


_PIECES = st.one_of(
    st.text(alphabet=st.sampled_from(list("ab 中文\t\n📹[]ENPYJKR\x1c\u3000")), max_size=8),
    st.sampled_from(TAGS + SPECIAL_TOKENS),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_PIECES, max_size=8).map("".join))
def test_property_round_trip_and_agreement(text: str) -> None:
    tok = AptTokenizer.build([text])
    ids = tok.encode(text)
    assert ids == tok.hf_tokenizer.encode(text, add_special_tokens=False).ids
    if not any(s in text for s in SPECIAL_TOKENS):
        assert tok.unk_id not in ids
        assert tok.decode(ids) == normalize_text(text)


def test_transformers_loads_tokenizer_json_and_encodes_identically(
    tmp_path: Path, tok: AptTokenizer, raw_texts: list[str]
) -> None:
    transformers = pytest.importorskip("transformers")
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    assert len(hf) == tok.vocab_size
    sample = raw_texts[::7] + TRICKY
    for text in sample:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text), text
    ids = tok.encode("[PY] shì pín liáo tiān [EN] Video chat 记得视频聊天。")
    assert hf.decode(ids) == tok.decode(ids)


def test_save_load_round_trip_exactly(tmp_path: Path, tok: AptTokenizer) -> None:
    path = tmp_path / "sub" / "tokenizer.json"
    tok.save(path)
    loaded = AptTokenizer.load(path)
    assert loaded.to_json() == tok.to_json() == path.read_text(encoding="utf-8")
    assert loaded.sha256 == tok.sha256 and loaded == tok
    assert AptTokenizer.from_json(tok.to_json()).vocab == tok.vocab
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temp file left behind


def test_bad_tokenizer_files_raise_checkpoint_error(tmp_path: Path, tok: AptTokenizer) -> None:
    with pytest.raises(CheckpointError):
        AptTokenizer.from_json("{not json")
    with pytest.raises(CheckpointError):
        AptTokenizer.load(tmp_path / "missing.json")
    swapped = (
        tok.to_json()
        .replace('"[PAD]"', '"[TMP]"')
        .replace('"[UNK]"', '"[PAD]"')
        .replace('"[TMP]"', '"[UNK]"')
    )
    with pytest.raises(CheckpointError, match=r"\[PAD\] must have id 0"):
        AptTokenizer.from_json(swapped)


def test_encoding_10k_pairs_is_fast(tok: AptTokenizer, raw_texts: list[str]) -> None:
    texts = (raw_texts * 2)[:20_000]  # 10k pairs
    start = time.perf_counter()
    for text in texts:
        tok.encode(text)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"encoding 10k pairs took {elapsed:.2f}s"
