/* CPU kernels of the factored attention, float32 and float64: the monomial feature maps, their
 * vector-Jacobian product, and the polynomial of the causal in-chunk block.
 *
 * Built by lrcompile/native.py on first use and called through ctypes; the torch evaluations in
 * lrcompile/features.py and lrcompile/factored.py compute the same values and are the
 * reference in the tests.
 *
 * Features follow lrcompile.features.MonomialTable: feature 0 is 1, features 1..d are x itself,
 * and every feature t > d is feature parent[t] times x[last[t]] (parent[t] < t, of one degree
 * less). With coefficients c, feature t is c[t] times that monomial (the query side phi).
 *
 * Rows are taken in tiles of TILE: every feature of a tile is then one contiguous product of two
 * rows that are still in L1, written once, so a map costs one pass over its output.
 *
 *   x     (batch, rows, d)   strides (x_batch, x_row, 1)
 *   out   (batch, r, rows)   strides (out_batch, out_feature, 1)    feature-major, as the matrix
 *   grad  (batch, r, rows)   strides (g_batch, g_feature, 1)        products of the attention want
 *   dx    (batch, rows, d)   strides (dx_batch, dx_row, 1)
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TILE 64

#define DEFINE_KERNELS(T, SUFFIX)                                                                   \
                                                                                                    \
/* Unscaled monomials of the tile into m (rows 0..count-1, row stride m_feature); x is read     */ \
/* transposed, so the rows 1..d of m are the tile's x, one variable per row.                    */ \
static void monomials_##SUFFIX(const T* x, int64_t x_row, int64_t d, int64_t width, int64_t count, \
                               T* m, int64_t m_feature, const int32_t* parent, const int32_t* last) \
{                                                                                                   \
    for (int64_t c = 0; c < width; ++c) m[c] = 1;                                                   \
    if (count > 1)                                                                                  \
        for (int64_t c = 0; c < width; ++c)                                                         \
            for (int64_t j = 0; j < d; ++j) m[(1 + j) * m_feature + c] = x[c * x_row + j];          \
    for (int64_t t = 1 + d; t < count; ++t) {                                                       \
        const T* restrict p = m + parent[t] * m_feature;                                            \
        const T* restrict v = m + (1 + last[t]) * m_feature;                                        \
        T* restrict out = m + t * m_feature;                                                        \
        _Pragma("omp simd")                                                                         \
        for (int64_t c = 0; c < width; ++c) out[c] = p[c] * v[c];                                   \
    }                                                                                               \
}                                                                                                   \
                                                                                                    \
void lrc_features_##SUFFIX(const T* x, int64_t batch, int64_t rows, int64_t d,                      \
                           int64_t x_batch, int64_t x_row,                                         \
                           T* out, int64_t r, int64_t out_batch, int64_t out_feature,              \
                           int64_t r_lower, const int32_t* parent, const int32_t* last,            \
                           const T* coefficients, int threads)                                     \
{                                                                                                   \
    const int64_t tiles = (rows + TILE - 1) / TILE;                                                 \
    const int64_t lower = r_lower > 1 + d ? r_lower : 1 + d;                                        \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                               \
    for (int64_t job = 0; job < batch * tiles; ++job) {                                             \
        const int64_t b = job / tiles, c0 = (job % tiles) * TILE;                                   \
        const int64_t width = rows - c0 < TILE ? rows - c0 : TILE;                                  \
        T* o = out + b * out_batch + c0;                                                            \
        /* the lower degrees (and x) first, unscaled: they are the parents of the top degree */    \
        monomials_##SUFFIX(x + b * x_batch + c0 * x_row, x_row, d, width, lower,                    \
                           o, out_feature, parent, last);                                           \
        for (int64_t t = lower; t < r; ++t) {                                                       \
            const T* restrict p = o + parent[t] * out_feature;                                      \
            const T* restrict v = o + (1 + last[t]) * out_feature;                                  \
            T* restrict ot = o + t * out_feature;                                                   \
            const T scale = coefficients ? coefficients[t] : (T)1;                                  \
            _Pragma("omp simd")                                                                     \
            for (int64_t c = 0; c < width; ++c) ot[c] = scale * p[c] * v[c];                        \
        }                                                                                           \
        if (coefficients)                                                                           \
            for (int64_t t = 0; t < lower; ++t) {                                                   \
                T* restrict ot = o + t * out_feature;                                               \
                _Pragma("omp simd")                                                                 \
                for (int64_t c = 0; c < width; ++c) ot[c] *= coefficients[t];                       \
            }                                                                                       \
    }                                                                                               \
}                                                                                                   \
                                                                                                    \
