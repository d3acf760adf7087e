/* Pillow's 8-bit resampling, bit for bit, for only the output window a caller keeps.
 *
 * Mirrors src/libImaging/Resample.c of Pillow 13.0.0 (precompute_coeffs, normalize_coeffs_8bpc,
 * the 8bpc horizontal and vertical passes, ImagingResampleInner) for the filters BOX, BILINEAR,
 * HAMMING, BICUBIC and LANCZOS on 3-channel images:
 *   - the coefficients come from the same double operations in the same order (build with
 *     -fno-fast-math -ffp-contract=off), rounded to int with the same PRECISION_BITS;
 *   - as in ImagingResampleInner, a pass is skipped when its dimension is unchanged, the
 *     horizontal pass runs first unless the height shrinks by more than twice as many pixels as
 *     the width, and the first pass's result is clipped to uint8 before the second.
 * Two things differ, neither of which can move a value: each output pixel depends only on its
 * own coefficients, so only the pixels of the requested window (and the intermediate rows and
 * columns they read) are computed; and the sums are integer sums (modulo 2^32, like Pillow's
 * int accumulators on every platform it runs on), so their order is free: the horizontal pass
 * runs on blocks of rows transposed into columns and both passes become
 * `acc[i] += (uint32)src[i] * k` over contiguous memory, which the compiler vectorizes. The rows
 * between the passes stream through a small ring (cache-resident, no page faults) instead of a
 * whole intermediate image.
 * mmprep/imaging/resample.py checks the result against Pillow itself before using it.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef M_PI
#define M_PI 3.14159265358979323846
#endif

/* A vectorizable kernel: on x86-64, also built for AVX2 and picked at load time (integer
   arithmetic, so every variant computes the same values). */
#if defined(__x86_64__) && defined(__GNUC__) && defined(__has_attribute) && defined(__linux__)
#if __has_attribute(target_clones)
#define KERNEL __attribute__((target_clones("avx2", "default")))
#endif
#endif
#ifndef KERNEL
#define KERNEL
#endif

#define CHANNELS 3
#define PRECISION_BITS (32 - 8 - 2)
#define MAX_SIDE (1 << 24) /* sides are exact as float, so the box Pillow builds is exact too */
#ifndef BLOCK_ROWS
#define BLOCK_ROWS 16 /* source rows per horizontal block */
#endif
#define BLOCK_LANES (BLOCK_ROWS * CHANNELS)
#define BLOCK_STRIDE (BLOCK_LANES + 16) /* bytes a transposed column: one spare byte at least, for 4-byte copies */
#ifndef ROW_LANES
#define ROW_LANES 64 /* bytes of one vertical-pass row computed together */
#endif

/* ---- Pillow's filters (Resample.c, verbatim arithmetic) ---- */

static double
box_filter(double x) {
    if (x > -0.5 && x <= 0.5) {
        return 1.0;
    }
    return 0.0;
}

static double
bilinear_filter(double x) {
    if (x < 0.0) {
        x = -x;
    }
    if (x < 1.0) {
        return 1.0 - x;
    }
    return 0.0;
}

static double
hamming_filter(double x) {
    if (x < 0.0) {
        x = -x;
    }
    if (x == 0.0) {
        return 1.0;
    }
    if (x >= 1.0) {
        return 0.0;
    }
    x = x * M_PI;
    return sin(x) / x * (0.54f + 0.46f * cos(x));
}

static double
bicubic_filter(double x) {
#define a -0.5
    if (x < 0.0) {
        x = -x;
    }
    if (x < 1.0) {
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    }
    if (x < 2.0) {
        return (((x - 5) * x + 8) * x - 4) * a;
    }
    return 0.0;
#undef a
}

static double
sinc_filter(double x) {
    if (x == 0.0) {
        return 1.0;
    }
    x = x * M_PI;
    return sin(x) / x;
}

static double
lanczos_filter(double x) {
    if (-3.0 <= x && x < 3.0) {
        return sinc_filter(x) * sinc_filter(x / 3);
    }
    return 0.0;
}

typedef struct {
    double (*filter)(double x);
    double support;
} Filter;

/* Indexed by PIL.Image.Resampling: NEAREST=0 (not here), LANCZOS=1, BILINEAR=2, BICUBIC=3,
   BOX=4, HAMMING=5. */
static const Filter FILTERS[] = {
    {NULL, 0.0},
    {lanczos_filter, 3.0},
    {bilinear_filter, 1.0},
    {bicubic_filter, 2.0},
    {box_filter, 0.5},
    {hamming_filter, 1.0},
};
#define FILTER_COUNT ((int)(sizeof(FILTERS) / sizeof(FILTERS[0])))

/* ---- coefficients: precompute_coeffs + normalize_coeffs_8bpc for outputs [first, last) ---- */

