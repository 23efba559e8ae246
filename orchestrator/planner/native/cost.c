/* The cost model in C: see cost.h for the contract.
 *
 * Each function mirrors its Python twin expression by expression. The rules that keep it bit-exact:
 * - Python evaluates left to right; `int * float` converts the int first, so an integer
 *   subexpression (2 * params, hidden * vocab) is computed in int64 and converted afterwards.
 * - int / int is true division; both operands here are exact integers below 2**53, where Python's
 *   correctly rounded quotient equals (double)a / (double)b.
 * - max(a, b) returns a unless b > a; min(a, b) returns a unless b < a (ties keep the first).
 * - float ** float is pow() from the same libm CPython links (its special cases do not arise:
 *   the base is in (0, 1) and the exponent finite and >= 0).
 * The library is built with -ffp-contract=off and without fast-math (lib.py), so no FMA or
 * reassociation changes a rounding.
 *
 * Overflow (work.py's sums in int64): for a segment ending at n <= 2**21, the largest intermediate
 * is _sum_floor's m * q * (q - 1) <= n * n <= 2**42, and each per-segment sum is at most
 * n * (n + 1) / 2 + 2048 * n < 2**42, so 2**11 segments stay below 2**53: exact as doubles.
 */
#include "cost.h"

#include <math.h>

static double py_max(double a, double b) { return b > a ? b : a; }

static double py_min(double a, double b) { return b < a ? b : a; }

/* work._sum_floor: sum_{k=1}^{n} k // m (n >= 0, m >= 1: floor division is C's). */
static int64_t sum_floor(int64_t n, int64_t m) {
    if (n <= 0) return 0;
    int64_t q = n / m, r = n % m;
    return m * q * (q - 1) / 2 + q * (r + 1);
}

/* work._sum_min: sum_{k=1}^{n} min(k, cap). */
static int64_t sum_min(int64_t n, int64_t cap) {
    if (n <= cap) return n * (n + 1) / 2;
    return cap * (cap + 1) / 2 + (n - cap) * cap;
}

/* work._sum_min_floor: sum_{k=1}^{n} min(k // m, cap). */
static int64_t sum_min_floor(int64_t n, int64_t m, int64_t cap) {
    int64_t knee = cap * m;
    if (n < knee) return sum_floor(n, m);
    return sum_floor(knee - 1, m) + (n - knee + 1) * cap;
}

typedef struct {
    int64_t window, selected, visible;
} Upto;

/* work._upto: (window, selected, visible) summed over the queries at contexts 1..n. */
static Upto upto(const TsAttnGeo *a, int64_t n) {
    Upto u = {a->window ? sum_min(n, a->window) : 0, 0, 0};
    if (a->ratio == 0) return u;
    u.visible = sum_floor(n, a->ratio);
    u.selected = a->topk ? sum_min_floor(n, a->ratio, a->topk) : u.visible;
    return u;
}

/* CostModel.collective_seconds(tokens) with an int `tokens`. */
static double collective_seconds(const TsCost *c, int64_t tokens) {
    double out = 0.0;
    if (c->tp > 1) {
        double nbytes = (double)tokens / (double)c->dp * (double)c->hidden * (double)c->bf16_bytes * 2.0
                        * (double)(c->tp - 1) / (double)c->tp;
        out += 2.0 * (c->tp_link_latency_s + nbytes / c->tp_link_bytes_per_s);
    }
    if (c->ep > 1) {
        double nbytes = (double)tokens / (double)c->gpus * (double)c->moe_topk * (double)c->hidden * 3.0
                        * (double)(c->ep - 1) / (double)c->ep;
        out += 2.0 * c->ep_link_latency_s + nbytes / c->ep_link_bytes_per_s;
    }
    return out;
}

