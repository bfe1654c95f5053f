"""apt_model.hf: the transformers model, its config, conversion, export and Auto-class loading."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import apt_model.hf as H
from apt_model.checkpoint import export_pretrained, load_model
from apt_model.config import ModelConfig, model_preset
from apt_model.errors import CheckpointError, ConfigError
from apt_model.model import APTModel, seq2seq_loss
from apt_model.tokenizer import AptTokenizer

TEXTS = ["3 + 4 = ?", "7", "鼠后面是什么生肖？", "牛", "[EN] hello world", "你好"]


@pytest.fixture(scope="module")
def tok() -> AptTokenizer:
    return AptTokenizer.build(TEXTS)


@pytest.fixture(scope="module")
def native(tok: AptTokenizer) -> APTModel:
    torch.manual_seed(3)
    model = APTModel(model_preset("tiny", vocab_size=tok.vocab_size, max_len=32))
    # A few random steps so that greedy outputs are not one repeated token.
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        src = torch.randint(4, tok.vocab_size, (4, 6))
        tgt = torch.randint(4, tok.vocab_size, (4, 5))
        model(src, tgt).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def _prompts(tok: AptTokenizer) -> torch.Tensor:
    rows = [tok.encode(t) for t in TEXTS]
    width = max(map(len, rows))
    return torch.tensor([r + [tok.pad_id] * (width - len(r)) for r in rows])


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_config_mirrors_model_config() -> None:
    hf_fields = {f.name: f.default for f in dataclasses.fields(H.APTConfig)}
    for f in dataclasses.fields(ModelConfig):
        assert hf_fields[f.name] == f.default, f.name
    cfg = model_preset("tiny", vocab_size=50, pad_id=0)
    hc = H.APTConfig.from_model_config(cfg)
    assert hc.model_type == "apt" and hc.is_encoder_decoder and hc.use_cache is False
    assert hc.to_model_config() == cfg and hc.pad_token_id == 0 and hc.decoder_start_token_id == 2
    # A native export's config.json (with its format markers) is accepted as is.
    native_json = {**cfg.to_dict(), "format": "apt-export", "format_version": 1}
    assert H.APTConfig(**native_json).to_model_config() == cfg
    with pytest.raises(ConfigError, match="n_heads"):
        H.APTConfig(**{**cfg.to_dict(), "n_heads": 5})


def test_state_dict_conversion_is_lossless(native: APTModel) -> None:
    hf = H.APTForConditionalGeneration(H.APTConfig.from_model_config(native.config))
    state = H.native_to_hf_state(native.state_dict())
    assert set(state) == set(hf.state_dict()) and all(k.startswith("model.") for k in state)
    hf.load_state_dict(state, strict=True)
    back = H.hf_to_native_state(hf.state_dict())
    assert back.keys() == native.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in native.state_dict().items())
    fresh = APTModel(native.config)
    fresh.load_state_dict(back, strict=True)
    assert _same(fresh, native)
    with pytest.raises(ConfigError, match="unexpected key"):
        H.hf_to_native_state({"lm_head.weight": torch.zeros(1)})


def test_constructor_keeps_native_init() -> None:
    cfg = model_preset("tiny", vocab_size=30)
    torch.manual_seed(11)
    a = APTModel(cfg)
    torch.manual_seed(11)
    b = H.APTForConditionalGeneration(H.APTConfig.from_model_config(cfg))
    assert _same(a, b.model)


def test_forward_loss_is_the_native_objective(native: APTModel, tok: AptTokenizer) -> None:
    hf = H.APTForConditionalGeneration.from_native(native)
    src = _prompts(tok)
    out_ids = torch.randint(4, tok.vocab_size, (src.shape[0], 5))
    tgt_in = torch.cat([torch.full((src.shape[0], 1), tok.bos_id), out_ids], 1)
    tgt_out = torch.cat([out_ids, torch.full((src.shape[0], 1), tok.eos_id)], 1)
    tgt_in[0, 3:], tgt_out[0, 3:] = tok.pad_id, tok.pad_id
    ref = seq2seq_loss(native, src, tgt_in, tgt_out, pad_id=tok.pad_id)
    out = hf(input_ids=src, labels=tgt_out.masked_fill(tgt_out == tok.pad_id, -100), decoder_input_ids=tgt_in)
    assert torch.allclose(out.loss, ref.loss, atol=1e-6)
    assert torch.equal(out.logits, native(src, tgt_in))
    # labels alone: decoder input = [BOS] + labels shifted right
    assert torch.allclose(hf(input_ids=src, labels=tgt_out).loss, ref.loss, atol=1e-6)


def test_greedy_generate_matches_native(native: APTModel, tok: AptTokenizer) -> None:
    hf = H.APTForConditionalGeneration.from_native(native).eval()
    src = _prompts(tok)
    ref = native.generate(src, max_new_tokens=8, bos_id=tok.bos_id, eos_id=tok.eos_id)
    got = hf.generate(src, attention_mask=(src != tok.pad_id).long(), max_new_tokens=8, do_sample=False)
    assert torch.equal(got[:, 0], torch.full_like(got[:, 0], tok.bos_id))
    assert torch.equal(got[:, 1:], ref)
    assert len({tuple(r) for r in ref.tolist()}) > 1  # the prompts really lead to different outputs
    for i in (1, 4):  # single prompts (no padding) too
        row = src[i : i + 1, : int((src[i] != tok.pad_id).sum())]
        single = hf.generate(row, max_new_tokens=8)
        assert torch.equal(single[:, 1:], native.generate(row, max_new_tokens=8, bos_id=2, eos_id=3))


def test_sampling_generate(native: APTModel, tok: AptTokenizer) -> None:
    hf = H.APTForConditionalGeneration.from_native(native).eval()
    src = _prompts(tok)
    torch.manual_seed(0)
    a = hf.generate(src, max_new_tokens=8, do_sample=True, top_k=5, temperature=1.5)
    torch.manual_seed(0)
    b = hf.generate(src, max_new_tokens=8, do_sample=True, top_k=5, temperature=1.5)
    assert torch.equal(a, b) and a.shape[0] == src.shape[0] and 1 < a.shape[1] <= 9
    assert int(a.min()) >= 0 and int(a.max()) < tok.vocab_size


def test_save_hf_loads_through_auto_classes(native: APTModel, tok: AptTokenizer, tmp_path: Path) -> None:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    out = H.save_hf(tmp_path / "m", native, native.config, tok, extra_configs={"train_config": {"epochs": 1}})
    assert set(H.exported_files()) <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "apt" and config["format"] == "apt-export"
    assert {f.name for f in dataclasses.fields(ModelConfig)} <= set(config)
    model = AutoModelForSeq2SeqLM.from_pretrained(out)
    assert isinstance(model, H.APTForConditionalGeneration) and _same(model.model, native)
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert hf_tok.pad_token_id == tok.pad_id and hf_tok.eos_token_id == tok.eos_id
    enc = hf_tok(TEXTS, padding=True, return_tensors="pt")
    assert torch.equal(enc.input_ids, _prompts(tok))
    assert torch.equal(enc.attention_mask.bool(), _prompts(tok) != tok.pad_id)
    gen = model.generate(**enc, max_new_tokens=6)
    assert torch.equal(gen[:, 1:], native.generate(enc.input_ids, max_new_tokens=6, bos_id=2, eos_id=3))
    texts = hf_tok.batch_decode(gen, skip_special_tokens=True)
    assert texts == [tok.decode(r) for r in gen.tolist()]


def test_native_export_loads_and_converts(native: APTModel, tok: AptTokenizer, tmp_path: Path) -> None:
    from transformers import AutoModelForSeq2SeqLM

    export_pretrained(
        tmp_path / "native", native, native.config, tok, extra_configs={"data_config": {"x": 1}}
    )
    direct = H.APTForConditionalGeneration.from_pretrained(tmp_path / "native")
    assert _same(direct.model, native)
    out = H.convert_export(tmp_path / "native", tmp_path / "hf")
    assert json.loads((out / "data_config.json").read_text()) == {"x": 1}
    auto = AutoModelForSeq2SeqLM.from_pretrained(out)
    assert _same(auto.model, native)
    with pytest.raises(CheckpointError, match="must differ"):
        H.convert_export(tmp_path / "hf", tmp_path / "hf")


def test_hf_export_loads_with_load_model(native: APTModel, tok: AptTokenizer, tmp_path: Path) -> None:
    out = H.save_hf(tmp_path / "m", native, native.config, tok)
    loaded = load_model(out)
    assert _same(loaded.model, native) and loaded.tokenizer == tok