typedef struct {
    int ksize;
    int *bounds;     /* (xmin, count) per output */
    int32_t *coeffs; /* ksize per output */
    double *scratch; /* ksize doubles */
} Coeffs;

static int
coeffs_ksize(int in_size, int out_size, const Filter *filter) {
    float in0 = 0.0f, in1 = (float)in_size; /* Pillow's box: (0, 0, width, height) as float */
    double filterscale = (double)(in1 - in0) / out_size;
    if (filterscale < 1.0) {
        filterscale = 1.0;
    }
    return (int)ceil(filter->support * filterscale) * 2 + 1;
}

static void
coeffs_compute(int in_size, int out_size, const Filter *filter, int first, int last, Coeffs *c) {
    double support, scale, filterscale;
    float in0 = 0.0f, in1 = (float)in_size;
    int xx, x, xmin, xmax;
    const int ksize = c->ksize;

    filterscale = scale = (double)(in1 - in0) / out_size;
    if (filterscale < 1.0) {
        filterscale = 1.0;
    }
    support = filter->support * filterscale;

    double inv_filterscale = 1.0 / filterscale;
    for (xx = first; xx < last; xx++) {
        double *k = c->scratch;
        int32_t *kk = c->coeffs + (size_t)(xx - first) * ksize;
        double center = in0 + (xx + 0.5) * scale;
        double ww = 0.0;
        xmin = (int)(center - support + 0.5);
        if (xmin < 0) {
            xmin = 0;
        }
        xmax = (int)(center + support + 0.5);
        if (xmax > in_size) {
            xmax = in_size;
        }
        xmax -= xmin;
        for (x = 0; x < xmax; x++) {
            double w = filter->filter((x + xmin - center + 0.5) * inv_filterscale);
            k[x] = w;
            ww += w;
        }
        if (ww != 0.0) {
            for (x = 0; x < xmax; x++) {
                k[x] /= ww;
            }
        }
        for (x = 0; x < xmax; x++) {
            if (k[x] < 0) {
                kk[x] = (int)(-0.5 + k[x] * (1 << PRECISION_BITS));
            } else {
                kk[x] = (int)(0.5 + k[x] * (1 << PRECISION_BITS));
            }
        }
        c->bounds[(xx - first) * 2 + 0] = xmin;
        c->bounds[(xx - first) * 2 + 1] = xmax < 0 ? 0 : xmax;
    }
}

/* ---- the passes ---- */

static inline uint8_t
clip8(uint32_t sum) {
    int32_t v = (int32_t)sum >> PRECISION_BITS; /* Pillow: clip8_lookups[in >> PRECISION_BITS] */
    return (uint8_t)(v < 0 ? 0 : (v > 255 ? 255 : v));
}

/* One block of BLOCK_ROWS source rows, transposed: columns[col][row * 3 + channel]. Output:
   out[j][row * 3 + channel] for each of the `count` output columns. */
KERNEL static void
horizontal_block(
    const uint8_t *columns, int count, const int *bounds, const int32_t *coeffs, int ksize,
    int first_column, uint8_t *out
) {
    for (int j = 0; j < count; j++) {
        const uint8_t *base = columns + (size_t)(bounds[j * 2] - first_column) * BLOCK_STRIDE;
        const int taps = bounds[j * 2 + 1];
        const int32_t *k = coeffs + (size_t)j * ksize;
        uint32_t acc[BLOCK_LANES];
        for (int l = 0; l < BLOCK_LANES; l++) {
            acc[l] = 1u << (PRECISION_BITS - 1);
        }
        for (int t = 0; t < taps; t++) {
            const uint32_t c = (uint32_t)k[t];
            const uint8_t *p = base + (size_t)t * BLOCK_STRIDE;
            for (int l = 0; l < BLOCK_LANES; l++) {
                acc[l] += p[l] * c;
            }
        }
        uint8_t *o = out + (size_t)j * BLOCK_STRIDE;
        for (int l = 0; l < BLOCK_LANES; l++) {
            o[l] = clip8(acc[l]);
        }
    }
}

/* `width` bytes of one output row from `taps` rows starting at `src`, `stride` bytes apart. */
KERNEL static void
vertical_row(const uint8_t *src, ptrdiff_t stride, int taps, const int32_t *k, int width, uint8_t *out) {
    if (width < ROW_LANES) {
        uint32_t acc[ROW_LANES];
        for (int l = 0; l < width; l++) {
            acc[l] = 1u << (PRECISION_BITS - 1);
        }
        for (int t = 0; t < taps; t++) {
            const uint32_t c = (uint32_t)k[t];
            const uint8_t *p = src + t * stride;
            for (int l = 0; l < width; l++) {
                acc[l] += p[l] * c;
            }
        }
        for (int l = 0; l < width; l++) {
            out[l] = clip8(acc[l]);
        }
        return;
    }
    for (int start = 0; start < width; start += ROW_LANES) {
        /* the last chunk overlaps the one before: recomputing a value gives the same value */
        const int at = start + ROW_LANES <= width ? start : width - ROW_LANES;
        uint32_t acc[ROW_LANES];
        for (int l = 0; l < ROW_LANES; l++) {
            acc[l] = 1u << (PRECISION_BITS - 1);
        }
        for (int t = 0; t < taps; t++) {
            const uint32_t c = (uint32_t)k[t];
            const uint8_t *p = src + t * stride + at;
            for (int l = 0; l < ROW_LANES; l++) {
                acc[l] += p[l] * c;
            }
        }
        for (int l = 0; l < ROW_LANES; l++) {
            out[at + l] = clip8(acc[l]);
        }
    }
}

