/* CPU kernels of the factored attention (lrcompile/kernels/reference.py), for float32 and float64.
 *
 * Built by lrcompile/kernels/cpu.py on first use and called through ctypes. features.h holds the
 * monomial feature maps, their vector-Jacobian product and the causal in-chunk polynomial;
 * sweeps.h the chunk loops of the forward and backward, with the matrix products done by the
 * BLAS torch itself links (its ?gemm_, passed in by address); direct.h the direct (n x n block)
 * algorithm of short sequences, lrcompile/ops/algorithm.py; heads.h the parallel loop over heads
 * both run a call with. All are written once for a type `real` and included here for each type.
 * The torch evaluations in lrcompile/math/features.py and lrcompile/kernels/reference.py compute
 * the same values and are the reference in the tests.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TILE 64

/* One attention call, every head: what lrc_forward / lrc_backward read and write. Mirrored by
 * native.Problem (ctypes); the layouts are those of sweeps.h. */
typedef struct {
    int64_t heads, groups, n_q, n_k, d, e, r, r_lower, chunk_size, causal, degree, threads;
    const void *rows, *keys, *weighted, *g_rows;
    void *state, *out, *dq, *dk;
    const int32_t *parent, *last;
    const void *phi_coefficients, *polynomial;
    void *gemm;
} lrc_problem;

/* cpu.py compares this with the size of its ctypes mirror when it loads the library: a field
 * added on one side only would otherwise make every later field land at the wrong address. */
int64_t lrc_sizeof_problem(void) { return (int64_t)sizeof(lrc_problem); }

#define real float
#define SUFFIX(name) name##_f32
#include "features.h"
#include "sweeps.h"
#include "direct.h"
#undef real
#undef SUFFIX

#define real double
#define SUFFIX(name) name##_f64
#include "features.h"
#include "sweeps.h"
#include "direct.h"
#undef real
#undef SUFFIX
