/* model.h: the GPT-2-style model, forward and backward. Included twice by gpt.c, with
 * `real` = float and = double and F(name) giving each copy its own names.
 *
 * Shapes: B batch, T time, N = B*T rows, C = d_model, H heads, D = C/H, F = d_ff, V vocab.
 * Matrices are in the checkpoint's layout: [in, out] (y = x W + b); wte is [V, C] and the
 * logits are x wte^T (the tied output projection).
 * Every gradient buffer is zeroed once (calloc) and receives its contributions with +=,
 * so a tap's gradient is complete once every consumer's backward has run.
 * Dot products accumulate in double, whatever `real` is.
 */

/* ---- one parameter or tap: its values and its gradient, registered for the dump ---- */

static real *F(param)(const StFile *st, const char *name, long d0, long d1, real **grad) {
    const StEntry *e = st_find(st, name);
    if (!e) die(EXIT_BAD_INPUT, "%s: no tensor %s", st->path, name);
    int nd = d1 ? 2 : 1;
    long want[2] = {d0, d1};
    if (e->ndim != nd || e->shape[0] != d0 || (nd == 2 && e->shape[1] != d1))
        die(EXIT_BAD_INPUT, "%s: %s has shape [%ld%s%ld], expected [%ld%s%ld]", st->path, name, e->shape[0],
            e->ndim > 1 ? ", " : "", e->ndim > 1 ? e->shape[1] : 0L, d0, nd > 1 ? ", " : "", nd > 1 ? d1 : 0L);
    size_t n = numel(nd, want);
    int is64 = !strcmp(e->dtype, "F64");
    if (!is64 && strcmp(e->dtype, "F32")) die(EXIT_BAD_INPUT, "%s: %s has dtype %s, expected F32 or F64", st->path,
                                              name, e->dtype);
    if (e->end - e->begin != n * (is64 ? 8 : 4)) die(EXIT_BAD_INPUT, "%s: %s holds %zu bytes, expected %zu",
                                                     st->path, name, e->end - e->begin, n * (is64 ? 8 : 4));
    real *out = xcalloc(n, sizeof(real));
    const unsigned char *src = st->buf + st->data0 + e->begin;
    for (size_t i = 0; i < n; i++) {   /* memcpy per element: the data section need not be aligned */
        if (is64) { double v; memcpy(&v, src + 8 * i, 8); out[i] = (real)v; }
        else { float v; memcpy(&v, src + 4 * i, 4); out[i] = (real)v; }
    }
    *grad = xcalloc(n, sizeof(real));
    char gname[200];
    snprintf(gname, sizeof gname, "grad.%s", name);
    dump_add(gname, nd, want, *grad);
    return out;
}

/* a tap: values and gradient buffers of `ndim` dims, registered as NAME and grad.NAME unless dumped == 0 */
static real *F(tap)(const char *name, int ndim, long d0, long d1, long d2, long d3, real **grad, int dumped) {
    long shape[4] = {d0, d1, d2, d3};
    size_t n = numel(ndim, shape);
    real *v = xcalloc(n, sizeof(real));
    *grad = xcalloc(n, sizeof(real));
    if (dumped) {
        char gname[200];
        snprintf(gname, sizeof gname, "grad.%s", name);
        dump_add(name, ndim, shape, v);
        dump_add(gname, ndim, shape, *grad);
    }
    return v;
}

/* ---- embedding: out[b, t] = wte[ids[b, t]] + wpe[t] ---- */

static void F(embedding_forward)(real *out, const long *ids, const real *wte, const real *wpe, long B, long T,
                                 long C) {
    for (long b = 0; b < B; b++)
        for (long t = 0; t < T; t++) {
            const real *we = wte + ids[b * T + t] * C, *pe = wpe + t * C;
            real *o = out + (b * T + t) * C;
            for (long c = 0; c < C; c++) o[c] = we[c] + pe[c];
        }
}