/* ---- the stages of one resize ---- */

/* Up to BLOCK_ROWS rows resampled horizontally; the results stay in `block_out` (see block_row).
   h's bounds read source columns [first, last); `src` points at column `first` of the first row
   (`ps` bytes a pixel); `columns` holds (last - first) * BLOCK_STRIDE bytes and `block_out`
   count * BLOCK_STRIDE. With fewer rows than a block the other lanes hold stale values, unused. */
static void
horizontal_rows(
    const uint8_t *src, ptrdiff_t src_stride, int ps, int rows, const Coeffs *h, int count, int first,
    int last, uint8_t *columns, uint8_t *block_out
) {
    const int ncolumns = last - first;
    /* transpose: columns[x][r * 3 + channel], 4 bytes a copy where the 4th byte is either
       overwritten by the next row or lands in a column's spare bytes */
    for (int r = 0; r < rows; r++) {
        const uint8_t *line = src + r * src_stride;
        uint8_t *col = columns + r * CHANNELS;
        const int wide = ps == 4 ? ncolumns : ncolumns - 1; /* the last RGB pixel may end the buffer */
        for (int x = 0; x < wide; x++) {
            uint32_t pixel;
            memcpy(&pixel, line + (size_t)x * ps, 4);
            memcpy(col + (size_t)x * BLOCK_STRIDE, &pixel, 4);
        }
        for (int x = wide > 0 ? wide : 0; x < ncolumns; x++) {
            memcpy(col + (size_t)x * BLOCK_STRIDE, line + (size_t)x * ps, CHANNELS);
        }
    }
    horizontal_block(columns, count, h->bounds, h->coeffs, h->ksize, first, block_out);
}

/* Row r of the last horizontal_rows, `count` pixels of 3 bytes, into `out` (4 bytes a copy but the
   last: the next pixel overwrites the 4th). */
static void
block_row(const uint8_t *block_out, int r, int count, uint8_t *out) {
    const uint8_t *in = block_out + r * CHANNELS;
    for (int x = 0; x < count - 1; x++) {
        uint32_t pixel;
        memcpy(&pixel, in + (size_t)x * BLOCK_STRIDE, 4);
        memcpy(out + x * CHANNELS, &pixel, 4);
    }
    memcpy(out + (count - 1) * CHANNELS, in + (size_t)(count - 1) * BLOCK_STRIDE, CHANNELS);
}

/* `count` pixels of one row as 3 bytes a pixel. */
static void
copy_row(const uint8_t *src, int ps, int count, uint8_t *out) {
    if (ps == CHANNELS) {
        memcpy(out, src, (size_t)count * CHANNELS);
        return;
    }
    for (int x = 0; x < count; x++) {
        memcpy(out + x * CHANNELS, src + (ptrdiff_t)x * ps, CHANNELS);
    }
}

/* Output rows [first, first + count) of v, `width` bytes each: v's bounds count from src's row 0. */
static void
vertical_rows(
    const uint8_t *src, ptrdiff_t src_stride, int width, const Coeffs *v, int first, int count,
    uint8_t *dest, ptrdiff_t dest_stride
) {
    for (int y = first; y < first + count; y++) {
        vertical_row(
            src + v->bounds[y * 2] * src_stride, src_stride, v->bounds[y * 2 + 1],
            v->coeffs + (size_t)y * v->ksize, width, dest + (y - first) * dest_stride
        );
    }
}

/* ---- one resize ---- */

typedef struct {
    const uint8_t *pixels; /* source rows, `row_stride` bytes apart, `pixel_stride` bytes a pixel */
    ptrdiff_t row_stride;
    int pixel_stride; /* 3 (RGB) or 4 (Pillow's own RGBX storage; the 4th byte is ignored) */
    int width, height; /* source */
    int out_width, out_height;
    int left, top, right, bottom; /* window of the resized image */
    const Filter *filter;
} Job;

typedef struct {
    Coeffs h, v;
    int row_first, row_last;       /* source rows the window reads */
    int column_first, column_last; /* source columns the window reads */
    uint8_t *columns;              /* one transposed block of rows (horizontal pass) */
    uint8_t *block_out;            /* the horizontal pass's output for one block */
    uint8_t *temp;                 /* rows between the passes */
} Plan;

