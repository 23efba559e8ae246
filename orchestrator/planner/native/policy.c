/* The router's four policies in C; policy.h states the contract.
 *
 * Every expression below is written in the order the Python source evaluates it, with the same
 * int -> double conversions: `(int64 a) / (int64 b)` in Python is a true division, here
 * (double)a / (double)b (both exact while below 2^53, so the quotient rounds the same way);
 * `float * int` converts the int first. Python's min / max over equal keys keep the FIRST element;
 * the loops below replace their best only on a strictly smaller key, walking in Python's order.
 */
#include "policy.h"

#include <stddef.h>

static int64_t imax64(int64_t a, int64_t b) { return a > b ? a : b; }

/* -(-n // bs) for n >= 0, bs > 0: the prompt's blocks, the partial last block included. */
static int64_t prompt_blocks(int64_t n, int64_t bs) { return (n + bs - 1) / bs; }

/* estimate.uncached_tokens */
static int64_t uncached(int64_t n, int64_t cached_blocks, int64_t bs) { return imax64(n - cached_blocks * bs, 1); }

/* inputs.WorkerState.admits */
static int admits(const TsWorker *w) {
    int64_t overflow = imax64(w->running - w->max_running, 0);
    return w->queue_len + overflow < w->queue_limit && w->queued_tokens < w->max_queued;
}

/* inputs.DisaggThresholds.local */
static int local_prefill(const TsPolicy *p, int64_t unc, int64_t n) {
    if (p->disagg_mode == TS_DISAGG_CONDITIONAL)
        return unc < p->max_local_prefill_tokens && (double)unc < p->max_local_uncached_fraction * (double)n;
    return p->disagg_mode == TS_DISAGG_NEVER;
}

/* inputs.Link.seconds(blocks * kv_bytes_per_block) over the NVLink (same_domain) or the RDMA link. */
static double handoff(const TsPolicy *p, int same_domain, int64_t blocks) {
    return ts_link_seconds(p, same_domain, blocks * p->kv_bytes_per_block);
}

static void choose_pair(TsChoice *out, int32_t prefill, int32_t decode, int64_t unc) {
    out->refused = 0;
    out->prefill = prefill;
    out->decode = decode;
    out->uncached_tokens = unc;
}

static void refuse(TsChoice *out) {
    out->refused = 1;
    out->prefill = -1;
    out->decode = -1;
    out->uncached_tokens = 0;
}

/* outcome.decision's uncached tokens: from the prefill's matches, or the decode's when local. */
static void decide(TsChoice *out, const TsPolicy *p, const TsRequestView *v, int32_t prefill, int32_t decode) {
    int32_t from = prefill < 0 ? decode : prefill;
    choose_pair(out, prefill, decode, uncached(v->prompt_tokens, v->matches[from], p->block_size));
}

/* The admitting workers of a role in WorkerId order; *any = whether the role has any worker. */
static int32_t open_of_role(const TsWorker *ws, int32_t n, int32_t role, int32_t *idx) {
    int32_t k = 0;
    for (int32_t i = 0; i < n; i++)
        if (ws[i].role == role && admits(&ws[i])) idx[k++] = i;
    return k;
}

/* outcome.open_workers: the admitting workers of `role` into idx, their count; 0 after refusing. */
static int32_t open_or_refuse(const TsWorker *ws, int32_t n, int32_t role, int32_t *idx, TsChoice *out) {
    int32_t m = open_of_role(ws, n, role, idx);
    if (m == 0) refuse(out);
    return m;
}

/* ---- kv (policy_kv.KvPolicy) ---------------------------------------------------------------- */

/* The tie-break key (-shared, load, remote, prefill id, decode id); a local candidate's prefill id
 * ("", -1) sorts before every WorkerId, here -1 before every index. */
typedef struct {
    int64_t shared;  /* already negated */
    double load;
    int32_t remote;
    int32_t prefill;
    int32_t decode;
} TieKey;

/* Python's tuple `<`: the first unequal element decides. */
static int key_less(const TieKey *a, const TieKey *b) {
    if (a->shared != b->shared) return a->shared < b->shared;
    if (a->load != b->load) return a->load < b->load;
    if (a->remote != b->remote) return a->remote < b->remote;
    if (a->prefill != b->prefill) return a->prefill < b->prefill;
    return a->decode < b->decode;
}

/* KvPolicy._pressure with no dp term (every worker is its own instance). */
static double pressure(const TsPolicy *p, const TsWorker *d, int64_t blocks, int64_t reused) {
    double kv = ((double)(d->kv_used + blocks) - p->reuse_credit * (double)reused) / (double)d->kv_total;
    double run = (double)(d->running + 1) / (double)d->max_running;
    double dp = 0.0;
    return p->w_kv * kv + p->w_running * run + p->w_dp * dp;
}

