"""Tiny recipes of mixture-of-experts families (see tiny_kit.Recipe): 4 routed experts, top-2, and a dense
first block where the family has one."""

from __future__ import annotations

from recipes_core import _glm4v, _qwen3_5
from tiny_kit import END, START, Recipe, _qwen_patches


def _glm4v_moe(c):
    _glm4v(c)  # the same vision tower, M-RoPE and markers as GLM-4.1V; layer 0 dense (first_k_dense_replace)



def _qwen3_5_moe(c):
    _qwen3_5(c)  # Qwen3.5's hybrid decoder (linear-attention layer 0, full attention layer 1), every block MoE
    c.text_config.shared_expert_intermediate_size = 32


RECIPES: dict[str, Recipe] = {
    "glm4v_moe": Recipe(_glm4v_moe, _qwen_patches, (START,), (END,), token_types="mm_token_type_ids"),
    "qwen3_5_moe": Recipe(_qwen3_5_moe, _qwen_patches, (START,), (END,), token_types="mm_token_type_ids"),
}
