/* Memory read bandwidth: sums 1 GiB of f32 with AVX-512 loads, 1 and 2 OpenMP threads, best
 * of 5. Used for BENCHMARKS.md.
 *
 *   gcc -O2 -mavx512f -fopenmp tools/probes/read_bandwidth.c -o /tmp/bw && /tmp/bw
 */
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <omp.h>
#include <time.h>
int main(){ size_t n=(size_t)1<<28; float*a=aligned_alloc(64,n*4); 
#pragma omp parallel for
for(size_t i=0;i<n;i++)a[i]=i*1e-9f;
for(int threads=1;threads<=2;threads++){ double best=1e9; float s=0;
for(int r=0;r<5;r++){ struct timespec t0,t1; clock_gettime(CLOCK_MONOTONIC,&t0);
 float tot=0;
#pragma omp parallel for num_threads(threads) reduction(+:tot)
 for(size_t c=0;c<n;c+=1<<16){ __m512 acc=_mm512_setzero_ps(), acc2=_mm512_setzero_ps(); for(size_t i=c;i<c+(1<<16);i+=32){acc=_mm512_add_ps(acc,_mm512_load_ps(a+i)); acc2=_mm512_add_ps(acc2,_mm512_load_ps(a+i+16));} tot+=_mm512_reduce_add_ps(_mm512_add_ps(acc,acc2)); }
 clock_gettime(CLOCK_MONOTONIC,&t1); double dt=(t1.tv_sec-t0.tv_sec)+(t1.tv_nsec-t0.tv_nsec)*1e-9; if(dt<best)best=dt; s+=tot;}
 printf("threads %d: %.1f GB/s (%f)\n",threads,n*4/best/1e9,s);}
}
