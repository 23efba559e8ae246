"""Config parsing from both config.json forms, presets, and clear errors."""

from __future__ import annotations

import pytest

from workers.model.config import LayerKind, YarnConfig, config_from_dict
from workers.model.presets import preset, v4_flash, v4_pro

pytestmark = pytest.mark.model

# The released DeepSeek-V4-Flash config.json (official form), as published.
FLASH_OFFICIAL = {
    "architectures": ["DeepseekV4ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 0, "eos_token_id": 1, "expert_dtype": "fp4", "hc_eps": 1e-06, "hc_mult": 4,
    "hc_sinkhorn_iters": 20, "head_dim": 512, "hidden_act": "silu", "hidden_size": 4096, "index_head_dim": 128,
    "index_n_heads": 64, "index_topk": 512, "initializer_range": 0.02, "max_position_embeddings": 1048576,
    "model_type": "deepseek_v4", "moe_intermediate_size": 2048, "n_routed_experts": 256, "n_shared_experts": 1,
    "norm_topk_prob": True, "num_attention_heads": 64, "num_experts_per_tok": 6, "num_hidden_layers": 43,
    "num_hash_layers": 3, "num_key_value_heads": 1, "num_nextn_predict_layers": 1, "o_groups": 8,
    "o_lora_rank": 1024, "q_lora_rank": 1024, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 16, "original_max_position_embeddings": 65536,
                     "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.5, "scoring_func": "sqrtsoftplus", "sliding_window": 128,
    "swiglu_limit": 10.0, "tie_word_embeddings": False, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.57.1", "use_cache": True, "vocab_size": 129280, "compress_rope_theta": 160000,
    "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0],
}


def test_official_flash_config_is_the_flash_preset():
    cfg = config_from_dict(FLASH_OFFICIAL)
    assert cfg == v4_flash()
    assert cfg.layer_kinds[:4] == (LayerKind.SWA, LayerKind.SWA, LayerKind.CSA, LayerKind.HCA)
    assert cfg.layer_kinds[-1] is LayerKind.CSA and cfg.num_layers == 43
    assert cfg.yarn == YarnConfig(16.0, 65536, 32.0, 1.0)


def test_official_pro_layout():
    d = dict(FLASH_OFFICIAL, num_hidden_layers=61, hidden_size=7168, num_attention_heads=128, q_lora_rank=1536,
             o_groups=16, n_routed_experts=384, moe_intermediate_size=3072, routed_scaling_factor=2.5,
             index_topk=1024, compress_ratios=[128, 128] + [4, 128] * 29 + [4, 0])
    cfg = config_from_dict(d)
    assert cfg == v4_pro()
    hca = [i for i, k in enumerate(cfg.layer_kinds) if k is LayerKind.HCA]
    assert hca == [0, 1] + list(range(3, 60, 2))


def test_official_and_transformers_forms_agree():
    """The transformers form of the same model (what its DeepseekV4Config writes) parses equal."""
    cfg = preset("tiny")
    official = cfg.to_hf_dict()
    hf = {k: v for k, v in official.items()
          if k not in ("compress_ratios", "num_hash_layers", "qk_rope_head_dim", "rope_scaling")}
    hf |= {
        "layer_types": [k.value for k in cfg.layer_kinds],
        "mlp_layer_types": ["hash_moe"] * cfg.hash_layers + ["moe"] * (cfg.num_layers - cfg.hash_layers),
        "compress_rates": {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
        "partial_rotary_factor": 0.125,
        "rope_parameters": {
            "main": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.125},
            "compress": {"rope_type": "yarn", "rope_theta": 160000.0, "factor": 16.0, "beta_fast": 32,
                         "beta_slow": 1, "original_max_position_embeddings": 65536, "attention_factor": 1.0,
                         "partial_rotary_factor": 0.125},
        },
    }
    assert config_from_dict(official) == cfg
    assert config_from_dict(hf) == cfg


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match=r"dspark_markov_rank"):
        config_from_dict(dict(FLASH_OFFICIAL, dspark_markov_rank=256))


@pytest.mark.parametrize("change,match", [
    ({"compress_ratios": [0, 0] + [4, 128] * 20 + [4, 4]}, r"MTP layers are sliding-window only"),
    ({"compress_ratios": [0, 3] + [4, 128] * 20 + [4, 0]}, r"compress_ratios"),
    ({"num_key_value_heads": 8}, r"num_key_value_heads"),
    ({"rope_scaling": {"type": "linear", "factor": 2}}, r"rope type 'linear'"),
    ({"n_shared_experts": 2}, r"n_shared_experts"),
])
def test_bad_values_are_named(change, match):
    with pytest.raises(ValueError, match=match):
        config_from_dict(dict(FLASH_OFFICIAL, **change))


def test_tiny_preset_keeps_the_real_kv_geometry():
    cfg = preset("tiny")
    assert (cfg.head_dim, cfg.rope_head_dim, cfg.index_head_dim, cfg.window) == (512, 64, 128, 128)
    assert (cfg.csa_ratio, cfg.hca_ratio) == (4, 128) and cfg.index_heads >= 16
    assert set(cfg.layer_kinds) == set(LayerKind) and cfg.hash_layers == 1
    with pytest.raises(KeyError, match="known"):
        preset("v4-huge")