static void F(embedding_backward)(real *dwte, real *dwpe, const real *dout, const long *ids, long B, long T,
                                  long C) {
    for (long b = 0; b < B; b++)
        for (long t = 0; t < T; t++) {
            const real *d = dout + (b * T + t) * C;
            real *dw = dwte + ids[b * T + t] * C, *dp = dwpe + t * C;
            for (long c = 0; c < C; c++) {
#if BUG == TIED_GRAD_ASSIGNED
                dw[c] = d[c];                       /* planted: = where += belongs */
#else
                dw[c] += d[c];
#endif
                dp[c] += d[c];
            }
        }
}

/* ---- layer norm over C: y = (x - mean) * rstd * w + b, rstd = 1 / sqrt(biased var + eps) ---- */

static void F(layernorm_forward)(real *out, real *mean, real *rstd, const real *x, const real *w, const real *b,
                                 long N, long C, double eps) {
    for (long n = 0; n < N; n++) {
        const real *xn = x + n * C;
        double m = 0, v = 0;
        for (long c = 0; c < C; c++) m += xn[c];
        m /= (double)C;
        for (long c = 0; c < C; c++) v += ((double)xn[c] - m) * ((double)xn[c] - m);
        v /= (double)C;
        double s = 1.0 / sqrt(v + eps);
        for (long c = 0; c < C; c++) out[n * C + c] = (real)(((double)xn[c] - m) * s * w[c] + b[c]);
        mean[n] = (real)m;
        rstd[n] = (real)s;
    }
}

/* dx += rstd (g - mean(g) - xhat mean(g xhat)), g = dout * w; dw += dout xhat; db += dout */
static void F(layernorm_backward)(real *dx, real *dw, real *db, const real *dout, const real *x, const real *w,
                                  const real *mean, const real *rstd, long N, long C) {
    for (long n = 0; n < N; n++) {
        const real *d = dout + n * C, *xn = x + n * C;
        double g_mean = 0, gx_mean = 0;
        for (long c = 0; c < C; c++) {
            double xhat = ((double)xn[c] - mean[n]) * rstd[n];
            g_mean += (double)d[c] * w[c];
            gx_mean += (double)d[c] * w[c] * xhat;
        }
        g_mean /= (double)C;
        gx_mean /= (double)C;
#if BUG == LN_BACKWARD_NO_MEAN
        g_mean = 0;                                 /* planted: the mean term is dropped */
#endif
        for (long c = 0; c < C; c++) {
            double xhat = ((double)xn[c] - mean[n]) * rstd[n];
            dw[c] += (real)((double)d[c] * xhat);
            db[c] += d[c];
            dx[n * C + c] += (real)(rstd[n] * ((double)d[c] * w[c] - g_mean - xhat * gx_mean));
        }
    }
}

/* ---- linear: out (N, O) = x (N, I) W [I, O] + b ---- */

static void F(linear_forward)(real *out, const real *x, const real *W, const real *b, long N, long I, long O) {
    for (long n = 0; n < N; n++)
        for (long o = 0; o < O; o++) {
            double acc = b ? b[o] : 0;
            for (long i = 0; i < I; i++) acc += (double)x[n * I + i] * W[i * O + o];
            out[n * O + o] = (real)acc;
        }
}

static void F(linear_backward)(real *dx, real *dW, real *db, const real *dout, const real *x, const real *W, long N,
                               long I, long O) {
    for (long n = 0; n < N; n++)
        for (long i = 0; i < I; i++) {
            double acc = 0;
            for (long o = 0; o < O; o++) acc += (double)dout[n * O + o] * W[i * O + o];
            dx[n * I + i] += (real)acc;
        }
    for (long i = 0; i < I; i++)
        for (long o = 0; o < O; o++) {
            double acc = 0;
            for (long n = 0; n < N; n++) acc += (double)x[n * I + i] * dout[n * O + o];
            dW[i * O + o] += (real)acc;
        }
    for (long o = 0; o < O; o++) {
        double acc = 0;
        for (long n = 0; n < N; n++) acc += dout[n * O + o];
        db[o] += (real)acc;
    }
}

