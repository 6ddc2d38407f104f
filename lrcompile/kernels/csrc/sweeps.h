/* The chunked sweeps of lrcompile.kernels.reference, one head per thread, for one element type: included
 * by kernels.c once per type, with `real` and SUFFIX() defined. The arithmetic is that of
 * lrcompile/kernels/reference.py (read its docstring for the derivation); this file only moves the loops
 * out of Python, so that each core runs its heads' products back to back, single-threaded,
 * with the head's features and states in its own cache and no interpreter in between.
 *
 * Layouts, per head (lrc_problem in kernels.c): rows (N, d) with N = groups * n_q, head-major
 * when non-causal and position-major when causal; keys (n_k, d); W^ (n_k, e); G^ (N, e);
 * states S and R stored transposed, (e, r); O^ (e, N) and U (e, n_k) likewise; features are
 * (r, width) blocks. Everything is row-major and contiguous.
 */

typedef void (*SUFFIX(gemm_t))(const char*, const char*, const int*, const int*, const int*, const real*,
                                const real*, const int*, const real*, const int*, const real*, real*, const int*);

/* C (M x N, ldc) = alpha op(A) op(B) + beta C, row-major; op(A) is M x K, transposed when ta.
 * Fortran BLAS is column-major, where a row-major matrix reads as its transpose: C^T = op(B)^T op(A)^T. */
static void SUFFIX(mm)(SUFFIX(gemm_t) gemm, int ta, int tb, int64_t M, int64_t N, int64_t K, real alpha,
                       const real* A, int64_t lda, const real* B, int64_t ldb, real beta, real* C, int64_t ldc)
{
    const int m = (int)M, n = (int)N, k = (int)K, la = (int)lda, lb = (int)ldb, lc = (int)ldc;
    gemm(tb ? "T" : "N", ta ? "T" : "N", &n, &m, &k, &alpha, B, &lb, A, &la, &beta, C, &lc);
}

/* One thread's buffers for one head at a time. */
typedef struct {
    real *features, *d_features;  /* (r, width) */
    real *scores, *d_scores;      /* (chunk rows, chunk keys) */
    real *query_state;            /* R^T (e, r) */
    real *state;                  /* S^T (e, r), the backward's copy it peels */
    real *scratch;                /* VJP tiles */
    int64_t width, block;
} SUFFIX(workspace);

static void SUFFIX(workspace_free)(SUFFIX(workspace)* w)
{
    free(w->features);
    free(w->d_features);
    free(w->scores);
    free(w->d_scores);
    free(w->query_state);
    free(w->state);
    free(w->scratch);
}

static int SUFFIX(workspace_alloc)(SUFFIX(workspace)* w, const lrc_problem* p)
{
    const int64_t query_rows = p->causal ? p->chunk_size * p->groups : p->chunk_size;
    w->width = query_rows > p->chunk_size ? query_rows : p->chunk_size;
    w->block = p->chunk_size;
    w->features = malloc(sizeof(real) * p->r * w->width);
    w->d_features = malloc(sizeof(real) * p->r * w->width);
    w->scores = malloc(sizeof(real) * query_rows * p->chunk_size);
    w->d_scores = malloc(sizeof(real) * query_rows * p->chunk_size);
    w->query_state = malloc(sizeof(real) * p->e * p->r);
    w->state = malloc(sizeof(real) * p->e * p->r);
    w->scratch = malloc(sizeof(real) * SUFFIX(vjp_scratch)(p->d, p->r_lower));
    return w->features && w->d_features && w->scores && w->d_scores && w->query_state && w->state && w->scratch;
}

/* Features (r, width) of `width` consecutive rows into out (feature stride out_feature). */
static void SUFFIX(features_rows)(const lrc_problem* p, const real* x, int64_t width, real* out, int64_t out_feature,
                                  const real* coefficients)
{
    for (int64_t c0 = 0; c0 < width; c0 += TILE)
        SUFFIX(features_tile)(x + c0 * p->d, p->d, p->d, width - c0 < TILE ? width - c0 : TILE, out + c0,
                              out_feature, p->r, p->r_lower, p->parent, p->last, coefficients);
}

