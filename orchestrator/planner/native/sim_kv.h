/* The KV index's two views (KvIndex: resumable and held-only bitmasks per block) and every slot's
 * prefix cache at its per-block reference semantics (orchestrator/planner/cache.py).
 * A private header of sim.c (static functions: one translation unit, so the compiler inlines
 * across the parts). */
#ifndef TANDEM_SIM_KV_H
#define TANDEM_SIM_KV_H

#include "sim_state.h"

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

/* KvIndex.match_views: per slot, the leading blocks held of either kind (match_held), and the deepest
 * resumable block within that run (match: where a computation resumes, passing over held-only
 * blocks before it). */
static void match_views(Sim *s, const int32_t *ids, int32_t n, int32_t *match, int32_t *held) {
    uint64_t act[MAX_WORKERS / 64]; /* slots whose held run reaches the current block */
    int W = s->words;
    for (int w = 0; w < W; w++) act[w] = ~0ULL;
    for (int32_t i = 0; i < s->n_slots; i++) match[i] = held[i] = 0;
    int any = 1;
    for (int32_t k = 0; k < n && any; k++) {
        const uint64_t *r = res_of(s, ids[k]), *h = ho_of(s, ids[k]);
        any = 0;
        for (int w = 0; w < W; w++) {
            uint64_t on = act[w] & (r[w] | h[w]);
            uint64_t bits = act[w] & ~on; /* their held run ends before block k */
            while (bits) {
                held[w * 64 + __builtin_ctzll(bits)] = k;
                bits &= bits - 1;
            }
            bits = on & r[w]; /* still held through block k, and resumable there */
            while (bits) {
                match[w * 64 + __builtin_ctzll(bits)] = k + 1;
                bits &= bits - 1;
            }
            act[w] = on;
            any |= on != 0;
        }
    }
    for (int w = 0; w < W; w++) {
        uint64_t m = act[w];
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
    while (k < n && c->val[ids[k]] != 0) k++;
    if (resumable) /* resume after the deepest block computed here, passing over pulled ones */
        while (k > 0 && is_pulled(s, slot, ids[k - 1])) k--;
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

#endif