/* ---- GELU: exact x Phi(x), or the tanh approximation ---- */

#ifndef GELU_K
#define GELU_K 0.7978845608028654                  /* sqrt(2 / pi) */
#endif

static void F(gelu_forward)(real *out, const real *x, long n, int exact) {
    for (long i = 0; i < n; i++) {
        double v = x[i];
        out[i] = (real)(exact ? 0.5 * v * (1.0 + erf(v / sqrt(2.0)))
                              : 0.5 * v * (1.0 + tanh(GELU_K * (v + 0.044715 * v * v * v))));
    }
}

static void F(gelu_backward)(real *dx, const real *x, const real *dout, long n, int exact) {
    for (long i = 0; i < n; i++) {
        double v = x[i], g;
        if (exact) {
            g = 0.5 * (1.0 + erf(v / sqrt(2.0))) + v * exp(-0.5 * v * v) / sqrt(2.0 * 3.14159265358979323846);
        } else {
            double t = tanh(GELU_K * (v + 0.044715 * v * v * v));
            g = 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * GELU_K * (1.0 + 3.0 * 0.044715 * v * v);
        }
        dx[i] += (real)(g * dout[i]);
    }
}

/* ---- causal self-attention on qkv (N, 3C) = [q | k | v] ----
 * 1. q, k, v (B, H, T, D) from the columns of qkv
 * 2. att[t, s] = q_t . k_s / sqrt(D) for every s (the tap holds the scores before the mask)
 * 3. probs[t, s] = softmax over s <= t of att[t, s]; 0 for s > t
 * 4. ctx[b, t, h*D + d] = sum_s probs[t, s] v[s, d]                                          */

static void F(attention_forward)(real *q, real *k, real *v, real *att, real *probs, real *ctx, const real *qkv,
                                 long B, long T, long C, long H) {
    long D = C / H;
    double scale = 1.0 / sqrt((double)D);
    for (long b = 0; b < B; b++)
        for (long h = 0; h < H; h++) {
            long bh = (b * H + h) * T;
            for (long t = 0; t < T; t++)           /* 1. */
                for (long d = 0; d < D; d++) {
                    const real *row = qkv + (b * T + t) * 3 * C + h * D + d;
                    q[(bh + t) * D + d] = row[0];
                    k[(bh + t) * D + d] = row[C];
                    v[(bh + t) * D + d] = row[2 * C];
                }
            for (long t = 0; t < T; t++) {
                real *a = att + (bh + t) * T, *p = probs + (bh + t) * T;
                double mx = -INFINITY, sum = 0;
                for (long s = 0; s < T; s++) {      /* 2. */
                    double acc = 0;
                    for (long d = 0; d < D; d++) acc += (double)q[(bh + t) * D + d] * k[(bh + s) * D + d];
                    a[s] = (real)(acc * scale);
                    if (s <= t && a[s] > mx) mx = a[s];
                }
                for (long s = 0; s < T; s++) {      /* 3. */
                    double e = s <= t ? exp((double)a[s] - mx) : 0.0;
                    p[s] = (real)e;
                    sum += e;
                }
                for (long s = 0; s < T; s++) p[s] = (real)(p[s] / sum);
                for (long d = 0; d < D; d++) {      /* 4. */
                    double acc = 0;
                    for (long s = 0; s <= t; s++) acc += (double)p[s] * v[(bh + s) * D + d];
                    ctx[(b * T + t) * C + h * D + d] = (real)acc;
                }
            }
        }
}

