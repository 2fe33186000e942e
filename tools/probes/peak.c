/* Clock and peak dot-product throughput of this CPU (one core):
 * dependent integer adds (1 per cycle), then 12 independent chains of `vpdpbusd zmm`
 * (AVX-512 VNNI) and of `vdpbf16ps zmm` (AVX512_BF16). Used for BENCHMARKS.md.
 *
 *   gcc -O2 tools/probes/peak.c -o /tmp/peak && /tmp/peak
 */
#include <stdio.h>
#include <time.h>

static double seconds(struct timespec a, struct timespec b) {
    return (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) * 1e-9;
}

#define TWELVE(op) \
    op " %%zmm0, %%zmm1, %%zmm2\n\t" op " %%zmm0, %%zmm1, %%zmm3\n\t" \
    op " %%zmm0, %%zmm1, %%zmm4\n\t" op " %%zmm0, %%zmm1, %%zmm5\n\t" \
    op " %%zmm0, %%zmm1, %%zmm6\n\t" op " %%zmm0, %%zmm1, %%zmm7\n\t" \
    op " %%zmm0, %%zmm1, %%zmm8\n\t" op " %%zmm0, %%zmm1, %%zmm9\n\t" \
    op " %%zmm0, %%zmm1, %%zmm10\n\t" op " %%zmm0, %%zmm1, %%zmm11\n\t" \
    op " %%zmm0, %%zmm1, %%zmm12\n\t" op " %%zmm0, %%zmm1, %%zmm13\n\t"
#define CLOBBERS "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", \
    "xmm10", "xmm11", "xmm12", "xmm13"

int main(void) {
    struct timespec t0, t1;
    long n = 2000000000, x = 0, m = 200000000;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < n; i++)
        __asm__ volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0" : "+r"(x));
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("clock: %.2f GHz (dependent adds)\n", 4.0 * n / seconds(t0, t1) / 1e9);

    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < m; i++) __asm__ volatile(TWELVE("vpdpbusd") ::: CLOBBERS);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double r = 12.0 * m / seconds(t0, t1);
    printf("vpdpbusd zmm: %.2f G/s per core = %.0f GOP/s per core\n", r / 1e9, r * 128 / 1e9);

    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < m; i++) __asm__ volatile(TWELVE("vdpbf16ps") ::: CLOBBERS);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    r = 12.0 * m / seconds(t0, t1);
    printf("vdpbf16ps zmm: %.2f G/s per core = %.0f GFLOP/s per core\n", r / 1e9, r * 64 / 1e9);
    return 0;
}