/* Per open decode: its local option, or the terms its pair rows share. */
typedef struct {
    int32_t worker;
    int32_t local;        /* 1: the decode prefills this request itself */
    double cost;          /* local: t + weight * pressure */
    double pressure;      /* local: with matches; pair: with held */
    double wp;            /* pair: weight * pressure */
    double h_intra, h_cross;  /* pair: handoff within / across the decode's domain */
} DecodeTerms;

/* Prefills grouped by domain in order of first appearance (KvPolicy._domains). */
typedef struct {
    int32_t n_groups;
    int32_t domain[TS_MAX_WORKERS];
    double best_t[TS_MAX_WORKERS];
    int32_t start[TS_MAX_WORKERS + 1];  /* group g's members: member[start[g] .. start[g+1]) */
    int32_t member[TS_MAX_WORKERS];     /* worker indexes, WorkerId order within a group */
    double t[TS_MAX_WORKERS];           /* per member: (queued + uncached) / rate */
    double load[TS_MAX_WORKERS];        /* per member: queued / rate */
} Domains;

static void kv_domains(const TsPolicy *p, const TsWorker *ws, const TsRequestView *v, const int32_t *pre,
                       int32_t n_pre, Domains *g) {
    int32_t group_of[TS_MAX_WORKERS], count[TS_MAX_WORKERS];
    g->n_groups = 0;
    for (int32_t i = 0; i < n_pre; i++) {
        int32_t dom = ws[pre[i]].domain, k = 0;
        while (k < g->n_groups && g->domain[k] != dom) k++;
        if (k == g->n_groups) {
            g->domain[k] = dom;
            count[k] = 0;
            g->n_groups++;
        }
        group_of[i] = k;
        count[k]++;
    }
    g->start[0] = 0;
    for (int32_t k = 0; k < g->n_groups; k++) g->start[k + 1] = g->start[k] + count[k];
    int32_t fill[TS_MAX_WORKERS];
    for (int32_t k = 0; k < g->n_groups; k++) fill[k] = g->start[k];
    int64_t n = v->prompt_tokens, bs = p->block_size;
    for (int32_t i = 0; i < n_pre; i++) {
        const TsWorker *w = &ws[pre[i]];
        int32_t k = group_of[i], slot = fill[k]++;
        int64_t unc = uncached(n, v->matches[pre[i]], bs);
        g->member[slot] = pre[i];
        g->t[slot] = (double)(w->queued_tokens + unc) / w->prefill_rate;
        g->load[slot] = (double)w->queued_tokens / w->prefill_rate;
        if (slot == g->start[k] || g->t[slot] < g->best_t[k]) g->best_t[k] = g->t[slot];
    }
}

