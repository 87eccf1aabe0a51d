/* gpt.c: a small GPT-2-style transformer in C99, one forward and one backward, for the
 * outside-program protocol of the conformance suite.
 *
 *     ./gpt CASE OUT
 *
 * CASE is a folder written by `python -m tools.layerdiff --export-case CASE`:
 *     checkpoint.safetensors   weights under the canonical (Hugging Face GPT-2) names, metadata
 *                              "config" = the ModelConfig as JSON
 *     ids.npy, targets.npy     the batch, int64 (B, T); targets equal to pad_id are ignored
 * OUT is the dump this program writes (safetensors): every tap, "loss", grad.<tap> and
 * grad.<parameter>, in the case's dtype (float32 or float64, chosen at run time).
 *
 * What it implements: pre-LN blocks, GELU (tanh approximation or exact erf), biases everywhere,
 * the output projection tied to the token embedding, one prediction head, cross-entropy with a
 * temperature, 'standard' or 'flash' attention (the same function; flash has no att/probs taps).
 * Anything else exits with status 3 and one line naming the field.
 *
 * Exit status: 0 dump written; 2 bad input (usage, unreadable or malformed file); 3 configuration
 * not supported.
 *
 * Files: this one holds the file formats (a tiny JSON scanner, .npy and safetensors I/O) and
 * main(); model.h holds the model, included twice: once with real = float, once with double.
 *
 * Planted bugs, for watching the debugger find them (make BUG=NAME):
 *     LN_BACKWARD_NO_MEAN   layer-norm backward without its mean term
 *     WTE_GRAD_TRANSPOSED   the output projection writes its wte gradient at [c][v] instead of [v][c]
 *     TIED_GRAD_ASSIGNED    the embedding backward assigns (=) into the tied wte gradient instead of +=
 */
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LN_BACKWARD_NO_MEAN 1
#define WTE_GRAD_TRANSPOSED 2
#define TIED_GRAD_ASSIGNED 3
#ifndef BUG
#define BUG 0
#endif

#define EXIT_BAD_INPUT 2
#define EXIT_UNSUPPORTED 3

static void die(int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("gpt: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(code);
}

/* ---- allocations: every block is remembered, free_all() releases them (valgrind-clean) ---- */

static void **allocs;
static long n_allocs, cap_allocs;

static void *xcalloc(size_t n, size_t size) {
    void *p = calloc(n ? n : 1, size);
    if (!p) die(EXIT_BAD_INPUT, "out of memory allocating %zu x %zu bytes", n, size);
    if (n_allocs == cap_allocs) {
        cap_allocs = cap_allocs ? 2 * cap_allocs : 256;
        void **grown = realloc(allocs, (size_t)cap_allocs * sizeof *allocs);
        if (!grown) die(EXIT_BAD_INPUT, "out of memory");
        allocs = grown;
    }
    allocs[n_allocs++] = p;
    return p;
}

static void free_all(void) {
    for (long i = 0; i < n_allocs; i++) free(allocs[i]);
    free(allocs);
    allocs = NULL;
    n_allocs = cap_allocs = 0;
}

static unsigned char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) die(EXIT_BAD_INPUT, "cannot open %s: %s", path, strerror(errno));
    if (fseek(f, 0, SEEK_END) != 0) die(EXIT_BAD_INPUT, "cannot seek in %s", path);
    long n = ftell(f);
    if (n < 0) die(EXIT_BAD_INPUT, "cannot size %s", path);
    rewind(f);
    unsigned char *buf = xcalloc((size_t)n + 1, 1);    /* +1: a NUL after text */
    if (fread(buf, 1, (size_t)n, f) != (size_t)n) die(EXIT_BAD_INPUT, "short read on %s", path);
    fclose(f);
    *len = (size_t)n;
    return buf;
}

/* ---- a tiny JSON scanner: enough for a safetensors header and a ModelConfig ---- */

typedef struct {
    const char *s, *end;
    const char *what;     /* for error messages */
} Json;

