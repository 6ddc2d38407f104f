/* Monomial feature maps, their vector-Jacobian product, and the causal in-chunk polynomial, for
 * one element type: included by kernels.c once per type, with `real` and SUFFIX() defined.
 *
 * Features follow lrcompile.features.MonomialTable: feature 0 is 1, features 1..d are x itself,
 * and every feature t > d is feature parent[t] times x[last[t]] (parent[t] < t, of one degree
 * less). With coefficients c, feature t is c[t] times that monomial (the query side, phi).
 *
 * Rows are taken in tiles of TILE: every feature of a tile is then one contiguous product of two
 * rows that are still in L1, written once, so a map costs one pass over its output.
 *
 *   x     (rows, d)   row stride x_row, unit column stride
 *   out   (r, rows)   feature stride out_feature: feature-major, as the state products want it
 *   grad  (r, rows)   feature stride g_feature
 *   dx    (rows, d)   row stride dx_row
 */

/* Unscaled monomials 0..count-1 of one tile (count >= 1 + d) into m, feature stride m_feature. */
static void SUFFIX(monomials)(const real* x, int64_t x_row, int64_t d, int64_t width, int64_t count,
                              real* m, int64_t m_feature, const int32_t* parent, const int32_t* last)
{
    for (int64_t c = 0; c < width; ++c) m[c] = 1;
    for (int64_t c = 0; c < width; ++c)
        for (int64_t j = 0; j < d; ++j) m[(1 + j) * m_feature + c] = x[c * x_row + j];
    for (int64_t t = 1 + d; t < count; ++t) {
        const real* restrict p = m + parent[t] * m_feature;
        const real* restrict v = m + (1 + last[t]) * m_feature;
        real* restrict out = m + t * m_feature;
        #pragma omp simd
        for (int64_t c = 0; c < width; ++c) out[c] = p[c] * v[c];
    }
}

static int64_t SUFFIX(lower_rows)(int64_t d, int64_t r_lower)
{
    return r_lower > 1 + d ? r_lower : 1 + d; /* x itself is always needed */
}

/* All r features of one tile of width <= TILE. */
static void SUFFIX(features_tile)(const real* x, int64_t x_row, int64_t d, int64_t width, real* out,
                                  int64_t out_feature, int64_t r, int64_t r_lower, const int32_t* parent,
                                  const int32_t* last, const real* coefficients)
{
    /* the lower degrees (and x) first, unscaled: they are the parents of the top degree */
    const int64_t lower = SUFFIX(lower_rows)(d, r_lower);
    SUFFIX(monomials)(x, x_row, d, width, lower, out, out_feature, parent, last);
    for (int64_t t = lower; t < r; ++t) {
        const real* restrict p = out + parent[t] * out_feature;
        const real* restrict v = out + (1 + last[t]) * out_feature;
        real* restrict ot = out + t * out_feature;
        const real scale = coefficients ? coefficients[t] : (real)1;
        #pragma omp simd
        for (int64_t c = 0; c < width; ++c) ot[c] = scale * p[c] * v[c];
    }
    if (coefficients)
        for (int64_t t = 0; t < lower; ++t) {
            real* restrict ot = out + t * out_feature;
            #pragma omp simd
            for (int64_t c = 0; c < width; ++c) ot[c] *= coefficients[t];
        }
}

static int64_t SUFFIX(vjp_scratch)(int64_t d, int64_t r_lower)
{
    return TILE * (SUFFIX(lower_rows)(d, r_lower) + r_lower + d);
}

/* dx of one tile. Reverse mode through the recursion, top feature first: feature t =
 * m[parent] * x[last] gives dx[last] += G_t m[parent] and G_parent += G_t x[last]; a parent's G
 * is complete before it is reached because every child has a larger index. Only the lower
 * degrees need accumulators. scratch holds vjp_scratch(d, r_lower) elements. */
static void SUFFIX(vjp_tile)(const real* x, int64_t x_row, int64_t d, int64_t width, const real* grad,
                             int64_t g_feature, real* dx, int64_t dx_row, int64_t r, int64_t r_lower,
                             const int32_t* parent, const int32_t* last, const real* coefficients, real* scratch)
{
    const int64_t lower = SUFFIX(lower_rows)(d, r_lower);
    real* m = scratch;
    real* g_lower = m + TILE * lower;
    real* dxt = g_lower + TILE * r_lower;
    SUFFIX(monomials)(x, x_row, d, width, lower, m, TILE, parent, last);
    for (int64_t t = 0; t < r_lower; ++t) {
        const real scale = coefficients ? coefficients[t] : (real)1;
        for (int64_t c = 0; c < width; ++c) g_lower[t * TILE + c] = scale * grad[t * g_feature + c];
    }
    memset(dxt, 0, sizeof(real) * TILE * d);
    for (int64_t t = r - 1; t >= 1; --t) {
        const int64_t p = parent[t], j = last[t];
        const real* restrict mp = m + p * TILE;
        const real* restrict xj = m + (1 + j) * TILE;
        real* restrict dj = dxt + j * TILE;
        if (t >= r_lower) {
            const real* restrict gt = grad + t * g_feature;
            const real scale = coefficients ? coefficients[t] : (real)1;
            real* restrict gp = g_lower + p * TILE;
            #pragma omp simd
            for (int64_t c = 0; c < width; ++c) {
                const real g = scale * gt[c];
                dj[c] += g * mp[c];
                gp[c] += g * xj[c];
            }
        } else {
            const real* restrict gt = g_lower + t * TILE;
            #pragma omp simd
            for (int64_t c = 0; c < width; ++c) dj[c] += gt[c] * mp[c];
            if (p > 0) {
                real* restrict gp = g_lower + p * TILE;
                #pragma omp simd
                for (int64_t c = 0; c < width; ++c) gp[c] += gt[c] * xj[c];
            }
        }
    }
    for (int64_t c = 0; c < width; ++c)
        for (int64_t j = 0; j < d; ++j) dx[c * dx_row + j] = dxt[j * TILE + c];
}

