"""DeepSeek-V4 model configuration: one frozen dataclass, parsed from either config.json form.

Two forms exist in the wild:
- the official one (DeepSeek's checkpoints): `compress_ratios` (one ratio per layer, then the MTP
  layers), `num_hash_layers`, `qk_rope_head_dim`, `rope_scaling` (YaRN for compressed layers);
- the one transformers writes: `layer_types`, `mlp_layer_types`, `compress_rates`,
  `rope_parameters` ({"main": ..., "compress": ...}), `partial_rotary_factor`.
Both parse to the same `ModelConfig`; unknown keys are an error that names them.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any


class LayerKind(enum.Enum):
    """Attention kind of a layer: sliding window only, or window plus compressed entries."""

    SWA = "sliding_attention"
    CSA = "compressed_sparse_attention"
    HCA = "heavily_compressed_attention"


class ScoreFunc(enum.Enum):
    """Router score function applied to the gate logits."""

    SQRT_SOFTPLUS = "sqrtsoftplus"
    SOFTMAX = "softmax"
    SIGMOID = "sigmoid"


@dataclass(frozen=True)
class YarnConfig:
    """YaRN frequency interpolation of the compressed layers' RoPE (no attention-scale change)."""

    factor: float = 16.0
    original_max_position: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    """Every hyper-parameter the DeepSeek-V4 model code reads.

    `layer_kinds[i]` is layer i's attention kind; `hash_layers` how many leading layers route by
    token id (`tid2eid`). `csa_ratio` / `hca_ratio` are the compression ratios m of CSA / HCA layers.
    The MTP layers are sliding-window only and not hash-routed.
    """

    vocab_size: int
    hidden_size: int
    layer_kinds: tuple[LayerKind, ...]
    hash_layers: int
    num_heads: int
    head_dim: int = 512
    rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    window: int = 128
    csa_ratio: int = 4
    hca_ratio: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    top_k: int = 6
    moe_intermediate_size: int = 2048
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0
    score_func: ScoreFunc = ScoreFunc.SQRT_SOFTPLUS
    index_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    yarn: YarnConfig | None = field(default_factory=YarnConfig)
    num_mtp_layers: int = 1
    max_position: int = 1048576
    bos_token_id: int = 0
    eos_token_id: int = 1

    def __post_init__(self) -> None:
        checks = [
            ("head_dim", self.head_dim > self.rope_head_dim > 0 and self.rope_head_dim % 2 == 0),
            ("hash_layers", 0 <= self.hash_layers <= self.num_layers),
            ("top_k", 0 < self.top_k <= self.n_routed_experts),
            ("n_shared_experts", self.n_shared_experts == 1),
            ("o_groups", self.num_heads % self.o_groups == 0),
            ("index_head_dim", self.index_head_dim > self.rope_head_dim),
            ("csa_ratio", self.csa_ratio > 0),
            ("hca_ratio", self.hca_ratio > 0),
            ("window", self.window > 0),
            ("num_mtp_layers", self.num_mtp_layers >= 0),
        ]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"ModelConfig.{name} = {getattr(self, name)!r} is invalid for this config")

    @property
    def num_layers(self) -> int:
        return len(self.layer_kinds)

    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.rope_head_dim

    def ratio(self, kind: LayerKind) -> int:
        """Compression ratio m of a layer kind (0 for sliding-window-only layers)."""
        return {LayerKind.SWA: 0, LayerKind.CSA: self.csa_ratio, LayerKind.HCA: self.hca_ratio}[kind]

    def is_hash_layer(self, layer: int) -> bool:
        """Whether main layer `layer` routes by token id; MTP layers (index >= num_layers) never do."""
        return layer < self.hash_layers

    def to_hf_dict(self) -> dict[str, Any]:
        """The official config.json form of this config (what the writer saves)."""
        d: dict[str, Any] = {
            "architectures": ["DeepseekV4ForCausalLM"],
            "model_type": "deepseek_v4",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "compress_ratios": [self.ratio(k) for k in self.layer_kinds] + [0] * self.num_mtp_layers,
            "num_hash_layers": self.hash_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": 1,
            "head_dim": self.head_dim,
            "qk_rope_head_dim": self.rope_head_dim,
            "q_lora_rank": self.q_lora_rank,
            "o_groups": self.o_groups,
            "o_lora_rank": self.o_lora_rank,
            "sliding_window": self.window,
            "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts,
            "num_experts_per_tok": self.top_k,
            "moe_intermediate_size": self.moe_intermediate_size,
            "routed_scaling_factor": self.routed_scaling_factor,
            "swiglu_limit": self.swiglu_limit,
            "scoring_func": self.score_func.value,
            "index_n_heads": self.index_heads,
            "index_head_dim": self.index_head_dim,
            "index_topk": self.index_topk,
            "hc_mult": self.hc_mult,
            "hc_sinkhorn_iters": self.hc_sinkhorn_iters,
            "hc_eps": self.hc_eps,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "compress_rope_theta": self.compress_rope_theta,
            "num_nextn_predict_layers": self.num_mtp_layers,
            "max_position_embeddings": self.max_position,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        if self.yarn is not None:
            d["rope_scaling"] = {
                "type": "yarn",
                "factor": self.yarn.factor,
                "original_max_position_embeddings": self.yarn.original_max_position,
                "beta_fast": self.yarn.beta_fast,
                "beta_slow": self.yarn.beta_slow,
            }
        if self.csa_ratio != 4 or self.hca_ratio != 128:
            # The official form cannot say which ratio is which kind unless they are the usual ones.
            raise ValueError(
                f"official config form needs csa_ratio 4 and hca_ratio 128, got "
                f"{self.csa_ratio} and {self.hca_ratio}"
            )
        return d

    def with_(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


# Keys of either config.json form that carry nothing the model reads (bookkeeping, training-only,
# or fixed by the architecture and checked where they matter).
_IGNORED_KEYS = frozenset(
    {
        "architectures",
        "model_type",
        "attention_bias",
        "attention_dropout",
        "initializer_range",
        "hidden_act",
        "torch_dtype",
        "dtype",
        "transformers_version",
        "use_cache",
        "tie_word_embeddings",
        "norm_topk_prob",
        "topk_method",
        "quantization_config",
        "expert_dtype",
        "output_router_logits",
        "router_aux_loss_coef",
        "router_jitter_noise",
        "pad_token_id",
        "mlp_bias",
        "scale_fmt",
        "auto_map",
    }
)

_COMMON_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_attention_heads": "num_heads",
    "head_dim": "head_dim",
    "q_lora_rank": "q_lora_rank",
    "o_groups": "o_groups",
    "o_lora_rank": "o_lora_rank",
    "sliding_window": "window",
    "n_routed_experts": "n_routed_experts",
    "n_shared_experts": "n_shared_experts",
    "num_experts_per_tok": "top_k",
    "moe_intermediate_size": "moe_intermediate_size",
    "routed_scaling_factor": "routed_scaling_factor",
    "swiglu_limit": "swiglu_limit",
    "index_n_heads": "index_heads",
    "index_head_dim": "index_head_dim",
    "index_topk": "index_topk",
    "hc_mult": "hc_mult",
    "hc_sinkhorn_iters": "hc_sinkhorn_iters",
    "hc_eps": "hc_eps",
    "rms_norm_eps": "norm_eps",
    "rope_theta": "rope_theta",
    "compress_rope_theta": "compress_rope_theta",
    "max_position_embeddings": "max_position",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
}
_OFFICIAL_KEYS = {
    "compress_ratios",
    "num_hash_layers",
    "qk_rope_head_dim",
    "rope_scaling",
    "num_hidden_layers",
    "num_nextn_predict_layers",
    "num_key_value_heads",
    "scoring_func",
}
_HF_KEYS = {"layer_types", "mlp_layer_types", "compress_rates", "rope_parameters", "partial_rotary_factor"}


def _yarn_from(d: Mapping[str, Any], where: str) -> YarnConfig | None:
    kind = d.get("rope_type", d.get("type", "default"))
    if kind == "default":
        return None
    if kind != "yarn":
        raise ValueError(f"{where}: rope type {kind!r} is not supported (yarn or default)")
    af = d.get("attention_factor", 1.0)
    if af != 1.0:
        raise ValueError(f"{where}.attention_factor = {af!r}: DeepSeek-V4 applies YaRN without mscale (1.0)")
    return YarnConfig(
        factor=float(d["factor"]),
        original_max_position=int(d["original_max_position_embeddings"]),
        beta_fast=float(d.get("beta_fast", 32)),
        beta_slow=float(d.get("beta_slow", 1)),
    )


def config_from_dict(d: Mapping[str, Any]) -> ModelConfig:
    """Parse a checkpoint's config.json (official or transformers form) into a ModelConfig.

    Raises ValueError naming any unknown key, or the key whose value is unusable.
    """
    unknown = sorted(set(d) - _IGNORED_KEYS - set(_COMMON_KEYS) - _OFFICIAL_KEYS - _HF_KEYS)
    if unknown:
        raise ValueError(f"config.json has keys DeepSeek-V4 does not know: {unknown}")
    if d.get("num_key_value_heads", 1) != 1:
        raise ValueError(
            f"config.json num_key_value_heads = {d['num_key_value_heads']!r}: V4 has one KV head"
        )
    kw: dict[str, Any] = {ours: d[theirs] for theirs, ours in _COMMON_KEYS.items() if theirs in d}
    if "eos_token_id" in kw and isinstance(kw["eos_token_id"], list):
        kw["eos_token_id"] = int(kw["eos_token_id"][0])
    if "scoring_func" in d:
        kw["score_func"] = ScoreFunc(d["scoring_func"])
    n_layers = int(d["num_hidden_layers"])
    n_mtp = int(d.get("num_nextn_predict_layers", 1))
    head_dim = int(d.get("head_dim", 512))
    if "layer_types" in d:
        kinds = tuple(LayerKind(t) for t in d["layer_types"])
        rates = d.get("compress_rates") or {}
        kw["csa_ratio"] = int(rates.get(LayerKind.CSA.value, 4))
        kw["hca_ratio"] = int(rates.get(LayerKind.HCA.value, 128))
    elif "compress_ratios" in d:
        ratios = list(d["compress_ratios"])
        by_ratio = {0: LayerKind.SWA, 4: LayerKind.CSA, 128: LayerKind.HCA}
        if len(ratios) < n_layers or any(r not in by_ratio for r in ratios):
            raise ValueError(
                f"config.json compress_ratios = {ratios!r}: need >= {n_layers} entries of 0/4/128"
            )
        if any(r != 0 for r in ratios[n_layers:]):
            raise ValueError(
                f"config.json compress_ratios[{n_layers}:] = {ratios[n_layers:]!r}: MTP layers are "
                "sliding-window only (0)"
            )
        kinds = tuple(by_ratio[r] for r in ratios[:n_layers])
    else:
        raise ValueError("config.json has neither layer_types nor compress_ratios")
    if len(kinds) != n_layers:
        raise ValueError(f"config.json: {len(kinds)} layer kinds for num_hidden_layers = {n_layers}")
    if "mlp_layer_types" in d:
        mlp = list(d["mlp_layer_types"])
        hash_layers = sum(1 for t in mlp if t == "hash_moe")
        if mlp != ["hash_moe"] * hash_layers + ["moe"] * (len(mlp) - hash_layers):
            raise ValueError(f"config.json mlp_layer_types = {mlp!r}: hash_moe layers must lead, then moe")
    else:
        hash_layers = int(d.get("num_hash_layers", 3))
    if "qk_rope_head_dim" in d:
        kw["rope_head_dim"] = int(d["qk_rope_head_dim"])
    elif "partial_rotary_factor" in d and d["partial_rotary_factor"] is not None:
        kw["rope_head_dim"] = round(head_dim * float(d["partial_rotary_factor"]))
    rp = d.get("rope_parameters")
    if isinstance(rp, Mapping) and isinstance(rp.get("compress"), Mapping):
        main, comp = rp["main"], rp["compress"]
        if _yarn_from(main, "rope_parameters.main") is not None:
            raise ValueError("rope_parameters.main: sliding-window layers use plain RoPE, got yarn")
        kw["rope_theta"] = float(main.get("rope_theta", kw.get("rope_theta", 10000.0)))
        kw["compress_rope_theta"] = float(comp.get("rope_theta", kw.get("compress_rope_theta", 160000.0)))
        kw["yarn"] = _yarn_from(comp, "rope_parameters.compress")
    else:
        scaling = d.get("rope_scaling") or (rp if isinstance(rp, Mapping) else None)
        kw["yarn"] = _yarn_from(scaling, "rope_scaling") if scaling else None
    return ModelConfig(layer_kinds=kinds, hash_layers=hash_layers, num_mtp_layers=n_mtp, **kw)


def load_config(path: str | Path) -> ModelConfig:
    """Read `config.json` from a checkpoint directory (or the file itself)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        raise FileNotFoundError(f"no config.json at {p}")
    return config_from_dict(json.loads(p.read_text()))
