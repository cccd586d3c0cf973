"""Offline processors for tiny test models: a word-level tokenizer whose special tokens sit at the
ids the model config names, and the family's own image processor sized to the tiny vision tower.

``save_model_dir(family, model, path)`` writes a folder that ``AutoModelForImageTextToText`` and
``AutoProcessor`` load without any hub access, as a real checkpoint would.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}{IMAGE} {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endif %}"
    "<|end|> {% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
WORDS = ("what is shown here a cat dog red blue one two three the image describe it yes no".split())


def make_tokenizer(vocab_size: int, specials: dict[str, int], extra_tokens: dict[str, str] | None = None):
    """Word-level tokenizer with ``specials`` at fixed ids and plain words filling the other ids."""
    vocab = dict(specials)
    fixed = ["[UNK]", "[PAD]", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", *WORDS]
    free = (i for i in range(vocab_size) if i not in specials.values())
    for token in fixed:
        vocab[token] = next(free)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                      extra_special_tokens=extra_tokens or {})
    wrapped.add_special_tokens({"additional_special_tokens": list(specials)})
    return wrapped


def make_processor(family: str, model):
    cfg = model.config
    vocab = cfg.get_text_config().vocab_size
    if family in ("llava", "llava_next"):
        from transformers import CLIPImageProcessor, LlavaNextImageProcessor, LlavaNextProcessor, LlavaProcessor

        size = cfg.vision_config.image_size
        tokenizer = make_tokenizer(vocab, {"<image>": cfg.image_token_id})
        if family == "llava":
            image_processor = CLIPImageProcessor(size={"shortest_edge": size},
                                                 crop_size={"height": size, "width": size})
            cls = LlavaProcessor
        else:
            image_processor = LlavaNextImageProcessor(
                size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                image_grid_pinpoints=cfg.image_grid_pinpoints)
            cls = LlavaNextProcessor
        # CLIP towers emit a CLS token; the 'default' strategy drops it, so the processor counts it.
        return cls(image_processor=image_processor, tokenizer=tokenizer, patch_size=cfg.vision_config.patch_size,
                   vision_feature_select_strategy=cfg.vision_feature_select_strategy, num_additional_image_tokens=1,
                   chat_template=CHAT_TEMPLATE.replace("{IMAGE}", "<image>"))
    if family in ("qwen2_vl", "qwen2_5_vl"):
        from transformers import Qwen2VLImageProcessor

        vc = cfg.vision_config
        specials = {"<|image_pad|>": cfg.image_token_id, "<|video_pad|>": cfg.video_token_id,
                    "<|vision_start|>": cfg.vision_start_token_id, "<|vision_end|>": cfg.vision_end_token_id}
        tokenizer = make_tokenizer(vocab, specials)
        unit = vc.patch_size * vc.spatial_merge_size
        image_processor = Qwen2VLImageProcessor(
            patch_size=vc.patch_size, merge_size=vc.spatial_merge_size, temporal_patch_size=vc.temporal_patch_size,
            min_pixels=(2 * unit) ** 2, max_pixels=(4 * unit) ** 2)
        return _image_only_qwen2_vl_processor()(
            image_processor=image_processor, tokenizer=tokenizer,
            chat_template=CHAT_TEMPLATE.replace("{IMAGE}", "<|vision_start|> <|image_pad|> <|vision_end|>"))
    raise ValueError(f"no tiny processor for family {family!r}")


def _image_only_qwen2_vl_processor():
    """Qwen2VLProcessor without its video processor: in transformers 5 the video processor needs
    torchvision, which cannot be installed beside this machine's CPU torch. Images only."""
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            self.video_processor = None
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImageOnlyQwen2VLProcessor


def save_model_dir(family: str, model, path: Path) -> Path:
    """Save ``model`` and a matching processor as a checkpoint folder."""
    path = Path(path)
    model.save_pretrained(path)
    make_processor(family, model).save_pretrained(path)
    return path


def write_calibration(folder: Path, n: int = 4, seed: int = 0, with_bad: bool = False) -> tuple[Path, Path]:
    """A LLaVA-conversation JSON with ``n`` random 16x16 images (plus unusable records if ``with_bad``)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = Path(folder) / "images"
    images.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(images / f"{i}.png")
        records.append({"id": f"s{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\ndescribe the image"},
            {"from": "gpt", "value": "a red cat" if i % 2 else "two blue dog"}]})
    if with_bad:
        records.append({"id": "text-only", "conversations": [{"from": "human", "value": "what is a cat"}]})
        turns = [{"from": "human", "value": "<image>\nwhat"}]
        records.append({"id": "missing", "image": "nope.png", "conversations": turns})
    path = Path(folder) / "calib.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path, images


def write_jsonl(path: Path, items: list[dict]) -> None:
    """``items`` as JSON Lines (one object a line, each ending in a newline)."""
    Path(path).write_text("".join(json.dumps(x) + "\n" for x in items))


def write_user_folder(base: Path) -> Path:
    """A user's folder as the hostile-input tests start from: a tiny LLaVA in ``model``, three calibration
    records in ``calib`` and a two-item multiple-choice benchmark ``look.jsonl`` over their images."""
    from tiny_models import build_tiny

    model, _ = build_tiny("llava")
    save_model_dir("llava", model, base / "model")
    write_calibration(base / "calib", n=3)
    write_jsonl(base / "look.jsonl", [{"id": f"q{i}", "image": f"calib/images/{i}.png", "question": "what is shown",
                                       "options": ["cat", "dog"], "answer": ["cat", "dog"][i % 2]} for i in range(2)])
    return base