/* CostModel._fixed_seconds: everything but the attention core. */
static double fixed_seconds(const TsCost *c, int64_t tokens, int64_t sampled) {
    const double bw = c->bw, fp8_b = c->fp8_weight_bytes;
    const double gpus = (double)c->gpus, tp = (double)c->tp;
    const double t = (double)tokens;
    double total = 0.0;
    for (int32_t i = 0; i < c->n_attn; i++) {
        const TsAttnGeo *g = &c->attn[i];
        total += (double)g->layers * py_max((double)(2 * g->params) * t / gpus / c->fp8,
                                            (double)g->params * fp8_b / tp / bw);
    }
    const double experts = (double)c->experts;
    const double touched = experts * (1.0 - pow(1.0 - (double)c->moe_topk / experts, t));
    const double routed = py_max(2.0 * t * (double)c->moe_topk * (double)c->expert_params / gpus / c->routed,
                                 touched * (double)c->expert_params * c->routed_weight_bytes / gpus / bw);
    const double shared = py_max(2.0 * t * (double)c->shared_params / gpus / c->fp8,
                                 (double)c->shared_params * fp8_b / tp / bw);
    total += (double)c->moe_layers * (routed + shared);
    if (c->dense_layers) {
        total += (double)c->dense_layers * py_max(2.0 * t * (double)c->dense_params / gpus / c->fp8,
                                                  (double)c->dense_params * fp8_b / tp / bw);
    }
    total += (double)c->layers * (collective_seconds(c, tokens) + c->layer_floor_s);
    const int64_t head = c->hidden * c->vocab;
    total += py_max((double)(2 * sampled * head) / gpus / c->bf16, (double)(head * c->bf16_bytes) / gpus / bw);
    return total;
}

double ts_prefill_chunk_seconds(const TsCost *cost, const int64_t *starts, const int64_t *ends, int32_t n,
                                int64_t sampled) {
    int64_t tokens = 0;
    for (int32_t j = 0; j < n; j++) tokens += ends[j] - starts[j];
    double total = fixed_seconds(cost, tokens, sampled);
    for (int32_t i = 0; i < cost->n_attn; i++) {
        const TsAttnGeo *a = &cost->attn[i];
        int64_t attended = 0, scored = 0, kv_read = 0;
        for (int32_t j = 0; j < n; j++) {  /* work._segment, summed as in prefill_work */
            const int64_t s = starts[j], e = ends[j];
            const Upto u1 = upto(a, e), u0 = upto(a, s);
            const int64_t entries = a->ratio ? e / a->ratio : 0;
            const int64_t win = e < a->window ? e : a->window;
            attended += (u1.window - u0.window) + (u1.selected - u0.selected);
            scored += a->indexer ? u1.visible - u0.visible : 0;
            kv_read += win * a->entry_bytes + entries * (a->entry_bytes + a->index_key_bytes);
        }
        total += (double)a->layers * py_max(cost->attn_rate * (double)attended + cost->index_rate * (double)scored,
                                            (double)kv_read * cost->kv_rate);
    }
    return total;
}

double ts_decode_step_seconds(const TsCost *cost, int64_t batch, double context_tokens) {
    double total = fixed_seconds(cost, batch, batch);
    const double b = (double)batch;
    const double mean = context_tokens / b;
    for (int32_t i = 0; i < cost->n_attn; i++) {
        const TsAttnGeo *a = &cost->attn[i];
        /* min(mean, window) is the int window when window < mean: then win is the int window * batch */
        const double win = py_min(mean, (double)a->window) * b;
        const double visible = a->ratio ? context_tokens / (double)a->ratio : 0.0;
        const double selected = a->topk ? py_min((double)(a->topk * batch), visible) : visible;
        const double attended = win + selected;
        const double kv_read = attended * (double)a->entry_bytes + visible * (double)a->index_key_bytes;
        total += (double)a->layers * py_max(cost->attn_rate * attended
                                            + cost->index_rate * (a->indexer ? visible : 0.0),
                                            kv_read * cost->kv_rate);
    }
    return total;
}