static void
plan_free(Plan *p) {
    free(p->h.bounds);
    free(p->h.coeffs);
    free(p->h.scratch);
    free(p->v.bounds);
    free(p->v.coeffs);
    free(p->v.scratch);
    free(p->columns);
    free(p->block_out);
    free(p->temp);
}

static int
coeffs_alloc(Coeffs *c, int ksize, int count) {
    c->ksize = ksize;
    if ((size_t)ksize > SIZE_MAX / sizeof(double) / (size_t)count) {
        return 0;
    }
    c->bounds = malloc((size_t)count * 2 * sizeof(int));
    c->coeffs = calloc((size_t)count * (size_t)ksize, sizeof(int32_t));
    c->scratch = malloc((size_t)ksize * sizeof(double));
    return c->bounds && c->coeffs && c->scratch;
}

/* The coefficients of outputs [first, last) of one axis, and the source span [*lo, *hi) they read. */
static int
axis_plan(int in_size, int out_size, const Filter *filter, int first, int last, Coeffs *c, int *lo, int *hi) {
    const int count = last - first;
    if (!coeffs_alloc(c, coeffs_ksize(in_size, out_size, filter), count)) {
        return 0;
    }
    coeffs_compute(in_size, out_size, filter, first, last, c);
    *lo = in_size;
    *hi = 0;
    for (int i = 0; i < count; i++) {
        int start = c->bounds[i * 2], end = start + c->bounds[i * 2 + 1];
        *lo = start < *lo ? start : *lo;
        *hi = end > *hi ? end : *hi;
    }
    if (*hi < *lo) {
        *hi = *lo;
    }
    return 1;
}

static void
shift_bounds(Coeffs *c, int count, int by) {
    for (int i = 0; i < count; i++) {
        c->bounds[i * 2] -= by;
    }
}

/* The window into `out` (window_h x window_w x 3, C order); 0 when out of memory. Runs without
   the GIL: nothing here touches a Python object. */
/* Rows of the first pass as the second needs them, in a ring of `ring` rows stored twice (slot s
   and s + ring), so that any `ring` consecutive rows lie at one stride: each output row's taps. */
typedef struct {
    uint8_t *rows;
    int ring, produced;
    ptrdiff_t stride;
} Ring;

/* Where row `row` goes (its first copy); ring_mirror makes the second. */
static uint8_t *
ring_slot(const Ring *ring, int row) {
    return ring->rows + (ptrdiff_t)(row % ring->ring) * ring->stride;
}

static void
ring_mirror(const Ring *ring, int row) {
    uint8_t *slot = ring_slot(ring, row);
    memcpy(slot + (ptrdiff_t)ring->ring * ring->stride, slot, (size_t)ring->stride);
}

/* The window into `out` (window_h x window_w x 3, C order); 0 when out of memory. Runs without
   the GIL: nothing here touches a Python object. */
