/* The native simulator's state: containers (FIFO queue, binary heaps), the per-request Job, the
 * per-slot Cache / Engine / Decode, the whole Sim, and the small helpers every part uses.
 * A private header of sim.c (static functions: one translation unit, so the compiler inlines
 * across the parts). */
#ifndef TANDEM_SIM_STATE_H
#define TANDEM_SIM_STATE_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "sim.h"

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
    int64_t *seg_start, *seg_end;  /* the iteration in flight: run_job[i]'s chunk [start, end) */
    int32_t n_running;
    int busy;
    double busy_time;
    int64_t queued_tokens;
} Engine;

typedef struct {
    int32_t slot;  /* also its local prefill engine's index in Sim.engines */
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
    int32_t *blocks;               /* dense block ids: per request its prompt's, then its answer's */
    int64_t *all_off;              /* n_requests + 1 offsets into blocks */
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

/* Request j's prompt block ids (its answer's follow them in the same array); their count. */
static inline int32_t job_blocks(const Sim *s, int32_t j, const int32_t **ids) {
    *ids = s->blocks + s->all_off[j];
    return (int32_t)(s->in->block_off[j + 1] - s->in->block_off[j]);
}

/* How many answer block ids follow request j's prompt ids. */
static inline int32_t job_answer(const Sim *s, int32_t j) {
    return (int32_t)(s->in->answer_off[j + 1] - s->in->answer_off[j]);
}

static void push(Sim *s, double t, int32_t kind, int32_t a, int64_t b) {
    Event e = {t, ++s->seq, kind, a, b};
    if (EventHeap_push(&s->events, e)) s->failed = 1;
}

#endif