static void SUFFIX(vjp_rows)(const lrc_problem* p, const real* x, int64_t width, const real* grad, int64_t g_feature,
                             real* dx, const real* coefficients, real* scratch)
{
    for (int64_t c0 = 0; c0 < width; c0 += TILE)
        SUFFIX(vjp_tile)(x + c0 * p->d, p->d, p->d, width - c0 < TILE ? width - c0 : TILE, grad + c0, g_feature,
                         dx + c0 * p->d, p->d, p->r, p->r_lower, p->parent, p->last, coefficients, scratch);
}

/* The in-chunk block of query rows [q0, q1) (positions a.. of the chunk, position-major) and
 * keys [k0, k1): X = rows keys^T, then A = P(X) * M in place (and dX from dA when d_scores). */
static void SUFFIX(block)(const lrc_problem* p, SUFFIX(workspace)* w, const real* rows, const real* keys,
                          int64_t query_rows, int64_t key_count, int64_t offset, real* d_scores)
{
    SUFFIX(gemm_t) gemm = (SUFFIX(gemm_t))p->gemm;
    SUFFIX(mm)(gemm, 0, 1, query_rows, key_count, p->d, 1, rows, p->d, keys, p->d, 0, w->scores, w->block);
    for (int64_t i = 0; i < query_rows; ++i)
        SUFFIX(block_row)(w->scores + i * w->block, d_scores ? d_scores + i * w->block : 0, key_count,
                          offset + i / p->groups + 1, (const real*)p->polynomial, p->degree);
}

/* Head h's part of every tensor of the problem (NULL where the problem has none). */
typedef struct {
    const real *rows, *keys, *W, *G;  /* (N, d), (n_k, d), (n_k, e), (N, e) */
    real *state, *out, *dq, *dk;      /* (e, r), (e, N) or (e, n_k), (N, d), (n_k, d) */
} SUFFIX(head_view);

static SUFFIX(head_view) SUFFIX(head)(const lrc_problem* p, int64_t h, int64_t out_columns)
{
    const int64_t N = p->groups * p->n_q;
    SUFFIX(head_view) v = {
        (const real*)p->rows + h * N * p->d, (const real*)p->keys + h * p->n_k * p->d,
        (const real*)p->weighted + h * p->n_k * p->e, p->g_rows ? (const real*)p->g_rows + h * N * p->e : 0,
        (real*)p->state + h * p->e * p->r, (real*)p->out + h * p->e * out_columns,
        p->dq ? (real*)p->dq + h * N * p->d : 0, p->dk ? (real*)p->dk + h * p->n_k * p->d : 0,
    };
    return v;
}

/* ---- forward ---------------------------------------------------------------------------- */

