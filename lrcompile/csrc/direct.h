/* The direct algorithm of lrcompile.direct, one head per thread, for one element type: included
 * by kernels.c once per type, with `real` and SUFFIX() defined, after sweeps.h (whose mm() and
 * block_row() of features.h it uses).
 *
 * The same polynomial attention as the sweeps, computed as the n x n block the causal in-chunk
 * step already uses, with no features and no states (lrcompile/direct.py derives it):
 *
 *   forward    X = Q' K'^T,  A = P(X) * M,  O^ = A W^                       (N, e)
 *   backward   X, A as above;  dA = G^ W^^T;  dX = dA * M * P'(X)
 *              dq' = dX K',  dk' = dX^T Q',  U = A^T G^                     (N, d), (n_k, d), (n_k, e)
 *
 * M is 1 everywhere when non-causal; causally row i (position i / groups, rows position-major)
 * sees keys 0..i / groups (top-left aligned, as SDPA). W^ = w * [V | 1] carries the key weights.
 *
 * Tiles: `chunk` query positions at a time (chunk * groups rows, or chunk rows when non-causal)
 * against every key the tile can see, so a thread's scores are a (chunk rows) x n_k block, and
 * causally the keys after a tile's last position are never multiplied.
 *
 * Layouts, per head (lrc_problem in kernels.c): rows (N, d), keys (n_k, d), W^ (n_k, e),
 * G^ (N, e), out O^ (N, e) in the forward and U (n_k, e) in the backward; row-major, contiguous.
 * Fields of lrc_problem about features (r, r_lower, parent, last, phi_coefficients, state) are
 * not read.
 */

typedef struct {
    real *scores, *d_scores;  /* (tile rows, n_k) */
} SUFFIX(direct_workspace);

static int64_t SUFFIX(direct_tile_rows)(const lrc_problem* p)
{
    const int64_t N = p->groups * p->n_q;
    const int64_t rows = p->causal ? p->chunk * p->groups : p->chunk;
    return rows < N ? rows : N;
}

/* Query rows [q0, q0 + wq) of head view v: scores against the first `kc` keys into w->scores
 * (leading dimension n_k), made A = P(X) * M in place; with d_scores, dA there becomes dX. */
static void SUFFIX(direct_block)(const lrc_problem* p, SUFFIX(direct_workspace)* w, const real* rows,
                                 const real* keys, int64_t q0, int64_t wq, int64_t kc, real* d_scores)
{
    SUFFIX(mm)((SUFFIX(gemm_t))p->gemm, 0, 1, wq, kc, p->d, 1, rows + q0 * p->d, p->d, keys, p->d, 0, w->scores,
               p->n_k);
    for (int64_t i = 0; i < wq; ++i) {
        /* causal: position (q0 + i) / groups sees keys up to itself; block_row clips to kc */
        const int64_t visible = p->causal ? (q0 + i) / p->groups + 1 : kc;
        SUFFIX(block_row)(w->scores + i * p->n_k, d_scores ? d_scores + i * p->n_k : 0, kc, visible,
                          (const real*)p->polynomial, p->degree);
    }
}

/* Keys a tile of rows [q0, q0 + wq) can see: all of them, or causally those up to its last position. */
static int64_t SUFFIX(direct_keys)(const lrc_problem* p, int64_t q0, int64_t wq)
{
    if (!p->causal) return p->n_k;
    const int64_t last_position = (q0 + wq - 1) / p->groups;
    return last_position + 1 < p->n_k ? last_position + 1 : p->n_k;
}

