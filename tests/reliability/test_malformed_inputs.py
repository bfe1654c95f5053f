"""Row "malformed inputs": property-based tests of every parser a user's file or parameter reaches.

Each property feeds thousands of generated inputs (``derandomize=True``: the same cases on every CI run) and asserts
the one contract: the input is accepted, or refused with an ``AptError`` whose message is one clean line — no other
exception type escapes — and nothing is written. Parsers: the HLBD loader (generated documents, mutated and raw
bytes), the tokenizer (``from_json`` on garbage; ``encode``/``decode`` of arbitrary text), the config dataclasses
(``from_dict``/``from_json``) and the pipeline parameters (``parse_params``).
"""

from __future__ import annotations

import atexit
import json
import math
import shutil
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apt_model.config import DataConfig, DBCDACConfig, ModelConfig, TrainConfig
from apt_model.data import HLBDDataset, load_dataset, normalize_text
from apt_model.data.full import LEVEL_FIELDS
from apt_model.errors import AptError
from apt_model.tokenizer import RESERVED, AptTokenizer
from tests.reliability.helpers import count, snapshot, write_dataset_file


def _settings(n: int) -> settings:
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


def assert_clean_error(exc: BaseException) -> None:
    """The contract for refused input: an AptError, one non-empty line, no traceback-ish noise."""
    assert isinstance(exc, AptError), f"{type(exc).__name__} escaped: {exc!r}"
    msg = str(exc)
    assert msg and msg == msg.strip() and "\n" not in msg and "\r" not in msg, repr(msg)
    assert "Traceback" not in msg


# ------------------------------------------------------------------------------------------------ strategies
def _long_text(n: int) -> str:
    return "x" * n  # over the loader's 10 000-character limit for one text (or just under it)


WEIRD_TEXT = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)) | st.sampled_from(list(" \t\n\r\x0b\x0c\x1c\x1d\x85\u2028\u3000[]")),
    max_size=12,
)  # fmt: skip
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | WEIRD_TEXT
    | st.sampled_from(["", " ", "1 + 1 = ?", "2", "[EN]", "[PAD]", "鼠"])
    | st.sampled_from([10_001, 5000]).map(_long_text)
)
JSON = st.recursive(
    SCALARS, lambda c: st.lists(c, max_size=4) | st.dictionaries(WEIRD_TEXT, c, max_size=4), max_leaves=12
)