static void j_ws(Json *j) {
    while (j->s < j->end && isspace((unsigned char)*j->s)) j->s++;
}

static int j_peek(Json *j) {
    j_ws(j);
    return j->s < j->end ? (unsigned char)*j->s : -1;
}

static void j_expect(Json *j, char c) {
    if (j_peek(j) != (unsigned char)c)
        die(EXIT_BAD_INPUT, "%s: malformed JSON, expected '%c' at offset %ld", j->what, c, (long)(j->end - j->s));
    j->s++;
}

/* a string, unescaped into a new NUL-terminated buffer (\uXXXX outside ASCII becomes '?') */
static char *j_string(Json *j) {
    j_expect(j, '"');
    char *out = xcalloc((size_t)(j->end - j->s) + 1, 1), *o = out;
    while (j->s < j->end && *j->s != '"') {
        char c = *j->s++;
        if (c == '\\') {
            if (j->s >= j->end) break;
            c = *j->s++;
            switch (c) {
                case 'n': c = '\n'; break;
                case 't': c = '\t'; break;
                case 'r': c = '\r'; break;
                case 'b': c = '\b'; break;
                case 'f': c = '\f'; break;
                case 'u': {
                    if (j->end - j->s < 4) die(EXIT_BAD_INPUT, "%s: truncated \\u escape", j->what);
                    char hex[5] = {j->s[0], j->s[1], j->s[2], j->s[3], 0};
                    long u = strtol(hex, NULL, 16);
                    c = (u > 0 && u < 128) ? (char)u : '?';
                    j->s += 4;
                    break;
                }
                default: break;  /* \" \\ \/ stand for themselves */
            }
        }
        *o++ = c;
    }
    j_expect(j, '"');
    return out;
}

static double j_number(Json *j) {
    j_ws(j);
    char *stop;
    double v = strtod(j->s, &stop);
    if (stop == j->s || stop > j->end) die(EXIT_BAD_INPUT, "%s: malformed JSON number", j->what);
    j->s = stop;
    return v;
}

static int j_literal(Json *j, const char *word) {
    size_t n = strlen(word);
    j_ws(j);
    if ((size_t)(j->end - j->s) >= n && strncmp(j->s, word, n) == 0) {
        j->s += n;
        return 1;
    }
    return 0;
}

static void j_skip(Json *j);

/* walks an object: call with *started = 0; returns 1 while there is another member (its key in *key) */
static int j_member(Json *j, int *started, char **key) {
    if (!*started) {
        j_expect(j, '{');
        *started = 1;
        if (j_peek(j) == '}') { j->s++; return 0; }
    } else {
        if (j_peek(j) == '}') { j->s++; return 0; }
        j_expect(j, ',');
    }
    *key = j_string(j);
    j_expect(j, ':');
    return 1;
}

static void j_skip(Json *j) {
    int c = j_peek(j);
    if (c == '"') { (void)j_string(j); return; }
    if (c == '{') {
        int started = 0;
        char *key;
        while (j_member(j, &started, &key)) j_skip(j);
        return;
    }
    if (c == '[') {
        j->s++;
        if (j_peek(j) == ']') { j->s++; return; }
        do j_skip(j); while (j_peek(j) == ',' && j->s++);
        j_expect(j, ']');
        return;
    }
    if (j_literal(j, "true") || j_literal(j, "false") || j_literal(j, "null")) return;
    (void)j_number(j);
}

/* [n0, n1, ...] into out (at most max entries); returns the count */
static int j_int_array(Json *j, long *out, int max) {
    int n = 0;
    j_expect(j, '[');
    if (j_peek(j) == ']') { j->s++; return 0; }
    for (;;) {
        double v = j_number(j);
        if (n >= max) die(EXIT_BAD_INPUT, "%s: array longer than %d", j->what, max);
        out[n++] = (long)v;
        if (j_peek(j) == ',') { j->s++; continue; }
        j_expect(j, ']');
        return n;
    }
}

/* ---- the configuration ---- */