static void SUFFIX(direct_forward_head)(const lrc_problem* p, SUFFIX(direct_workspace)* w, int64_t h)
{
    SUFFIX(gemm_t) gemm = (SUFFIX(gemm_t))p->gemm;
    const int64_t N = p->groups * p->n_q, d = p->d, e = p->e, tile = SUFFIX(direct_tile_rows)(p);
    const real* rows = (const real*)p->rows + h * N * d;
    const real* keys = (const real*)p->keys + h * p->n_k * d;
    const real* W = (const real*)p->weighted + h * p->n_k * e;
    real* O = (real*)p->out + h * N * e;
    for (int64_t q0 = 0; q0 < N; q0 += tile) {
        const int64_t wq = N - q0 < tile ? N - q0 : tile, kc = SUFFIX(direct_keys)(p, q0, wq);
        SUFFIX(direct_block)(p, w, rows, keys, q0, wq, kc, 0);
        SUFFIX(mm)(gemm, 0, 0, wq, e, kc, 1, w->scores, p->n_k, W, e, 0, O + q0 * e, e);  /* O^ = A W^ */
    }
}

static void SUFFIX(direct_backward_head)(const lrc_problem* p, SUFFIX(direct_workspace)* w, int64_t h)
{
    SUFFIX(gemm_t) gemm = (SUFFIX(gemm_t))p->gemm;
    const int64_t N = p->groups * p->n_q, d = p->d, e = p->e, tile = SUFFIX(direct_tile_rows)(p);
    const real* rows = (const real*)p->rows + h * N * d;
    const real* keys = (const real*)p->keys + h * p->n_k * d;
    const real* W = (const real*)p->weighted + h * p->n_k * e;
    const real* G = (const real*)p->g_rows + h * N * e;
    real* dq = (real*)p->dq + h * N * d;
    real* dk = (real*)p->dk + h * p->n_k * d;
    real* U = (real*)p->out + h * p->n_k * e;
    /* dk and U sum over tiles; keys no query sees (causal, n_k > n_q) stay zero */
    memset(dk, 0, sizeof(real) * p->n_k * d);
    memset(U, 0, sizeof(real) * p->n_k * e);
    for (int64_t q0 = 0; q0 < N; q0 += tile) {
        const int64_t wq = N - q0 < tile ? N - q0 : tile, kc = SUFFIX(direct_keys)(p, q0, wq);
        SUFFIX(mm)(gemm, 0, 1, wq, kc, e, 1, G + q0 * e, e, W, e, 0, w->d_scores, p->n_k);  /* dA = G^ W^^T */
        SUFFIX(direct_block)(p, w, rows, keys, q0, wq, kc, w->d_scores);                    /* A, dX */
        SUFFIX(mm)(gemm, 0, 0, wq, d, kc, 1, w->d_scores, p->n_k, keys, d, 0, dq + q0 * d, d);   /* dq' = dX K' */
        SUFFIX(mm)(gemm, 1, 0, kc, d, wq, 1, w->d_scores, p->n_k, rows + q0 * d, d, 1, dk, d);   /* dk' += dX^T Q' */
        SUFFIX(mm)(gemm, 1, 0, kc, e, wq, 1, w->scores, p->n_k, G + q0 * e, e, 1, U, e);         /* U += A^T G^ */
    }
}

/* ---- entry points: 0 on success, 1 when a thread could not allocate its score tiles ------ */

static int SUFFIX(direct_run_heads)(const lrc_problem* p, int backward)
{
    const int64_t tile_elements = SUFFIX(direct_tile_rows)(p) * p->n_k + 1;  /* + 1: never malloc(0) */
    int failed = 0;
    #pragma omp parallel num_threads(p->threads)
    {
        SUFFIX(direct_workspace) w;
        w.scores = malloc(sizeof(real) * tile_elements);
        w.d_scores = backward ? malloc(sizeof(real) * tile_elements) : 0;
        const int ready = w.scores && (w.d_scores || !backward);
        if (!ready) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(dynamic, 1)
        for (int64_t h = 0; h < p->heads; ++h) {
            if (!ready) continue;
            if (backward)
                SUFFIX(direct_backward_head)(p, &w, h);
            else
                SUFFIX(direct_forward_head)(p, &w, h);
        }
        free(w.scores);
        free(w.d_scores);
    }
    return failed;
}

int SUFFIX(lrc_direct_forward)(const lrc_problem* p) { return SUFFIX(direct_run_heads)(p, 0); }

int SUFFIX(lrc_direct_backward)(const lrc_problem* p) { return SUFFIX(direct_run_heads)(p, 1); }