static int
run_job(const Job *job, uint8_t *out) {
    const int window_w = job->right - job->left, window_h = job->bottom - job->top;
    const int ps = job->pixel_stride;
    const ptrdiff_t out_stride = (ptrdiff_t)window_w * CHANNELS;
    const int need_h = job->out_width != job->width, need_v = job->out_height != job->height;
    /* ImagingResampleInner (13.0.0): the vertical pass goes first when the height shrinks by more
       than twice as many pixels as the width */
    const int vertical_first = need_h && need_v && job->out_height < job->height &&
                               (int64_t)job->height - job->out_height >
                                   2 * ((int64_t)job->width - job->out_width);
    Plan plan;
    Plan *p = &plan;
    memset(p, 0, sizeof(plan));
    int ok = 1;
    if (need_v) {
        ok = ok && axis_plan(job->height, job->out_height, job->filter, job->top, job->bottom, &p->v,
                             &p->row_first, &p->row_last);
        if (ok) {
            shift_bounds(&p->v, window_h, p->row_first);
        }
    } else {
        p->row_first = job->top;
        p->row_last = job->bottom;
    }
    if (need_h) {
        ok = ok && axis_plan(job->width, job->out_width, job->filter, job->left, job->right, &p->h,
                             &p->column_first, &p->column_last);
        if (ok) {
            size_t columns = (size_t)(p->column_last - p->column_first);
            p->columns = calloc((columns ? columns : 1) * BLOCK_STRIDE, 1);
            p->block_out = malloc((size_t)window_w * BLOCK_STRIDE);
            ok = p->columns && p->block_out;
        }
    } else {
        p->column_first = job->left;
        p->column_last = job->right;
    }
    const int rows = p->row_last - p->row_first, columns = p->column_last - p->column_first;
    const uint8_t *source = job->pixels + (ptrdiff_t)p->row_first * job->row_stride;
    const uint8_t *source_columns = source + (ptrdiff_t)p->column_first * ps;
    if (!ok) {
        /* out of memory */
    } else if (vertical_first) {
        /* BLOCK_ROWS window rows at a time: vertically (all the columns they read, ps bytes a
           pixel), then horizontally straight into the output */
        const ptrdiff_t temp_stride = (ptrdiff_t)(columns ? columns : 1) * ps;
        p->temp = malloc((size_t)BLOCK_ROWS * (size_t)temp_stride);
        ok = p->temp != NULL;
        for (int y = 0; ok && y < window_h; y += BLOCK_ROWS) {
            const int n = window_h - y < BLOCK_ROWS ? window_h - y : BLOCK_ROWS;
            vertical_rows(source_columns, job->row_stride, columns * ps, &p->v, y, n, p->temp, temp_stride);
            horizontal_rows(p->temp, temp_stride, ps, n, &p->h, window_w, p->column_first, p->column_last,
                            p->columns, p->block_out);
            for (int r = 0; r < n; r++) {
                block_row(p->block_out, r, window_w, out + (y + r) * out_stride);
            }
        }
    } else if (need_v && !need_h && ps == CHANNELS) { /* the vertical pass reads the source in place */
        vertical_rows(source_columns, job->row_stride, (int)out_stride, &p->v, 0, window_h, out, out_stride);
    } else if (need_v) {
        /* horizontally (or copied) into a ring of rows, then vertically, one output row at a time;
           the ring holds every row when the bounds are not monotonic (they always are in practice) */
        Ring ring = {.ring = p->v.ksize + BLOCK_ROWS, .produced = 0, .stride = out_stride};
        for (int y = 1; y < window_h; y++) {
            if (p->v.bounds[y * 2] < p->v.bounds[y * 2 - 2] ||
                p->v.bounds[y * 2] + p->v.bounds[y * 2 + 1] < p->v.bounds[y * 2 - 2] + p->v.bounds[y * 2 - 1]) {
                ring.ring = rows;
            }
        }
        ring.ring = ring.ring > rows ? (rows ? rows : 1) : ring.ring;
        ring.rows = p->temp = malloc((size_t)ring.ring * 2 * (size_t)out_stride);
        ok = p->temp != NULL;
        for (int y = 0; ok && y < window_h; y++) {
            const int lo = p->v.bounds[y * 2], taps = p->v.bounds[y * 2 + 1];
            while (ring.produced < lo + taps) {
                const int n = rows - ring.produced < BLOCK_ROWS ? rows - ring.produced : BLOCK_ROWS;
                const uint8_t *src = source_columns + ring.produced * job->row_stride;
                if (need_h) {
                    horizontal_rows(src, job->row_stride, ps, n, &p->h, window_w, p->column_first,
                                    p->column_last, p->columns, p->block_out);
                }
                for (int r = 0; r < n; r++) {
                    uint8_t *slot = ring_slot(&ring, ring.produced + r);
                    if (need_h) {
                        block_row(p->block_out, r, window_w, slot);
                    } else {
                        copy_row(src + r * job->row_stride, ps, window_w, slot);
                    }
                    ring_mirror(&ring, ring.produced + r);
                }
                ring.produced += n;
            }
            vertical_row(ring_slot(&ring, lo), out_stride, taps,
                         p->v.coeffs + (size_t)y * p->v.ksize, (int)out_stride, out + y * out_stride);
        }
    } else if (need_h) { /* horizontally straight into the output */
        for (int y = 0; y < window_h; y += BLOCK_ROWS) {
            const int n = window_h - y < BLOCK_ROWS ? window_h - y : BLOCK_ROWS;
            horizontal_rows(source_columns + y * job->row_stride, job->row_stride, ps, n, &p->h, window_w,
                            p->column_first, p->column_last, p->columns, p->block_out);
            for (int r = 0; r < n; r++) {
                block_row(p->block_out, r, window_w, out + (y + r) * out_stride);
            }
        }
    } else {
        for (int y = 0; y < window_h; y++) {
            copy_row(source_columns + y * job->row_stride, ps, window_w, out + y * out_stride);
        }
    }
    plan_free(p);
    return ok;
}

/* ---- Python glue ---- */

static PyObject *numpy_empty = NULL;
static PyObject *numpy_uint8 = NULL;

static int
parse_int(PyObject *obj, const char *what, long *value) {
    PyObject *index = PyNumber_Index(obj);
    if (!index) {
        PyErr_Format(PyExc_TypeError, "%s must be integers, not %.100s", what, Py_TYPE(obj)->tp_name);
        return 0;
    }
    *value = PyLong_AsLong(index);
    Py_DECREF(index);
    if (*value == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s is out of range", what);
        return 0;
    }
    return 1;
}

