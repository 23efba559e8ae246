/* The router's four policies (orchestrator/router/policy_*.py) in C, for the native simulator.
 *
 * Contract: for the same workers, request view and parameters, ts_route chooses exactly what the
 * Python `Router.route` chooses (same prefill, same decode, same uncached token count, a refusal
 * exactly when Python refuses), with every floating-point expression evaluated in Python's order.
 * Limits (the simulator's situation; the Python glue checks them): every worker is its own
 * instance (dp_rank 0, so the kv policy's dp term is 0), and the router's load book folds nothing
 * in (states are fresher than every booking), so the view's workers are the reports as given.
 * Also: 0 <= n_workers <= TS_MAX_WORKERS (ts_route's scratch lives on its stack: nothing is
 * allocated per call), kind and disagg_mode are among the enums below, and every count and every
 * count times block_size or kv_bytes_per_block stays below 2^53 (so each int -> double conversion
 * is exact, as Python's is).
 */
#ifndef TANDEM_POLICY_H
#define TANDEM_POLICY_H

#include <stdint.h>

#define TS_MAX_WORKERS 256

enum { TS_PREFILL = 0, TS_DECODE = 1 };
enum { TS_POLICY_KV = 0, TS_POLICY_ROUND_ROBIN = 1, TS_POLICY_SGLANG = 2, TS_POLICY_DYNAMO = 3 };
enum { TS_DISAGG_CONDITIONAL = 0, TS_DISAGG_ALWAYS = 1, TS_DISAGG_NEVER = 2 };

/* One worker's state as the policy sees it (inputs.WorkerState). */
typedef struct {
    int32_t role;            /* TS_PREFILL / TS_DECODE */
    int32_t domain;          /* NVLink domain id: equal ids = same domain */
    double prefill_rate;     /* prefill_rate_tps, > 0 */
    int64_t queued_tokens;   /* queued_prefill_tokens */
    int64_t kv_used;         /* kv_blocks_used */
    int64_t kv_total;        /* kv_blocks_total */
    int64_t running;         /* running_requests */
    int64_t max_running;     /* max_running_requests */
    int64_t queue_len;       /* queue_length */
    int64_t queue_limit;
    int64_t max_queued;      /* max_queued_prefill_tokens */
} TsWorker;

/* Fleet params and the policy's knobs (inputs.FleetParams, KvParams, SglangParams, DynamoParams). */
typedef struct {
    int32_t kind;            /* TS_POLICY_* */
    int32_t disagg_mode;     /* TS_DISAGG_* */
    int64_t block_size;
    int64_t kv_bytes_per_block;
    double intra_bw, intra_lat;   /* topology.intra_domain: bandwidth bytes/s, latency s */
    double cross_bw, cross_lat;   /* topology.cross_domain */
    int64_t max_local_prefill_tokens;
    double max_local_uncached_fraction;
    double w_kv, w_running, w_dp, reuse_credit, decode_load_weight_s, tie_tolerance_s;   /* kv */
    double cache_threshold; int64_t balance_abs_threshold; double balance_rel_threshold; /* sglang */
    double overlap_weight, prefill_load_scale;                                           /* dynamo */
} TsPolicy;

/* One request against the fleet (RoutingView minus the workers). */
typedef struct {
    int64_t prompt_tokens;
    const int32_t *matches;  /* per worker (same order as the workers array): leading resumable blocks */
    const int32_t *held;     /* per worker: max(held view, matches) = RoutingView.held_blocks */
    int32_t has_affinity;    /* 0: no affinity (no session or an unknown one) */
    int32_t aff_prefill;     /* affinity pair: worker index, -1 = the pair was local (prefill None),
                                -2 = a worker no longer in the fleet (matches no index) */
    int32_t aff_decode;      /* worker index, -2 = a worker no longer in the fleet */
    int64_t decisions_made;  /* LoadBook.decisions_made before this request */
} TsRequestView;

typedef struct {
    int32_t refused;         /* 1: Python returns a Refusal; the other fields are then unset */
    int32_t prefill;         /* worker index, -1 = the decode prefills locally */
    int32_t decode;          /* worker index */
    int64_t uncached_tokens; /* RouteDecision.uncached_tokens */
} TsChoice;

/* inputs.Link.seconds(nbytes) over the NVLink (same_domain) or the RDMA link of the fleet: 0 when
 * nothing moves. Shared by the policies' handoff estimate and the simulator's transfers. */
static inline double ts_link_seconds(const TsPolicy *p, int same_domain, int64_t nbytes) {
    if (nbytes <= 0) return 0.0;
    if (same_domain) return p->intra_lat + (double)nbytes / p->intra_bw;
    return p->cross_lat + (double)nbytes / p->cross_bw;
}

/* Workers are given sorted by WorkerId (the Python view's order); an index's rank in that order is
 * the WorkerId tie-break. */
void ts_route(const TsPolicy *policy, const TsWorker *workers, int32_t n_workers,
              const TsRequestView *view, TsChoice *out);

#endif
