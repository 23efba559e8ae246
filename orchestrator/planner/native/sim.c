/* The native twin of orchestrator/planner/sim.py (event loop and handlers), instances.py
 * (PrefillEngine, DecodeInstance) and cache.py (PrefixCache, at its per-block reference semantics)
 * with the KvIndex views they feed. Each function names the Python it mirrors; keep them in step.
 *
 * Representation: block hashes are interned to dense ids in arrival order (a prompt's new blocks get
 * consecutive ids, so the per-cache arrays are walked mostly sequentially); the KV index is two
 * bitmasks per block over the worker slots (resumable, held-only), exactly the views the caches'
 * stored / removed announcements build in Python. The router's load book folds nothing in the
 * simulator (every state is rebuilt after the booking that touched it), so only its decision counter
 * and its session -> last pair LRU are kept.
 */
#include "sim.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define MAX_WORKERS 256

enum { EV_ARRIVE = 0, EV_PREFILL_DONE = 1, EV_LOCAL_DONE = 2, EV_TRANSFER_DONE = 3, EV_DECODE_FINISH = 4 };

/* ---- small containers ------------------------------------------------------------------------ */
typedef struct {
    int32_t *v;
    int64_t head, tail, cap;
} Queue; /* FIFO of ints (Python deque) */

static int q_push(Queue *q, int32_t x) {
    if (q->tail == q->cap) {
        if (q->head > 0 && q->head * 2 >= q->cap) { /* compact */
            memmove(q->v, q->v + q->head, (size_t)(q->tail - q->head) * sizeof(int32_t));
            q->tail -= q->head;
            q->head = 0;
        } else {
            int64_t cap = q->cap ? q->cap * 2 : 16;
            int32_t *v = realloc(q->v, (size_t)cap * sizeof(int32_t));
            if (!v) return -1;
            q->v = v;
            q->cap = cap;
        }
    }
    q->v[q->tail++] = x;
    return 0;
}
static inline int64_t q_len(const Queue *q) { return q->tail - q->head; }

/* A binary min-heap of T ordered by LESS (a strict order: ties never happen, so any correct heap
 * pops the same sequence as Python's heapq): NAME_push (0, or -1 when out of memory), NAME_pop. */
#define DEFINE_HEAP(NAME, T, LESS)                                              \
    typedef struct {                                                            \
        T *v;                                                                   \
        int64_t n, cap;                                                         \
    } NAME;                                                                     \
    static int NAME##_push(NAME *h, T e) {                                      \
        if (h->n == h->cap) {                                                   \
            int64_t cap = h->cap ? h->cap * 2 : 64;                             \
            T *v = realloc(h->v, (size_t)cap * sizeof(T));                      \
            if (!v) return -1;                                                  \
            h->v = v;                                                           \
            h->cap = cap;                                                       \
        }                                                                       \
        int64_t i = h->n++;                                                     \
        while (i > 0) {                                                         \
            int64_t p = (i - 1) / 2;                                            \
            if (!LESS(&e, &h->v[p])) break;                                     \
            h->v[i] = h->v[p];                                                  \
            i = p;                                                              \
        }                                                                       \
        h->v[i] = e;                                                            \
        return 0;                                                               \
    }                                                                           \
    static T NAME##_pop(NAME *h) {                                              \
        T top = h->v[0], last = h->v[--h->n];                                   \
        int64_t i = 0;                                                          \
        for (;;) {                                                              \
            int64_t c = 2 * i + 1;                                              \
            if (c >= h->n) break;                                               \
            if (c + 1 < h->n && LESS(&h->v[c + 1], &h->v[c])) c++;              \
            if (!LESS(&h->v[c], &last)) break;                                  \
            h->v[i] = h->v[c];                                                  \
            i = c;                                                              \
        }                                                                       \
        if (h->n > 0) h->v[i] = last;                                           \
        return top;                                                             \
    }

typedef struct {
    double t;
    int64_t seq;
    int32_t kind, a;
    int64_t b;
} Event;

/* heapq on (t, seq, kind, payload): seq is unique, so (t, seq) orders */
static inline int ev_less(const Event *x, const Event *y) {
    return x->t < y->t || (x->t == y->t && x->seq < y->seq);
}
DEFINE_HEAP(EventHeap, Event, ev_less)

typedef struct {
    double step;
    int32_t job;
} Fin;

/* DecodeInstance.heap: (finish step, job seq); a job's index is its arrival seq */
static inline int fin_less(const Fin *x, const Fin *y) {
    return x->step < y->step || (x->step == y->step && x->job < y->job);
}
DEFINE_HEAP(FinHeap, Fin, fin_less)

/* Python's max(a, b) / min(a, b) on floats: the first argument unless the second is strictly
 * larger / smaller. */
static inline double pmax(double a, double b) { return b > a ? b : a; }
static inline double pmin(double a, double b) { return b < a ? b : a; }
static inline int64_t imin(int64_t a, int64_t b) { return b < a ? b : a; }
static inline int64_t imax(int64_t a, int64_t b) { return b > a ? b : a; }
static inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; } /* a >= 0, b > 0 */