/* Reverse mode through the recursion, top feature first: feature t = m[parent] * x[last] gives  */ \
/* dx[last] += G_t m[parent] and G_parent += G_t x[last]; a parent's G is complete before it is  */ \
/* reached because every child has a larger index. Only the lower degrees need accumulators.    */ \
int lrc_features_vjp_##SUFFIX(const T* x, int64_t batch, int64_t rows, int64_t d,                  \
                               int64_t x_batch, int64_t x_row,                                     \
                               const T* grad, int64_t r, int64_t g_batch, int64_t g_feature,       \
                               T* dx, int64_t dx_batch, int64_t dx_row,                            \
                               int64_t r_lower, const int32_t* parent, const int32_t* last,        \
                               const T* coefficients, int threads)                                 \
{                                                                                                   \
    const int64_t tiles = (rows + TILE - 1) / TILE;                                                 \
    const int64_t lower_rows = r_lower > 1 + d ? r_lower : 1 + d; /* x itself is always needed */  \
    int failed = 0;                                                                                 \
    _Pragma("omp parallel num_threads(threads)")                                                    \
    {                                                                                               \
        T* m = malloc(sizeof(T) * TILE * (lower_rows + r_lower + d));                               \
        T* g_lower = m + TILE * lower_rows;                                                         \
        T* dxt = g_lower + TILE * r_lower;                                                          \
        if (!m) {                                                                                   \
            _Pragma("omp atomic write")                                                             \
            failed = 1;                                                                             \
        }                                                                                           \
        _Pragma("omp for schedule(static)")                                                         \
        for (int64_t job = 0; job < batch * tiles; ++job) {                                         \
            if (!m) continue;                                                                       \
            const int64_t b = job / tiles, c0 = (job % tiles) * TILE;                               \
            const int64_t width = rows - c0 < TILE ? rows - c0 : TILE;                              \
            const T* gb = grad + b * g_batch + c0;                                                  \
            monomials_##SUFFIX(x + b * x_batch + c0 * x_row, x_row, d, width, lower_rows,           \
                               m, TILE, parent, last);                                              \
            for (int64_t t = 0; t < r_lower; ++t) {                                                 \
                const T scale = coefficients ? coefficients[t] : (T)1;                              \
                for (int64_t c = 0; c < width; ++c) g_lower[t * TILE + c] = scale * gb[t * g_feature + c]; \
            }                                                                                       \
            memset(dxt, 0, sizeof(T) * TILE * d);                                                   \
            for (int64_t t = r - 1; t >= 1; --t) {                                                  \
                const int64_t p = parent[t], j = last[t];                                           \
                const T* restrict mp = m + p * TILE;                                                \
                const T* restrict xj = m + (1 + j) * TILE;                                          \
                T* restrict dj = dxt + j * TILE;                                                    \
                if (t >= r_lower) {                                                                 \
                    const T* restrict gt = gb + t * g_feature;                                      \
                    const T scale = coefficients ? coefficients[t] : (T)1;                          \
                    T* restrict gp = g_lower + p * TILE;                                            \
                    _Pragma("omp simd")                                                             \
                    for (int64_t c = 0; c < width; ++c) {                                           \
                        const T g = scale * gt[c];                                                  \
                        dj[c] += g * mp[c];                                                         \
                        gp[c] += g * xj[c];                                                         \
                    }                                                                               \
                } else {                                                                            \
                    const T* restrict gt = g_lower + t * TILE;                                      \
                    _Pragma("omp simd")                                                             \
                    for (int64_t c = 0; c < width; ++c) dj[c] += gt[c] * mp[c];                     \
                    if (p > 0) {                                                                    \
                        T* restrict gp = g_lower + p * TILE;                                        \
                        _Pragma("omp simd")                                                         \
                        for (int64_t c = 0; c < width; ++c) gp[c] += gt[c] * xj[c];                 \
                    }                                                                               \
                }                                                                                   \
            }                                                                                       \
            T* db = dx + b * dx_batch + c0 * dx_row;                                                \
            for (int64_t c = 0; c < width; ++c)                                                     \
                for (int64_t j = 0; j < d; ++j) db[c * dx_row + j] = dxt[j * TILE + c];             \
        }                                                                                           \
        free(m);                                                                                    \
    }                                                                                               \
    return failed; /* 1: no memory for the scratch tiles */                                       \
}

DEFINE_KERNELS(float, f32)
DEFINE_KERNELS(double, f64)

/* The in-chunk block of causal attention, in place. scores (batch, rows, cols) holds X = q' k'^T
 * for query rows that are position-major (row rho is position offset + rho / groups relative to
 * key 0 of the block) and becomes A = P(X) * M, M[rho, j] = [offset + rho / groups >= j].
 * With grad (same layout) holding dL/dA, grad becomes dL/dX = dL/dA * M * P'(X) first.
 * coefficients c_0..c_degree of P, Horner's rule for P and P'.
 */
#define DEFINE_BLOCK(T, SUFFIX)                                                                     \
void lrc_causal_block_##SUFFIX(T* scores, int64_t batch, int64_t rows, int64_t cols,                \
                               int64_t s_batch, int64_t s_row, T* grad, int64_t g_batch,           \
                               int64_t g_row, int64_t offset, int64_t groups,                      \
                               const T* coefficients, int64_t degree, int threads)                 \
{                                                                                                   \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                               \
    for (int64_t job = 0; job < batch * rows; ++job) {                                              \
        const int64_t b = job / rows, row = job % rows;                                             \
        T* restrict x = scores + b * s_batch + row * s_row;                                         \
        T* restrict g = grad ? grad + b * g_batch + row * g_row : 0;                                \
        int64_t visible = offset + row / groups + 1; /* keys 0..visible-1 are seen */               \
        if (visible > cols) visible = cols;                                                         \
        if (visible < 0) visible = 0;                                                               \
        if (g) {                                                                                    \
            _Pragma("omp simd")                                                                     \
            for (int64_t j = 0; j < visible; ++j) {                                                 \
                T slope = degree * coefficients[degree];                                            \
                for (int64_t m = degree - 1; m >= 1; --m) slope = slope * x[j] + m * coefficients[m]; \
                g[j] *= slope;                                                                      \
            }                                                                                       \
            for (int64_t j = visible; j < cols; ++j) g[j] = 0;                                      \
        }                                                                                           \
        _Pragma("omp simd")                                                                         \
        for (int64_t j = 0; j < visible; ++j) {                                                     \
            T value = coefficients[degree];                                                         \
            for (int64_t m = degree - 1; m >= 0; --m) value = value * x[j] + coefficients[m];       \
            x[j] = value;                                                                           \
        }                                                                                           \
        for (int64_t j = visible; j < cols; ++j) x[j] = 0;                                          \
    }                                                                                               \
}

DEFINE_BLOCK(float, f32)
DEFINE_BLOCK(double, f64)
