"""Tiny recipes of mixture-of-experts families (see tiny_kit.Recipe): 4 routed experts, top-2, and a dense
first block where the family has one."""

from __future__ import annotations

import torch
from recipes_core import _glm4v, _qwen3_5
from tiny_kit import END, IMAGE, PAD, START, VIDEO, VOCAB, Recipe, _pixels, _qwen_patches, _tokens, _vision


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


def _minimax_m3_vl(c):
    _vision(c, patch_size=2, hidden_size=32, intermediate_size=64, num_attention_heads=2, spatial_merge_size=2,
            temporal_patch_size=2, image_size=8)
    c.projector_hidden_size = 64
    c.merged_hidden_size = 64 * 2 ** 2  # derived at construction: 2x2 merged tokens of the text width
    t = c.text_config
    t.mlp_layer_types = ["dense", "sparse"]
    t.intermediate_size, t.shared_intermediate_size, t.dense_intermediate_size, t.rotary_dim = 32, 32, 128, 8
    t.bos_token_id, t.eos_token_id = 1, 2
    _tokens(c, image_token_index=IMAGE, video_token_index=VIDEO)


def _mistral_large4(c):
    _vision(c, image_size=8, patch_size=2, hidden_size=16, intermediate_size=32, num_attention_heads=2, head_dim=8)
    t = c.text_config
    t.kv_lora_rank, t.qk_rope_head_dim, t.qk_nope_head_dim, t.v_head_dim, t.num_key_value_heads = 16, 8, 8, 16, 4
    t.head_dim, t.qk_head_dim = 8, 16  # both derived at construction from the rope / nope widths
    t.index_n_heads, t.index_head_dim, t.index_topk = 2, 16, 8  # the sparse-attention indexer keeps 8 tokens
    # per-layer lists derived at construction for 72 layers: layer 0 dense, layer 1 MoE without RoPE
    t.no_rope_layers, t.kv_source_layers, t.indexer_types = [1, 0], [0, 1], ["full", "full"]
    t.mlp_layer_types = ["dense", "sparse"]
    _tokens(c, image_token_index=IMAGE)


def _mistral_image(config, g):
    return {"pixel_values": torch.randn(1, 3, 8, 8, generator=g), "image_sizes": torch.tensor([[8, 8]])}


def _muse_spark(c):
    _vision(c, patch_size=2, hidden_size=32, intermediate_size=64, num_attention_heads=2, pos_emb_height=4,
            pos_emb_width=4, max_position_embeddings=16)
    c.out_hidden_size, c.projector_hidden_size = 32 * 2 ** 2, 64  # 2x2 merged vision tokens, the adapter's width
    a = c.audio_config  # built but fed nothing: as small as its validation allows
    a.num_hidden_layers, a.patch_sizes, a.hidden_sizes, a.depths, a.out_hidden_size = 2, (4, 2), (8, 16), (1, 1), 64
    t = c.text_config
    t.moe_hidden_size, t.sliding_window = 32, 8  # experts work at width 32, between pre/post expert projections
    # per-layer lists derived at construction: layer 0 dense with sliding attention and RoPE, layer 1 MoE, full, NoPE
    t.mlp_layer_types, t.layer_types = ["dense", "sparse"], ["sliding_attention", "full_attention"]
    t.layer_rope_theta, t.bos_token_id, t.eos_token_id = [10000.0, 0], 1, 2
    _tokens(c, image_token_id=IMAGE, video_token_id=VIDEO, audio_token_id=249)


def _muse_patches(config, g):
    """One 8x8 image as 16 flattened 2x2 patches of 2 frames (grid 1x4x4), merged 2x2 into 4 tokens."""
    return {"pixel_values": torch.randn(16, 2 * 3 * 2 * 2, generator=g), "image_grid_thw": torch.tensor([[1, 4, 4]])}


