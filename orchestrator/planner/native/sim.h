/* The native simulator's entry point: one whole replay of orchestrator/planner/sim.py's
 * `Simulator`, in C. The Python glue (orchestrator/planner/native_sim.py) fills TsSimInput from
 * the same fleet and requests, and reads TsSimOutput back into a SimResult.
 *
 * Contract: for the same input, every request's routing (prefill, decode, local or not), first
 * token and finish times, and cached tokens, and every instance's busy time, equal the Python
 * simulator's bit for bit: the same handlers in the same order, the same event sequence numbers,
 * the same floating-point expressions (see policy.h and cost.h for the router and the prices).
 */
#ifndef TANDEM_SIM_H
#define TANDEM_SIM_H

#include <stdint.h>

#include "cost.h"
#include "policy.h"

typedef struct {
    /* requests, sorted by arrival (stable) */
    int32_t n_requests;
    const double *arrival;
    const int64_t *prompt;          /* prompt tokens */
    const int64_t *output;          /* output tokens (>= 1) */
    const int64_t *block_off;       /* n_requests + 1 offsets into block_hashes */
    const uint64_t *block_hashes;   /* every request's full-block hashes, concatenated */
    const int64_t *answer_off;      /* n_requests + 1 offsets into answer_hashes */
    const uint64_t *answer_hashes;  /* per request: the blocks its answer fills on the decode (kept
                                       resumable when it ends there; fleet_setup.answer_blocks) */
    const int32_t *session;         /* dense session id, -1 = none */
    int32_t n_sessions;
    int64_t max_sessions;           /* LoadBook's session LRU bound */
    const int64_t *handoff_base;    /* handoff_bytes(arch, prompt, 0) per request */
    int64_t block_bytes;            /* bytes of one block's pages (a reused block is not pulled) */
    int64_t reserve_fixed_blocks;   /* ceil(request_reserve_bytes(arch, 0) / block_bytes) */
    /* instances: slots 0..n_prefill-1 are the prefill instances, then the decode instances */
    int32_t n_prefill, n_decode;
    const int32_t *domain;          /* per slot: NVLink domain id */
    const int64_t *capacity;        /* per slot: KV blocks */
    const int32_t *rank;            /* per slot: its index among the workers sorted by WorkerId */
    int64_t p_max_batch, p_max_tokens, d_max_batch, d_max_tokens;
    double prefill_rate, decode_rate;
    int64_t queue_limit;
    int64_t max_queued;             /* WorkerState.max_queued_prefill_tokens */
    const TsCost *prefill_cost, *decode_cost;
    const TsPolicy *policy;
    /* SLO counting (Simulator.meets); infinities and miss_budget = n_requests for a plain run */
    double slo_ttft, slo_tpot;
    int64_t miss_budget;
} TsSimInput;

typedef struct {
    /* per request (input order); -1.0 when never reached */
    double *t_first, *t_finish;
    int64_t *cached_tokens;
    int8_t *routed;                 /* 1: a decode was chosen (not refused) */
    int8_t *local;                  /* 1: prefilled on its decode */
    int32_t *prefill_slot;          /* -1: local or refused */
    int32_t *decode_slot;           /* -1: refused */
    /* per slot */
    double *busy_time;              /* prefill engines; for decode slots their local prefills */
    double *active_time;            /* decode slots: time spent decoding */
    double area;                    /* integral of requests in the system */
    int64_t rejected, misses, in_system;
    int32_t within_budget;          /* 0 when the replay stopped because misses > miss_budget */
} TsSimOutput;

/* 0 on success; otherwise a negative code (-1: out of memory, -2: too many workers) and nothing
 * in out is meaningful. */
int32_t ts_simulate(const TsSimInput *in, TsSimOutput *out);

#endif
