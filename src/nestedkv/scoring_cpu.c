/* Steps 1 to 3 of the NestedKV score (raw cosine anomalies at the three scales) in one pass per head.
 *
 * The C half of nestedkv.scoring_cpu; nestedkv.scoring holds the same steps as tensor functions (the
 * definition, and the path on other devices), and the tests hold this kernel to them. For every head:
 *   where angles are given, k_i's first r dims become k*cos_i - (k[perm]*sign)*sin_i  (undo_rotary)
 *   k_hat_i = k_i / max(|k_i|, eps)                                   (normalise_keys)
 *   global anchor: mean of all k_hat; block anchor: mean of k_hat over i's block [bounds[j], bounds[j+1]);
 *   window anchor: mean of k_hat over [max(0, i - window + 1), i]       (anchors)
 *   anomaly = -(k_hat_i . anchor) / max(|anchor|, eps)                  (cosine_anomaly)
 * written to out[head][scale][i] for scale = 0 global, 1 block, 2 window.
 *
 * The tensor path sums through one float32 prefix sum centred on the global mean; here the sums run in
 * double (a running window sum: add the newest key, drop the one that left), so the anchors are at least
 * as accurate. Heads are spread over threads; each thread keeps one head's normalised keys (n x d
 * floats) and its sums.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

static double norm(const double *a, int64_t d) {
    double sum = 0.0;
    for (int64_t t = 0; t < d; t++) sum += a[t] * a[t];
    return sqrt(sum);
}

/* -(k_hat . anchor) / max(|anchor|, eps) for the anchor sum / count, from dot = k_hat . sum and |sum|. */
static float anomaly(double dot, double sum_norm, double count, double eps) {
    return (float)(-(dot / count) / fmax(sum_norm / count, eps));
}

/* The rotation of one head's keys to undo: angles cos, sin (n, r) and the signed permutation (perm, sign)
 * of the rotated dims; r = 0 for none. */
typedef struct {
    const float *cos, *sin, *sign;
    const int64_t *perm;
    int64_t r;
} rotation;

/* One head: keys (n, d) -> out (3, n). k_hat: scratch of n * d floats; sums: scratch of 3 * d doubles. */
static void score_head(const float *keys, rotation rot, const int64_t *bounds, int64_t n_bounds, float *out,
                       int64_t n, int64_t d, int64_t window, double eps, float *k_hat, double *sums) {
    double *global = sums, *block = sums + d, *recent = sums + 2 * d;
    for (int64_t t = 0; t < d; t++) global[t] = 0.0, recent[t] = 0.0;
    for (int64_t i = 0; i < n; i++) {
        const float *k = keys + i * d;
        float *h = k_hat + i * d;
        for (int64_t t = 0, at = i * rot.r; t < rot.r; t++, at++)
            h[t] = k[t] * rot.cos[at] - k[rot.perm[t]] * rot.sign[t] * rot.sin[at];
        for (int64_t t = rot.r; t < d; t++) h[t] = k[t];
        float squares = 0.f;
        for (int64_t t = 0; t < d; t++) squares += h[t] * h[t];
        float length = fmaxf(sqrtf(squares), (float)eps);
        for (int64_t t = 0; t < d; t++) h[t] /= length, global[t] += h[t];
    }
    double global_norm = norm(global, d);
    for (int64_t j = 0; j + 1 < n_bounds; j++) {
        int64_t first = bounds[j], end = bounds[j + 1];
        for (int64_t t = 0; t < d; t++) block[t] = 0.0;
        for (int64_t i = first; i < end; i++)
            for (int64_t t = 0; t < d; t++) block[t] += k_hat[i * d + t];
        double block_norm = norm(block, d);
        for (int64_t i = first; i < end; i++) {
            /* The window gains key i and loses key i - window; all four sums in one pass over d. */
            const float *h = k_hat + i * d, *left = i >= window ? k_hat + (i - window) * d : NULL;
            double to_global = 0.0, to_block = 0.0, to_window = 0.0, window_squares = 0.0;
            for (int64_t t = 0; t < d; t++) {
                double sum = recent[t] + h[t] - (left ? left[t] : 0.f);
                recent[t] = sum;
                to_global += h[t] * global[t], to_block += h[t] * block[t];
                to_window += h[t] * sum, window_squares += sum * sum;
            }
            double count = i + 1 < window ? i + 1 : window;
            out[i] = anomaly(to_global, global_norm, (double)n, eps);
            out[n + i] = anomaly(to_block, block_norm, (double)(end - first), eps);
            out[2 * n + i] = anomaly(to_window, sqrt(window_squares), count, eps);
        }
    }
}

/* keys (heads, n, d) float32; bounds: n_bounds block edges from 0 to n; out (heads, 3, n) float32.
 * cos, sin (heads / heads_per_row, n, r), perm (r,) int64, sign (r,): the rotation to undo before scoring,
 * heads h to h + heads_per_row - 1 reading one row of angles; all NULL and r = 0 for none.
 * Returns 0, or 1 if scratch memory could not be allocated. */
int nestedkv_anomalies_cpu(const float *keys, const int64_t *bounds, float *out, int64_t heads, int64_t n,
                           int64_t d, int64_t n_bounds, int64_t window, double eps, const float *cos,
                           const float *sin, const int64_t *perm, const float *sign, int64_t r,
                           int64_t heads_per_row, int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *k_hat = malloc(sizeof(float) * n * d);
        double *sums = malloc(sizeof(double) * 3 * d);
        /* Every thread must reach the loop (a worksharing construct); one without scratch fails its heads. */
#pragma omp for schedule(dynamic, 1)
        for (int64_t h = 0; h < heads; h++) {
            if (k_hat == NULL || sums == NULL)
                failed = 1;
            else {
                int64_t row = r ? h / heads_per_row * n * r : 0;
                rotation rot = {r ? cos + row : NULL, r ? sin + row : NULL, sign, perm, r};
                score_head(keys + h * n * d, rot, bounds, n_bounds, out + h * 3 * n, n, d, window, eps, k_hat, sums);
            }
        }
        free(k_hat);
        free(sums);
    }
    return failed;
}