static int
parse_ints(PyObject *obj, const char *what, int n, long *values) {
    if (!PyTuple_Check(obj) && !PyList_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a tuple of %d integers, not %.100s", what, n, Py_TYPE(obj)->tp_name);
        return 0;
    }
    if (PySequence_Fast_GET_SIZE(obj) != n) {
        PyErr_Format(PyExc_ValueError, "%s must have %d items, got %zd", what, n, PySequence_Fast_GET_SIZE(obj));
        return 0;
    }
    for (int i = 0; i < n; i++) {
        if (!parse_int(PySequence_Fast_GET_ITEM(obj, i), what, &values[i])) {
            return 0;
        }
    }
    return 1;
}

/* Checks the sizes, the filter and the window; fills the job's output fields. */
static int
parse_geometry(Job *job, PyObject *size, PyObject *resample, PyObject *window) {
    long out[2], filter, box[4];
    if (job->width < 1 || job->height < 1 || job->width > MAX_SIDE || job->height > MAX_SIDE) {
        PyErr_Format(PyExc_ValueError, "image size %dx%d is outside 1..%d per side", job->width, job->height, MAX_SIDE);
        return 0;
    }
    if (!parse_ints(size, "size", 2, out)) {
        return 0;
    }
    if (out[0] < 1 || out[1] < 1 || out[0] > MAX_SIDE || out[1] > MAX_SIDE) {
        PyErr_Format(PyExc_ValueError, "size (%ld, %ld) is outside 1..%d per side", out[0], out[1], MAX_SIDE);
        return 0;
    }
    if (!parse_int(resample, "resample", &filter)) {
        return 0;
    }
    if (filter < 1 || filter >= FILTER_COUNT) {
        PyErr_Format(PyExc_ValueError,
                     "resample %ld is not mirrored here (LANCZOS=1, BILINEAR=2, BICUBIC=3, BOX=4, HAMMING=5)", filter);
        return 0;
    }
    if (window == Py_None) {
        box[0] = box[1] = 0;
        box[2] = out[0];
        box[3] = out[1];
    } else if (!parse_ints(window, "window", 4, box)) {
        return 0;
    }
    if (!(0 <= box[0] && box[0] < box[2] && box[2] <= out[0] && 0 <= box[1] && box[1] < box[3] && box[3] <= out[1])) {
        PyErr_Format(PyExc_ValueError,
                     "window (%ld, %ld, %ld, %ld) is not a non-empty (left, top, right, bottom) box inside %ldx%ld",
                     box[0], box[1], box[2], box[3], out[0], out[1]);
        return 0;
    }
    job->out_width = (int)out[0];
    job->out_height = (int)out[1];
    job->left = (int)box[0];
    job->top = (int)box[1];
    job->right = (int)box[2];
    job->bottom = (int)box[3];
    job->filter = &FILTERS[filter];
    return 1;
}

/* A new uint8 array holding the job's window; the work runs without the GIL. */
static PyObject *
execute(const Job *job) {
    PyObject *result = PyObject_CallFunction(
        numpy_empty, "((iii)O)", job->bottom - job->top, job->right - job->left, CHANNELS, numpy_uint8
    );
    if (!result) {
        return NULL;
    }
    Py_buffer out;
    if (PyObject_GetBuffer(result, &out, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        Py_DECREF(result);
        return NULL;
    }
    int ok;
    Py_BEGIN_ALLOW_THREADS;
    ok = run_job(job, (uint8_t *)out.buf);
    Py_END_ALLOW_THREADS;
    PyBuffer_Release(&out);
    if (!ok) {
        Py_DECREF(result);
        return PyErr_NoMemory();
    }
    return result;
}

static int
is_uint8_format(const char *format) {
    if (format == NULL) {
        return 1; /* the buffer protocol's default: unsigned bytes */
    }
    if (*format && strchr("@=<>!", *format)) {
        format++;
    }
    return strcmp(format, "B") == 0;
}

/* The pixels argument of resize() and planes(): a C-contiguous uint8 (height, width, 3) buffer in `view`
   (release it), or 0 with the error set. */
static int
get_pixels(PyObject *pixels, Py_buffer *view) {
    if (PyObject_GetBuffer(pixels, view, PyBUF_RECORDS_RO) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "pixels must be a uint8 array (height, width, 3), not %.100s",
                     Py_TYPE(pixels)->tp_name);
        return 0;
    }
    if (!is_uint8_format(view->format) || view->itemsize != 1) {
        PyErr_Format(PyExc_TypeError, "pixels must be uint8, got buffer format '%s'", view->format ? view->format : "B");
    } else if (view->ndim != 3 || view->shape[2] != CHANNELS) {
        PyErr_Format(PyExc_ValueError, "pixels must have shape (height, width, 3), got %d dimensions%s",
                     view->ndim, view->ndim == 3 ? " with another channel count" : "");
    } else if (!PyBuffer_IsContiguous(view, 'C')) {
        PyErr_SetString(PyExc_ValueError, "pixels must be C-contiguous (use numpy.ascontiguousarray)");
    } else {
        return 1;
    }
    PyBuffer_Release(view);
    return 0;
}

