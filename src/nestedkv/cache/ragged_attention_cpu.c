/* Attention over a ragged layer on the CPU, reading every stream's packed keys and values in place.
 *
 * The C half of nestedkv.cache.cpu_kernel: one call serves every stream (batch row x KV head) of a
 * layer. A stream's keys are its packed context rows offsets[s]..offsets[s+1] of the (L, d) buffers,
 * followed by its dense tail rows (s * tail)..(s * tail + tail) of the (S * tail, d) buffers. Query row
 * r of a stream (query head r / q_len of its group, new token t = r % q_len) sees the whole context and
 * the tail causally: tail rows 0..tail - q_len + t.
 *
 * Split-KV (as FlashDecoding does): a stream's keys are cut into chunks of CHUNK keys, chunks are
 * spread over threads, each chunk leaves a partial softmax (its max logit m, its exp-sum l and its
 * unnormalised output), and the partials of a stream are merged by rescaling to the largest m. Two
 * threads then share the work whatever the number of streams, and every byte of the cache is read
 * once. A call with many query rows per stream (a multi-token feed) works in register tiles of rows and
 * keys, a decoding step (a few rows) row by row. Keys and values are stored in float32 or bfloat16 (a
 * chunk's rows are then widened into float32 scratch first, exactly: bfloat16 is float32's upper half, and
 * the cache is read at half the bytes). Logits and accumulation are float32. Compiled with
 * -ffast-math for the vectorised expf, so no infinity is ever formed: a chunk none of whose keys a row
 * may see leaves m = -FLT_MAX, l = 0.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CHUNK 256
/* From this many query rows per stream on (a multi-token feed, not a decoding step), a chunk's logits
 * and outputs are computed in register tiles: the tiles' set-up pays off only when many rows share it. */
#define MANY_ROWS 8

/* 8 float lanes, loadable from any float address: GCC's and Clang's vector extension, compiled to the
 * widest vector instructions of -march (scalar code where there are none). */
typedef float lanes __attribute__((vector_size(32), aligned(4)));

/* logits[r * n + j] = q_r . keys[j] for keys j = first..n - 1, one sum across dim per (row, key), four keys
 * at a time. */
static void logits_by_row(const float *q, const float *const *keys, int64_t first, int64_t n, int64_t rows,
                          int64_t dim, float *logits) {
    for (int64_t r = 0; r < rows; r++) {
        const float *query = q + r * dim;
        int64_t j = first;
        for (; j + 4 <= n; j += 4) {
            const float *k0 = keys[j], *k1 = keys[j + 1], *k2 = keys[j + 2], *k3 = keys[j + 3];
            float d0 = 0.f, d1 = 0.f, d2 = 0.f, d3 = 0.f;
            for (int64_t t = 0; t < dim; t++)
                d0 += query[t] * k0[t], d1 += query[t] * k1[t], d2 += query[t] * k2[t], d3 += query[t] * k3[t];
            float *out = logits + r * n + j;
            out[0] = d0, out[1] = d1, out[2] = d2, out[3] = d3;
        }
        for (; j < n; j++) {
            float dot = 0.f;
            for (int64_t t = 0; t < dim; t++) dot += query[t] * keys[j][t];
            logits[r * n + j] = dot;
        }
    }
}

/* The same logits in tiles of 4 rows x 8 keys: the 8 keys are first transposed into block (dim x 8), so
 * every step is one multiply-add of 8 lanes per row and no sum runs across lanes. */
static void logits_by_tile(const float *q, const float *const *keys, int64_t n, int64_t rows, int64_t dim,
                           float *logits, float *block) {
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        for (int64_t t = 0; t < dim; t++)
            for (int64_t k = 0; k < 8; k++) block[t * 8 + k] = keys[j + k][t];
        int64_t r = 0;
        for (; r + 4 <= rows; r += 4) {
            const float *q0 = q + r * dim, *q1 = q0 + dim, *q2 = q1 + dim, *q3 = q2 + dim;
            lanes a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
            for (int64_t t = 0; t < dim; t++) {
                const lanes k = *(const lanes *)(block + t * 8);
                a0 += q0[t] * k, a1 += q1[t] * k, a2 += q2[t] * k, a3 += q3[t] * k;
            }
            *(lanes *)(logits + r * n + j) = a0, *(lanes *)(logits + (r + 1) * n + j) = a1;
            *(lanes *)(logits + (r + 2) * n + j) = a2, *(lanes *)(logits + (r + 3) * n + j) = a3;
        }
        for (; r < rows; r++) {
            lanes a = {0};
            for (int64_t t = 0; t < dim; t++) a += q[r * dim + t] * *(const lanes *)(block + t * 8);
            *(lanes *)(logits + r * n + j) = a;
        }
    }
    logits_by_row(q, keys, j, n, rows, dim, logits); /* the last n % 8 keys */
}

