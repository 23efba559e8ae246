/* The planner's cost model (orchestrator/planner/cost.py, work.py) in C, for the native simulator.
 *
 * Contract: ts_prefill_chunk_seconds and ts_decode_step_seconds return exactly (bit for bit) what
 * CostModel.prefill_chunk_seconds and CostModel.decode_step_seconds return for the same instance,
 * every expression evaluated in Python's order. TsCost holds what CostModel derives from (gpu,
 * arch, par, precision); orchestrator/planner/native/cost_params.py fills it from a CostModel.
 */
#ifndef TANDEM_COST_H
#define TANDEM_COST_H

#include <stdint.h>

#define TS_MAX_ATTN_KINDS 8

typedef struct TsCost TsCost;  /* defined below by the cost model's author */

/* One attention layer kind (models.AttentionGeometry): the integers the prices use. */
typedef struct {
    int64_t layers;
    int64_t window;           /* 0: no sliding window */
    int64_t ratio;            /* 0: no compressed entries */
    int64_t topk;             /* 0: every visible entry is attended */
    int64_t indexer;          /* 0 / 1 */
    int64_t entry_bytes;
    int64_t index_key_bytes;
    int64_t params;           /* weights of one layer's attention block */
} TsAttnGeo;

/* One CostModel: its precomputed doubles (same names without the leading underscore), the looked-up
 * constants, and the integers of its Parallelism and ModelArch. Mirrored field for field by
 * cost_params.TsCost (ctypes): change both together. */
struct TsCost {
    /* CostModel.__post_init__ */
    double bf16;              /* _bf16: bf16 FLOP/s reached */
    double fp8;               /* _fp8 */
    double routed;            /* _routed: routed experts' FLOP/s (fp4 or fp8) */
    double bw;                /* _bw: HBM bytes/s reached */
    double attn_rate;         /* _attn_rate: seconds per attended key */
    double index_rate;        /* _index_rate: seconds per indexer score */
    double kv_rate;           /* _kv_rate: seconds per KV byte read */
    /* constants the Python looks up per call */
    double fp8_weight_bytes;     /* WEIGHT_BYTES[Precision.FP8] */
    double routed_weight_bytes;  /* WEIGHT_BYTES[precision] */
    double layer_floor_s;        /* LAYER_LATENCY_FLOOR_S */
    double tp_link_latency_s;    /* LINK_LATENCY_S[link_for_group(gpu, tp)]; read only when tp > 1 */
    double tp_link_bytes_per_s;  /* link_bytes_per_s(gpu, that link) */
    double ep_link_latency_s;    /* the same for the ep group; read only when ep > 1 */
    double ep_link_bytes_per_s;
    /* Parallelism */
    int64_t gpus, tp, ep, dp;
    /* ModelArch */
    int64_t hidden, vocab;
    int64_t layers;              /* ModelArch.layers: sum of the kinds' layers */
    int64_t bf16_bytes;          /* BF16_BYTES */
    int64_t experts, moe_topk, expert_params, shared_params, moe_layers, dense_layers, dense_params;
    int32_t n_attn;              /* kinds in attn[], 1..TS_MAX_ATTN_KINDS, ModelArch.attention's order */
    int32_t reserved;            /* 0: keeps attn[] 8-byte aligned on every ABI */
    TsAttnGeo attn[TS_MAX_ATTN_KINDS];
};

/* One chunked-prefill step over n segments [starts[i], ends[i]) of different requests, `sampled`
 * of which produce logits. The caller guarantees 0 <= starts[i] < ends[i] (the Python wrapper
 * checks it). The work sums are exact int64 integers below 2**53 for ends up to 2**21 tokens and up to
 * 2**11 segments (see cost.c), so their conversions to double are exact as in Python. */
double ts_prefill_chunk_seconds(const TsCost *cost, const int64_t *starts, const int64_t *ends, int32_t n,
                                int64_t sampled);

/* One decode step of `batch` requests whose contexts sum to context_tokens (batch >= 1,
 * context_tokens >= batch: the caller guarantees it). */
double ts_decode_step_seconds(const TsCost *cost, int64_t batch, double context_tokens);

#endif