PyDoc_STRVAR(resize_doc,
"resize(pixels, size, resample, window=None) -> numpy.ndarray\n\n"
"np.asarray(Image.fromarray(pixels).resize(size, resample, reducing_gap=None)).crop(window), bit for bit,\n"
"computing only the window. pixels: a C-contiguous uint8 array (height, width, 3); size: (width, height)\n"
"of the whole resized image; resample: LANCZOS=1, BILINEAR=2, BICUBIC=3, BOX=4 or HAMMING=5;\n"
"window: (left, top, right, bottom) as Image.crop takes it, default the whole image.\n"
"Returns a new uint8 array (bottom - top, right - left, 3).");

static PyObject *
resize(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"pixels", "size", "resample", "window", NULL};
    PyObject *pixels, *size, *resample, *window = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO|O:resize", keywords, &pixels, &size, &resample, &window)) {
        return NULL;
    }
    Py_buffer view;
    if (!get_pixels(pixels, &view)) {
        return NULL;
    }
    PyObject *result = NULL;
    if (view.shape[0] > MAX_SIDE || view.shape[1] > MAX_SIDE) {
        PyErr_Format(PyExc_ValueError, "image sides must be at most %d", MAX_SIDE);
    } else {
        Job job = {
            .pixels = view.buf,
            .row_stride = (ptrdiff_t)view.shape[1] * CHANNELS,
            .pixel_stride = CHANNELS,
            .width = (int)view.shape[1],
            .height = (int)view.shape[0],
        };
        if (parse_geometry(&job, size, resample, window)) {
            result = execute(&job);
        }
    }
    PyBuffer_Release(&view);
    return result;
}

/* The Arrow C data interface (https://arrow.apache.org/docs/format/CDataInterface.html). */
struct ArrowSchema {
    const char *format;
    const char *name;
    const char *metadata;
    int64_t flags;
    int64_t n_children;
    struct ArrowSchema **children;
    struct ArrowSchema *dictionary;
    void (*release)(struct ArrowSchema *);
    void *private_data;
};

struct ArrowArray {
    int64_t length;
    int64_t null_count;
    int64_t offset;
    int64_t n_buffers;
    int64_t n_children;
    const void **buffers;
    struct ArrowArray **children;
    struct ArrowArray *dictionary;
    void (*release)(struct ArrowArray *);
    void *private_data;
};

PyDoc_STRVAR(resize_arrow_doc,
"resize_arrow(schema, array, image_size, size, resample, window=None) -> numpy.ndarray\n\n"
"resize() reading a Pillow RGB image in place: schema and array are the capsules of\n"
"image.__arrow_c_array__() (Pillow's RGBX pixels, one contiguous block), image_size is image.size.");

static PyObject *
resize_arrow(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"schema", "array", "image_size", "size", "resample", "window", NULL};
    PyObject *schema_capsule, *array_capsule, *image_size, *size, *resample, *window = Py_None;
    long dims[2];
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOO|O:resize_arrow", keywords, &schema_capsule,
                                     &array_capsule, &image_size, &size, &resample, &window)) {
        return NULL;
    }
    if (!PyCapsule_IsValid(schema_capsule, "arrow_schema") || !PyCapsule_IsValid(array_capsule, "arrow_array")) {
        PyErr_SetString(PyExc_TypeError, "schema and array must be the capsules of image.__arrow_c_array__()");
        return NULL;
    }
    if (!parse_ints(image_size, "image_size", 2, dims)) {
        return NULL;
    }
    if (dims[0] < 1 || dims[1] < 1 || dims[0] > MAX_SIDE || dims[1] > MAX_SIDE) {
        PyErr_Format(PyExc_ValueError, "image_size (%ld, %ld) is outside 1..%d per side", dims[0], dims[1], MAX_SIDE);
        return NULL;
    }
    struct ArrowSchema *schema = PyCapsule_GetPointer(schema_capsule, "arrow_schema");
    struct ArrowArray *array = PyCapsule_GetPointer(array_capsule, "arrow_array");
    const int64_t pixels = (int64_t)dims[0] * dims[1];
    /* Pillow's RGB export: a fixed-size list of 4 uint8 per pixel, the child named after the mode */
    const int layout_ok =
        schema && array && schema->release && array->release && schema->format &&
        strcmp(schema->format, "+w:4") == 0 && schema->n_children == 1 && schema->children[0] &&
        schema->children[0]->format && strcmp(schema->children[0]->format, "C") == 0 &&
        schema->children[0]->name && strcmp(schema->children[0]->name, "RGB") == 0 &&
        array->length == pixels && array->offset == 0 && array->null_count == 0 && array->n_children == 1 &&
        array->children[0] && array->children[0]->length == pixels * 4 && array->children[0]->offset == 0 &&
        array->children[0]->n_buffers == 2 && array->children[0]->buffers &&
        array->children[0]->buffers[1] != NULL;
    if (!layout_ok) {
        PyErr_Format(PyExc_ValueError, "the Arrow export is not one contiguous block of %ldx%ld RGB pixels",
                     dims[0], dims[1]);
        return NULL;
    }
    Job job = {
        .pixels = array->children[0]->buffers[1],
        .row_stride = (ptrdiff_t)dims[0] * 4,
        .pixel_stride = 4,
        .width = (int)dims[0],
        .height = (int)dims[1],
    };
    if (!parse_geometry(&job, size, resample, window)) {
        return NULL;
    }
    return execute(&job); /* the capsules (held by our caller's arguments) keep the pixels alive */
}

