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
 *
 * Parts (private headers, one translation unit): sim_state.h (containers and state), sim_kv.h (index
 * views, prefix caches), sim_instances.h (prefill engines, decode batches), sim_setup.h (building and
 * freeing the state); this file: the handlers, routing an arrival, and the loop.
 */
#include "sim.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "sim_instances.h"
#include "sim_kv.h"
#include "sim_setup.h"
#include "sim_state.h"

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

static void admit_decode(Sim *s, Decode *d) {
    Engine *local = &s->engines[d->slot];
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
        int same = s->in->domain[job->prefill] == s->in->domain[d->slot];
        d->incoming += 1;
        int64_t nbytes = s->in->handoff_base[j] - n * s->in->block_bytes;
        push(s, s->now + ts_link_seconds(s->in->policy, same, nbytes), EV_TRANSFER_DONE, j, 0);
    }
}

static void kick_local(Sim *s, Decode *d) {
    Engine *local = &s->engines[d->slot];
    if (local->busy || !q_len(&local->queue)) return;
    dec_advance(d, s->now);
    double dt;
    if (!engine_start(s, local, &dt)) return;
    d->paused = 1;
    d->version += 1;
    push(s, s->now + dt, EV_LOCAL_DONE, (int32_t)(d - s->decodes), 0);
}

/* Simulator._prefilled: the prompt is computed (first token out now): count a missed TTFT and keep
 * its computed blocks in the cache of `slot`. */
static void prefilled(Sim *s, int32_t slot, int32_t j) {
    Job *job = &s->jobs[j];
    job->t_first = s->now;
    if (s->now - s->in->arrival[j] > s->in->slo_ttft) {
        job->missed = 1;
        s->misses++;
    }
    const int32_t *ids;
    int32_t nb = job_blocks(s, j, &ids);
    cache_complete(s, slot, ids, nb, job->cached_blocks, 0);
}

static void on_prefill_done(Sim *s, Engine *e, int32_t *scratch) {
    int32_t nd = engine_finish(s, e, scratch);
    for (int32_t i = 0; i < nd; i++) {
        int32_t j = scratch[i];
        Job *job = &s->jobs[j];
        prefilled(s, e->slot, j);
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
        const int32_t *ids;
        int32_t nb = job_blocks(s, j, &ids), na = job_answer(s, j);
        if (na) cache_complete(s, d->slot, ids, nb + na, nb, 0); /* the answer's blocks: kept, resumable */
        s->caches[d->slot].reserved -= job->local ? job->prefill_reserve : job->decode_reserve;
        cache_release(s, d->slot, ids, nb + na);
        end_job(s, j);
    }
    admit_decode(s, d);
    kick_local(s, d);
    if (!d->paused) reschedule(s, d);
}

static void on_local_done(Sim *s, Decode *d, int32_t *scratch) {
    Engine *local = &s->engines[d->slot];
    int32_t nd = engine_finish(s, local, scratch);
    for (int32_t i = 0; i < nd; i++) {
        int32_t j = scratch[i];
        Job *job = &s->jobs[j];
        prefilled(s, d->slot, j);
        d->promised_n -= 1;
        d->promised_blocks -= job->decode_reserve;
        if (s->in->output[j] == 1) {
            s->caches[d->slot].reserved -= job->prefill_reserve;
            const int32_t *ids;
            int32_t nb = job_blocks(s, j, &ids);
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
            Engine *local = &s->engines[d->slot];
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
        Engine *local = &s->engines[d->slot];
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
