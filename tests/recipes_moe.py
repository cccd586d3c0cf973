"""Tiny recipes of mixture-of-experts families (see tiny_kit.Recipe): 4 routed experts, top-2, and a dense
first block where the family has one."""

from __future__ import annotations

import torch
from recipes_core import _glm4v, _qwen3_5
from tiny_kit import END, IMAGE, PAD, START, VIDEO, Recipe, _pixels, _qwen_patches, _tokens, _vision


def _glm4v_moe(c):
    _glm4v(c)  # the same vision tower, M-RoPE and markers as GLM-4.1V; layer 0 dense (first_k_dense_replace)



def _qwen3_5_moe(c):
    _qwen3_5(c)  # Qwen3.5's hybrid decoder (linear-attention layer 0, full attention layer 1), every block MoE
    c.text_config.shared_expert_intermediate_size = 32



def _deepseek_v3_text(t):
    """DeepSeek-V3's MLA attention at tiny ranks; layer 0 dense, layer 1 MoE (routed and shared experts)."""
    t.q_lora_rank, t.kv_lora_rank, t.qk_rope_head_dim, t.qk_nope_head_dim, t.v_head_dim = 32, 16, 8, 8, 16
    t.n_group, t.topk_group, t.first_k_dense_replace, t.num_key_value_heads = 1, 1, 1, 4
    t.head_dim = t.qk_rope_head_dim  # the rotary width (derived at construction, before the shrink)


def _kimi_k25(c):
    _vision(c, patch_size=2, hidden_size=32, intermediate_size=64, num_attention_heads=2, pos_emb_height=8,
            pos_emb_width=8)
    c.projection_hidden_size = 32  # the vision width: the projector's norm reads pooled vision features
    _deepseek_v3_text(c.text_config)
    _tokens(c, image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)


def _kimi_patches(config, g):
    """One 8x8 image as 16 patches of 2x2 (grid 1x4x4), merged 2x2 into 4 tokens."""
    return {"pixel_values": torch.randn(16, 3, 2, 2, generator=g), "image_grid_thw": torch.tensor([[1, 4, 4]])}



def _aria(c):
    _vision(c, image_size=8, patch_size=2, hidden_size=32, intermediate_size=64, num_attention_heads=2)
    c.projector_patch_to_query_dict = {16: 4}  # 16 patches of an 8x8 image -> 4 queries
    c.max_value_projector_patch_to_query_dict = 4
    t = c.text_config
    t.moe_num_experts, t.moe_topk, t.moe_num_shared_experts, t.intermediate_size = 4, 2, 1, 32
    t.head_dim = t.hidden_size // t.num_attention_heads
    _tokens(c, image_token_index=IMAGE)


def _llama4_decoder(t):
    """Llama4's decoder: layer 0 dense with RoPE and chunked attention, layer 1 MoE (router-scaled inputs, experts
    stored transposed) without RoPE."""
    t.intermediate_size, t.intermediate_size_mlp = 32, 128  # an expert's width, the dense MLP's width
    t.moe_layers, t.no_rope_layers = [1], [1, 0]
    t.attention_chunk_size, t.layer_types = 8, ["chunked_attention", "full_attention"]


def _llama4_text(c):
    _llama4_decoder(c)
    c.pad_token_id = PAD


RECIPES: dict[str, Recipe] = {
    "glm4v_moe": Recipe(_glm4v_moe, _qwen_patches, (START,), (END,), token_types="mm_token_type_ids"),
    "qwen3_5_moe": Recipe(_qwen3_5_moe, _qwen_patches, (START,), (END,), token_types="mm_token_type_ids"),
    "kimi_k25": Recipe(_kimi_k25, _kimi_patches, (START,), (END,)),
    "aria": Recipe(_aria, _pixels(8)),
    # Llama4's decoder, fed text: Llama4ForConditionalGeneration.forward cannot run on transformers 5.24 (it reads
    # `image_outputs` from its language model's output, which has none), so the LVLM itself is left out
    "llama4_text": Recipe(_llama4_text, None, causal_lm=True),
}