typedef struct {
    long vocab_size, max_seq_len, d_model, n_heads, d_ff, n_layers, n_future, pad_id;
    int bias, tie_embeddings;
    double ln_eps, temperature;
    char norm[32], activation[32], attention[32], dtype[32], loss[32];
} Config;

static Config parse_config(const char *text) {
    Config c;
    memset(&c, 0, sizeof c);
    c.n_future = 1;
    c.temperature = 1.0;
    Json j = {text, text + strlen(text), "config"};
    int started = 0, seen = 0;
    char *key;
    struct { const char *name; long *v; } ints[] = {
        {"vocab_size", &c.vocab_size}, {"max_seq_len", &c.max_seq_len}, {"d_model", &c.d_model},
        {"n_heads", &c.n_heads}, {"d_ff", &c.d_ff}, {"n_layers", &c.n_layers}, {"n_future", &c.n_future},
        {"pad_id", &c.pad_id}};
    struct { const char *name; char *v; } strs[] = {
        {"norm", c.norm}, {"activation", c.activation}, {"attention", c.attention}, {"dtype", c.dtype},
        {"loss", c.loss}};
    while (j_member(&j, &started, &key)) {
        int known = 0;
        for (size_t i = 0; i < sizeof ints / sizeof *ints; i++)
            if (!strcmp(key, ints[i].name)) { *ints[i].v = (long)j_number(&j); known = 1; }
        for (size_t i = 0; i < sizeof strs / sizeof *strs; i++)
            if (!strcmp(key, strs[i].name)) {
                char *s = j_string(&j);
                snprintf(strs[i].v, 32, "%s", s);
                known = 1;
            }
        if (!strcmp(key, "bias") || !strcmp(key, "tie_embeddings")) {
            int v = j_literal(&j, "true") ? 1 : (j_literal(&j, "false") ? 0 : -1);
            if (v < 0) die(EXIT_BAD_INPUT, "config field %s is not true/false", key);
            *(!strcmp(key, "bias") ? &c.bias : &c.tie_embeddings) = v;
            known = 1;
        }
        if (!strcmp(key, "ln_eps")) { c.ln_eps = j_number(&j); known = 1; }
        if (!strcmp(key, "temperature")) { c.temperature = j_number(&j); known = 1; }
        if (!known) die(EXIT_UNSUPPORTED, "unsupported configuration field %s (this implementation does not know it)",
                        key);
        seen++;
    }
    if (c.vocab_size < 1 || c.d_model < 1 || c.n_heads < 1 || c.d_ff < 1 || c.n_layers < 1 || c.max_seq_len < 1 ||
        c.d_model % c.n_heads != 0 || c.ln_eps <= 0 || c.temperature <= 0)
        die(EXIT_BAD_INPUT, "config is incomplete or invalid (V=%ld C=%ld H=%ld F=%ld L=%ld S=%ld eps=%g)",
            c.vocab_size, c.d_model, c.n_heads, c.d_ff, c.n_layers, c.max_seq_len, c.ln_eps);
    /* what this implementation supports; the first field outside it is named */
    if (strcmp(c.norm, "pre")) die(EXIT_UNSUPPORTED, "unsupported configuration field norm=%s (supported: pre)", c.norm);
    if (strcmp(c.activation, "gelu_tanh") && strcmp(c.activation, "gelu"))
        die(EXIT_UNSUPPORTED, "unsupported configuration field activation=%s (supported: gelu_tanh, gelu)",
            c.activation);
    if (!c.bias) die(EXIT_UNSUPPORTED, "unsupported configuration field bias=false (supported: true)");
    if (!c.tie_embeddings)
        die(EXIT_UNSUPPORTED, "unsupported configuration field tie_embeddings=false (supported: true)");
    if (c.n_future != 1)
        die(EXIT_UNSUPPORTED, "unsupported configuration field n_future=%ld (supported: 1)", c.n_future);
    if (strcmp(c.loss, "cross_entropy"))
        die(EXIT_UNSUPPORTED, "unsupported configuration field loss=%s (supported: cross_entropy)", c.loss);
    if (strcmp(c.attention, "standard") && strcmp(c.attention, "flash"))
        die(EXIT_UNSUPPORTED, "unsupported configuration field attention=%s (supported: standard, flash)",
            c.attention);
    if (strcmp(c.dtype, "float32") && strcmp(c.dtype, "float64"))
        die(EXIT_UNSUPPORTED, "unsupported configuration field dtype=%s (supported: float32, float64)", c.dtype);
    (void)seen;
    return c;
}