/* ---- state ----------------------------------------------------------------------------------- */
typedef struct {
    int32_t prefill;  /* engine index, -1 = none */
    int32_t decode;   /* decode index, -1 = none */
    int8_t local, missed;
    int64_t pos, cached_tokens, cached_blocks, reused_blocks, prefill_reserve, decode_reserve;
    double decoded_from, t_first, t_join, t_finish;
} Job;

typedef struct {
    int32_t *val;      /* per block id: 0 absent, > 0 holders, < 0 -(release number): cached */
    int64_t capacity, reserved, cached;
    int32_t seq;       /* releases that freed a block */
    int32_t *lru_block, *lru_seq; /* the LRU: freed blocks in release order, prompt order within */
    int64_t lru_head, lru_tail, lru_cap;
} Cache;

typedef struct {
    int32_t slot;
    int is_local;
    const TsCost *cost;
    int64_t max_batch, max_tokens;
    Queue queue;
    int32_t *run_job;
    int64_t *run_end, *seg_start, *seg_end;
    int32_t n_running;
    int busy;
    double busy_time;
    int64_t queued_tokens;
} Engine;

typedef struct {
    int32_t slot, engine;
    Queue waiting;
    int64_t incoming, promised_n, promised_blocks;
    FinHeap heap;
    int64_t batch, max_batch, version;
    double ctx_base, steps, step_time, t_last, active_time, area;
    int paused;
} Decode;

typedef struct {
    const TsSimInput *in;
    TsSimOutput *out;
    int32_t n_slots, words;        /* worker slots; 64-bit words per mask */
    int32_t *blocks;               /* dense block ids, same offsets as in->block_hashes */
    int32_t n_ids;
    uint64_t *res, *held_only;     /* per block id: `words` mask words over slots */
    Cache *caches;                 /* per slot */
    Engine *engines;               /* per slot: prefill engines, then the decodes' local engines */
    Decode *decodes;
    Job *jobs;
    EventHeap events;
    int64_t seq;                   /* event pushes so far (the arrivals took 1..n_requests) */
    double now, t_area;
    int64_t in_system, misses, rejected, decisions;
    /* sessions: last pair, and the LRU of sessions by last booking (doubly linked) */
    int32_t *aff_prefill, *aff_decode; /* slots; aff_prefill -1 = local, -2 = no pair */
    int32_t *s_prev, *s_next;
    int32_t s_head, s_tail;
    int64_t s_count;
    int32_t slot_of_rank[MAX_WORKERS];
    int failed;                    /* an allocation failed */
} Sim;

static inline int32_t job_blocks(const Sim *s, int32_t j, const int32_t **ids) {
    int64_t a = s->in->block_off[j], b = s->in->block_off[j + 1];
    *ids = s->blocks + a;
    return (int32_t)(b - a);
}

static void push(Sim *s, double t, int32_t kind, int32_t a, int64_t b) {
    Event e = {t, ++s->seq, kind, a, b};
    if (EventHeap_push(&s->events, e)) s->failed = 1;
}

/* ---- the index (KvIndex views) --------------------------------------------------------------- */
static inline uint64_t *res_of(Sim *s, int32_t b) { return s->res + (int64_t)b * s->words; }
static inline uint64_t *ho_of(Sim *s, int32_t b) { return s->held_only + (int64_t)b * s->words; }

/* KvIndex.stored(worker, blocks, held_only) of one block: it moves to the given view. */
static inline void index_store(Sim *s, int32_t slot, int32_t b, int held_only) {
    uint64_t bit = 1ULL << (slot & 63);
    int w = slot >> 6;
    if (held_only) {
        ho_of(s, b)[w] |= bit;
        res_of(s, b)[w] &= ~bit;
    } else {
        res_of(s, b)[w] |= bit;
        ho_of(s, b)[w] &= ~bit;
    }
}

static inline void index_remove(Sim *s, int32_t slot, int32_t b) {
    uint64_t bit = 1ULL << (slot & 63);
    int w = slot >> 6;
    res_of(s, b)[w] &= ~bit;
    ho_of(s, b)[w] &= ~bit;
}

static inline int is_pulled(Sim *s, int32_t slot, int32_t b) {
    return (int)((ho_of(s, b)[slot >> 6] >> (slot & 63)) & 1ULL);
}

/* KvIndex.match_views: per slot, the leading blocks held resumable (match) and of either kind
 * (match_held). */
