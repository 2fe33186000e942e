/* Memory read bandwidth: sums 1 GiB of f32 with AVX-512 loads, 1 and 2 OpenMP threads, best
 * of 5. Used for BENCHMARKS.md.
 *
 *   gcc -O2 -mavx512f -fopenmp tools/probes/read_bandwidth.c -o /tmp/bw && /tmp/bw
 */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define CHUNK ((size_t)1 << 16) /* floats per parallel task */

static double seconds(struct timespec a, struct timespec b) {
    return (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) * 1e-9;
}

int main(void) {
    size_t n = (size_t)1 << 28;
    float *a = aligned_alloc(64, n * sizeof(float));
    if (!a) return 1;
#pragma omp parallel for
    for (size_t i = 0; i < n; i++) a[i] = i * 1e-9f;

    for (int threads = 1; threads <= 2; threads++) {
        double best = 1e9;
        float checksum = 0; /* printed, so the sums are not optimised away */
        for (int rep = 0; rep < 5; rep++) {
            struct timespec t0, t1;
            float total = 0;
            clock_gettime(CLOCK_MONOTONIC, &t0);
#pragma omp parallel for num_threads(threads) reduction(+ : total)
            for (size_t c = 0; c < n; c += CHUNK) {
                __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
                for (size_t i = c; i < c + CHUNK; i += 32) {
                    acc0 = _mm512_add_ps(acc0, _mm512_load_ps(a + i));
                    acc1 = _mm512_add_ps(acc1, _mm512_load_ps(a + i + 16));
                }
                total += _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
            }
            clock_gettime(CLOCK_MONOTONIC, &t1);
            double dt = seconds(t0, t1);
            if (dt < best) best = dt;
            checksum += total;
        }
        printf("threads %d: %.1f GB/s (%f)\n", threads, n * sizeof(float) / best / 1e9, checksum);
    }
    free(a);
    return 0;
}
