/* Timing loop for bench/native_policy.py: ts_route called back to back from C, so the figure is
 * the policy's own cost per request (no ctypes call in the timed span). */
#define _POSIX_C_SOURCE 199309L  /* clock_gettime under -std=c11 */
#include <stdint.h>
#include <time.h>

#include "policy.h"

/* Route views[i % n_views] for i in [0, reps); the mean nanoseconds per call. *checksum sums the
 * choices (read by the caller, so no call can be dropped as unused). */
double ts_bench_route(const TsPolicy *policy, const TsWorker *workers, int32_t n_workers,
                      const TsRequestView *views, int32_t n_views, int64_t reps, int64_t *checksum) {
    struct timespec t0, t1;
    TsChoice out;
    int64_t sum = 0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int64_t i = 0; i < reps; i++) {
        ts_route(policy, workers, n_workers, &views[i % n_views], &out);
        sum += out.refused + out.prefill + out.decode + out.uncached_tokens;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    *checksum = sum;
    return ((double)(t1.tv_sec - t0.tv_sec) * 1e9 + (double)(t1.tv_nsec - t0.tv_nsec)) / (double)reps;
}