static void match_views(Sim *s, const int32_t *ids, int32_t n, int32_t *match, int32_t *held) {
    uint64_t act_r[MAX_WORKERS / 64], act_h[MAX_WORKERS / 64];
    int W = s->words;
    for (int w = 0; w < W; w++) act_r[w] = act_h[w] = ~0ULL;
    for (int32_t i = 0; i < s->n_slots; i++) match[i] = held[i] = 0;
    int any_r = 1, any_h = 1;
    for (int32_t k = 0; k < n && (any_r || any_h); k++) {
        const uint64_t *r = res_of(s, ids[k]), *h = ho_of(s, ids[k]);
        any_r = any_h = 0;
        for (int w = 0; w < W; w++) {
            uint64_t nr = act_r[w] & r[w], nh = act_h[w] & (r[w] | h[w]);
            uint64_t drop = act_r[w] & ~nr;
            while (drop) {
                int bit = __builtin_ctzll(drop);
                match[w * 64 + bit] = k;
                drop &= drop - 1;
            }
            drop = act_h[w] & ~nh;
            while (drop) {
                int bit = __builtin_ctzll(drop);
                held[w * 64 + bit] = k;
                drop &= drop - 1;
            }
            act_r[w] = nr;
            act_h[w] = nh;
            any_r |= nr != 0;
            any_h |= nh != 0;
        }
    }
    for (int w = 0; w < W; w++) {
        uint64_t m = act_r[w];
        while (m) {
            int bit = __builtin_ctzll(m);
            if (w * 64 + bit < s->n_slots) match[w * 64 + bit] = n;
            m &= m - 1;
        }
        m = act_h[w];
        while (m) {
            int bit = __builtin_ctzll(m);
            if (w * 64 + bit < s->n_slots) held[w * 64 + bit] = n;
            m &= m - 1;
        }
    }
}

/* ---- PrefixCache (per-block reference semantics) --------------------------------------------- */
static void cache_evict(Sim *s, int32_t slot, int64_t n) {
    Cache *c = &s->caches[slot];
    int64_t gone = 0;
    while (gone < n && c->lru_head < c->lru_tail) {
        int32_t b = c->lru_block[c->lru_head], sq = c->lru_seq[c->lru_head];
        c->lru_head++;
        if (c->val[b] != -sq) continue; /* held again, or re-released later: stale */
        c->val[b] = 0;
        index_remove(s, slot, b);
        c->cached--;
        gone++;
    }
}

static int lru_push(Cache *c, int32_t b, int32_t sq) {
    if (c->lru_tail == c->lru_cap) {
        if (c->lru_head > 0 && c->lru_head * 2 >= c->lru_cap) {
            int64_t n = c->lru_tail - c->lru_head;
            memmove(c->lru_block, c->lru_block + c->lru_head, (size_t)n * sizeof(int32_t));
            memmove(c->lru_seq, c->lru_seq + c->lru_head, (size_t)n * sizeof(int32_t));
            c->lru_head = 0;
            c->lru_tail = n;
        } else {
            int64_t cap = c->lru_cap ? c->lru_cap * 2 : 1024;
            int32_t *a = realloc(c->lru_block, (size_t)cap * sizeof(int32_t));
            if (!a) return -1;
            c->lru_block = a;
            a = realloc(c->lru_seq, (size_t)cap * sizeof(int32_t));
            if (!a) return -1;
            c->lru_seq = a;
            c->lru_cap = cap;
        }
    }
    c->lru_block[c->lru_tail] = b;
    c->lru_seq[c->lru_tail] = sq;
    c->lru_tail++;
    return 0;
}

/* PrefixCache.reserve */
static int cache_reserve(Sim *s, int32_t slot, int64_t blocks) {
    Cache *c = &s->caches[slot];
    if (c->reserved + blocks > c->capacity) return 0;
    c->reserved += blocks;
    cache_evict(s, slot, c->reserved + c->cached - c->capacity);
    return 1;
}

static inline void cache_hold(Cache *c, int32_t b) {
    if (c->val[b] < 0) {
        c->cached--;
        c->val[b] = 1;
    } else {
        c->val[b] += 1;
    }
}

/* PrefixCache.acquire_leading (resumable = 1) / acquire_kept (0) */
static int64_t cache_acquire(Sim *s, int32_t slot, const int32_t *ids, int32_t n, int resumable) {
    Cache *c = &s->caches[slot];
    int32_t k = 0;
    while (k < n && c->val[ids[k]] != 0 && !(resumable && is_pulled(s, slot, ids[k]))) k++;
    for (int32_t i = 0; i < k; i++) cache_hold(c, ids[i]);
    return k;
}

/* PrefixCache.complete(hashes, start, held_only) */
static void cache_complete(Sim *s, int32_t slot, const int32_t *ids, int32_t n, int64_t start, int held_only) {
    Cache *c = &s->caches[slot];
    for (int64_t i = start; i < n; i++) {
        int32_t b = ids[i];
        if (c->val[b] == 0) {
            c->val[b] = 1;
            index_store(s, slot, b, held_only);
        } else {
            cache_hold(c, b);
            if (!held_only && is_pulled(s, slot, b)) index_store(s, slot, b, 0); /* computed here now */
        }
    }
}

/* PrefixCache.release */
static void cache_release(Sim *s, int32_t slot, const int32_t *ids, int32_t n) {
    Cache *c = &s->caches[slot];
    int any = 0;
    for (int32_t i = 0; i < n; i++) any |= c->val[ids[i]] == 1;
    if (!any) {
        for (int32_t i = 0; i < n; i++) c->val[ids[i]] -= 1;
        return;
    }
    int32_t sq = ++c->seq;
    for (int32_t i = 0; i < n; i++) {
        int32_t b = ids[i];
        if (c->val[b] == 1) {
            c->val[b] = -sq;
            c->cached++;
            if (lru_push(c, b, sq)) s->failed = 1;
        } else {
            c->val[b] -= 1;
        }
    }
    cache_evict(s, slot, c->reserved + c->cached - c->capacity);
}

