/* The direct algorithm (lrcompile.ops.algorithm; reference.Direct in torch), fused, one (batch, key/value
 * head) per thread, for one
 * element type: included by kernels.c once per type, with `real` and SUFFIX() defined, after
 * sweeps.h (whose mm() it uses).
 *
 * The same polynomial attention as lrcompile.kernels.reference, computed as the n x n block the causal
 * in-chunk step already uses, without features or states, and with everything around the block
 * that the op otherwise does in separate torch passes (scaling, key centring, key weights, the
 * normalisation, G^, dV, dw, the centring correction) done here, so that a short call is one
 * parallel region forward and one backward. lrcompile/ops/algorithm.py derives it; per head, with
 * r = sqrt(s), K' = r K - mu (mu the mean of the valid keys when non-causal, else 0):
 *
 *   forward    X = r Q K'^T;  A = P(X) * M (unweighted);  A_w = A * w (per key column)
 *              D = A_w 1;  out = (A_w V) / D   (0 where D = 0: no key to attend to)
 *   backward   g = dO / D,  delta = (dO . out) / D  (0 where D = 0)
 *              E = g V^T - delta 1^T  (dL/dA_w);  dX = E * w * P'(X) * M
 *              dq = r dX K';  G = r dX^T Q (dL/dK');  dk = r (G - [valid] sum_j G_j / n_valid)
 *              dV = A_w^T g;  dw_j = sum_i A_ij E_ij
 *
 * M is 1 everywhere when non-causal; causally query position i sees keys 0..i (top-left aligned,
 * as SDPA). Query rows are head-major, N = groups * n_q: row g n_q + i is position i of query
 * head g of this key/value head (GQA).
 *
 * Tiles: `tile` query rows at a time, scores (tile, n_k) in the thread's buffer; causally a tile
 * holds consecutive positions of one query head and multiplies only the keys up to its last.
 *
 * Layouts (lrc_direct_problem): q (heads, N, d); k (heads, n_k, d); v (heads, n_k, dv);
 * weight (heads, n_k) or NULL; out, grad_out (heads, N, dv); denominator (heads, N);
 * dq (heads, N, d); dk (heads, n_k, d); dv_out (heads, n_k, dv); dw (heads, n_k) or NULL.
 * Row-major, contiguous.
 */

#ifndef LRC_DIRECT_PROBLEM
#define LRC_DIRECT_PROBLEM
/* One direct attention call, every head. Mirrored by native.DirectProblem (ctypes). */
typedef struct {
    int64_t heads, groups, n_q, n_k, d, dv, causal, degree, tile, threads;
    double root_scale;
    const void *q, *k, *v, *weight, *grad_out;
    void *out, *denominator, *dq, *dk, *dv_out, *dw;
    const void* polynomial;
    void* gemm;
} lrc_direct_problem;

/* Compared with the size of native.DirectProblem at load time, as lrc_sizeof_problem is. */
int64_t lrc_sizeof_direct_problem(void) { return (int64_t)sizeof(lrc_direct_problem); }

/* The tiles of a head's query rows: causally consecutive positions of one query head (a tile
 * then sees the keys up to its last position), else any `tile` consecutive rows. */
typedef struct {
    int64_t q0, rows, position;  /* first row, row count, position of the first row */
} lrc_direct_tile;

static int64_t lrc_direct_tile_count(const lrc_direct_problem* p)
{
    if (p->causal) return p->groups * ((p->n_q + p->tile - 1) / p->tile);
    return (p->groups * p->n_q + p->tile - 1) / p->tile;
}

static lrc_direct_tile lrc_direct_tile_at(const lrc_direct_problem* p, int64_t t)
{
    lrc_direct_tile tile;
    if (p->causal) {
        const int64_t per_group = (p->n_q + p->tile - 1) / p->tile;
        tile.position = (t % per_group) * p->tile;
        tile.q0 = (t / per_group) * p->n_q + tile.position;
        tile.rows = p->n_q - tile.position < p->tile ? p->n_q - tile.position : p->tile;
    } else {
        tile.position = 0;
        tile.q0 = t * p->tile;
        tile.rows = p->groups * p->n_q - tile.q0 < p->tile ? p->groups * p->n_q - tile.q0 : p->tile;
    }
    return tile;
}
#endif