/* backward of 4.-1.: dprobs (every s, as d loss / d probs), datt, dq, dk, dv, then dqkv += */
static void F(attention_backward)(real *dqkv, real *dq, real *dk, real *dv, real *datt, real *dprobs,
                                  const real *dctx, const real *q, const real *k, const real *v, const real *probs,
                                  long B, long T, long C, long H) {
    long D = C / H;
    double scale = 1.0 / sqrt((double)D);
    for (long b = 0; b < B; b++)
        for (long h = 0; h < H; h++) {
            long bh = (b * H + h) * T;
            for (long t = 0; t < T; t++) {
                const real *dy = dctx + (b * T + t) * C + h * D;
                const real *p = probs + (bh + t) * T;
                real *dp = dprobs + (bh + t) * T, *da = datt + (bh + t) * T;
                double dot = 0;
                for (long s = 0; s < T; s++) {      /* 4. ctx = probs v */
                    double acc = 0;
                    for (long d = 0; d < D; d++) acc += (double)dy[d] * v[(bh + s) * D + d];
                    dp[s] += (real)acc;
                    dot += acc * p[s];
                    for (long d = 0; d < D; d++) dv[(bh + s) * D + d] += (real)((double)p[s] * dy[d]);
                }
                for (long s = 0; s < T; s++)        /* 3. softmax: datt = p (dp - sum p dp) */
                    da[s] += (real)((double)p[s] * ((double)dp[s] - dot));
                for (long s = 0; s <= t; s++)       /* 2. att = q k^T * scale */
                    for (long d = 0; d < D; d++) {
                        dq[(bh + t) * D + d] += (real)((double)da[s] * k[(bh + s) * D + d] * scale);
                        dk[(bh + s) * D + d] += (real)((double)da[s] * q[(bh + t) * D + d] * scale);
                    }
            }
            for (long t = 0; t < T; t++)           /* 1. */
                for (long d = 0; d < D; d++) {
                    real *row = dqkv + (b * T + t) * 3 * C + h * D + d;
                    row[0] += dq[(bh + t) * D + d];
                    row[C] += dk[(bh + t) * D + d];
                    row[2 * C] += dv[(bh + t) * D + d];
                }
        }
}

/* ---- tied output projection: logits (N, V) = x (N, C) wte^T ---- */

static void F(unembed_forward)(real *logits, const real *x, const real *wte, long N, long C, long V) {
    for (long n = 0; n < N; n++)
        for (long u = 0; u < V; u++) {
            double acc = 0;
            for (long c = 0; c < C; c++) acc += (double)x[n * C + c] * wte[u * C + c];
            logits[n * V + u] = (real)acc;
        }
}

static void F(unembed_backward)(real *dx, real *dwte, const real *dlogits, const real *x, const real *wte, long N,
                                long C, long V) {
    for (long n = 0; n < N; n++)
        for (long c = 0; c < C; c++) {
            double acc = 0;
            for (long u = 0; u < V; u++) acc += (double)dlogits[n * V + u] * wte[u * C + c];
            dx[n * C + c] += (real)acc;
        }
    for (long u = 0; u < V; u++)
        for (long c = 0; c < C; c++) {
            double acc = 0;
            for (long n = 0; n < N; n++) acc += (double)dlogits[n * V + u] * x[n * C + c];
#if BUG == WTE_GRAD_TRANSPOSED
            dwte[c * V + u] += (real)acc;          /* planted: [c][v] indexing of a [V][C] matrix */
#else
            dwte[u * C + c] += (real)acc;
#endif
        }
}

/* ---- cross-entropy of softmax(logits / temperature), PAD targets ignored, mean over the rest ---- */

