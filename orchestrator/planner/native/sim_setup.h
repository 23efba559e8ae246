/* Building and freeing a simulation's state: dense block ids, the index, caches, engines, decodes,
 * jobs and the session table.
 * A private header of sim.c (static functions: one translation unit, so the compiler inlines
 * across the parts). */
#ifndef TANDEM_SIM_SETUP_H
#define TANDEM_SIM_SETUP_H

#include "sim_state.h"

/* ---- set-up, the loop, tear-down ------------------------------------------------------------- */
static inline uint64_t mix64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

/* Dense ids for the block hashes (prompts' and answers'), in order of first appearance; each
 * request's prompt ids then its answer ids, contiguous. */
static int intern_blocks(Sim *s) {
    const TsSimInput *in = s->in;
    int64_t prompts = in->block_off[in->n_requests], answers = in->answer_off[in->n_requests];
    int64_t total = prompts + answers;
    s->blocks = malloc((size_t)(total ? total : 1) * sizeof(int32_t));
    s->all_off = malloc((size_t)(in->n_requests + 1) * sizeof(int64_t));
    int64_t cap = 16;
    while (cap < 2 * total) cap <<= 1;
    uint64_t *keys = malloc((size_t)cap * sizeof(uint64_t));
    int32_t *vals = malloc((size_t)cap * sizeof(int32_t));
    if (!s->blocks || !s->all_off || !keys || !vals) {
        free(keys);
        free(vals);
        return -1;
    }
    for (int64_t i = 0; i < cap; i++) vals[i] = -1;
    int32_t next = 0;
    int64_t out = 0;
    for (int32_t j = 0; j < in->n_requests; j++) {
        s->all_off[j] = out;
        for (int part = 0; part < 2; part++) {
            const uint64_t *hs = part ? in->answer_hashes : in->block_hashes;
            const int64_t *off = part ? in->answer_off : in->block_off;
            for (int64_t i = off[j]; i < off[j + 1]; i++) {
                uint64_t h = hs[i];
                int64_t p = (int64_t)(mix64(h) & (uint64_t)(cap - 1));
                while (vals[p] >= 0 && keys[p] != h) p = (p + 1) & (cap - 1);
                if (vals[p] < 0) {
                    keys[p] = h;
                    vals[p] = next++;
                }
                s->blocks[out++] = vals[p];
            }
        }
    }
    s->all_off[in->n_requests] = out;
    free(keys);
    free(vals);
    s->n_ids = next;
    return 0;
}

static void sim_free(Sim *s) {
    free(s->blocks);
    free(s->all_off);
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
        e->seg_start = malloc(mb * sizeof(int64_t));
        e->seg_end = malloc(mb * sizeof(int64_t));
        if (!c->val || !e->run_job || !e->seg_start || !e->seg_end) return -1;
    }
    for (int32_t i = 0; i < in->n_decode; i++) {
        Decode *d = &s->decodes[i];
        d->slot = in->n_prefill + i;
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

#endif