/* ---- PrefillEngine --------------------------------------------------------------------------- */
static inline int64_t reserve_blocks(const Sim *s, int64_t tokens) {
    return ceil_div(tokens, 256) + s->in->reserve_fixed_blocks;
}

static int engine_admit(Sim *s, Engine *e, int32_t j) {
    Job *job = &s->jobs[j];
    int64_t tokens = s->in->prompt[j] + (e->is_local ? s->in->output[j] : 0);
    int64_t need = reserve_blocks(s, tokens);
    if (!cache_reserve(s, e->slot, need)) return 0;
    job->prefill_reserve = need;
    const int32_t *ids;
    int32_t nb = job_blocks(s, j, &ids);
    int64_t n = cache_acquire(s, e->slot, ids, nb, 1);
    job->cached_blocks = n;
    job->cached_tokens = imin(n * 256, s->in->prompt[j] - 1);
    job->pos = job->cached_tokens;
    return 1;
}

/* PrefillEngine.start: 1 and *dt when an iteration starts. */
static int engine_start(Sim *s, Engine *e, double *dt) {
    int64_t budget = e->max_tokens, sampled = 0;
    int32_t n = 0;
    for (int64_t qi = e->queue.head; qi < e->queue.tail; qi++) {
        if (budget <= 0 || n >= e->max_batch) break;
        int32_t j = e->queue.v[qi];
        Job *job = &s->jobs[j];
        if (job->prefill_reserve == 0 && !engine_admit(s, e, j)) break;
        int64_t prompt = s->in->prompt[j];
        int64_t end = imin(job->pos + budget, prompt);
        e->seg_start[n] = job->pos;
        e->seg_end[n] = end;
        e->run_job[n] = j;
        e->run_end[n] = end;
        n++;
        budget -= end - job->pos;
        sampled += end == prompt;
    }
    if (n == 0) return 0;
    e->n_running = n;
    e->busy = 1;
    *dt = ts_prefill_chunk_seconds(e->cost, e->seg_start, e->seg_end, n, sampled);
    e->busy_time += *dt;
    return 1;
}

/* PrefillEngine.finish_iteration: the completed jobs into done[] (queue order); their count. */
static int32_t engine_finish(Sim *s, Engine *e, int32_t *done) {
    int32_t nd = 0;
    for (int32_t i = 0; i < e->n_running; i++) {
        int32_t j = e->run_job[i];
        Job *job = &s->jobs[j];
        int64_t end = e->run_end[i];
        e->queued_tokens -= end - job->pos;
        job->pos = end;
        if (end == s->in->prompt[j]) done[nd++] = j;
    }
    e->queue.head += nd;
    e->n_running = 0;
    e->busy = 0;
    return nd;
}

/* ---- DecodeInstance -------------------------------------------------------------------------- */
static void dec_advance(Decode *d, double now) {
    if (d->batch && !d->paused && d->step_time > 0) {
        double dt = now - d->t_last;
        d->steps += dt / d->step_time;
        d->active_time += dt;
    }
    if (d->batch) d->area += (double)d->batch * (now - d->t_last);
    d->t_last = now;
}

static void dec_join(Sim *s, Decode *d, int32_t j, double now) {
    dec_advance(d, now);
    Job *job = &s->jobs[j];
    job->decoded_from = d->steps;
    job->t_join = now;
    Fin f = {(d->steps + (double)s->in->output[j]) - 1.0, j};
    if (FinHeap_push(&d->heap, f)) s->failed = 1;
    d->batch += 1;
    d->ctx_base += (double)(s->in->prompt[j] + 1) - d->steps;
}

static int32_t dec_pop_finished(Sim *s, Decode *d, double now, int32_t *out) {
    dec_advance(d, now);
    int32_t n = 0;
    while (d->heap.n && d->heap.v[0].step <= d->steps + 1e-6) {
        Fin f = FinHeap_pop(&d->heap);
        d->steps = pmax(d->steps, f.step);
        d->batch -= 1;
        d->ctx_base -= (double)(s->in->prompt[f.job] + 1) - s->jobs[f.job].decoded_from;
        out[n++] = f.job;
    }
    if (!d->batch) d->ctx_base = 0.0;
    return n;
}

/* DecodeInstance.next_finish: 1 and *t when a completion is ahead. */
static int dec_next_finish(Sim *s, Decode *d, double now, double *t) {
    dec_advance(d, now);
    d->version += 1;
    if (!d->batch || d->paused) {
        d->step_time = 0.0;
        return 0;
    }
    double k = pmax(d->heap.v[0].step - d->steps, 0.0);
    double mid = d->ctx_base + (double)d->batch * (d->steps + pmax(k - 1.0, 0.0) / 2.0);
    d->step_time = ts_decode_step_seconds(s->in->decode_cost, d->batch, pmax(mid, (double)d->batch));
    d->t_last = now;
    *t = now + k * d->step_time;
    return 1;
}

