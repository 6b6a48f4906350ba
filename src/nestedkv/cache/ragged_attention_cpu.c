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
 * once. Logits and accumulation are float32. Compiled with -ffast-math for the vectorised expf, so
 * no infinity is ever formed: a chunk none of whose keys a row may see leaves m = -FLT_MAX, l = 0.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CHUNK 256

/* keys begin..end of one stream's sequence (context, then tail) against its query rows.
 * part: per row, (d outputs, m, l). logits: scratch of rows * CHUNK floats. */
static void attend_chunk(const float *q, const float *context, const float *tail_rows, int64_t n_context,
                         const float *context_values, const float *tail_values, int64_t begin, int64_t end,
                         const int64_t *visible, int64_t rows, int64_t dim, float *logits, float *part) {
    const int64_t n = end - begin;
    for (int64_t j = 0; j < n; j++) {
        const int64_t i = begin + j;
        const float *key = i < n_context ? context + i * dim : tail_rows + (i - n_context) * dim;
        for (int64_t r = 0; r < rows; r++) {
            const float *query = q + r * dim;
            float dot = 0.f;
            for (int64_t t = 0; t < dim; t++) dot += query[t] * key[t];
            logits[r * n + j] = dot;
        }
    }
    for (int64_t r = 0; r < rows; r++) {
        float *row = logits + r * n, *out = part + r * (dim + 2), top = -FLT_MAX, sum = 0.f;
        const int64_t seen = visible[r] - begin < n ? (visible[r] - begin > 0 ? visible[r] - begin : 0) : n;
        for (int64_t j = 0; j < seen; j++) top = row[j] > top ? row[j] : top;
        for (int64_t j = 0; j < seen; j++) {
            row[j] = expf(row[j] - top);
            sum += row[j];
        }
        for (int64_t j = seen; j < n; j++) row[j] = 0.f;
        memset(out, 0, dim * sizeof(float));
        out[dim] = top;
        out[dim + 1] = sum;
    }
    for (int64_t j = 0; j < n; j++) {
        const int64_t i = begin + j;
        const float *value = i < n_context ? context_values + i * dim : tail_values + (i - n_context) * dim;
        for (int64_t r = 0; r < rows; r++) {
            const float weight = logits[r * n + j];
            float *out = part + r * (dim + 2);
            for (int64_t t = 0; t < dim; t++) out[t] += weight * value[t];
        }
    }
}

/* q: (S, rows, d), scaled; context_keys, context_values: (L, d); offsets: (S + 1,); tail_keys,
 * tail_values: (S, tail, d); out: (S, rows, d). Returns 0, or -1 when scratch memory ran out. */
int ragged_attention_cpu(const float *q, const float *context_keys, const float *context_values,
                         const int64_t *offsets, const float *tail_keys, const float *tail_values, float *out,
                         int64_t streams, int64_t rows, int64_t q_len, int64_t tail, int64_t dim, int threads) {
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
        float *logits = malloc(rows * CHUNK * sizeof(float));
        int64_t *visible = malloc(rows * sizeof(int64_t));
        if (!logits || !visible) failed = 1;
#pragma omp for schedule(dynamic)
        for (int64_t c = 0; c < chunks; c++) {
            if (!logits || !visible) continue;
            const int64_t s = owner[c], n_context = offsets[s + 1] - offsets[s];
            const int64_t begin = (c - first_chunk[s]) * CHUNK, length = n_context + tail;
            for (int64_t r = 0; r < rows; r++) visible[r] = n_context + tail - q_len + r % q_len + 1;
            attend_chunk(q + s * rows * dim, context_keys + offsets[s] * dim, tail_keys + s * tail * dim, n_context,
                         context_values + offsets[s] * dim, tail_values + s * tail * dim, begin,
                         begin + CHUNK < length ? begin + CHUNK : length, visible, rows, dim, logits,
                         parts + c * rows * (dim + 2));
        }
        free(logits);
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