static real F(loss_forward)(real *probs, const real *logits, const long *targets, long N, long V, long pad,
                            double temp, long *n_valid) {
    double total = 0;
    long cnt = 0;
    for (long n = 0; n < N; n++) {
        const real *z = logits + n * V;
        double mx = -INFINITY, sum = 0;
        for (long u = 0; u < V; u++) if (z[u] / temp > mx) mx = z[u] / temp;
        for (long u = 0; u < V; u++) sum += exp(z[u] / temp - mx);
        for (long u = 0; u < V; u++) probs[n * V + u] = (real)(exp(z[u] / temp - mx) / sum);
        if (targets[n] == pad) continue;
        total += -(z[targets[n]] / temp - mx - log(sum));
        cnt++;
    }
    *n_valid = cnt;
    return (real)(cnt ? total / (double)cnt : NAN);
}

/* dlogits += (p - onehot(y)) / (n_valid * temperature) on valid rows */
static void F(loss_backward)(real *dlogits, const real *probs, const long *targets, long N, long V, long pad,
                             double temp, long n_valid) {
    for (long n = 0; n < N; n++) {
        if (targets[n] == pad) continue;
        double w = 1.0 / ((double)n_valid * temp);
        for (long u = 0; u < V; u++)
            dlogits[n * V + u] += (real)(((double)probs[n * V + u] - (u == targets[n] ? 1.0 : 0.0)) * w);
    }
}

/* ---- the model ---- */

typedef struct {   /* one block's parameters (and, in a second copy, their gradients) */
    real *ln1_w, *ln1_b, *attn_w, *attn_b, *proj_w, *proj_b, *ln2_w, *ln2_b, *fc_w, *fc_b, *fcp_w, *fcp_b;
} F(BlockParams);

typedef struct {   /* one block's activations (and, in a second copy, their gradients) */
    real *ln1, *ln1_mean, *ln1_rstd, *qkv, *q, *k, *v, *att, *probs, *ctx, *attn_out, *resid1;
    real *ln2, *ln2_mean, *ln2_rstd, *fc, *act, *mlp_out, *out;
} F(BlockActs);

