"""smol-llava assembly on a tiny stand-in LM (offline, no download); the real build is a slow test."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_processors import make_tokenizer
from transformers import AutoModelForImageTextToText, AutoProcessor, LlamaConfig, LlamaForCausalLM

from atv import default_model as dm
from atv.suite import make_items
from evaluation.model_io import build_prompt
from pruning.errors import ConfigError, OutputExistsError
from pruning.outputs import mark_folder

TINY = dm.DefaultModelConfig(image_size=16, patch_size=8, vision_hidden=32, vision_layers=1, vision_heads=2,
                             vision_intermediate=64)  # 4 visual tokens per image


@pytest.fixture(scope="module")
def tiny_lm():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                         pad_token_id=2, bos_token_id=1, eos_token_id=2)
    tokenizer = make_tokenizer(64, {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<empty_output>": 16})
    tokenizer.pad_token = "<|im_end|>"
    return LlamaForCausalLM(config).eval(), tokenizer


@pytest.fixture(scope="module")
def tiny_parts(tiny_lm):
    model, _ = dm.assemble(*tiny_lm, None, cfg=TINY, seed=1)
    return dm.parts_state(model)


def test_assembly_keeps_the_lm_bit_identical_and_ties_the_head(tiny_lm, tiny_parts):
    lm, tokenizer = tiny_lm
    model, processor = dm.assemble(lm, tokenizer, tiny_parts, cfg=TINY)
    for key, value in lm.get_decoder().state_dict().items():
        assert torch.equal(model.get_decoder().state_dict()[key], value), key
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    ids = torch.tensor([[5, 9, 12, 20, 7]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, lm(input_ids=ids).logits)  # text-only: same LM
    assert processor.image_token_id == model.config.image_token_id == 16


def test_parts_round_trip_and_strict_loading(tiny_lm, tiny_parts):
    model, _ = dm.assemble(*tiny_lm, tiny_parts, cfg=TINY, seed=5)
    again = dm.parts_state(model)
    assert again.keys() == tiny_parts.keys() and all(torch.equal(again[k], tiny_parts[k]) for k in again)
    assert any(k.startswith("vision_tower.") for k in again)
    assert any(k.startswith("multi_modal_projector.") for k in again)
    broken = dict(tiny_parts)
    broken.pop(next(iter(broken)))
    with pytest.raises(dm.AssetError, match="do not fit the"):
        dm.assemble(*tiny_lm, broken, cfg=TINY)


def test_saved_folder_reloads_offline_and_expands_the_image_token(tiny_lm, tiny_parts, tmp_path):
    model, processor = dm.assemble(*tiny_lm, tiny_parts, cfg=TINY)
    out = dm.write_model_dir(tmp_path / "smol", model, processor)
    reloaded = AutoModelForImageTextToText.from_pretrained(out).eval()
    proc = AutoProcessor.from_pretrained(out)
    item = make_items("digit", "eval", 1)[0]
    prompt = build_prompt(proc, item.question, with_image=True)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert "<empty_output>\nWhich digit is shown?" in prompt
    inputs = proc(images=[item.image.resize((16, 16))], text=[prompt], return_tensors="pt")
    assert int((inputs["input_ids"] == 16).sum()) == TINY.tokens_per_image == 4
    with torch.no_grad():
        ours, theirs = model(**inputs).logits, reloaded(**inputs).logits
    assert torch.equal(ours, theirs)
    assert not list(tmp_path.glob(".*partial*"))


def test_encode_example_labels_only_the_answer(tiny_lm, tiny_parts):
    model, processor = dm.assemble(*tiny_lm, tiny_parts, cfg=TINY)
    item = make_items("scene-colour", "train", 1)[0]
    item.image = item.image.resize((16, 16))
    enc = dm.encode_example(processor, item)
    target = processor.tokenizer.encode(item.answer + "<|im_end|>", add_special_tokens=False)
    assert enc["labels"][enc["labels"] != -100].tolist() == target
    assert enc["input_ids"][-len(target):].tolist() == target
    batch = dm.collate([enc, dm.encode_example(processor, item, with_target=False)], pad_id=2)
    assert batch["attention_mask"].sum(1).tolist() == [len(enc["input_ids"]), len(enc["input_ids"]) - len(target)]
    assert model(**batch).loss.isfinite()


def test_failed_write_leaves_nothing(tiny_lm, tiny_parts, tmp_path, monkeypatch):
    model, processor = dm.assemble(*tiny_lm, tiny_parts, cfg=TINY)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(processor, "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        dm.write_model_dir(tmp_path / "smol", model, processor)
    assert list(tmp_path.iterdir()) == []


def test_build_reuses_the_cache_and_reports_missing_parts(tmp_path, monkeypatch):
    cached = tmp_path / "cache" / dm.MODEL_NAME
    mark_folder(cached, dm.BUILD_KIND)  # only the toolkit's own build is reused
    (cached / "config.json").write_text("{}")
    assert dm.build_default_model(tmp_path / "cache", assets_dir=tmp_path / "none") == cached  # no work done
    monkeypatch.setenv("ATV_CACHE", str(tmp_path / "env"))
    assert dm.cache_root() == tmp_path / "env"
    with pytest.raises(dm.AssetError, match="atv default-model train"):
        dm.build_default_model(assets_dir=tmp_path / "none", progress=False)
    assert not (tmp_path / "env" / dm.MODEL_NAME).exists()


def test_config_errors(tiny_lm, tmp_path):
    with pytest.raises(ConfigError, match="stage2_steps must be positive, got -1"):
        dm.TrainConfig(stage2_steps=-1)
    with pytest.raises(ConfigError, match="learning rates must be > 0"):
        dm.TrainConfig(stage1_lr=0)
    with pytest.raises(ConfigError, match="'<nope>' is not in the tokenizer"):
        dm.make_processor(tiny_lm[1], replace(TINY, image_token="<nope>"))
    save_file({"x": torch.zeros(1)}, str(tmp_path / dm.PARTS_FILE))
    with pytest.raises(OutputExistsError, match="pass overwrite"):
        dm.train_default_model(out_dir=tmp_path)
    with pytest.raises(dm.AssetError, match="does not exist"):
        dm.load_language_model(tmp_path / "missing.gguf")


def test_cli_registers_the_commands(tmp_path):
    from atv import cli
    from atv.cli import build_parser, main

    args = build_parser().parse_args(["default-model", "build", "--cache-dir", str(tmp_path)])
    assert args.func is cli._default_model_build and args.cache_dir == tmp_path
    assert main(["suite", "--out", str(tmp_path / "s"), "--n-eval", "2", "--n-calib", "3"]) == 0
    assert (tmp_path / "s" / "digit.jsonl").read_text().count("\n") == 2
    assert main(["suite", "--out", str(tmp_path / "s"), "--n-eval", "0"]) == 2  # ConfigError -> exit code 2


def _cached_gguf() -> Path:
    return dm.cache_root() / "smollm2" / dm.GGUF_NAME


@pytest.mark.slow
@pytest.mark.skipif(not _cached_gguf().is_file() or not (dm.ASSETS_DIR / dm.PARTS_FILE).is_file(),
                    reason="SmolLM2 GGUF not cached (run 'atv default-model build') or parts not trained")
def test_real_build_keeps_smollm2_unchanged(tmp_path):
    folder = dm.build_default_model(tmp_path, progress=False, gguf_path=_cached_gguf())
    lm, _ = dm.load_language_model(_cached_gguf())
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    for key, value in lm.get_decoder().state_dict().items():
        assert torch.equal(model.get_decoder().state_dict()[key], value), key
    processor = AutoProcessor.from_pretrained(folder)
    item = make_items("digit", "eval", 1)[0]
    inputs = processor(images=[item.image], text=[build_prompt(processor, item.question, True)], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 36
