"""HLBD Full: the concept table, record → tagged pairs, and the per-level hold-out split."""

from __future__ import annotations

import re
import unicodedata
from collections import defaultdict
from pathlib import Path

from apt_model.data import FULL_MODULES, TAGS, generate, load_dataset
from apt_model.data.concepts import CONCEPTS
from apt_model.data.full import LEVEL_FIELDS, content_sha256, record_pairs
from apt_model.io import dumps_json

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_concept_table_has_60_concepts_with_unique_values_per_level() -> None:
    assert len(CONCEPTS) >= 60
    records = [c.record() for c in CONCEPTS]
    for level, fields in LEVEL_FIELDS.items():
        for field in fields:
            values = [r[level][field] for r in records]
            assert all(isinstance(v, str) and v.strip() == v != "" for v in values), (level, field)
            if field != "数学":
                assert len(set(values)) == len(values), (level, field)
    assert len({r["concept"] for r in records}) == len(records)


def test_pinyin_has_one_toned_syllable_per_character() -> None:
    for c in CONCEPTS:
        syllables = c.pinyin.split(" ")
        assert len(syllables) == len(c.concept), c
        for s in syllables:
            plain = unicodedata.normalize("NFD", s)
            assert re.fullmatch(r"[a-z\u0300-\u030c]+", plain), s  # letters and combining tone marks only


def test_record_shape_matches_the_spec_example() -> None:
    spec = {
        "concept": "视频聊天",
        "level_1": {"字卡": "视频聊天", "emoji": "📹"},
        "level_2": {"短语": "视频聊天吧"},
        "level_3": {"数学": "S = VP (VP: 视频聊天)"},
        "level_4": {"拼音": "shì pín liáo tiān"},
        "level_5": {"英文": "Video chat"},
        "level_6": {"中文": "记得视频聊天。"},
        "level_7": {"日文": "ビデオ通話"},
        "level_8": {"韩文": "영상통화"},
    }
    assert CONCEPTS[0].record() == spec


def test_record_pairs_use_dynamic_tags_both_ways() -> None:
    pairs = record_pairs(CONCEPTS[0].record())
    assert [m for m, _, _ in pairs] == list(FULL_MODULES)
    assert (
        pairs[0][1]
        == "概念: 视频聊天 [EMOJI] 视频聊天 📹 [PHRASE] 视频聊天吧 句法结构: S = VP (VP: 视频聊天)"
    )
    assert (
        pairs[0][2] == "[PY] shì pín liáo tiān [EN] Video chat 记得视频聊天。 [JP] ビデオ通話 [KR] 영상통화"
    )
    per_level = {m: (i, o) for m, i, o in pairs[1:]}
    assert per_level == {
        "full_emoji": ("[EMOJI] 📹", "记得视频聊天。"),
        "full_phrase": ("[PHRASE] 视频聊天吧", "记得视频聊天。"),
        "full_en": ("[EN] Video chat", "记得视频聊天。"),
        "full_py": ("[PY] shì pín liáo tiān", "记得视频聊天。"),
        "full_jp": ("[JP] ビデオ通話", "记得视频聊天。"),
        "full_kr": ("[KR] 영상통화", "记得视频聊天。"),
    }
    used = {t for _, i, o in pairs for t in TAGS if t in i or t in o}
    assert used == set(TAGS)


def test_every_record_yields_its_tagged_pairs(full_doc: dict, default_datasets: dict) -> None:
    ds = default_datasets["full"]
    assert ds.format == "full"
    samples = full_doc["samples"]
    assert len(ds.pairs) == 7 * len(samples)
    assert not ds.duplicates
    by_module = defaultdict(list)
    for p in ds.pairs:
        by_module[p.module].append(p)
    assert {m: len(v) for m, v in by_module.items()} == dict.fromkeys(FULL_MODULES, len(samples))
    got = {(p.input, p.output) for p in ds.pairs}
    for record in samples:
        for _, i, o in record_pairs(record):
            assert (i, o) in got


def test_split_holds_out_levels_of_concepts_trained_on_otherwise(
    full_doc: dict, default_datasets: dict
) -> None:
    ds = default_datasets["full"]
    md = full_doc["metadata"]
    assert ds.split_source == "file"
    assert len(ds.val) == md["split_counts"]["val"] == round(0.1 * len(ds.pairs))
    concept_of = {}
    for r in full_doc["samples"]:
        for _, i, _ in record_pairs(r):
            concept_of[i] = r["concept"]
    train_levels: dict[str, int] = defaultdict(int)
    record_in_train = set()
    for p in ds.pairs:
        if p.module == "full_record":
            assert p.split == "train"
            record_in_train.add(concept_of[p.input])
        elif p.split == "train":
            train_levels[concept_of[p.input]] += 1
    for p in ds.val:
        concept = concept_of[p.input]
        assert concept in record_in_train
        assert train_levels[concept] >= 3
        # The answer is a sentence the model has seen for the same concept in training.
        assert any(q.output == p.output for q in ds.train if q.module != "full_record")
    assert len({p.module for p in ds.val}) >= 4


def test_metadata_provenance(full_doc: dict) -> None:
    md = full_doc["metadata"]
    assert md["total_samples"] == len(full_doc["samples"]) == len(CONCEPTS)
    assert md["total_pairs"] == 7 * len(CONCEPTS)
    assert md["modules"] == list(FULL_MODULES)
    assert md["content_sha256"] == content_sha256(full_doc["samples"], md["splits"]["val"])
    assert sum(c["total"] for c in md["counts"].values()) == md["total_pairs"]


def test_seed_changes_split_and_sizes() -> None:
    a = dumps_json(generate("full", seed=1))
    assert a == dumps_json(generate("full", seed=1))
    assert a != dumps_json(generate("full", seed=2))
    small = generate("full", size="small")
    assert 20 <= len(small["samples"]) < len(CONCEPTS)


def test_spec_example_file_loads() -> None:
    ds = load_dataset(FIXTURES / "hlbd_full_spec.json")
    assert ds.format == "full" and ds.split_source == "hash"
    assert len(ds.pairs) == 7
    assert ds.pairs[0].split == "train"  # record pairs always train when the file has no split
    assert ds.pairs[1].input == "[EMOJI] 📹" and ds.pairs[1].output == "记得视频聊天。"