/* One thread's buffers. */
typedef struct {
    real *keys;              /* K' (n_k, d) of the current head */
    real *scores, *d_scores; /* (tile, n_k) */
    real *g;                 /* dO / D of a tile (tile, dv) */
    real *delta;             /* (dO . out) / D of a tile (tile) */
    real *weights;           /* w of the current head, 1 without a mask (n_k): no branch per score */
    real *dw;                /* dw of the current head (n_k) */
    real *value, *slope;     /* P(X), P'(X) of one row (n_k) */
    real *columns;           /* a sum over keys (d) */
} SUFFIX(direct_workspace);

static int SUFFIX(valid_key)(const real* weight, int64_t j) { return !weight || weight[j] > 0; }

/* K' = r K - mu into w->keys, and the key weights into w->weights. Returns the number of valid
 * keys (w_j > 0), at least 1. Row by row: keys are (n_k, d) row-major. */
static int64_t SUFFIX(direct_keys)(const lrc_direct_problem* p, SUFFIX(direct_workspace)* w, const real* k,
                                   const real* weight)
{
    const int64_t n_k = p->n_k, d = p->d;
    const real r = (real)p->root_scale;
    real* restrict mu = w->columns;
    int64_t valid = 0;
    for (int64_t j = 0; j < n_k; ++j) w->weights[j] = weight ? weight[j] : 1;
    for (int64_t j = 0; j < n_k * d; ++j) w->keys[j] = r * k[j];
    if (p->causal) return 1;  /* causal keys are not centred: the mean would leak later keys */
    memset(mu, 0, sizeof(real) * d);
    for (int64_t j = 0; j < n_k; ++j) {
        if (!SUFFIX(valid_key)(weight, j)) continue;
        ++valid;
        const real* restrict key = w->keys + j * d;
        for (int64_t col = 0; col < d; ++col) mu[col] += key[col];
    }
    if (valid == 0) return 1;
    for (int64_t col = 0; col < d; ++col) mu[col] /= (real)valid;
    for (int64_t j = 0; j < n_k; ++j) {
        real* restrict key = w->keys + j * d;
        for (int64_t col = 0; col < d; ++col) key[col] -= mu[col];
    }
    return valid;
}

/* The keys a tile of wq rows from `position` can see: all, or causally those up to its last. */
static int64_t SUFFIX(direct_tile_keys)(const lrc_direct_problem* p, int64_t position, int64_t wq)
{
    if (!p->causal) return p->n_k;
    return position + wq < p->n_k ? position + wq : p->n_k;
}

/* value[j] = P(x[j]) and, with slope, slope[j] = P'(x[j]) for j < count: Horner's rule with the
 * degree as the outer loop, so that every inner loop is a plain vector loop over the row. */
static void SUFFIX(polynomial_row)(const real* restrict x, int64_t count, const real* c, int64_t degree,
                                   real* restrict value, real* restrict slope)
{
    for (int64_t j = 0; j < count; ++j) value[j] = c[degree];
    if (slope)
        for (int64_t j = 0; j < count; ++j) slope[j] = degree * c[degree];
    for (int64_t m = degree - 1; m >= 0; --m) {
        const real cm = c[m], m_cm = m * c[m];
        for (int64_t j = 0; j < count; ++j) value[j] = value[j] * x[j] + cm;
        if (slope && m >= 1)
            for (int64_t j = 0; j < count; ++j) slope[j] = slope[j] * x[j] + m_cm;
    }
}