PyDoc_STRVAR(planes_doc,
"planes(pixels, table) -> numpy.ndarray\n\n"
"out[c, y, x] = table[c, pixels[y, x, c]]: a C-contiguous uint8 array (height, width, 3) through a\n"
"C-contiguous float32 table (3, 256) into a new float32 array (3, height, width). The value table of\n"
"fastprep (rescale and normalize of every uint8 value, computed by transformers' own numpy ops) applied\n"
"without the GIL: a copy of table entries, so the floats are the table's, whatever the order.");

static int
is_float32_format(const char *format) {
    if (format == NULL) {
        return 0;
    }
    if (*format && strchr("@=<", *format)) { /* native or little-endian: what numpy.float32 is here */
        format++;
    }
    return strcmp(format, "f") == 0;
}

static PyObject *
planes(PyObject *module, PyObject *args) {
    PyObject *pixels, *table;
    if (!PyArg_ParseTuple(args, "OO:planes", &pixels, &table)) {
        return NULL;
    }
    Py_buffer src, lut;
    if (!get_pixels(pixels, &src)) {
        return NULL;
    }
    if (PyObject_GetBuffer(table, &lut, PyBUF_RECORDS_RO) < 0) {
        PyErr_Clear();
        PyBuffer_Release(&src);
        PyErr_Format(PyExc_TypeError, "table must be a float32 array (3, 256), not %.100s", Py_TYPE(table)->tp_name);
        return NULL;
    }
    PyObject *result = NULL;
    if (!is_float32_format(lut.format) || lut.itemsize != 4) {
        PyErr_Format(PyExc_TypeError, "table must be float32, got buffer format '%s'", lut.format ? lut.format : "B");
    } else if (lut.ndim != 2 || lut.shape[0] != CHANNELS || lut.shape[1] != 256 || !PyBuffer_IsContiguous(&lut, 'C')) {
        PyErr_SetString(PyExc_ValueError, "table must be a C-contiguous array of shape (3, 256)");
    } else {
        const Py_ssize_t height = src.shape[0], width = src.shape[1], n = height * width;
        result = PyObject_CallFunction(numpy_empty, "((nnn)s)", (Py_ssize_t)CHANNELS, height, width, "float32");
        Py_buffer out;
        if (result && PyObject_GetBuffer(result, &out, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
            Py_CLEAR(result);
        }
        if (result) {
            const uint8_t *in = src.buf;
            const float *t = lut.buf;
            float *r = out.buf, *g = r + n, *b = g + n;
            Py_BEGIN_ALLOW_THREADS;
            for (Py_ssize_t i = 0; i < n; i++) {
                r[i] = t[in[3 * i]];
                g[i] = t[256 + in[3 * i + 1]];
                b[i] = t[512 + in[3 * i + 2]];
            }
            Py_END_ALLOW_THREADS;
            PyBuffer_Release(&out);
        }
    }
    PyBuffer_Release(&lut);
    PyBuffer_Release(&src);
    return result;
}

static PyMethodDef methods[] = {
    {"resize", (PyCFunction)(void (*)(void))resize, METH_VARARGS | METH_KEYWORDS, resize_doc},
    {"resize_arrow", (PyCFunction)(void (*)(void))resize_arrow, METH_VARARGS | METH_KEYWORDS, resize_arrow_doc},
    {"planes", (PyCFunction)planes, METH_VARARGS, planes_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "_resample",
    "Pillow's 8-bit resampling (13.0.0's Resample.c), bit for bit, computing only a window of the output.",
    -1,
    methods,
};

PyMODINIT_FUNC
PyInit__resample(void) {
    PyObject *numpy = PyImport_ImportModule("numpy");
    if (!numpy) {
        return NULL;
    }
    numpy_empty = PyObject_GetAttrString(numpy, "empty");
    numpy_uint8 = PyObject_GetAttrString(numpy, "uint8");
    Py_DECREF(numpy);
    if (!numpy_empty || !numpy_uint8) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&module_def);
    if (!module) {
        return NULL;
    }
    if (PyModule_AddIntConstant(module, "MAX_SIDE", MAX_SIDE) < 0 ||
        PyModule_AddStringConstant(module, "PILLOW_SOURCE", "13.0.0") < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