/* ---- safetensors: 8-byte little-endian header length, JSON header, raw little-endian data ---- */

typedef struct {
    char *name;
    char dtype[8];
    int ndim;
    long shape[8];
    size_t begin, end;   /* byte offsets into the data section */
} StEntry;

typedef struct {
    unsigned char *buf;
    size_t len, data0;   /* data0: where the data section starts */
    StEntry *e;
    int n;
    char *config;        /* metadata "config", or NULL */
    const char *path;
} StFile;

static uint64_t le64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static StFile st_read(const char *path) {
    StFile st;
    memset(&st, 0, sizeof st);
    st.path = path;
    st.buf = read_file(path, &st.len);
    if (st.len < 8) die(EXIT_BAD_INPUT, "%s: %zu bytes, too short for a safetensors file", path, st.len);
    uint64_t hlen = le64(st.buf);
    if (hlen > st.len - 8) die(EXIT_BAD_INPUT, "%s: header length %llu exceeds the file (%zu bytes)", path,
                               (unsigned long long)hlen, st.len);
    st.data0 = 8 + (size_t)hlen;
    Json j = {(const char *)st.buf + 8, (const char *)st.buf + st.data0, path};
    int cap = 64, started = 0;
    st.e = xcalloc((size_t)cap, sizeof *st.e);
    char *key;
    while (j_member(&j, &started, &key)) {
        if (!strcmp(key, "__metadata__")) {
            int s2 = 0;
            char *mk;
            while (j_member(&j, &s2, &mk)) {
                if (!strcmp(mk, "config")) st.config = j_string(&j);
                else j_skip(&j);
            }
            continue;
        }
        if (st.n == cap) {   /* grow: copy into a bigger tracked block */
            StEntry *bigger = xcalloc((size_t)cap * 2, sizeof *st.e);
            memcpy(bigger, st.e, (size_t)cap * sizeof *st.e);
            st.e = bigger;
            cap *= 2;
        }
        StEntry *e = &st.e[st.n++];
        e->name = key;
        int s3 = 0;
        char *field;
        long offs[2] = {-1, -1};
        while (j_member(&j, &s3, &field)) {
            if (!strcmp(field, "dtype")) snprintf(e->dtype, sizeof e->dtype, "%s", j_string(&j));
            else if (!strcmp(field, "shape")) e->ndim = j_int_array(&j, e->shape, 8);
            else if (!strcmp(field, "data_offsets")) {
                if (j_int_array(&j, offs, 2) != 2) die(EXIT_BAD_INPUT, "%s: %s: data_offsets needs 2 numbers",
                                                       path, key);
            } else j_skip(&j);
        }
        if (offs[0] < 0 || offs[1] < offs[0] || (size_t)offs[1] > st.len - st.data0)
            die(EXIT_BAD_INPUT, "%s: tensor %s has data_offsets [%ld, %ld] outside the data (%zu bytes)", path, key,
                offs[0], offs[1], st.len - st.data0);
        e->begin = (size_t)offs[0];
        e->end = (size_t)offs[1];
    }
    if (!st.config) die(EXIT_BAD_INPUT, "%s has no \"config\" in its metadata (write the case with --export-case)",
                        path);
    return st;
}

static const StEntry *st_find(const StFile *st, const char *name) {
    for (int i = 0; i < st->n; i++)
        if (!strcmp(st->e[i].name, name)) return &st->e[i];
    return NULL;
}

/* ---- .npy: int64 (or int32) C-order 2-d arrays ---- */