static void SUFFIX(direct_forward_head)(const lrc_direct_problem* p, SUFFIX(direct_workspace)* w, int64_t h)
{
    SUFFIX(gemm_t) gemm = (SUFFIX(gemm_t))p->gemm;
    const int64_t N = p->groups * p->n_q, n_k = p->n_k, d = p->d, dv = p->dv;
    const real* q = (const real*)p->q + h * N * d;
    const real* v = (const real*)p->v + h * n_k * dv;
    const real* weight = p->weight ? (const real*)p->weight + h * n_k : 0;
    const real* c = (const real*)p->polynomial;
    real* out = (real*)p->out + h * N * dv;
    real* denominator = (real*)p->denominator + h * N;
    const real* restrict weights = w->weights;
    real* restrict value = w->value;
    SUFFIX(direct_keys)(p, w, (const real*)p->k + h * n_k * d, weight);
    for (int64_t t = 0; t < lrc_direct_tile_count(p); ++t) {
        const lrc_direct_tile tile = lrc_direct_tile_at(p, t);
        const int64_t q0 = tile.q0, wq = tile.rows, position = tile.position;
        const int64_t kc = SUFFIX(direct_tile_keys)(p, position, wq);
        SUFFIX(mm)(gemm, 0, 1, wq, kc, d, (real)p->root_scale, q + q0 * d, d, w->keys, d, 0, w->scores, n_k);  /* X */
        for (int64_t i = 0; i < wq; ++i) {
            real* restrict x = w->scores + i * n_k;
            const int64_t seen = p->causal && position + i + 1 < kc ? position + i + 1 : kc;
            SUFFIX(polynomial_row)(x, seen, c, p->degree, value, 0);
            real sum = 0;
            #pragma omp simd reduction(+ : sum)
            for (int64_t j = 0; j < seen; ++j) {
                x[j] = value[j] * weights[j];  /* A_w */
                sum += x[j];
            }
            for (int64_t j = seen; j < kc; ++j) x[j] = 0;
            denominator[q0 + i] = sum;
        }
        SUFFIX(mm)(gemm, 0, 0, wq, dv, kc, 1, w->scores, n_k, v, dv, 0, out + q0 * dv, dv);  /* A_w V */
        for (int64_t i = 0; i < wq; ++i) {
            const real D = denominator[q0 + i], inverse = D != 0 ? 1 / D : 0;
            for (int64_t col = 0; col < dv; ++col) out[(q0 + i) * dv + col] *= inverse;
        }
    }
}

static void SUFFIX(direct_backward_head)(const lrc_direct_problem* p, SUFFIX(direct_workspace)* w, int64_t h)
{
    SUFFIX(gemm_t) gemm = (SUFFIX(gemm_t))p->gemm;
    const int64_t N = p->groups * p->n_q, n_k = p->n_k, d = p->d, dv = p->dv;
    const real r = (real)p->root_scale;
    const real* q = (const real*)p->q + h * N * d;
    const real* v = (const real*)p->v + h * n_k * dv;
    const real* weight = p->weight ? (const real*)p->weight + h * n_k : 0;
    const real* grad_out = (const real*)p->grad_out + h * N * dv;
    const real* out = (const real*)p->out + h * N * dv;
    const real* denominator = (const real*)p->denominator + h * N;
    const real* c = (const real*)p->polynomial;
    real* dq = (real*)p->dq + h * N * d;
    real* dk = (real*)p->dk + h * n_k * d;  /* G = dL/dK' until the end */
    real* dV = (real*)p->dv_out + h * n_k * dv;
    real* dw = p->dw ? (real*)p->dw + h * n_k : 0;
    const real* restrict weights = w->weights;
    real* restrict value = w->value;
    real* restrict slope = w->slope;
    real* restrict dw_head = w->dw;
    const int64_t valid = SUFFIX(direct_keys)(p, w, (const real*)p->k + h * n_k * d, weight);
    /* keys no query sees (causal, n_k > n_q) keep these zeros */
    memset(dk, 0, sizeof(real) * n_k * d);
    memset(dV, 0, sizeof(real) * n_k * dv);
    memset(dw_head, 0, sizeof(real) * n_k);
    for (int64_t t = 0; t < lrc_direct_tile_count(p); ++t) {
        const lrc_direct_tile tile = lrc_direct_tile_at(p, t);
        const int64_t q0 = tile.q0, wq = tile.rows, position = tile.position;
        const int64_t kc = SUFFIX(direct_tile_keys)(p, position, wq);
        for (int64_t i = 0; i < wq; ++i) {  /* g = dO / D, delta = (dO . out) / D */
            const real D = denominator[q0 + i], inverse = D != 0 ? 1 / D : 0;
            const real* restrict dO = grad_out + (q0 + i) * dv;
            const real* restrict o = out + (q0 + i) * dv;
            real dot = 0;
            for (int64_t col = 0; col < dv; ++col) {
                w->g[i * dv + col] = dO[col] * inverse;
                dot += dO[col] * o[col];
            }
            w->delta[i] = dot * inverse;
        }
        SUFFIX(mm)(gemm, 0, 1, wq, kc, dv, 1, w->g, dv, v, dv, 0, w->d_scores, n_k);         /* g V^T */
        SUFFIX(mm)(gemm, 0, 1, wq, kc, d, r, q + q0 * d, d, w->keys, d, 0, w->scores, n_k);  /* X */
        for (int64_t i = 0; i < wq; ++i) {
            real* restrict x = w->scores + i * n_k;
            real* restrict e = w->d_scores + i * n_k;
            const int64_t seen = p->causal && position + i + 1 < kc ? position + i + 1 : kc;
            const real delta = w->delta[i];
            SUFFIX(polynomial_row)(x, seen, c, p->degree, value, slope);
            #pragma omp simd
            for (int64_t j = 0; j < seen; ++j) {
                const real dA = e[j] - delta;  /* dL/dA_w */
                dw_head[j] += value[j] * dA;
                e[j] = dA * weights[j] * slope[j];  /* dX */
                x[j] = value[j] * weights[j];       /* A_w */
            }
            for (int64_t j = seen; j < kc; ++j) x[j] = e[j] = 0;
        }
        SUFFIX(mm)(gemm, 0, 0, wq, d, kc, r, w->d_scores, n_k, w->keys, d, 0, dq + q0 * d, d);  /* dq = r dX K' */
        SUFFIX(mm)(gemm, 1, 0, kc, d, wq, r, w->d_scores, n_k, q + q0 * d, d, 1, dk, d);        /* G += r dX^T Q */
        SUFFIX(mm)(gemm, 1, 0, kc, dv, wq, 1, w->scores, n_k, w->g, dv, 1, dV, dv);             /* dV += A_w^T g */
    }
    if (dw) memcpy(dw, dw_head, sizeof(real) * n_k);
    /* dk = r (G - [valid] mean over valid keys of G), since mu is the mean of the valid r k_j */
    real* restrict mean = w->columns;
    memset(mean, 0, sizeof(real) * d);
    if (!p->causal)
        for (int64_t j = 0; j < n_k; ++j)
            for (int64_t col = 0; col < d; ++col) mean[col] += dk[j * d + col] / (real)valid;
    for (int64_t j = 0; j < n_k; ++j) {
        const int centred = !p->causal && SUFFIX(valid_key)(weight, j);
        for (int64_t col = 0; col < d; ++col) dk[j * d + col] = r * (dk[j * d + col] - (centred ? mean[col] : 0));
    }
}