/* ---- the simulator's handlers (Simulator._*) ------------------------------------------------- */
static void count(Sim *s, int64_t delta) {
    s->out->area += (double)s->in_system * (s->now - s->t_area);
    s->t_area = s->now;
    s->in_system += delta;
}

static void kick_prefill(Sim *s, Engine *e) {
    if (!e->busy) {
        double dt;
        if (engine_start(s, e, &dt)) push(s, s->now + dt, EV_PREFILL_DONE, e->slot, 0);
    }
}

static void end_job(Sim *s, int32_t j) {
    Job *job = &s->jobs[j];
    job->t_finish = s->now;
    int64_t out = s->in->output[j];
    if (!job->missed && out > 1 && (s->now - job->t_first) / (double)(out - 1) > s->in->slo_tpot) s->misses++;
    count(s, -1);
}

static void release_prefill(Sim *s, int32_t j) {
    Job *job = &s->jobs[j];
    Engine *e = &s->engines[job->prefill];
    Cache *c = &s->caches[e->slot];
    c->reserved -= job->prefill_reserve;
    const int32_t *ids;
    int32_t nb = job_blocks(s, j, &ids);
    cache_release(s, e->slot, ids, nb);
    kick_prefill(s, e);
}

static void reschedule(Sim *s, Decode *d) {
    double t;
    if (dec_next_finish(s, d, s->now, &t)) push(s, t, EV_DECODE_FINISH, (int32_t)(d - s->decodes), d->version);
}

static double link_seconds(const TsPolicy *p, int same, int64_t nbytes) {
    if (nbytes <= 0) return 0.0;
    return same ? p->intra_lat + (double)nbytes / p->intra_bw : p->cross_lat + (double)nbytes / p->cross_bw;
}

static void admit_decode(Sim *s, Decode *d) {
    Engine *local = &s->engines[d->engine];
    while (q_len(&d->waiting) && d->batch + d->incoming + q_len(&local->queue) < d->max_batch) {
        int32_t j = d->waiting.v[d->waiting.head];
        Job *job = &s->jobs[j];
        if (!cache_reserve(s, d->slot, job->decode_reserve)) break;
        d->waiting.head++;
        d->promised_n -= 1;
        d->promised_blocks -= job->decode_reserve;
        const int32_t *ids;
        int32_t nb = job_blocks(s, j, &ids);
        int64_t n = cache_acquire(s, d->slot, ids, nb, 0);
        job->reused_blocks = n;
        int same = s->in->domain[s->engines[job->prefill].slot] == s->in->domain[d->slot];
        d->incoming += 1;
        int64_t nbytes = s->in->handoff_base[j] - n * s->in->block_bytes;
        push(s, s->now + link_seconds(s->in->policy, same, nbytes), EV_TRANSFER_DONE, j, 0);
    }
}

static void kick_local(Sim *s, Decode *d) {
    Engine *local = &s->engines[d->engine];
    if (local->busy || !q_len(&local->queue)) return;
    dec_advance(d, s->now);
    double dt;
    if (!engine_start(s, local, &dt)) return;
    d->paused = 1;
    d->version += 1;
    push(s, s->now + dt, EV_LOCAL_DONE, (int32_t)(d - s->decodes), 0);
}

static void first_token(Sim *s, Job *job, int32_t j) {
    job->t_first = s->now;
    if (s->now - s->in->arrival[j] > s->in->slo_ttft) {
        job->missed = 1;
        s->misses++;
    }
}

static void on_prefill_done(Sim *s, Engine *e, int32_t *scratch) {
    int32_t nd = engine_finish(s, e, scratch);
    for (int32_t i = 0; i < nd; i++) {
        int32_t j = scratch[i];
        Job *job = &s->jobs[j];
        first_token(s, job, j);
        const int32_t *ids;
        int32_t nb = job_blocks(s, j, &ids);
        cache_complete(s, e->slot, ids, nb, job->cached_blocks, 0);
        Decode *d = &s->decodes[job->decode];
        if (s->in->output[j] == 1) {
            d->promised_n -= 1;
            d->promised_blocks -= job->decode_reserve;
            release_prefill(s, j);
            end_job(s, j);
        } else {
            if (q_push(&d->waiting, j)) s->failed = 1;
            admit_decode(s, d);
        }
    }
    kick_prefill(s, e);
}

static void on_transfer_done(Sim *s, int32_t j) {
    release_prefill(s, j);
    Job *job = &s->jobs[j];
    Decode *d = &s->decodes[job->decode];
    d->incoming -= 1;
    const int32_t *ids;
    int32_t nb = job_blocks(s, j, &ids);
    cache_complete(s, d->slot, ids, nb, job->reused_blocks, 1);
    dec_join(s, d, j, s->now);
    reschedule(s, d);
}