static void route_kv(const TsPolicy *p, const TsWorker *ws, int32_t nw, const TsRequestView *v, TsChoice *out) {
    int32_t dec[TS_MAX_WORKERS], pre[TS_MAX_WORKERS];
    int32_t n_dec = open_of_role(ws, nw, TS_DECODE, dec);
    int32_t n_pre = open_of_role(ws, nw, TS_PREFILL, pre);
    int64_t n = v->prompt_tokens, bs = p->block_size, blocks = prompt_blocks(n, bs);
    double weight = p->decode_load_weight_s;
    Domains g;
    kv_domains(p, ws, v, pre, n_pre, &g);

    /* the candidates' costs and the cheapest (KvPolicy._ties, first half) */
    DecodeTerms terms[TS_MAX_WORKERS];
    int have = 0;
    double best = 0.0;
    for (int32_t j = 0; j < n_dec; j++) {
        const TsWorker *d = &ws[dec[j]];
        DecodeTerms *dt = &terms[j];
        int64_t held = v->matches[dec[j]], kept = v->held[dec[j]];
        int64_t unc_d = uncached(n, held, bs);
        dt->worker = dec[j];
        dt->local = local_prefill(p, unc_d, n);
        if (dt->local) {
            dt->pressure = pressure(p, d, blocks, held);
            double t = (double)(d->queued_tokens + unc_d) / d->prefill_rate;
            dt->cost = t + weight * dt->pressure;
            if (!have || dt->cost < best) best = dt->cost;
            have = 1;
            continue;
        }
        dt->pressure = pressure(p, d, blocks, kept);
        dt->wp = weight * dt->pressure;
        int64_t moved = imax64(blocks - kept, 0);
        dt->h_intra = handoff(p, 1, moved);
        dt->h_cross = handoff(p, 0, moved);
        for (int32_t k = 0; k < g.n_groups; k++) {
            double h = g.domain[k] == d->domain ? dt->h_intra : dt->h_cross;
            double cost = g.best_t[k] + h + dt->wp;
            if (!have || cost < best) best = cost;
            have = 1;
        }
    }
    if (!have) {
        refuse(out);
        return;
    }
    double limit = best + p->tie_tolerance_s;

    /* the tie-break over every candidate within the limit (local ones first, then the rows) */
    int aff = v->has_affinity;
    TieKey win = {0, 0.0, 0, 0, 0};
    int found = 0;
    for (int32_t j = 0; j < n_dec; j++) {
        const DecodeTerms *dt = &terms[j];
        if (!dt->local || !(dt->cost <= limit)) continue;
        const TsWorker *d = &ws[dt->worker];
        TieKey key = {aff ? -((int64_t)(dt->worker == v->aff_decode) + (int64_t)(v->aff_prefill == -1)) : 0,
                      (double)d->queued_tokens / d->prefill_rate + dt->pressure, 0, -1, dt->worker};
        if (!found || key_less(&key, &win)) win = key;
        found = 1;
    }
    for (int32_t j = 0; j < n_dec; j++) {
        const DecodeTerms *dt = &terms[j];
        if (dt->local) continue;
        int64_t base = dt->worker == v->aff_decode;
        for (int32_t k = 0; k < g.n_groups; k++) {
            double h = g.domain[k] == ws[dt->worker].domain ? dt->h_intra : dt->h_cross;
            if (!(g.best_t[k] + h + dt->wp <= limit)) continue;
            double extra = h + dt->wp;
            for (int32_t s = g.start[k]; s < g.start[k + 1]; s++) {
                if (!(g.t[s] + extra <= limit)) continue;
                TieKey key = {aff ? -(base + (int64_t)(g.member[s] == v->aff_prefill)) : 0,
                              g.load[s] + dt->pressure, 1, g.member[s], dt->worker};
                if (!found || key_less(&key, &win)) win = key;
                found = 1;
            }
        }
    }
    if (!found) {  /* every row within the limit rounded past it member by member: Python refuses */
        refuse(out);
        return;
    }
    if (win.remote)
        choose_pair(out, win.prefill, win.decode, uncached(n, v->matches[win.prefill], bs));
    else
        choose_pair(out, -1, win.decode, uncached(n, v->matches[win.decode], bs));
}

/* ---- round-robin (policy_round_robin.RoundRobinPolicy) -------------------------------------- */

/* The first admitting worker of role from position decisions_made mod (workers of role). */
static int32_t rr_turn(const TsWorker *ws, int32_t nw, int32_t role, int64_t k) {
    int32_t all[TS_MAX_WORKERS], m = 0;
    for (int32_t i = 0; i < nw; i++)
        if (ws[i].role == role) all[m++] = i;
    for (int32_t i = 0; i < m; i++) {
        int32_t w = all[(k + i) % m];
        if (admits(&ws[w])) return w;
    }
    return -1;  /* unreachable: the caller found an admitting worker first */
}

static void route_round_robin(const TsPolicy *p, const TsWorker *ws, int32_t nw, const TsRequestView *v,
                              TsChoice *out) {
    int32_t idx[TS_MAX_WORKERS];
    if (!open_or_refuse(ws, nw, TS_DECODE, idx, out)) return;
    int32_t decode = rr_turn(ws, nw, TS_DECODE, v->decisions_made);
    if (p->disagg_mode == TS_DISAGG_NEVER) {
        decide(out, p, v, -1, decode);
        return;
    }
    if (!open_or_refuse(ws, nw, TS_PREFILL, idx, out)) return;
    decide(out, p, v, rr_turn(ws, nw, TS_PREFILL, v->decisions_made), decode);
}

/* ---- sglang (policy_sglang.SglangPolicy) ---------------------------------------------------- */

static int64_t sglang_load(const TsWorker *w) { return w->running + w->queue_len; }

/* argmin(workers, sglang_load): the least load, then the lowest index. */
static int32_t least_loaded(const TsWorker *ws, const int32_t *idx, int32_t m) {
    int32_t best = idx[0];
    for (int32_t i = 1; i < m; i++)
        if (sglang_load(&ws[idx[i]]) < sglang_load(&ws[best])) best = idx[i];
    return best;
}