/* One row of the causal in-chunk block, in place: x holds X = q' k'^T and becomes
 * A = P(X) * M, where the row sees keys 0..visible-1; with g (dL/dA), g becomes
 * dL/dX = dL/dA * M * P'(X) first. coefficients c_0..c_degree of P, Horner's rule. */
static void SUFFIX(block_row)(real* restrict x, real* restrict g, int64_t cols, int64_t visible,
                              const real* coefficients, int64_t degree)
{
    if (visible > cols) visible = cols;
    if (visible < 0) visible = 0;
    if (g) {
        #pragma omp simd
        for (int64_t j = 0; j < visible; ++j) {
            real slope = degree * coefficients[degree];
            for (int64_t m = degree - 1; m >= 1; --m) slope = slope * x[j] + m * coefficients[m];
            g[j] *= slope;
        }
        for (int64_t j = visible; j < cols; ++j) g[j] = 0;
    }
    #pragma omp simd
    for (int64_t j = 0; j < visible; ++j) {
        real value = coefficients[degree];
        for (int64_t m = degree - 1; m >= 0; --m) value = value * x[j] + coefficients[m];
        x[j] = value;
    }
    for (int64_t j = visible; j < cols; ++j) x[j] = 0;
}

/* ---- batched entry points (Python's FeatureMap and the in-chunk block of the torch sweep) ---- */

void SUFFIX(lrc_features)(const real* x, int64_t batch, int64_t rows, int64_t d, int64_t x_batch, int64_t x_row,
                          real* out, int64_t r, int64_t out_batch, int64_t out_feature, int64_t r_lower,
                          const int32_t* parent, const int32_t* last, const real* coefficients, int threads)
{
    const int64_t tiles = (rows + TILE - 1) / TILE;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t job = 0; job < batch * tiles; ++job) {
        const int64_t b = job / tiles, c0 = (job % tiles) * TILE;
        const int64_t width = rows - c0 < TILE ? rows - c0 : TILE;
        SUFFIX(features_tile)(x + b * x_batch + c0 * x_row, x_row, d, width, out + b * out_batch + c0,
                              out_feature, r, r_lower, parent, last, coefficients);
    }
}

int SUFFIX(lrc_features_vjp)(const real* x, int64_t batch, int64_t rows, int64_t d, int64_t x_batch, int64_t x_row,
                             const real* grad, int64_t r, int64_t g_batch, int64_t g_feature,
                             real* dx, int64_t dx_batch, int64_t dx_row, int64_t r_lower,
                             const int32_t* parent, const int32_t* last, const real* coefficients, int threads)
{
    const int64_t tiles = (rows + TILE - 1) / TILE;
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        real* scratch = malloc(sizeof(real) * SUFFIX(vjp_scratch)(d, r_lower));
        if (!scratch) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t job = 0; job < batch * tiles; ++job) {
            if (!scratch) continue;
            const int64_t b = job / tiles, c0 = (job % tiles) * TILE;
            const int64_t width = rows - c0 < TILE ? rows - c0 : TILE;
            SUFFIX(vjp_tile)(x + b * x_batch + c0 * x_row, x_row, d, width, grad + b * g_batch + c0, g_feature,
                             dx + b * dx_batch + c0 * dx_row, dx_row, r, r_lower, parent, last, coefficients, scratch);
        }
        free(scratch);
    }
    return failed; /* 1: no memory for the scratch tiles */
}

/* scores (batch, rows, cols) of position-major query rows: row i is position offset + i / groups
 * relative to the block's first key, and sees keys 0..offset + i / groups. */
void SUFFIX(lrc_causal_block)(real* scores, int64_t batch, int64_t rows, int64_t cols, int64_t s_batch,
                              int64_t s_row, real* grad, int64_t g_batch, int64_t g_row, int64_t offset,
                              int64_t groups, const real* coefficients, int64_t degree, int threads)
{
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t job = 0; job < batch * rows; ++job) {
        const int64_t b = job / rows, row = job % rows;
        SUFFIX(block_row)(scores + b * s_batch + row * s_row, grad ? grad + b * g_batch + row * g_row : 0, cols,
                          offset + row / groups + 1, coefficients, degree);
    }
}