static void on_decode_finish(Sim *s, Decode *d, int64_t version, int32_t *scratch) {
    if (version != d->version) return;
    int32_t n = dec_pop_finished(s, d, s->now, scratch);
    for (int32_t i = 0; i < n; i++) {
        int32_t j = scratch[i];
        Job *job = &s->jobs[j];
        s->caches[d->slot].reserved -= job->local ? job->prefill_reserve : job->decode_reserve;
        const int32_t *ids;
        int32_t nb = job_blocks(s, j, &ids);
        cache_release(s, d->slot, ids, nb);
        end_job(s, j);
    }
    admit_decode(s, d);
    kick_local(s, d);
    if (!d->paused) reschedule(s, d);
}

static void on_local_done(Sim *s, Decode *d, int32_t *scratch) {
    Engine *local = &s->engines[d->engine];
    int32_t nd = engine_finish(s, local, scratch);
    for (int32_t i = 0; i < nd; i++) {
        int32_t j = scratch[i];
        Job *job = &s->jobs[j];
        first_token(s, job, j);
        const int32_t *ids;
        int32_t nb = job_blocks(s, j, &ids);
        cache_complete(s, d->slot, ids, nb, job->cached_blocks, 0);
        d->promised_n -= 1;
        d->promised_blocks -= job->decode_reserve;
        if (s->in->output[j] == 1) {
            s->caches[d->slot].reserved -= job->prefill_reserve;
            cache_release(s, d->slot, ids, nb);
            end_job(s, j);
        } else {
            dec_join(s, d, j, s->now);
        }
    }
    dec_advance(d, s->now);
    d->paused = 0;
    admit_decode(s, d);
    kick_local(s, d);
    if (!d->paused) reschedule(s, d);
}

/* LoadBook.book's session part: remember the pair, most recent last, at most max_sessions. */
static void book_session(Sim *s, int32_t sess, int32_t pf, int32_t dc) {
    s->decisions += 1;
    if (sess < 0) return;
    int known = s->aff_prefill[sess] != -2;
    s->aff_prefill[sess] = pf;
    s->aff_decode[sess] = dc;
    if (known) { /* unlink */
        if (s->s_prev[sess] >= 0) s->s_next[s->s_prev[sess]] = s->s_next[sess]; else s->s_head = s->s_next[sess];
        if (s->s_next[sess] >= 0) s->s_prev[s->s_next[sess]] = s->s_prev[sess]; else s->s_tail = s->s_prev[sess];
    } else {
        s->s_count += 1;
    }
    s->s_prev[sess] = s->s_tail;
    s->s_next[sess] = -1;
    if (s->s_tail >= 0) s->s_next[s->s_tail] = sess; else s->s_head = sess;
    s->s_tail = sess;
    if (s->s_count > s->in->max_sessions) { /* forget the least recently routed session */
        int32_t old = s->s_head;
        s->s_head = s->s_next[old];
        if (s->s_head >= 0) s->s_prev[s->s_head] = -1; else s->s_tail = -1;
        s->aff_prefill[old] = -2;
        s->s_count -= 1;
    }
}

/* Simulator._states: every worker's state now, in WorkerId order. */
static void build_states(Sim *s, TsWorker *w) {
    const TsSimInput *in = s->in;
    for (int32_t slot = 0; slot < s->n_slots; slot++) {
        TsWorker *x = &w[in->rank[slot]];
        x->domain = in->domain[slot];
        x->kv_total = s->caches[slot].capacity;
        x->queue_limit = in->queue_limit;
        x->max_queued = in->max_queued;
        if (slot < in->n_prefill) {
            Engine *e = &s->engines[slot];
            x->role = TS_PREFILL;
            x->prefill_rate = in->prefill_rate;
            x->queued_tokens = imax(e->queued_tokens, 0);
            x->kv_used = s->caches[slot].reserved;
            x->running = e->n_running;
            x->max_running = e->max_batch;
            x->queue_len = q_len(&e->queue) - e->n_running;
        } else {
            Decode *d = &s->decodes[slot - in->n_prefill];
            Engine *local = &s->engines[d->engine];
            x->role = TS_DECODE;
            x->prefill_rate = in->decode_rate;
            x->queued_tokens = imax(local->queued_tokens, 0);
            x->kv_used = s->caches[slot].reserved + d->promised_blocks;
            x->running = d->batch + d->incoming + d->promised_n;
            x->max_running = d->max_batch;
            x->queue_len = q_len(&d->waiting) + q_len(&local->queue);
        }
    }
}

