"""The parts every tiny-family recipe uses: the tiny vocabulary and its special ids, ``shrink`` (a
default config cut to test size), config and input helpers, and ``Recipe``. Recipes live in the
``recipes_*.py`` modules; ``tiny_families.build_family`` builds a model and its batch from one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

VOCAB = 256
SPECIAL_BASE = 200                      # ids below are plain text
IMAGE, VIDEO, START, END = 250, 251, 252, 253
PAD = 0

# Size fields of any (sub-)config, set wherever the config has them.
_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, depth=2, num_heads=2, embed_dim=32, moe_intermediate_size=32,
              num_experts=4, n_routed_experts=4, num_local_experts=4, num_experts_per_tok=2, out_hidden_size=64,
              projection_dim=64, vocab_size=VOCAB, max_position_embeddings=512)


class FamilyUnavailable(Exception):
    """The installed transformers cannot build or run this family (message says why)."""


def shrink(config: Any) -> Any:
    """Set every size field of ``config`` and its sub-configs to its tiny value, in place."""
    from transformers import PreTrainedConfig

    for key, value in list(vars(config).items()):
        if isinstance(value, PreTrainedConfig):
            shrink(value)
        elif key in _SMALL and isinstance(value, int) and not isinstance(value, bool):
            setattr(config, key, _SMALL[key])
    n = getattr(config, "num_hidden_layers", None)
    # only a stored list (Bamba's layer_types is derived from other fields, read-only)
    if isinstance(vars(config).get("layer_types"), list) and isinstance(n, int):
        config.layer_types = config.layer_types[:n]
    return config


def _vision(config: Any, **fields: Any) -> None:
    """Set vision-tower fields (image size, patch size, ...) on ``config.vision_config``."""
    for key, value in fields.items():
        setattr(config.vision_config, key, value)


def _tokens(config: Any, **ids: int) -> None:
    """Point the config's special token ids into the tiny vocabulary."""
    for key, value in ids.items():
        setattr(config, key, value)


def _pixels(size: int, channels: int = 3) -> Callable[[Any, torch.Generator], dict[str, torch.Tensor]]:
    return lambda _config, g: {"pixel_values": torch.randn(1, channels, size, size, generator=g)}


def _qwen_patches(config: Any, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Qwen-style flattened patches of one 8x8 image (grid 1x4x4, patch 2)."""
    vc = config.vision_config
    patch_dim = getattr(vc, "in_channels", 3) * vc.temporal_patch_size * vc.patch_size ** 2
    return {"pixel_values": torch.randn(16, patch_dim, generator=g), "image_grid_thw": torch.tensor([[1, 4, 4]])}


@dataclass(frozen=True)
class Recipe:
    edit: Callable[[Any], Any]                       # shrunk default config -> tiny config (in place, or returned)
    vision: Callable[[Any, torch.Generator], dict] | None  # one image's inputs; None = text-only model
    before: tuple[int, ...] = ()                     # marker tokens before the image run
    after: tuple[int, ...] = ()                      # and after it
    finish: Callable[[dict], None] | None = None     # batch-level fix-ups of the stacked inputs
    causal_lm: bool = False                          # a text-only model outside the image-text-to-text table
    token_types: str | None = None                   # input marking image tokens 1 (e.g. mm_token_type_ids)
    image_tokens: int | None = None                  # placeholder tokens per image, when the model's image
                                                     # features do not sit on them (cross-attention models: 1)