/* out_r = sum_j weights[r * n + j] * values[j] (out_r at part + r * (dim + 2)): the first paired_rows rows in
 * pairs over tiles of 32 components when dim allows (the 8 accumulators stay in registers, each value loaded
 * once per pair), the others one row at a time. */
static void weighted_values(const float *weights, const float *const *values, int64_t n, int64_t rows,
                            int64_t dim, int64_t paired_rows, float *part) {
    int64_t r = 0;
    if (dim % 32 == 0)
        for (; r + 2 <= paired_rows; r += 2) {
            const float *w0 = weights + r * n, *w1 = w0 + n;
            float *o0 = part + r * (dim + 2), *o1 = o0 + dim + 2;
            for (int64_t t = 0; t < dim; t += 32) {
                lanes a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
                for (int64_t j = 0; j < n; j++) {
                    const float *v = values[j] + t;
                    const lanes v0 = *(const lanes *)v, v1 = *(const lanes *)(v + 8), v2 = *(const lanes *)(v + 16),
                                v3 = *(const lanes *)(v + 24);
                    a0 += w0[j] * v0, a1 += w0[j] * v1, a2 += w0[j] * v2, a3 += w0[j] * v3;
                    b0 += w1[j] * v0, b1 += w1[j] * v1, b2 += w1[j] * v2, b3 += w1[j] * v3;
                }
                *(lanes *)(o0 + t) = a0, *(lanes *)(o0 + t + 8) = a1;
                *(lanes *)(o0 + t + 16) = a2, *(lanes *)(o0 + t + 24) = a3;
                *(lanes *)(o1 + t) = b0, *(lanes *)(o1 + t + 8) = b1;
                *(lanes *)(o1 + t + 16) = b2, *(lanes *)(o1 + t + 24) = b3;
            }
        }
    for (; r < rows; r++) {
        float *out = part + r * (dim + 2);
        memset(out, 0, dim * sizeof(float));
        for (int64_t j = 0; j < n; j++)
            for (int64_t t = 0; t < dim; t++) out[t] += weights[r * n + j] * values[j][t];
    }
}

/* Row i of a sequence whose first n_context rows lie at context and the others at tail, as float32: the row
 * itself, or (bfloat16 storage) its exact float32 copy written to converted. */
static const float *row_of(const void *context, const void *tail, int64_t n_context, int64_t i, int64_t dim,
                           int bf16, float *converted) {
    const int64_t offset = (i < n_context ? i : i - n_context) * dim;
    const void *base = i < n_context ? context : tail;
    if (!bf16) return (const float *)base + offset;
    const uint16_t *source = (const uint16_t *)base + offset;
    for (int64_t t = 0; t < dim; t++) {
        const uint32_t bits = (uint32_t)source[t] << 16; /* bfloat16 is float32's upper half */
        memcpy(converted + t, &bits, sizeof(float));
    }
    return converted;
}

/* keys begin..end of one stream's sequence (context, then tail) against its query rows, stored in float32 or
 * (bf16) bfloat16. part: per row, (d outputs, m, l). logits: scratch of rows * CHUNK floats; block: of
 * CHUNK * d floats; converted: of 2 * CHUNK * d floats where bf16 (the chunk's keys and values in float32). */
static void attend_chunk(const float *q, const void *context, const void *tail_rows, int64_t n_context,
                         const void *context_values, const void *tail_values, int64_t begin, int64_t end,
                         const int64_t *visible, int64_t rows, int64_t dim, int bf16, float *logits, float *block,
                         float *converted, float *part) {
    const int64_t n = end - begin;
    const float *keys[CHUNK], *values[CHUNK];
    for (int64_t j = 0; j < n; j++) {
        keys[j] = row_of(context, tail_rows, n_context, begin + j, dim, bf16, converted + j * dim);
        values[j] = row_of(context_values, tail_values, n_context, begin + j, dim, bf16,
                           converted + (CHUNK + j) * dim);
    }
    const int many = rows >= MANY_ROWS;
    if (many)
        logits_by_tile(q, keys, n, rows, dim, logits, block);
    else
        logits_by_row(q, keys, 0, n, rows, dim, logits);
    for (int64_t r = 0; r < rows; r++) {
        float *row = logits + r * n, *out = part + r * (dim + 2), top = -FLT_MAX, sum = 0.f;
        const int64_t seen = visible[r] - begin < n ? (visible[r] - begin > 0 ? visible[r] - begin : 0) : n;
        for (int64_t j = 0; j < seen; j++) top = row[j] > top ? row[j] : top;
        for (int64_t j = 0; j < seen; j++) {
            row[j] = expf(row[j] - top);
            sum += row[j];
        }
        for (int64_t j = seen; j < n; j++) row[j] = 0.f;
        out[dim] = top;
        out[dim + 1] = sum;
    }
    weighted_values(logits, values, n, rows, dim, many ? rows : 0, part);
}

