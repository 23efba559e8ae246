/* Simulated instances (orchestrator/planner/instances.py): the chunked-prefill engine (prefill
 * instances and the decodes' local prefills) and the decode batch that advances analytically.
 * A private header of sim.c (static functions: one translation unit, so the compiler inlines
 * across the parts). */
#ifndef TANDEM_SIM_INSTANCES_H
#define TANDEM_SIM_INSTANCES_H

#include "sim_kv.h"

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
        int64_t end = e->seg_end[i];
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

#endif