def _qwen3_omni_moe_thinker(c):
    # DeepStack after layer 0 only, so that the last layer's output is the decoder's output
    _vision(c, patch_size=2, spatial_merge_size=2, temporal_patch_size=2, hidden_size=32, intermediate_size=64,
            out_hidden_size=64, num_position_embeddings=64, deepstack_visual_indexes=[0])
    a = c.audio_config  # built but fed nothing; its size fields have their own names
    a.encoder_layers, a.d_model, a.encoder_attention_heads, a.encoder_ffn_dim = 1, 32, 2, 64
    a.output_dim, a.downsample_hidden_size, a.num_mel_bins = 64, 16, 16
    t = c.text_config
    t.mlp_only_layers = [0]  # layer 0 dense, layer 1 MoE
    t.rope_parameters = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0,
                         "mrope_interleaved": True}
    _tokens(c, image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, audio_token_id=249,
            audio_start_token_id=248, user_token_id=247)


def _qwen4_exp(c):
    _vision(c, patch_size=2, spatial_merge_size=2, temporal_patch_size=2, hidden_size=32, intermediate_size=64,
            out_hidden_size=64, num_position_embeddings=64)
    t = c.text_config
    t.layer_types = ["linear_attention", "indexed_attention"]
    t.linear_num_key_heads, t.linear_num_value_heads, t.linear_key_head_dim, t.linear_value_head_dim = 2, 4, 8, 8
    t.shared_expert_intermediate_size, t.hc_lowrank = 32, 8  # hyper-connections: 4 residual streams, rank 8
    # the sparse-attention indexer of layer 1: 8 tokens kept, scored in blocks of 2
    t.indexer_n_heads, t.indexer_kv_heads, t.indexer_head_dim = 2, 1, 16
    t.indexer_budget, t.indexer_compress_ratio = 8, 2
    t.rope_parameters = {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0,
                         "mrope_interleaved": True, "partial_rotary_factor": 0.5}
    _tokens(c, image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)


def _inkling2(c):
    """Inkling-2: layer 0 sliding-window, layer 1 full attention with the relative position bias; every block MoE
    between block attention residuals (one residual block of both layers: layer 1 adds to its
    input), short convolutions in k/v and after attention and MLP."""
    _vision(c, patch_size=2, hidden_size=32, intermediate_size=64, num_attention_heads=2, posemb_grid_size=4,
            projection_hidden_dim=64, text_hidden_size=64)
    t = c.text_config
    t.layer_types, t.n_layers_per_attn_res_block = ["hybrid_sliding", "hybrid"], 2
    t.swa_num_attention_heads, t.swa_num_key_value_heads, t.swa_head_dim = 4, 2, 16
    t.sliding_window_size, t.rel_extent, t.d_rel, t.unpadded_vocab_size, t.eos_token_id = 8, 16, 8, VOCAB, 2
    _tokens(c, image_token_id=IMAGE)


def _inkling2_patches(config, g):
    """One 8x8 image as 4 tokens, each a 2x2 square of 2x2 patches (channels last), grid 1x2x2 in tokens."""
    return {"pixel_values": torch.randn(4, 4, 4, 3, generator=g), "image_grid_thw": torch.tensor([[1, 2, 2]])}


RECIPES: dict[str, Recipe] = {
    "glm4v_moe": Recipe(_glm4v_moe, _qwen_patches, (START,), (END,), token_types="mm_token_type_ids"),
    "qwen3_5_moe": Recipe(_qwen3_5_moe, _qwen_patches, (START,), (END,), token_types="mm_token_type_ids"),
    "kimi_k25": Recipe(_kimi_k25, _kimi_patches, (START,), (END,)),
    "aria": Recipe(_aria, _pixels(8)),
    "minimax_m3_vl": Recipe(_minimax_m3_vl, _qwen_patches),
    "mistral_large4": Recipe(_mistral_large4, _mistral_image),
    "muse_spark": Recipe(_muse_spark, _muse_patches),
    "qwen3_omni_moe_thinker": Recipe(_qwen3_omni_moe_thinker, _qwen_patches, (START,), (END,)),
    "qwen4_exp": Recipe(_qwen4_exp, _qwen_patches, (START,), (END,), token_types="mm_token_type_ids"),
    # Llama4's decoder, fed text: Llama4ForConditionalGeneration.forward cannot run on transformers 5.24 (it reads
    # `image_outputs` from its language model's output, which has none), so the LVLM itself is left out
    "llama4_text": Recipe(_llama4_text, None, causal_lm=True),
    "inkling2": Recipe(_inkling2, _inkling2_patches),
}