/* q: (S, rows, d) float32, scaled; context_keys, context_values: (L, d); offsets: (S + 1,); tail_keys,
 * tail_values: (S, tail, d), all four float32, or bfloat16 where bf16 is set; out: (S, rows, d) float32.
 * Returns 0, or -1 when scratch memory ran out. */
int ragged_attention_cpu(const float *q, const void *context_keys, const void *context_values,
                         const int64_t *offsets, const void *tail_keys, const void *tail_values, float *out,
                         int64_t streams, int64_t rows, int64_t q_len, int64_t tail, int64_t dim, int bf16,
                         int threads) {
    const int64_t item = bf16 ? 2 : 4; /* bytes per stored element */
    int64_t *first_chunk = malloc((streams + 1) * sizeof(int64_t));
    if (!first_chunk) return -1;
    first_chunk[0] = 0;
    for (int64_t s = 0; s < streams; s++)
        first_chunk[s + 1] = first_chunk[s] + (offsets[s + 1] - offsets[s] + tail + CHUNK - 1) / CHUNK;
    const int64_t chunks = first_chunk[streams];
    float *parts = malloc((chunks + 1) * rows * (dim + 2) * sizeof(float));
    int64_t *owner = malloc((chunks + 1) * sizeof(int64_t));
    if (!parts || !owner) {
        free(first_chunk), free(parts), free(owner);
        return -1;
    }
    for (int64_t s = 0; s < streams; s++)
        for (int64_t c = first_chunk[s]; c < first_chunk[s + 1]; c++) owner[c] = s;
    int failed = 0;
    /* One parallel region: the chunks, then (after the implicit barrier of the first loop) the merge of
     * each stream's partials; waking the threads twice costs as much as a short layer's work. */
#pragma omp parallel num_threads(threads)
    {
        /* the transposed keys of the register tiles: a decoding step (a few rows) needs none */
        const int tiled = rows >= MANY_ROWS;
        float *logits = malloc(rows * CHUNK * sizeof(float));
        float *block = tiled ? malloc(CHUNK * dim * sizeof(float)) : NULL;
        int64_t *visible = malloc(rows * sizeof(int64_t));
        float *converted = bf16 ? malloc(2 * CHUNK * dim * sizeof(float)) : NULL;
        const int scratch = logits && visible && (block || !tiled) && (converted || !bf16);
        if (!scratch) failed = 1;
#pragma omp for schedule(dynamic)
        for (int64_t c = 0; c < chunks; c++) {
            if (!scratch) continue;
            const int64_t s = owner[c], n_context = offsets[s + 1] - offsets[s];
            const int64_t begin = (c - first_chunk[s]) * CHUNK, length = n_context + tail;
            for (int64_t r = 0; r < rows; r++) visible[r] = n_context + tail - q_len + r % q_len + 1;
            const int64_t context_at = offsets[s] * dim * item, tail_at = s * tail * dim * item;
            attend_chunk(q + s * rows * dim, (const char *)context_keys + context_at, (const char *)tail_keys + tail_at,
                         n_context, (const char *)context_values + context_at, (const char *)tail_values + tail_at,
                         begin, begin + CHUNK < length ? begin + CHUNK : length, visible, rows, dim, bf16, logits,
                         block, converted, parts + c * rows * (dim + 2));
        }
        free(logits);
        free(converted);
        free(block);
        free(visible);
#pragma omp for
        for (int64_t s = 0; s < streams; s++) {
            if (failed) continue;
            for (int64_t r = 0; r < rows; r++) {
                float *result = out + (s * rows + r) * dim, top = -FLT_MAX, sum = 0.f;
                memset(result, 0, dim * sizeof(float));
                for (int64_t c = first_chunk[s]; c < first_chunk[s + 1]; c++) {
                    const float m = parts[(c * rows + r) * (dim + 2) + dim];
                    top = m > top ? m : top;
                }
                for (int64_t c = first_chunk[s]; c < first_chunk[s + 1]; c++) {
                    const float *part = parts + (c * rows + r) * (dim + 2);
                    const float scale = part[dim + 1] > 0.f ? expf(part[dim] - top) : 0.f;
                    sum += part[dim + 1] * scale;
                    for (int64_t t = 0; t < dim; t++) result[t] += part[t] * scale;
                }
                for (int64_t t = 0; t < dim; t++) result[t] /= sum; /* sum >= 1: a row sees its own token */
            }
        }
    }
    free(first_chunk), free(parts), free(owner);
    return failed ? -1 : 0;
}