/* ---- entry points: 0 on success, 1 when a thread could not allocate its buffers ---------- */

static void SUFFIX(direct_workspace_free)(SUFFIX(direct_workspace)* w)
{
    free(w->keys);
    free(w->scores);
    free(w->d_scores);
    free(w->g);
    free(w->delta);
    free(w->weights);
    free(w->dw);
    free(w->value);
    free(w->slope);
    free(w->columns);
}

static real* SUFFIX(direct_buffer)(int64_t size) { return malloc(sizeof(real) * (size + 1)); }  /* never malloc(0) */

static int SUFFIX(direct_workspace_alloc)(SUFFIX(direct_workspace)* w, const lrc_direct_problem* p, int backward)
{
    const int64_t tile_scores = p->tile * p->n_k + 1;
    w->keys = SUFFIX(direct_buffer)(p->n_k * p->d);
    w->scores = SUFFIX(direct_buffer)(tile_scores);
    w->d_scores = SUFFIX(direct_buffer)(backward ? tile_scores : 0);
    w->g = SUFFIX(direct_buffer)(p->tile * p->dv);
    w->delta = SUFFIX(direct_buffer)(p->tile);
    w->weights = SUFFIX(direct_buffer)(p->n_k);
    w->dw = SUFFIX(direct_buffer)(p->n_k);
    w->value = SUFFIX(direct_buffer)(p->n_k);
    w->slope = SUFFIX(direct_buffer)(p->n_k);
    w->columns = SUFFIX(direct_buffer)(p->d);
    return w->keys && w->scores && w->d_scores && w->g && w->delta && w->weights && w->dw && w->value && w->slope
           && w->columns;
}

#define RUN_HEADS SUFFIX(direct_run_heads)
#define HEADS_PROBLEM lrc_direct_problem
#define HEADS_WORKSPACE SUFFIX(direct_workspace)
#define HEADS_ALLOC SUFFIX(direct_workspace_alloc)
#define HEADS_FREE SUFFIX(direct_workspace_free)
#define HEADS_FORWARD SUFFIX(direct_forward_head)
#define HEADS_BACKWARD SUFFIX(direct_backward_head)
#include "heads.h"

int SUFFIX(lrc_direct_forward)(const lrc_direct_problem* p) { return SUFFIX(direct_run_heads)(p, 0); }

int SUFFIX(lrc_direct_backward)(const lrc_direct_problem* p) { return SUFFIX(direct_run_heads)(p, 1); }