static long *npy_read_ints(const char *path, long *rows, long *cols) {
    size_t len;
    unsigned char *buf = read_file(path, &len);
    if (len < 10 || memcmp(buf, "\x93NUMPY", 6) != 0) die(EXIT_BAD_INPUT, "%s is not a .npy file", path);
    size_t hlen, h0;
    if (buf[6] == 1) { hlen = buf[8] | (buf[9] << 8); h0 = 10; }
    else {
        if (len < 12) die(EXIT_BAD_INPUT, "%s: truncated .npy header", path);
        hlen = (size_t)buf[8] | ((size_t)buf[9] << 8) | ((size_t)buf[10] << 16) | ((size_t)buf[11] << 24);
        h0 = 12;
    }
    if (h0 + hlen > len) die(EXIT_BAD_INPUT, "%s: .npy header longer than the file", path);
    char *h = xcalloc(hlen + 1, 1);
    memcpy(h, buf + h0, hlen);
    int esize = strstr(h, "'<i8'") ? 8 : (strstr(h, "'<i4'") ? 4 : 0);
    if (!esize) die(EXIT_BAD_INPUT, "%s: dtype must be little-endian int64 or int32 ('<i8'/'<i4'), header %s", path, h);
    if (strstr(h, "'fortran_order': True")) die(EXIT_BAD_INPUT, "%s: Fortran order is not supported", path);
    char *sh = strstr(h, "'shape': (");
    if (!sh) die(EXIT_BAD_INPUT, "%s: no shape in the .npy header", path);
    sh += strlen("'shape': (");
    long dims[2] = {0, 0};
    int nd = 0;
    while (*sh && *sh != ')') {
        if (isdigit((unsigned char)*sh)) {
            if (nd == 2) die(EXIT_BAD_INPUT, "%s: expected a 2-d array (B, T)", path);
            dims[nd++] = strtol(sh, &sh, 10);
        } else sh++;
    }
    if (nd == 1) { dims[1] = dims[0]; dims[0] = 1; }     /* (T,) is one row */
    if (nd == 0) die(EXIT_BAD_INPUT, "%s: expected a 2-d array (B, T)", path);
    size_t n = (size_t)dims[0] * (size_t)dims[1];
    if (h0 + hlen + n * (size_t)esize > len) die(EXIT_BAD_INPUT, "%s: data shorter than shape (%ld, %ld)", path,
                                                 dims[0], dims[1]);
    long *out = xcalloc(n, sizeof *out);
    const unsigned char *d = buf + h0 + hlen;
    for (size_t i = 0; i < n; i++) {
        uint64_t v = 0;
        for (int b = esize - 1; b >= 0; b--) v = (v << 8) | d[i * (size_t)esize + (size_t)b];
        out[i] = esize == 8 ? (long)(int64_t)v : (long)(int32_t)(uint32_t)v;
    }
    *rows = dims[0];
    *cols = dims[1];
    return out;
}

/* ---- the dump: every registered tensor, written as one safetensors file ---- */

typedef struct {
    char name[128];
    int ndim;
    long shape[4];
    const void *data;
} DumpEntry;

static DumpEntry *dump;
static int dump_n, dump_cap;

static void dump_add(const char *name, int ndim, const long *shape, const void *data) {
    if (dump_n == dump_cap) {
        int cap = dump_cap ? 2 * dump_cap : 256;
        DumpEntry *bigger = xcalloc((size_t)cap, sizeof *bigger);
        if (dump_n) memcpy(bigger, dump, (size_t)dump_n * sizeof *dump);
        dump = bigger;
        dump_cap = cap;
    }
    DumpEntry *e = &dump[dump_n++];
    snprintf(e->name, sizeof e->name, "%s", name);
    e->ndim = ndim;
    for (int i = 0; i < ndim; i++) e->shape[i] = shape[i];
    e->data = data;
}

static size_t numel(int ndim, const long *shape) {
    size_t n = 1;
    for (int i = 0; i < ndim; i++) n *= (size_t)shape[i];
    return n;
}