static void on_arrive(Sim *s, int32_t j) {
    const TsSimInput *in = s->in;
    Job *job = &s->jobs[j];
    TsWorker workers[MAX_WORKERS];
    int32_t m_slot[MAX_WORKERS], h_slot[MAX_WORKERS], m_rank[MAX_WORKERS], h_rank[MAX_WORKERS];
    const int32_t *ids;
    int32_t nb = job_blocks(s, j, &ids);
    match_views(s, ids, nb, m_slot, h_slot);
    for (int32_t slot = 0; slot < s->n_slots; slot++) {
        m_rank[in->rank[slot]] = m_slot[slot];
        h_rank[in->rank[slot]] = h_slot[slot] > m_slot[slot] ? h_slot[slot] : m_slot[slot];
    }
    build_states(s, workers);
    int32_t sess = in->session[j];
    TsRequestView view = {in->prompt[j], m_rank, h_rank, 0, -1, -1, s->decisions};
    if (sess >= 0 && s->aff_prefill[sess] != -2) {
        view.has_affinity = 1;
        view.aff_prefill = s->aff_prefill[sess] < 0 ? -1 : in->rank[s->aff_prefill[sess]];
        view.aff_decode = in->rank[s->aff_decode[sess]];
    }
    TsChoice choice;
    ts_route(in->policy, workers, s->n_slots, &view, &choice);
    if (choice.refused) {
        s->rejected++;
        s->misses++;
        return;
    }
    int32_t pslot = choice.prefill < 0 ? -1 : s->slot_of_rank[choice.prefill];
    int32_t dslot = s->slot_of_rank[choice.decode];
    book_session(s, sess, pslot, dslot);
    count(s, +1);
    Decode *d = &s->decodes[dslot - in->n_prefill];
    job->decode = dslot - in->n_prefill;
    job->decode_reserve = reserve_blocks(s, in->prompt[j] + in->output[j]);
    d->promised_n += 1;
    d->promised_blocks += job->decode_reserve;
    if (pslot < 0) {
        job->local = 1;
        Engine *local = &s->engines[d->engine];
        if (q_push(&local->queue, j)) s->failed = 1;
        local->queued_tokens += choice.uncached_tokens;
        kick_local(s, d);
    } else {
        job->prefill = pslot;
        Engine *e = &s->engines[pslot];
        if (q_push(&e->queue, j)) s->failed = 1;
        e->queued_tokens += choice.uncached_tokens;
        kick_prefill(s, e);
    }
}

/* ---- set-up, the loop, tear-down ------------------------------------------------------------- */
static inline uint64_t mix64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

/* Dense ids for the block hashes, in order of first appearance. */
static int intern_blocks(Sim *s) {
    int64_t total = s->in->block_off[s->in->n_requests];
    s->blocks = malloc((size_t)(total ? total : 1) * sizeof(int32_t));
    int64_t cap = 16;
    while (cap < 2 * total) cap <<= 1;
    uint64_t *keys = malloc((size_t)cap * sizeof(uint64_t));
    int32_t *vals = malloc((size_t)cap * sizeof(int32_t));
    if (!s->blocks || !keys || !vals) {
        free(keys);
        free(vals);
        return -1;
    }
    for (int64_t i = 0; i < cap; i++) vals[i] = -1;
    int32_t next = 0;
    for (int64_t i = 0; i < total; i++) {
        uint64_t h = s->in->block_hashes[i];
        int64_t p = (int64_t)(mix64(h) & (uint64_t)(cap - 1));
        while (vals[p] >= 0 && keys[p] != h) p = (p + 1) & (cap - 1);
        if (vals[p] < 0) {
            keys[p] = h;
            vals[p] = next++;
        }
        s->blocks[i] = vals[p];
    }
    free(keys);
    free(vals);
    s->n_ids = next;
    return 0;
}

static void sim_free(Sim *s) {
    free(s->blocks);
    free(s->res);
    free(s->held_only);
    if (s->caches)
        for (int32_t i = 0; i < s->n_slots; i++) {
            free(s->caches[i].val);
            free(s->caches[i].lru_block);
            free(s->caches[i].lru_seq);
        }
    free(s->caches);
    if (s->engines)
        for (int32_t i = 0; i < s->n_slots; i++) {
            Engine *e = &s->engines[i];
            free(e->queue.v);
            free(e->run_job);
            free(e->run_end);
            free(e->seg_start);
            free(e->seg_end);
        }
    free(s->engines);
    if (s->decodes)
        for (int32_t i = 0; i < s->in->n_decode; i++) {
            free(s->decodes[i].waiting.v);
            free(s->decodes[i].heap.v);
        }
    free(s->decodes);
    free(s->jobs);
    free(s->events.v);
    free(s->aff_prefill);
    free(s->aff_decode);
    free(s->s_prev);
    free(s->s_next);
}