static void SUFFIX(forward_head)(const lrc_problem* p, SUFFIX(workspace)* w, int64_t h)
{
    SUFFIX(gemm_t) gemm = (SUFFIX(gemm_t))p->gemm;
    const int64_t N = p->groups * p->n_q, d = p->d, e = p->e, r = p->r, ld = w->width;
    const SUFFIX(head_view) v = SUFFIX(head)(p, h, N);
    const real *rows = v.rows, *keys = v.keys, *W = v.W;
    const real* phi_coefficients = (const real*)p->phi_coefficients;
    real* S = v.state;  /* S^T (e, r) */
    real* O = v.out;    /* O^T (e, N) */
    memset(S, 0, sizeof(real) * e * r);
    if (!p->causal) {
        for (int64_t a = 0; a < p->n_k; a += p->chunk_size) {  /* S^T += W^_c^T psi_c^T */
            const int64_t wk = p->n_k - a < p->chunk_size ? p->n_k - a : p->chunk_size;
            SUFFIX(features_rows)(p, keys + a * d, wk, w->features, ld, 0);
            SUFFIX(mm)(gemm, 1, 1, e, r, wk, 1, W + a * e, e, w->features, ld, 1, S, r);
        }
        for (int64_t a = 0; a < N; a += p->chunk_size) {  /* O^T_c = S^T phi_c */
            const int64_t wq = N - a < p->chunk_size ? N - a : p->chunk_size;
            SUFFIX(features_rows)(p, rows + a * d, wq, w->features, ld, phi_coefficients);
            SUFFIX(mm)(gemm, 0, 0, e, wq, r, 1, S, r, w->features, ld, 0, O + a, N);
        }
        return;
    }
    for (int64_t a = 0; a < p->n_q; a += p->chunk_size) {
        const int64_t b = p->n_q - a < p->chunk_size ? p->n_q : a + p->chunk_size;
        const int64_t ka = a < p->n_k ? a : p->n_k, kb = b < p->n_k ? b : p->n_k;
        const int64_t q0 = a * p->groups, wq = (b - a) * p->groups, wk = kb - ka;
        SUFFIX(features_rows)(p, rows + q0 * d, wq, w->features, ld, phi_coefficients);
        SUFFIX(mm)(gemm, 0, 0, e, wq, r, 1, S, r, w->features, ld, 0, O + q0, N);  /* earlier chunks */
        if (wk > 0) {
            SUFFIX(block)(p, w, rows + q0 * d, keys + ka * d, wq, wk, a - ka, 0);  /* A = P(X) * M */
            SUFFIX(mm)(gemm, 1, 1, e, wq, wk, 1, W + ka * e, e, w->scores, w->block, 1, O + q0, N);
            SUFFIX(features_rows)(p, keys + ka * d, wk, w->features, ld, 0);
            SUFFIX(mm)(gemm, 1, 1, e, r, wk, 1, W + ka * e, e, w->features, ld, 1, S, r);
        }
    }
}

/* ---- backward --------------------------------------------------------------------------- */