static void dump_write(const char *path, const char *dtype, size_t esize) {
    size_t cap = 256 + (size_t)dump_n * 256, used = 0, offset = 0;
    char *h = xcalloc(cap, 1);
    used += (size_t)snprintf(h + used, cap - used, "{");
    for (int i = 0; i < dump_n; i++) {
        DumpEntry *e = &dump[i];
        size_t bytes = numel(e->ndim, e->shape) * esize;
        used += (size_t)snprintf(h + used, cap - used, "%s\"%s\":{\"dtype\":\"%s\",\"shape\":[", i ? "," : "",
                                 e->name, dtype);
        for (int d = 0; d < e->ndim; d++) used += (size_t)snprintf(h + used, cap - used, "%s%ld", d ? "," : "",
                                                                   e->shape[d]);
        used += (size_t)snprintf(h + used, cap - used, "],\"data_offsets\":[%zu,%zu]}", offset, offset + bytes);
        offset += bytes;
    }
    used += (size_t)snprintf(h + used, cap - used, "}");
    if (used >= cap - 8) die(EXIT_BAD_INPUT, "internal: dump header buffer too small");
    while (used % 8) h[used++] = ' ';                  /* pad the header to 8 bytes with spaces */
    FILE *f = fopen(path, "wb");
    if (!f) die(EXIT_BAD_INPUT, "cannot write %s: %s", path, strerror(errno));
    unsigned char len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (unsigned char)((uint64_t)used >> (8 * i));
    int ok = fwrite(len8, 1, 8, f) == 8 && fwrite(h, 1, used, f) == used;
    for (int i = 0; i < dump_n && ok; i++) {
        size_t n = numel(dump[i].ndim, dump[i].shape);
        ok = fwrite(dump[i].data, esize, n, f) == n;
    }
    if (fclose(f) != 0 || !ok) die(EXIT_BAD_INPUT, "error writing %s", path);
}

/* ---- the model, once per floating point type ---- */

#define real float
#define F(name) name##_f32
#define DTYPE_TAG "F32"
#include "model.h"
#undef real
#undef F
#undef DTYPE_TAG

#define real double
#define F(name) name##_f64
#define DTYPE_TAG "F64"
#include "model.h"
#undef real
#undef F
#undef DTYPE_TAG

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s CASE OUT\n  CASE: a folder written by python -m tools.layerdiff --export-case\n"
                        "  OUT: the dump to write (.safetensors)\n", argv[0]);
        return EXIT_BAD_INPUT;
    }
    char path[4096];
    snprintf(path, sizeof path, "%s/checkpoint.safetensors", argv[1]);
    StFile st = st_read(path);
    Config cfg = parse_config(st.config);
    long B, T, B2, T2;
    snprintf(path, sizeof path, "%s/ids.npy", argv[1]);
    long *ids = npy_read_ints(path, &B, &T);
    snprintf(path, sizeof path, "%s/targets.npy", argv[1]);
    long *targets = npy_read_ints(path, &B2, &T2);
    if (B != B2 || T != T2) die(EXIT_BAD_INPUT, "targets shape (%ld, %ld) differs from ids shape (%ld, %ld)", B2, T2,
                                B, T);
    if (T > cfg.max_seq_len) die(EXIT_BAD_INPUT, "sequence length %ld exceeds max_seq_len %ld", T, cfg.max_seq_len);
    for (long i = 0; i < B * T; i++) {
        if (ids[i] < 0 || ids[i] >= cfg.vocab_size)
            die(EXIT_BAD_INPUT, "token id %ld at position (%ld, %ld) is outside the vocabulary [0, %ld)", ids[i],
                i / T, i % T, cfg.vocab_size);
        if (targets[i] < 0 || targets[i] >= cfg.vocab_size)
            die(EXIT_BAD_INPUT, "target %ld at position (%ld, %ld) is outside the vocabulary [0, %ld)", targets[i],
                i / T, i % T, cfg.vocab_size);
    }
    if (!strcmp(cfg.dtype, "float32")) run_f32(&cfg, &st, ids, targets, B, T, argv[2]);
    else run_f64(&cfg, &st, ids, targets, B, T, argv[2]);
    free_all();
    return 0;
}