static void F(run)(const Config *cfg, const StFile *st, const long *ids, const long *targets, long B, long T,
                   const char *out_path) {
    const long C = cfg->d_model, H = cfg->n_heads, D = C / H, Fd = cfg->d_ff, V = cfg->vocab_size, N = B * T;
    const long L = cfg->n_layers;
    const int exact = !strcmp(cfg->activation, "gelu"), scores = !strcmp(cfg->attention, "standard");
    char nm[160];
#define NAME(...) (snprintf(nm, sizeof nm, __VA_ARGS__), nm)

    /* parameters and their gradients, canonical names */
    real *dwte, *dwpe, *dlnf_w, *dlnf_b;
    real *wte = F(param)(st, "transformer.wte.weight", V, C, &dwte);
    real *wpe = F(param)(st, "transformer.wpe.weight", cfg->max_seq_len, C, &dwpe);
    F(BlockParams) *P = xcalloc((size_t)L, sizeof *P), *G = xcalloc((size_t)L, sizeof *G);
    for (long i = 0; i < L; i++) {
#define LOAD(field, suffix, d0, d1) P[i].field = F(param)(st, NAME("transformer.h.%ld." suffix, i), d0, d1, &G[i].field)
        LOAD(ln1_w, "ln_1.weight", C, 0);
        LOAD(ln1_b, "ln_1.bias", C, 0);
        LOAD(attn_w, "attn.c_attn.weight", C, 3 * C);
        LOAD(attn_b, "attn.c_attn.bias", 3 * C, 0);
        LOAD(proj_w, "attn.c_proj.weight", C, C);
        LOAD(proj_b, "attn.c_proj.bias", C, 0);
        LOAD(ln2_w, "ln_2.weight", C, 0);
        LOAD(ln2_b, "ln_2.bias", C, 0);
        LOAD(fc_w, "mlp.c_fc.weight", C, Fd);
        LOAD(fc_b, "mlp.c_fc.bias", Fd, 0);
        LOAD(fcp_w, "mlp.c_proj.weight", Fd, C);
        LOAD(fcp_b, "mlp.c_proj.bias", C, 0);
#undef LOAD
    }
    real *lnf_w = F(param)(st, "transformer.ln_f.weight", C, 0, &dlnf_w);
    real *lnf_b = F(param)(st, "transformer.ln_f.bias", C, 0, &dlnf_b);

    /* activations (taps) and their gradients */
    real *dembed, *dlnf, *dlogits, *scratch;
    real *embed = F(tap)("embed.out", 3, B, T, C, 0, &dembed, 1);
    F(BlockActs) *A = xcalloc((size_t)L, sizeof *A), *dA = xcalloc((size_t)L, sizeof *dA);
    for (long i = 0; i < L; i++) {
#define TAP(field, name, nd, d0, d1, d2, d3, dumped) \
    A[i].field = F(tap)(NAME("h.%ld." name, i), nd, d0, d1, d2, d3, &dA[i].field, dumped)
        TAP(ln1, "ln_1.out", 3, B, T, C, 0, 1);
        TAP(ln1_mean, "ln_1.mean", 1, N, 0, 0, 0, 0);
        TAP(ln1_rstd, "ln_1.rstd", 1, N, 0, 0, 0, 0);
        TAP(qkv, "attn.qkv", 3, B, T, 3 * C, 0, 0);
        TAP(q, "attn.q", 4, B, H, T, D, 1);
        TAP(k, "attn.k", 4, B, H, T, D, 1);
        TAP(v, "attn.v", 4, B, H, T, D, 1);
        TAP(att, "attn.att", 4, B, H, T, T, scores);
        TAP(probs, "attn.probs", 4, B, H, T, T, scores);
        TAP(ctx, "attn.ctx", 3, B, T, C, 0, 1);
        TAP(attn_out, "attn.out", 3, B, T, C, 0, 1);
        TAP(resid1, "resid_1", 3, B, T, C, 0, 1);
        TAP(ln2, "ln_2.out", 3, B, T, C, 0, 1);
        TAP(ln2_mean, "ln_2.mean", 1, N, 0, 0, 0, 0);
        TAP(ln2_rstd, "ln_2.rstd", 1, N, 0, 0, 0, 0);
        TAP(fc, "mlp.fc", 3, B, T, Fd, 0, 1);
        TAP(act, "mlp.act", 3, B, T, Fd, 0, 1);
        TAP(mlp_out, "mlp.out", 3, B, T, C, 0, 1);
        TAP(out, "out", 3, B, T, C, 0, 1);
#undef TAP
    }
    real *lnf = F(tap)("ln_f.out", 3, B, T, C, 0, &dlnf, 1);
    real *lnf_mean = F(tap)("ln_f.mean", 1, N, 0, 0, 0, &scratch, 0);
    real *lnf_rstd = F(tap)("ln_f.rstd", 1, N, 0, 0, 0, &scratch, 0);
    real *logits = F(tap)("logits", 3, B, T, V, 0, &dlogits, 1);
    real *probs = F(tap)("loss.probs", 2, N, V, 0, 0, &scratch, 0);
    real *loss = xcalloc(1, sizeof(real));
    long no_dims[1] = {0};
    dump_add("loss", 0, no_dims, loss);

    /* forward */
    F(embedding_forward)(embed, ids, wte, wpe, B, T, C);
    const real *x = embed;
    for (long i = 0; i < L; i++) {
        F(BlockParams) *p = &P[i];
        F(BlockActs) *a = &A[i];
        F(layernorm_forward)(a->ln1, a->ln1_mean, a->ln1_rstd, x, p->ln1_w, p->ln1_b, N, C, cfg->ln_eps);
        F(linear_forward)(a->qkv, a->ln1, p->attn_w, p->attn_b, N, C, 3 * C);
        F(attention_forward)(a->q, a->k, a->v, a->att, a->probs, a->ctx, a->qkv, B, T, C, H);
        F(linear_forward)(a->attn_out, a->ctx, p->proj_w, p->proj_b, N, C, C);
        for (long j = 0; j < N * C; j++) a->resid1[j] = x[j] + a->attn_out[j];
        F(layernorm_forward)(a->ln2, a->ln2_mean, a->ln2_rstd, a->resid1, p->ln2_w, p->ln2_b, N, C, cfg->ln_eps);
        F(linear_forward)(a->fc, a->ln2, p->fc_w, p->fc_b, N, C, Fd);
        F(gelu_forward)(a->act, a->fc, N * Fd, exact);
        F(linear_forward)(a->mlp_out, a->act, p->fcp_w, p->fcp_b, N, Fd, C);
        for (long j = 0; j < N * C; j++) a->out[j] = a->resid1[j] + a->mlp_out[j];
        x = a->out;
    }
    F(layernorm_forward)(lnf, lnf_mean, lnf_rstd, x, lnf_w, lnf_b, N, C, cfg->ln_eps);
    F(unembed_forward)(logits, lnf, wte, N, C, V);
    long n_valid;
    *loss = F(loss_forward)(probs, logits, targets, N, V, cfg->pad_id, cfg->temperature, &n_valid);
    if (!n_valid) die(EXIT_BAD_INPUT, "every target is PAD (pad_id=%ld): the loss is undefined", cfg->pad_id);

    /* backward: the forward read bottom-up */
    F(loss_backward)(dlogits, probs, targets, N, V, cfg->pad_id, cfg->temperature, n_valid);
    F(unembed_backward)(dlnf, dwte, dlogits, lnf, wte, N, C, V);
    real *dx = L ? dA[L - 1].out : dembed;
    F(layernorm_backward)(dx, dlnf_w, dlnf_b, dlnf, x, lnf_w, lnf_mean, lnf_rstd, N, C);
    for (long i = L - 1; i >= 0; i--) {
        F(BlockParams) *p = &P[i], *g = &G[i];
        F(BlockActs) *a = &A[i], *d = &dA[i];
        const real *xin = i ? A[i - 1].out : embed;
        real *dxin = i ? dA[i - 1].out : dembed;
        for (long j = 0; j < N * C; j++) {          /* out = resid1 + mlp_out */
            d->resid1[j] += d->out[j];
            d->mlp_out[j] += d->out[j];
        }
        F(linear_backward)(d->act, g->fcp_w, g->fcp_b, d->mlp_out, a->act, p->fcp_w, N, Fd, C);
        F(gelu_backward)(d->fc, a->fc, d->act, N * Fd, exact);
        F(linear_backward)(d->ln2, g->fc_w, g->fc_b, d->fc, a->ln2, p->fc_w, N, C, Fd);
        F(layernorm_backward)(d->resid1, g->ln2_w, g->ln2_b, d->ln2, a->resid1, p->ln2_w, a->ln2_mean, a->ln2_rstd,
                              N, C);
        for (long j = 0; j < N * C; j++) {          /* resid1 = x + attn_out */
            dxin[j] += d->resid1[j];
            d->attn_out[j] += d->resid1[j];
        }
        F(linear_backward)(d->ctx, g->proj_w, g->proj_b, d->attn_out, a->ctx, p->proj_w, N, C, C);
        F(attention_backward)(d->qkv, d->q, d->k, d->v, d->att, d->probs, d->ctx, a->q, a->k, a->v, a->probs, B, T,
                              C, H);
        F(linear_backward)(d->ln1, g->attn_w, g->attn_b, d->qkv, a->ln1, p->attn_w, N, C, 3 * C);
        F(layernorm_backward)(dxin, g->ln1_w, g->ln1_b, d->ln1, xin, p->ln1_w, a->ln1_mean, a->ln1_rstd, N, C);
    }
    F(embedding_backward)(dwte, dwpe, dembed, ids, B, T, C);
#undef NAME
    dump_write(out_path, DTYPE_TAG, sizeof(real));
}
