"""Tiny random-weight models of image-text-to-text families beyond the registered ones.

``build_family(model_type, seed=0, batch=2) -> (model, inputs)`` builds a model of ``model_type``
from its default config shrunk to test size (hidden 64, 2 decoder layers, 2-layer vision towers,
8-32 px images, vocabulary 256) and a batch whose image tokens sit at known positions: text, then
the image placeholder run (with the family's start/end markers where it has them), then text of a
different length per row (right-padded).

The recipes live in ``recipes_*.py`` (one module per batch of families, see ``tiny_kit.Recipe``);
``TESTED`` lists the families with one. ``build_family`` raises ``FamilyUnavailable`` (with the
reason) when the installed transformers cannot build or run one.
"""

from __future__ import annotations

import recipes_a
import recipes_b
import recipes_c
import recipes_core
import recipes_moe
import torch
from tiny_kit import IMAGE, PAD, SPECIAL_BASE, FamilyUnavailable, Recipe, shrink
from tiny_models import _features_per_image  # one reading of the image-token count

__all__ = ["IMAGE", "RECIPES", "TESTED", "FamilyUnavailable", "build_family", "shrink"]

RECIPES: dict[str, Recipe] = {**recipes_core.RECIPES, **recipes_a.RECIPES, **recipes_b.RECIPES, **recipes_c.RECIPES,
                              **recipes_moe.RECIPES}
TESTED = tuple(RECIPES)


def build_family(model_type: str, seed: int = 0, batch: int = 2) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A tiny random ``model_type`` model and a right-padded batch of ``batch`` rows, one image each."""
    import transformers as tf
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in RECIPES:
        raise FamilyUnavailable(f"no tiny recipe for {model_type!r}; recipes: {TESTED}")
    recipe = RECIPES[model_type]
    edit, vision, before, after = recipe.edit, recipe.vision, recipe.before, recipe.after
    if model_type not in CONFIG_MAPPING:
        raise FamilyUnavailable(f"transformers {tf.__version__} has no model_type {model_type!r}")
    config = shrink(CONFIG_MAPPING[model_type]())
    config = edit(config) or config
    torch.manual_seed(seed)
    auto = tf.AutoModelForCausalLM if recipe.causal_lm else tf.AutoModelForImageTextToText
    model = auto.from_config(config).eval()
    g = torch.Generator().manual_seed(seed + 1000)
    if vision is None:
        return model, _pad([_text(g, 8 + 2 * b) for b in range(batch)])
    visions = [vision(config, g) for _ in range(batch)]
    n_image = recipe.image_tokens or _features_per_image(model, visions[0])
    rows = [_text(g, 3) + [*before, *[IMAGE] * n_image, *after] + _text(g, 4 + 2 * b) for b in range(batch)]
    inputs = _pad(rows)
    inputs.update({k: torch.cat([v[k] for v in visions]) for k in visions[0]})
    if recipe.finish is not None:
        recipe.finish(inputs)
    if recipe.token_types:
        inputs[recipe.token_types] = (inputs["input_ids"] == IMAGE).long()
    return model, inputs


def _text(g: torch.Generator, n: int) -> list[int]:
    return torch.randint(1, SPECIAL_BASE, (n,), generator=g).tolist()


def _pad(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        input_ids[b, :len(row)] = torch.tensor(row)
        attention_mask[b, :len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}