def _maybe(value: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly the well-formed value, sometimes anything at all."""
    return st.one_of(value, value, value, JSON)


PAIR_TEXT = st.one_of(
    st.sampled_from(["1 + 1 = ?", "2", "龙后面是什么生肖？", "蛇", "[EN] hi", "  a  b "]), WEIRD_TEXT
)
PAIR = st.fixed_dictionaries(
    {"input": _maybe(PAIR_TEXT), "output": _maybe(PAIR_TEXT)},
    optional={"extra": JSON},
)
METADATA = st.fixed_dictionaries(
    {},
    optional={
        "splits": _maybe(st.fixed_dictionaries({"val": _maybe(st.lists(_maybe(PAIR_TEXT), max_size=3))})),
        "total_samples": _maybe(st.integers(-2, 10)),
        "content_sha256": _maybe(st.text("0123456789abcdef", min_size=64, max_size=64)),
        "modules": JSON,
        "name": JSON,
    },
)
HARDCORE = st.fixed_dictionaries(
    {"data": _maybe(st.dictionaries(WEIRD_TEXT, _maybe(st.lists(_maybe(PAIR), max_size=5)), max_size=3))},
    optional={"metadata": _maybe(METADATA)},
)
LEVEL = {
    level: _maybe(st.fixed_dictionaries({f: _maybe(PAIR_TEXT) for f in names}))
    for level, names in LEVEL_FIELDS.items()
}
RECORD = st.fixed_dictionaries({"concept": _maybe(PAIR_TEXT)}, optional=LEVEL) | st.fixed_dictionaries(
    {"concept": _maybe(PAIR_TEXT), **LEVEL}
)
FULL = st.fixed_dictionaries(
    {"samples": _maybe(st.lists(_maybe(RECORD), max_size=3))},
    optional={"metadata": _maybe(METADATA), "data": JSON},
)
DOCS = st.one_of(HARDCORE, HARDCORE, FULL, FULL, JSON)


def _encode(doc: Any, ascii_only: bool, indent: int | None) -> bytes:
    return json.dumps(doc, ensure_ascii=ascii_only, indent=indent, allow_nan=True).encode(
        "utf-8", "surrogatepass"
    )


@st.composite
def mutated_bytes(draw: st.DrawFn, base: bytes) -> bytes:
    """A valid file with a few byte-level edits: flips, cuts, inserts (incl. huge numbers and deep nesting)."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "truncate", "splice"]))
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[i] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del data[i : i + draw(st.integers(1, 64))]
        elif kind == "truncate":
            del data[i:]
        elif kind == "splice":
            j = draw(st.integers(0, max(len(data) - 1, 0)))
            data[i:i] = data[j : j + draw(st.integers(1, 200))]
        else:
            chunk = draw(
                st.sampled_from([b"9" * 4000, b"[" * 3000, b'{"a":' * 1500, b"\xff\xfe", b"\x00", b"NaN", b"-Infinity",
                                 b'"input"', b'"data"', b'"samples"', b"\xed\xa0\x80", b"1e999", b'"\\ud800"'])
                | st.binary(max_size=16)
            )  # fmt: skip
            data[i:i] = chunk
    return bytes(data)


# ------------------------------------------------------------------------------------------------ HLBD loader
class _Dir:
    """One scratch folder per property (hypothesis re-runs the body, so no function-scoped tmp_path)."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="apt_rel_fuzz_"))
        self.file = self.path / "hlbd.json"
        atexit.register(shutil.rmtree, self.path, True)


def _check_load(d: _Dir, data: bytes) -> None:
    d.file.write_bytes(data)
    before = snapshot(d.path)
    try:
        ds = load_dataset(d.file)
    except BaseException as exc:
        assert_clean_error(exc)
        assert str(exc).startswith(str(d.file)), str(exc)  # names the file
    else:
        assert isinstance(ds, HLBDDataset)
        inputs = [p.input for p in ds.pairs]
        assert len(inputs) == len(set(inputs))  # duplicates never trained on twice
        for p in ds.pairs:
            assert p.input and p.output and p.split in ("train", "val")
            assert normalize_text(p.input) == p.input
    assert snapshot(d.path) == before, "loading wrote or changed a file"


_DOCS_DIR = _Dir()


@_settings(1000)
@given(doc=DOCS, ascii_only=st.booleans(), indent=st.sampled_from([None, 1]))
def test_load_dataset_generated_documents(doc: Any, ascii_only: bool, indent: int | None) -> None:
    count("cases:load_dataset-documents")
    _check_load(_DOCS_DIR, _encode(doc, ascii_only, indent))


_VALID = write_dataset_file(_Dir().path / "valid.json").read_bytes()
_BYTES_DIR = _Dir()


@_settings(1000)
@given(data=st.one_of(mutated_bytes(_VALID), mutated_bytes(_VALID), st.binary(max_size=300)))
def test_load_dataset_raw_and_mutated_bytes(data: bytes) -> None:
    count("cases:load_dataset-bytes")
    _check_load(_BYTES_DIR, data)


def test_load_dataset_reports_a_huge_integer_as_a_data_error(tmp_path: Path) -> None:
    """Excluded from the byte mutations above (they insert 4000 digits at most); pinned here instead."""
    path = tmp_path / "big.json"
    path.write_bytes(b'{"data": {"m": [{"input": "a", "output": "b", "n": ' + b"9" * 5000 + b"}]}}")
    with pytest.raises(AptError) as info:
        load_dataset(path)
    assert_clean_error(info.value)


# ------------------------------------------------------------------------------------------------ tokenizer
_TOK = AptTokenizer.build(["1 + 1 = ?", "2", "龙后面是什么生肖？", "蛇", "hello world", "[EN] abc"])
_TOK_DOC = json.loads(_TOK.to_json())


@st.composite
def mutated_tokenizer_json(draw: st.DrawFn) -> str:
    doc = json.loads(json.dumps(_TOK_DOC))
    for _ in range(draw(st.integers(1, 3))):
        if not isinstance(doc, dict):
            break
        target = draw(
            st.sampled_from(
                ["model", "vocab", "added_tokens", "normalizer", "pre_tokenizer", "decoder", "top"]
            )
        )
        value = draw(JSON)
        model = doc.get("model")
        if (
            target == "vocab"
            and isinstance(model, dict)
            and isinstance(model.get("vocab"), dict)
            and model["vocab"]
        ):
            vocab = model["vocab"]
            key = draw(st.sampled_from(sorted(vocab)) | WEIRD_TEXT)
            vocab[key] = draw(st.integers(-3, len(vocab) + 3) | JSON)
        elif target == "added_tokens" and isinstance(doc.get("added_tokens"), list) and doc["added_tokens"]:
            i = draw(st.integers(0, len(doc["added_tokens"]) - 1))
            tok = doc["added_tokens"][i]
            doc["added_tokens"][i] = (
                value
                if draw(st.booleans()) or not isinstance(tok, dict)
                else {**tok, "id": draw(st.integers(-2, 99))}
            )
        elif target == "top":
            doc = value
        else:
            doc[target] = value
    text = json.dumps(doc, allow_nan=True)
    if draw(st.booleans()):  # and sometimes a byte-level cut on top
        text = text[: draw(st.integers(0, len(text)))]
    return text


@_settings(700)
@given(
    text=st.one_of(
        mutated_tokenizer_json(), mutated_tokenizer_json(), st.text(max_size=200), JSON.map(json.dumps)
    )
)
def test_tokenizer_from_json_garbage(text: str) -> None:
    count("cases:tokenizer-from_json")
    try:
        tok = AptTokenizer.from_json(text)
    except BaseException as exc:
        assert_clean_error(exc)
        return
    # Accepted: then it is a working APT tokenizer.
    assert [tok.token_to_id(t) for t in RESERVED] == list(range(len(RESERVED)))
    chars = [tok.id_to_token(i) for i in range(len(RESERVED), tok.vocab_size)]
    assert tok.decode(tok.encode("".join(c for c in chars if not c.isspace() and c != "["))) is not None


ENCODE_TEXT = st.lists(
    st.sampled_from(sorted(set("1 + = ?2龙后面是什么生肖？蛇hello world[EN] abc")))
    | st.sampled_from([*RESERVED, "\t", "\n", "\u3000", "\x1c", "\x85", "\u2028", "[", "]", "[E", "N]"])
    | st.characters(codec="utf-8", exclude_categories=("Cs",)),
    max_size=30,
).map("".join)


@_settings(1000)
@given(text=ENCODE_TEXT)
def test_tokenizer_encode_decode_arbitrary_text(text: str) -> None:
    count("cases:tokenizer-encode-decode")
    ids = _TOK.encode(text)
    assert all(isinstance(i, int) and 0 <= i < _TOK.vocab_size for i in ids)
    decoded = _TOK.decode(ids)
    assert isinstance(decoded, str)
    # The Hugging Face tokenizer.json we ship encodes exactly like the fast Python path.
    assert _TOK.hf_tokenizer.encode(text, add_special_tokens=False).ids == ids, text
    norm = normalize_text(text)
    vocab = set(_TOK.vocab)
    if "[" not in text and all(c in vocab for c in norm):
        assert decoded == norm  # the documented round trip


# ------------------------------------------------------------------------------------------------ configs
CONFIGS = (ModelConfig, TrainConfig, DataConfig, DBCDACConfig)


@st.composite
def config_dicts(draw: st.DrawFn) -> tuple[type, Any]:
    cls = draw(st.sampled_from(CONFIGS))
    names = [f.name for f in fields(cls)]
    # dbc_dac: a mapping or absent here; non-mapping values have their own tests below.
    value_for = {
        "dbc_dac": st.dictionaries(
            st.sampled_from([f.name for f in fields(DBCDACConfig)]) | WEIRD_TEXT, SCALARS, max_size=3
        )
    }
    keys = st.sampled_from(names) | WEIRD_TEXT
    d = draw(st.dictionaries(keys, SCALARS, max_size=6))
    for k in list(d):
        if k in value_for:
            d[k] = draw(value_for[k])
    return cls, d


@_settings(1000)
@given(case=config_dicts())
def test_config_from_dict_arbitrary(case: tuple[type, Any]) -> None:
    count("cases:config-from_dict")
    cls, data = case
    try:
        cfg = cls.from_dict(data)
    except BaseException as exc:
        assert_clean_error(exc)
        return
    assert cls.from_dict(cfg.to_dict()) == cfg  # what is accepted round-trips
    if isinstance(cfg, TrainConfig):
        assert isinstance(cfg.dbc_dac, DBCDACConfig)
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float):
            assert math.isfinite(value)


@_settings(400)
@given(
    cls=st.sampled_from(CONFIGS),
    text=st.one_of(JSON.map(lambda v: json.dumps(v, allow_nan=True)), st.text(max_size=60)),
)
def test_config_from_json_arbitrary(cls: type, text: str) -> None:
    count("cases:config-from_json")
    try:
        cls.from_json(text)
    except BaseException as exc:
        assert_clean_error(exc)


@pytest.mark.parametrize("data", ["0", True, 5, [1, 2], [["a"]]])
def test_config_from_dict_refuses_a_non_mapping(data: Any) -> None:
    with pytest.raises(AptError) as info:
        TrainConfig.from_dict(data)
    assert_clean_error(info.value)


@pytest.mark.parametrize("value", [5, "x", [], None])
def test_train_config_refuses_a_non_mapping_dbc_dac(value: Any) -> None:
    from apt_model.pipeline_params import parse_params

    with pytest.raises(AptError) as info:
        TrainConfig.from_dict({"dbc_dac": value})
    assert_clean_error(info.value)
    with pytest.raises(AptError) as info:
        parse_params(train_overrides={"dbc_dac": value})
    assert_clean_error(info.value)


@pytest.mark.parametrize("value", [5, "x"])
def test_cli_train_config_file_with_a_non_mapping_dbc_dac(
    tmp_path: Path, rel_dataset: Path, value: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from apt_model.cli import main
    from tests.reliability.helpers import TRAIN_FLAGS, assert_one_error_line

    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"train": {"dbc_dac": value}}), encoding="utf-8")
    save = tmp_path / "save"
    argv = [
        *TRAIN_FLAGS,
        "--dataset",
        str(rel_dataset),
        "--save-dir",
        str(save),
        "--no-tracking",
        "--epochs",
        "1",
    ]
    assert main([*argv, "--config", str(cfg)]) == 2
    assert_one_error_line(capsys.readouterr().err, "dbc_dac")
    assert not save.exists()


def _param_fields() -> list[str]:
    from apt_model.pipeline_params import PipelineParams

    return list(PipelineParams.model_fields)


@_settings(500)
@given(
    params=st.dictionaries(st.sampled_from(_param_fields()) | WEIRD_TEXT, JSON, max_size=5),
    cli=st.text(max_size=30),
)
def test_pipeline_params_arbitrary(params: dict[str, Any], cli: str) -> None:
    from apt_model.pipeline_params import parse_cli_value, parse_params

    count("cases:pipeline-params")
    parse_cli_value(cli)  # never raises: a value that is not JSON is the raw string
    try:
        parsed = parse_params(params)
    except BaseException as exc:
        assert_clean_error(exc)
        return
    parsed.model_cfg()
    parsed.train_cfg()
    parsed.data_config()