static void SUFFIX(backward_head)(const lrc_problem* p, SUFFIX(workspace)* w, int64_t h)
{
    SUFFIX(gemm_t) gemm = (SUFFIX(gemm_t))p->gemm;
    const int64_t N = p->groups * p->n_q, d = p->d, e = p->e, r = p->r, ld = w->width;
    const SUFFIX(head_view) v = SUFFIX(head)(p, h, p->n_k);
    const real *rows = v.rows, *keys = v.keys, *W = v.W, *G = v.G;
    const real* phi_coefficients = (const real*)p->phi_coefficients;
    real *dq = v.dq, *dk = v.dk;
    real* U = v.out;            /* U^T (e, n_k) */
    real* R = w->query_state;   /* R^T (e, r) */
    real* S = w->state;         /* S^T (e, r): the forward's, copied to be peeled */
    memcpy(S, v.state, sizeof(real) * e * r);
    memset(R, 0, sizeof(real) * e * r);
    if (!p->causal) {
        for (int64_t a = 0; a < N; a += p->chunk_size) {
            const int64_t wq = N - a < p->chunk_size ? N - a : p->chunk_size;
            SUFFIX(features_rows)(p, rows + a * d, wq, w->features, ld, phi_coefficients);
            SUFFIX(mm)(gemm, 1, 1, e, r, wq, 1, G + a * e, e, w->features, ld, 1, R, r);          /* R^T += G^_c^T phi_c^T */
            SUFFIX(mm)(gemm, 1, 1, r, wq, e, 1, S, r, G + a * e, e, 0, w->d_features, ld);          /* dphi = S G^_c^T */
            SUFFIX(vjp_rows)(p, rows + a * d, wq, w->d_features, ld, dq + a * d, phi_coefficients, w->scratch);
        }
        for (int64_t a = 0; a < p->n_k; a += p->chunk_size) {
            const int64_t wk = p->n_k - a < p->chunk_size ? p->n_k - a : p->chunk_size;
            SUFFIX(features_rows)(p, keys + a * d, wk, w->features, ld, 0);
            SUFFIX(mm)(gemm, 0, 0, e, wk, r, 1, R, r, w->features, ld, 0, U + a, p->n_k);          /* U^T_c = R^T psi_c */
            SUFFIX(mm)(gemm, 1, 1, r, wk, e, 1, R, r, W + a * e, e, 0, w->d_features, ld);          /* dpsi = R W^_c^T */
            SUFFIX(vjp_rows)(p, keys + a * d, wk, w->d_features, ld, dk + a * d, 0, w->scratch);
        }
        return;
    }
    /* causal: keys past the last query are seen by no query */
    const int64_t seen = p->n_q < p->n_k ? p->n_q : p->n_k;
    memset(dk + seen * d, 0, sizeof(real) * (p->n_k - seen) * d);
    for (int64_t j = 0; j < e; ++j) memset(U + j * p->n_k + seen, 0, sizeof(real) * (p->n_k - seen));
    const int64_t chunks = (p->n_q + p->chunk_size - 1) / p->chunk_size;
    for (int64_t c = chunks - 1; c >= 0; --c) {
        const int64_t a = c * p->chunk_size, b = p->n_q - a < p->chunk_size ? p->n_q : a + p->chunk_size;
        const int64_t ka = a < p->n_k ? a : p->n_k, kb = b < p->n_k ? b : p->n_k;
        const int64_t q0 = a * p->groups, wq = (b - a) * p->groups, wk = kb - ka;
        if (wk > 0) {  /* this chunk's keys: seen by later chunks through R, and in the block below */
            SUFFIX(features_rows)(p, keys + ka * d, wk, w->features, ld, 0);
            SUFFIX(mm)(gemm, 1, 1, e, r, wk, -1, W + ka * e, e, w->features, ld, 1, S, r);    /* now S_<c */
            SUFFIX(mm)(gemm, 0, 0, e, wk, r, 1, R, r, w->features, ld, 0, U + ka, p->n_k);
            SUFFIX(mm)(gemm, 1, 1, r, wk, e, 1, R, r, W + ka * e, e, 0, w->d_features, ld);
            SUFFIX(vjp_rows)(p, keys + ka * d, wk, w->d_features, ld, dk + ka * d, 0, w->scratch);
        }
        SUFFIX(features_rows)(p, rows + q0 * d, wq, w->features, ld, phi_coefficients);
        SUFFIX(mm)(gemm, 1, 1, r, wq, e, 1, S, r, G + q0 * e, e, 0, w->d_features, ld);
        SUFFIX(vjp_rows)(p, rows + q0 * d, wq, w->d_features, ld, dq + q0 * d, phi_coefficients, w->scratch);
        if (wk > 0) {  /* the block A = P(X) * M (w inside W^): dX = dA * M * P'(X) */
            SUFFIX(mm)(gemm, 0, 1, wq, wk, e, 1, G + q0 * e, e, W + ka * e, e, 0, w->d_scores, w->block);
            SUFFIX(block)(p, w, rows + q0 * d, keys + ka * d, wq, wk, a - ka, w->d_scores);
            SUFFIX(mm)(gemm, 0, 0, wq, d, wk, 1, w->d_scores, w->block, keys + ka * d, d, 1, dq + q0 * d, d);
            SUFFIX(mm)(gemm, 1, 0, wk, d, wq, 1, w->d_scores, w->block, rows + q0 * d, d, 1, dk + ka * d, d);
            SUFFIX(mm)(gemm, 1, 0, e, wk, wq, 1, G + q0 * e, e, w->scores, w->block, 1, U + ka, p->n_k);
        }
        SUFFIX(mm)(gemm, 1, 1, e, r, wq, 1, G + q0 * e, e, w->features, ld, 1, R, r);  /* now R_>=c */
    }
}

/* ---- entry points: 0 on success, 1 when a thread could not allocate its buffers ---------- */

#define RUN_HEADS SUFFIX(run_heads)
#define HEADS_PROBLEM lrc_problem
#define HEADS_WORKSPACE SUFFIX(workspace)
#define HEADS_ALLOC(w, p, backward) SUFFIX(workspace_alloc)(w, p)  /* the same buffers both ways */
#define HEADS_FREE SUFFIX(workspace_free)
#define HEADS_FORWARD SUFFIX(forward_head)
#define HEADS_BACKWARD SUFFIX(backward_head)
#include "heads.h"

int SUFFIX(lrc_forward)(const lrc_problem* p) { return SUFFIX(run_heads)(p, 0); }

int SUFFIX(lrc_backward)(const lrc_problem* p) { return SUFFIX(run_heads)(p, 1); }