/* SglangPolicy.pick over one side's admitting workers (m >= 1). */
static int32_t sglang_pick(const TsPolicy *p, const TsWorker *ws, const TsRequestView *v, const int32_t *idx,
                           int32_t m) {
    int64_t hi = sglang_load(&ws[idx[0]]), lo = hi;
    for (int32_t i = 1; i < m; i++) {
        int64_t l = sglang_load(&ws[idx[i]]);
        if (l > hi) hi = l;
        if (l < lo) lo = l;
    }
    if (hi - lo > p->balance_abs_threshold && (double)hi > p->balance_rel_threshold * (double)lo)
        return least_loaded(ws, idx, m);
    /* min by (-matched, load, id) */
    int32_t best = idx[0];
    for (int32_t i = 1; i < m; i++) {
        int32_t w = idx[i];
        int32_t mw = v->matches[w], mb = v->matches[best];
        if (mw > mb || (mw == mb && sglang_load(&ws[w]) < sglang_load(&ws[best]))) best = w;
    }
    double rate = (double)((int64_t)v->matches[best] * p->block_size) / (double)v->prompt_tokens;
    if (rate > p->cache_threshold) return best;
    return least_loaded(ws, idx, m);
}

static void route_sglang(const TsPolicy *p, const TsWorker *ws, int32_t nw, const TsRequestView *v,
                         TsChoice *out) {
    int32_t idx[TS_MAX_WORKERS];
    int32_t m = open_or_refuse(ws, nw, TS_DECODE, idx, out);
    if (!m) return;
    int32_t decode = sglang_pick(p, ws, v, idx, m);
    if (p->disagg_mode == TS_DISAGG_NEVER) {
        decide(out, p, v, -1, decode);
        return;
    }
    m = open_or_refuse(ws, nw, TS_PREFILL, idx, out);
    if (!m) return;
    decide(out, p, v, sglang_pick(p, ws, v, idx, m), decode);
}

/* ---- dynamo (policy_dynamo.DynamoPolicy) ---------------------------------------------------- */

/* DynamoPolicy.cost */
static double dynamo_cost(const TsPolicy *p, const TsWorker *w, const TsRequestView *v, int32_t i,
                          double overlap_weight) {
    int64_t n = v->prompt_tokens, bs = p->block_size;
    double credit = overlap_weight * (double)v->matches[i];
    double prefill = (double)(w->queued_tokens + n) / (double)bs;
    int64_t decode = w->kv_used + prompt_blocks(n, bs);
    double diff = prefill - credit;
    double load = 0.0 > diff ? 0.0 : diff;  /* max(diff, 0.0) keeps diff unless 0.0 is larger */
    return p->prefill_load_scale * load + (double)decode;
}

/* argmin by (cost, id) over admitting workers (m >= 1). */
static int32_t dynamo_argmin(const TsPolicy *p, const TsWorker *ws, const TsRequestView *v, const int32_t *idx,
                             int32_t m, double overlap_weight) {
    int32_t best = idx[0];
    double best_cost = dynamo_cost(p, &ws[best], v, best, overlap_weight);
    for (int32_t i = 1; i < m; i++) {
        double c = dynamo_cost(p, &ws[idx[i]], v, idx[i], overlap_weight);
        if (c < best_cost) {
            best = idx[i];
            best_cost = c;
        }
    }
    return best;
}

static void route_dynamo(const TsPolicy *p, const TsWorker *ws, int32_t nw, const TsRequestView *v,
                         TsChoice *out) {
    int32_t idx[TS_MAX_WORKERS];
    int32_t m = open_or_refuse(ws, nw, TS_DECODE, idx, out);
    if (!m) return;
    int32_t decode = dynamo_argmin(p, ws, v, idx, m, 0.0);
    int64_t unc = uncached(v->prompt_tokens, v->matches[decode], p->block_size);
    if (local_prefill(p, unc, v->prompt_tokens)) {
        choose_pair(out, -1, decode, unc);
        return;
    }
    m = open_or_refuse(ws, nw, TS_PREFILL, idx, out);
    if (!m) return;
    decide(out, p, v, dynamo_argmin(p, ws, v, idx, m, p->overlap_weight), decode);
}

void ts_route(const TsPolicy *policy, const TsWorker *workers, int32_t n_workers, const TsRequestView *view,
              TsChoice *out) {
    switch (policy->kind) {
    case TS_POLICY_KV: route_kv(policy, workers, n_workers, view, out); return;
    case TS_POLICY_ROUND_ROBIN: route_round_robin(policy, workers, n_workers, view, out); return;
    case TS_POLICY_SGLANG: route_sglang(policy, workers, n_workers, view, out); return;
    case TS_POLICY_DYNAMO: route_dynamo(policy, workers, n_workers, view, out); return;
    default: refuse(out); return;  /* unreachable: policy_params builds only the four kinds */
    }
}