static int sim_init(Sim *s, const TsSimInput *in, TsSimOutput *out) {
    memset(s, 0, sizeof(*s));
    s->in = in;
    s->out = out;
    s->n_slots = in->n_prefill + in->n_decode;
    if (s->n_slots > MAX_WORKERS) return -2;
    s->words = (s->n_slots + 63) / 64;
    s->s_head = s->s_tail = -1;
    if (intern_blocks(s)) return -1;
    int64_t ids = s->n_ids ? s->n_ids : 1;
    s->res = calloc((size_t)(ids * s->words), sizeof(uint64_t));
    s->held_only = calloc((size_t)(ids * s->words), sizeof(uint64_t));
    s->caches = calloc((size_t)s->n_slots, sizeof(Cache));
    s->engines = calloc((size_t)s->n_slots, sizeof(Engine));
    s->decodes = calloc((size_t)(in->n_decode ? in->n_decode : 1), sizeof(Decode));
    s->jobs = malloc((size_t)(in->n_requests ? in->n_requests : 1) * sizeof(Job));
    int32_t ns = in->n_sessions ? in->n_sessions : 1;
    s->aff_prefill = malloc((size_t)ns * sizeof(int32_t));
    s->aff_decode = malloc((size_t)ns * sizeof(int32_t));
    s->s_prev = malloc((size_t)ns * sizeof(int32_t));
    s->s_next = malloc((size_t)ns * sizeof(int32_t));
    if (!s->res || !s->held_only || !s->caches || !s->engines || !s->decodes || !s->jobs || !s->aff_prefill ||
        !s->aff_decode || !s->s_prev || !s->s_next)
        return -1;
    for (int32_t i = 0; i < ns; i++) s->aff_prefill[i] = -2;
    for (int32_t slot = 0; slot < s->n_slots; slot++) {
        s->slot_of_rank[in->rank[slot]] = slot;
        Cache *c = &s->caches[slot];
        c->capacity = in->capacity[slot];
        c->val = calloc((size_t)ids, sizeof(int32_t));
        Engine *e = &s->engines[slot];
        e->slot = slot;
        e->is_local = slot >= in->n_prefill;
        e->cost = e->is_local ? in->decode_cost : in->prefill_cost;
        e->max_batch = e->is_local ? in->d_max_batch : in->p_max_batch;
        e->max_tokens = e->is_local ? in->d_max_tokens : in->p_max_tokens;
        size_t mb = (size_t)e->max_batch;
        e->run_job = malloc(mb * sizeof(int32_t));
        e->run_end = malloc(mb * sizeof(int64_t));
        e->seg_start = malloc(mb * sizeof(int64_t));
        e->seg_end = malloc(mb * sizeof(int64_t));
        if (!c->val || !e->run_job || !e->run_end || !e->seg_start || !e->seg_end) return -1;
    }
    for (int32_t i = 0; i < in->n_decode; i++) {
        Decode *d = &s->decodes[i];
        d->slot = in->n_prefill + i;
        d->engine = d->slot;
        d->max_batch = in->d_max_batch;
    }
    for (int32_t j = 0; j < in->n_requests; j++) {
        Job *job = &s->jobs[j];
        memset(job, 0, sizeof(*job));
        job->prefill = job->decode = -1;
        job->t_first = job->t_join = job->t_finish = -1.0;
    }
    return 0;
}

int32_t ts_simulate(const TsSimInput *in, TsSimOutput *out) {
    Sim sim;
    Sim *s = &sim;
    int rc = sim_init(s, in, out);
    int32_t *scratch = malloc((size_t)(in->n_requests + 1) * sizeof(int32_t));
    if (rc || !scratch) {
        free(scratch);
        sim_free(s);
        return rc ? rc : -1;
    }
    out->area = 0.0;
    out->within_budget = 1;
    s->seq = in->n_requests; /* the arrivals were pushed first, as seq 1..n */
    int32_t next = 0;         /* next arrival */
    for (;;) {
        int from_heap;
        if (next < in->n_requests && s->events.n) {
            const Event *top = &s->events.v[0];
            double ta = in->arrival[next];
            from_heap = top->t < ta || (top->t == ta && top->seq < (int64_t)next + 1);
        } else if (next < in->n_requests) {
            from_heap = 0;
        } else if (s->events.n) {
            from_heap = 1;
        } else {
            break;
        }
        if (!from_heap) {
            s->now = in->arrival[next];
            on_arrive(s, next++);
        } else {
            Event e = EventHeap_pop(&s->events);
            s->now = e.t;
            switch (e.kind) {
            case EV_PREFILL_DONE: on_prefill_done(s, &s->engines[e.a], scratch); break;
            case EV_LOCAL_DONE: on_local_done(s, &s->decodes[e.a], scratch); break;
            case EV_TRANSFER_DONE: on_transfer_done(s, e.a); break;
            default: on_decode_finish(s, &s->decodes[e.a], e.b, scratch); break;
            }
        }
        if (s->failed) break;
        if (s->misses > in->miss_budget) {
            out->within_budget = 0;
            break;
        }
    }
    for (int32_t j = 0; j < in->n_requests; j++) {
        const Job *job = &s->jobs[j];
        out->t_first[j] = job->t_first;
        out->t_finish[j] = job->t_finish;
        out->cached_tokens[j] = job->cached_tokens;
        out->routed[j] = job->decode >= 0;
        out->local[j] = job->local;
        out->prefill_slot[j] = job->prefill;
        out->decode_slot[j] = job->decode < 0 ? -1 : in->n_prefill + job->decode;
    }
    for (int32_t slot = 0; slot < s->n_slots; slot++) {
        out->busy_time[slot] = s->engines[slot].busy_time;
        out->active_time[slot] = slot >= in->n_prefill ? s->decodes[slot - in->n_prefill].active_time : 0.0;
    }
    out->rejected = s->rejected;
    out->misses = s->misses;
    out->in_system = s->in_system;
    int failed = s->failed;
    free(scratch);
    sim_free(s);
    return failed ? -1 : 0;
}
