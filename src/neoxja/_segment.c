/* Step 3 of neoxja's tokenizer in C: rewritten text -> token ids.
 *
 * The rule (the reference's, see neoxja/tokenizer.py): at a position that starts with "<", the
 * longest vocabulary word of 3+ characters starting there wins. Otherwise the candidates are the
 * vocabulary words among the next 1, 2 and 3 characters and the smallest id wins (on a tie the
 * longer word). A character with no candidate becomes the <KIGOU> id (U+00A1..U+00BF,
 * U+01C0..U+01C3, U+02B9..U+0362), the <U2000U2BFF> id (U+2000..U+2BFF) or one byte id per UTF-8
 * byte (a lone surrogate stands for U+FFFD).
 *
 * Why C: in Python every token costs a loop iteration, a slice and dict look-ups (about 1 us);
 * here a token is two or three probes of an open-addressing table.
 *
 * Tables, built once per tokenizer from its word -> id dict:
 * - words of 1..3 characters, keyed by their code points packed into 64 bits (21 bits each,
 *   stored plus one so that a shorter word never equals a longer one and 0 means "empty slot").
 *   Each 1- and 2-character prefix of a word is in the table too, flagged "extends", so that the
 *   longer look-ups are skipped where no word continues;
 * - words of 3+ characters starting with "<", keyed by a hash of their code points and their
 *   length, checked against their stored text.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    uint64_t key; /* packed code points; 0: empty slot */
    int32_t id;   /* -1: only a prefix of longer words */
    int32_t extends;
} ShortEntry;

typedef struct {
    ShortEntry *slots;
    uint64_t mask;
} ShortTable;

typedef struct {
    uint64_t hash; /* 0: empty slot */
    Py_ssize_t offset;
    Py_ssize_t length;
    int32_t id;
} LongEntry;

typedef struct {
    PyObject_HEAD
    /* bmp[c]: the 1-character entry of a BMP character c as (id + 1) | extends << 31 (0: none) */
    uint32_t *bmp;
    ShortTable shorts[3]; /* words (and prefixes) of 1 (outside the BMP), 2 and 3 characters */
    LongEntry *longs; /* NULL when the vocabulary has no "<" word of 3+ characters */
    uint64_t long_mask;
    Py_UCS4 *long_text; /* the "<" words' code points, back to back */
    Py_ssize_t long_max; /* the longest "<" word */
    char *long_lengths;  /* long_lengths[L]: some "<" word has length L */
    int32_t kigou_id, u2000_id;
    int32_t byte_ids[256];
    PyObject **ints; /* id -> its int object, made on first use (ids below n_ints) */
    Py_ssize_t n_ints;
    int ready; /* every table built: set last by a successful __init__ */
} Segmenter;

static inline uint64_t
pack3(Py_UCS4 a, Py_UCS4 b, Py_UCS4 c)
{
    return (uint64_t)(a + 1) | ((uint64_t)(b + 1) << 21) | ((uint64_t)(c + 1) << 42);
}

static inline uint64_t
mix(uint64_t x)
{
    x ^= x >> 31;
    x *= 0x9E3779B97F4A7C15ULL;
    x ^= x >> 29;
    return x;
}

static ShortEntry *
short_slot(const ShortTable *t, uint64_t key)
{
    uint64_t i = mix(key) & t->mask;
    while (t->slots[i].key != 0 && t->slots[i].key != key)
        i = (i + 1) & t->mask;
    return &t->slots[i];
}

static inline const ShortEntry *
short_find(const ShortTable *t, uint64_t key)
{
    uint64_t i = mix(key) & t->mask;
    for (;;) {
        const ShortEntry *e = &t->slots[i];
        if (e->key == key)
            return e;
        if (e->key == 0)
            return NULL;
        i = (i + 1) & t->mask;
    }
}

static inline uint64_t
hash_step(uint64_t h, Py_UCS4 c)
{
    return (h ^ c) * 0x100000001B3ULL;
}

static inline uint64_t
long_hash(uint64_t h, Py_ssize_t length)
{
    uint64_t x = mix(h ^ ((uint64_t)length << 56));
    return x ? x : 1;
}

static uint64_t
table_size(Py_ssize_t entries)
{
    uint64_t size = 16;
    while (size < (uint64_t)entries * 4 / 3)
        size <<= 1;
    return size;
}

/* Enter a word of 1..3 characters and mark its shorter prefixes as extended. */
static void
add_short(Segmenter *s, const Py_UCS4 *cp, Py_ssize_t len, int32_t id)
{
    for (Py_ssize_t k = 1; k <= len; k++) {
        if (k == 1 && cp[0] < 0x10000) {
            uint32_t *v = &s->bmp[cp[0]];
            if (k == len)
                *v = (*v & 0x80000000u) | (uint32_t)(id + 1);
            else
                *v |= 0x80000000u;
            continue;
        }
        uint64_t key = pack3(cp[0], k > 1 ? cp[1] : (Py_UCS4)-1, k > 2 ? cp[2] : (Py_UCS4)-1);
        ShortEntry *e = short_slot(&s->shorts[k - 1], key);
        if (e->key == 0) {
            e->key = key;
            e->id = -1;
        }
        if (k == len)
            e->id = id;
        else
            e->extends = 1;
    }
}

/* Frees the tables, leaving the segmenter uninitialised (an __init__ that fails part way calls it,
 * so no half-built table is ever used). */
static void
free_tables(Segmenter *s)
{
    if (s->ints != NULL) {
        for (Py_ssize_t i = 0; i < s->n_ints; i++)
            Py_CLEAR(s->ints[i]);
        PyMem_Free(s->ints);
    }
    PyMem_Free(s->bmp);
    for (int k = 0; k < 3; k++)
        PyMem_Free(s->shorts[k].slots);
    PyMem_Free(s->longs);
    PyMem_Free(s->long_text);
    PyMem_Free(s->long_lengths);
    memset((char *)s + offsetof(Segmenter, bmp), 0, sizeof(Segmenter) - offsetof(Segmenter, bmp));
}

static void
Segmenter_dealloc(Segmenter *s)
{
    free_tables(s);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

/* An id argument: an int in 0..INT32_MAX, else a TypeError or ValueError naming `what`. It may run
 * Python code (__index__), so callers read it from objects nobody else can change meanwhile. */
static int
id_arg(PyObject *value, const char *what, int32_t *out)
{
    long v = PyLong_AsLong(value);
    if (v == -1 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "%s: id is outside 0..%ld", what, (long)INT32_MAX);
        }
        else if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "%s: an id must be an int, got %.100s", what, Py_TYPE(value)->tp_name);
        }
        return -1;
    }
    if (v < 0 || v > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "%s: id %ld is outside 0..%ld", what, v, (long)INT32_MAX);
        return -1;
    }
    *out = (int32_t)v;
    return 0;
}

/* Builds the tables into s (a private struct, see Segmenter_init) from private copies of the arguments: the vocabulary's (word, id) pairs as a new
 * list and byte_ids as a tuple, every id converted before any table is sized, so that Python code
 * run by a conversion (an __index__ that changes the dict or the list) cannot make the second pass
 * see more words than the first counted. */
static int
build_tables(Segmenter *s, PyObject *vocab, PyObject *kigou, PyObject *u2000, PyObject *byte_ids)
{
    if (id_arg(kigou, "kigou_id", &s->kigou_id) < 0 || id_arg(u2000, "u2000_id", &s->u2000_id) < 0)
        return -1;
    PyObject *bytes = PySequence_Check(byte_ids) ? PySequence_Tuple(byte_ids) : NULL;
    if (bytes == NULL) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "byte_ids must be a sequence of 256 ids, got %.100s",
                     Py_TYPE(byte_ids)->tp_name);
        return -1;
    }
    if (PyTuple_GET_SIZE(bytes) != 256) {
        PyErr_Format(PyExc_ValueError, "byte_ids must hold 256 ids, got %zd", PyTuple_GET_SIZE(bytes));
        Py_DECREF(bytes);
        return -1;
    }
    for (int b = 0; b < 256; b++) {
        if (id_arg(PyTuple_GET_ITEM(bytes, b), "byte_ids", &s->byte_ids[b]) < 0) {
            Py_DECREF(bytes);
            return -1;
        }
    }
    Py_DECREF(bytes);

    PyObject *items = PyDict_Items(vocab);
    if (items == NULL)
        return -1;
    Py_ssize_t n = PyList_GET_SIZE(items);
    int32_t *ids = PyMem_Malloc((n ? n : 1) * sizeof(int32_t));
    int status = -1;
    if (ids == NULL) {
        PyErr_NoMemory();
        goto done;
    }

    /* First pass: check every word and id, count the words of each table, find the largest id. */
    Py_ssize_t n_short[3] = {0, 0, 0}, n_long = 0, long_chars = 0;
    int32_t max_id = s->kigou_id > s->u2000_id ? s->kigou_id : s->u2000_id;
    for (int b = 0; b < 256; b++)
        max_id = s->byte_ids[b] > max_id ? s->byte_ids[b] : max_id;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *word = PyTuple_GET_ITEM(PyList_GET_ITEM(items, i), 0);
        if (!PyUnicode_Check(word)) {
            PyErr_Format(PyExc_TypeError, "vocab keys must be str, got %.100s", Py_TYPE(word)->tp_name);
            goto done;
        }
        if (id_arg(PyTuple_GET_ITEM(PyList_GET_ITEM(items, i), 1), "vocab", &ids[i]) < 0)
            goto done;
        max_id = ids[i] > max_id ? ids[i] : max_id;
        Py_ssize_t len = PyUnicode_GET_LENGTH(word);
        for (Py_ssize_t k = 1; k <= len && len <= 3; k++)
            n_short[k - 1]++; /* the word and its prefixes (an upper bound of each table's entries) */
        if (len >= 3 && PyUnicode_READ_CHAR(word, 0) == '<') {
            n_long++;
            long_chars += len;
            s->long_max = len > s->long_max ? len : s->long_max;
        }
    }
    if (max_id == INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "ids (vocab, kigou_id, u2000_id, byte_ids) must be below 2**31 - 1");
        goto done;
    }
    s->bmp = PyMem_Calloc(0x10000, sizeof(uint32_t));
    for (int k = 0; k < 3; k++) {
        uint64_t size = table_size(n_short[k]);
        s->shorts[k].slots = PyMem_Calloc(size, sizeof(ShortEntry));
        s->shorts[k].mask = size - 1;
        if (s->shorts[k].slots == NULL) {
            PyErr_NoMemory();
            goto done;
        }
    }
    /* ids beyond a dense vocabulary's range (a sparse or hostile one) get int objects made per use */
    s->n_ints = (Py_ssize_t)max_id + 1 < 2 * (n + 258) ? (Py_ssize_t)max_id + 1 : 2 * (n + 258);
    s->ints = PyMem_Calloc(s->n_ints, sizeof(PyObject *));
    if (s->bmp == NULL || s->ints == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (n_long) {
        uint64_t size = table_size(n_long);
        s->longs = PyMem_Calloc(size, sizeof(LongEntry));
        s->long_mask = size - 1;
        s->long_text = PyMem_Malloc(long_chars * sizeof(Py_UCS4));
        s->long_lengths = PyMem_Calloc(s->long_max + 1, 1);
        if (s->longs == NULL || s->long_text == NULL || s->long_lengths == NULL) {
            PyErr_NoMemory();
            goto done;
        }
    }

    /* Second pass: fill the tables (no Python code runs here). */
    Py_ssize_t text_used = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *word = PyTuple_GET_ITEM(PyList_GET_ITEM(items, i), 0);
        int32_t id = ids[i];
        Py_ssize_t len = PyUnicode_GET_LENGTH(word);
        if (len >= 1 && len <= 3) {
            Py_UCS4 cp[3];
            for (Py_ssize_t k = 0; k < len; k++)
                cp[k] = PyUnicode_READ_CHAR(word, k);
            add_short(s, cp, len, id);
        }
        if (len >= 3 && PyUnicode_READ_CHAR(word, 0) == '<') {
            Py_UCS4 *text = s->long_text + text_used;
            uint64_t h = 0;
            for (Py_ssize_t k = 0; k < len; k++) {
                text[k] = PyUnicode_READ_CHAR(word, k);
                h = hash_step(h, text[k]);
            }
            h = long_hash(h, len);
            uint64_t slot = h & s->long_mask;
            while (s->longs[slot].hash != 0)
                slot = (slot + 1) & s->long_mask;
            s->longs[slot] = (LongEntry){h, text_used, len, id};
            s->long_lengths[len] = 1;
            text_used += len;
        }
    }
    status = 0;
done:
    PyMem_Free(ids);
    Py_DECREF(items);
    return status;
}

static int
Segmenter_init(Segmenter *s, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"vocab", "kigou_id", "u2000_id", "byte_ids", NULL};
    PyObject *vocab, *kigou, *u2000, *byte_ids;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!OOO:Segmenter", kwlist, &PyDict_Type, &vocab, &kigou,
                                     &u2000, &byte_ids))
        return -1;
    if (s->ready) {
        PyErr_SetString(PyExc_RuntimeError, "Segmenter is already initialised");
        return -1;
    }
    /* Built aside and moved in at the end: a conversion that runs Python code may let another thread
     * call __init__ or segment() on this object meanwhile, and must find it untouched. */
    Segmenter built;
    memset(&built, 0, sizeof built);
    if (build_tables(&built, vocab, kigou, u2000, byte_ids) < 0) {
        free_tables(&built);
        return -1;
    }
    if (s->ready) {
        free_tables(&built);
        PyErr_SetString(PyExc_RuntimeError, "Segmenter is already initialised");
        return -1;
    }
    memcpy((char *)s + offsetof(Segmenter, bmp), (char *)&built + offsetof(Segmenter, bmp),
           sizeof(Segmenter) - offsetof(Segmenter, bmp));
    s->ready = 1;
    return 0;
}

/* The id of the longest "<" word of 3+ characters at text[pos:], or -1; its length in *len. */
#define DEFINE_LONG_MATCH(NAME, T)                                                                       \
    static int32_t NAME(const Segmenter *s, const T *text, Py_ssize_t pos, Py_ssize_t n, Py_ssize_t *len) \
    {                                                                                                    \
        Py_ssize_t limit = n - pos < s->long_max ? n - pos : s->long_max;                                \
        int32_t best = -1;                                                                               \
        uint64_t h = 0;                                                                                  \
        for (Py_ssize_t L = 1; L <= limit; L++) {                                                        \
            h = hash_step(h, text[pos + L - 1]);                                                         \
            if (L < 3 || !s->long_lengths[L])                                                            \
                continue;                                                                                \
            uint64_t want = long_hash(h, L);                                                             \
            for (uint64_t i = want & s->long_mask; s->longs[i].hash != 0; i = (i + 1) & s->long_mask) { \
                const LongEntry *e = &s->longs[i];                                                       \
                if (e->hash != want || e->length != L)                                                   \
                    continue;                                                                            \
                const Py_UCS4 *w = s->long_text + e->offset;                                             \
                Py_ssize_t k = 0;                                                                        \
                while (k < L && w[k] == (Py_UCS4)text[pos + k])                                          \
                    k++;                                                                                 \
                if (k == L) {                                                                            \
                    best = e->id;                                                                        \
                    *len = L;                                                                            \
                    break;                                                                               \
                }                                                                                        \
            }                                                                                            \
        }                                                                                                \
        return best;                                                                                     \
    }

DEFINE_LONG_MATCH(long_match_1, Py_UCS1)
DEFINE_LONG_MATCH(long_match_2, Py_UCS2)
DEFINE_LONG_MATCH(long_match_4, Py_UCS4)

typedef struct {
    int32_t *ids;
    Py_ssize_t size, capacity;
} IdBuffer;

static int
reserve(IdBuffer *buf, Py_ssize_t more)
{
    if (buf->size + more <= buf->capacity)
        return 0;
    Py_ssize_t capacity = buf->capacity * 2 + more + 64;
    int32_t *ids = PyMem_Realloc(buf->ids, capacity * sizeof(int32_t));
    if (ids == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    buf->ids = ids;
    buf->capacity = capacity;
    return 0;
}

/* The ids of one character that no word covers. Room for 4 ids must be reserved. */
static inline void
fallback(const Segmenter *s, Py_UCS4 c, IdBuffer *buf)
{
    int32_t *out = buf->ids + buf->size;
    if ((c >= 0xA1 && c <= 0xBF) || (c >= 0x1C0 && c <= 0x1C3) || (c >= 0x2B9 && c <= 0x362)) {
        out[0] = s->kigou_id;
        buf->size += 1;
    }
    else if (c >= 0x2000 && c <= 0x2BFF) {
        out[0] = s->u2000_id;
        buf->size += 1;
    }
    else if (c < 0x80) {
        out[0] = s->byte_ids[c];
        buf->size += 1;
    }
    else if (c < 0x800) {
        out[0] = s->byte_ids[0xC0 | (c >> 6)];
        out[1] = s->byte_ids[0x80 | (c & 0x3F)];
        buf->size += 2;
    }
    else if (c < 0x10000) {
        if (c >= 0xD800 && c <= 0xDFFF) /* a lone surrogate has no UTF-8 form: U+FFFD */
            c = 0xFFFD;
        out[0] = s->byte_ids[0xE0 | (c >> 12)];
        out[1] = s->byte_ids[0x80 | ((c >> 6) & 0x3F)];
        out[2] = s->byte_ids[0x80 | (c & 0x3F)];
        buf->size += 3;
    }
    else {
        out[0] = s->byte_ids[0xF0 | (c >> 18)];
        out[1] = s->byte_ids[0x80 | ((c >> 12) & 0x3F)];
        out[2] = s->byte_ids[0x80 | ((c >> 6) & 0x3F)];
        out[3] = s->byte_ids[0x80 | (c & 0x3F)];
        buf->size += 4;
    }
}

#define DEFINE_SEGMENT(NAME, T, LONG_MATCH)                                                       \
    static int NAME(const Segmenter *s, const T *text, Py_ssize_t n, IdBuffer *buf)               \
    {                                                                                            \
        Py_ssize_t pos = 0;                                                                      \
        while (pos < n) {                                                                        \
            if (reserve(buf, 4) < 0)                                                             \
                return -1;                                                                       \
            Py_UCS4 c0 = text[pos];                                                              \
            if (c0 == '<' && s->longs != NULL) {                                                 \
                Py_ssize_t len;                                                                  \
                int32_t id = LONG_MATCH(s, text, pos, n, &len);                                  \
                if (id >= 0) {                                                                   \
                    buf->ids[buf->size++] = id;                                                  \
                    pos += len;                                                                  \
                    continue;                                                                    \
                }                                                                                \
            }                                                                                    \
            int32_t best = -1;                                                                   \
            Py_ssize_t best_len = 0;                                                             \
            int extends = 0;                                                                     \
            if (c0 < 0x10000) {                                                                  \
                uint32_t v = s->bmp[c0];                                                         \
                best = (int32_t)(v & 0x7FFFFFFFu) - 1;                                           \
                extends = (v >> 31) != 0;                                                        \
            }                                                                                    \
            else {                                                                               \
                const ShortEntry *e1 = short_find(&s->shorts[0], pack3(c0, -1, -1));             \
                if (e1 != NULL) {                                                                \
                    best = e1->id;                                                               \
                    extends = e1->extends;                                                       \
                }                                                                                \
            }                                                                                    \
            best_len = best >= 0;                                                                \
            {                                                                                    \
                if (extends && pos + 1 < n) {                                                    \
                    Py_UCS4 c1 = text[pos + 1];                                                  \
                    const ShortEntry *e = short_find(&s->shorts[1], pack3(c0, c1, -1));          \
                    if (e != NULL) {                                                             \
                        if (e->id >= 0 && (best < 0 || e->id <= best)) {                         \
                            best = e->id;                                                        \
                            best_len = 2;                                                        \
                        }                                                                        \
                        if (e->extends && pos + 2 < n) {                                         \
                            e = short_find(&s->shorts[2], pack3(c0, c1, text[pos + 2]));         \
                            if (e != NULL && e->id >= 0 && (best < 0 || e->id <= best)) {        \
                                best = e->id;                                                    \
                                best_len = 3;                                                    \
                            }                                                                    \
                        }                                                                        \
                    }                                                                            \
                }                                                                                \
            }                                                                                    \
            if (best >= 0) {                                                                     \
                buf->ids[buf->size++] = best;                                                    \
                pos += best_len;                                                                 \
            }                                                                                    \
            else {                                                                               \
                fallback(s, c0, buf);                                                            \
                pos += 1;                                                                        \
            }                                                                                    \
        }                                                                                        \
        return 0;                                                                                \
    }

DEFINE_SEGMENT(segment_1, Py_UCS1, long_match_1)
DEFINE_SEGMENT(segment_2, Py_UCS2, long_match_2)
DEFINE_SEGMENT(segment_4, Py_UCS4, long_match_4)

/* The int object of an id (new reference), from the cache when the id is a vocabulary id. */
static inline PyObject *
id_object(Segmenter *s, int32_t id)
{
    if (id < 0 || id >= s->n_ints)
        return PyLong_FromLong(id);
    if (s->ints[id] == NULL && (s->ints[id] = PyLong_FromLong(id)) == NULL)
        return NULL;
    Py_INCREF(s->ints[id]);
    return s->ints[id];
}

static PyObject *
Segmenter_segment(Segmenter *s, PyObject *text)
{
    if (!PyUnicode_Check(text))
        return PyErr_Format(PyExc_TypeError, "text must be a str, got %.100s", Py_TYPE(text)->tp_name);
    if (!s->ready) {
        PyErr_SetString(PyExc_RuntimeError, "Segmenter is not initialised");
        return NULL;
    }
    Py_ssize_t n = PyUnicode_GET_LENGTH(text);
    IdBuffer buf = {NULL, 0, 0};
    if (reserve(&buf, n + 4) < 0)
        return NULL;
    const void *data = PyUnicode_DATA(text);
    int status;
    switch (PyUnicode_KIND(text)) {
    case PyUnicode_1BYTE_KIND:
        status = segment_1(s, data, n, &buf);
        break;
    case PyUnicode_2BYTE_KIND:
        status = segment_2(s, data, n, &buf);
        break;
    default:
        status = segment_4(s, data, n, &buf);
        break;
    }
    PyObject *list = status < 0 ? NULL : PyList_New(buf.size);
    for (Py_ssize_t i = 0; list != NULL && i < buf.size; i++) {
        PyObject *obj = id_object(s, buf.ids[i]);
        if (obj == NULL)
            Py_CLEAR(list);
        else
            PyList_SET_ITEM(list, i, obj);
    }
    PyMem_Free(buf.ids);
    return list;
}

/* unpack(lengths, ids): the lists of ids that pack() wrote (int32 arrays in native byte order, any
 * alignment: values are copied out, not dereferenced in place). */
static PyObject *
Segmenter_unpack(Segmenter *s, PyObject *args)
{
    Py_buffer lengths, ids;
    if (!PyArg_ParseTuple(args, "y*y*:unpack", &lengths, &ids))
        return NULL;
    PyObject *result = NULL;
    const char *len_bytes = lengths.buf, *id_bytes = ids.buf;
    Py_ssize_t n = lengths.len / 4, total = ids.len / 4, used = 0;
    if (lengths.len % 4 || ids.len % 4) {
        PyErr_SetString(PyExc_ValueError, "unpack: lengths and ids must hold int32 values (a multiple of 4 bytes)");
        goto done;
    }
    result = PyList_New(n);
    for (Py_ssize_t i = 0; result != NULL && i < n; i++) {
        int32_t len;
        memcpy(&len, len_bytes + 4 * i, 4);
        if (len < 0 || len > total - used) {
            PyErr_Format(PyExc_ValueError, "unpack: length %d of sequence %zd overruns the ids", len, i);
            Py_CLEAR(result);
            break;
        }
        PyObject *row = PyList_New(len);
        for (int32_t k = 0; row != NULL && k < len; k++) {
            int32_t id;
            memcpy(&id, id_bytes + 4 * (used + k), 4);
            PyObject *obj = id_object(s, id);
            if (obj == NULL)
                Py_CLEAR(row);
            else
                PyList_SET_ITEM(row, k, obj);
        }
        if (row == NULL) {
            Py_CLEAR(result);
            break;
        }
        used += len;
        PyList_SET_ITEM(result, i, row);
    }
    if (result != NULL && used != total) {
        PyErr_Format(PyExc_ValueError, "unpack: the lengths cover %zd ids of %zd", used, total);
        Py_CLEAR(result);
    }
done:
    PyBuffer_Release(&lengths);
    PyBuffer_Release(&ids);
    return result;
}

/* pack(sequences): (lengths, ids) of a list of lists of ints as int32 bytes, for unpack().
 *
 * Converting an item may run Python code (__index__) that changes the lists being packed, so one
 * pass reads every size afresh, holds a reference to the row and item it reads, and appends to
 * growing buffers: what is packed is what was read, and nothing is written beyond what was
 * allocated. (The first version sized its output in a first pass: a row that grew during the second
 * overflowed the heap.) */
static PyObject *
pack(PyObject *module, PyObject *sequences)
{
    (void)module;
    if (!PyList_Check(sequences))
        return PyErr_Format(PyExc_TypeError, "pack: expected a list, got %.100s", Py_TYPE(sequences)->tp_name);
    IdBuffer lengths = {NULL, 0, 0}, ids = {NULL, 0, 0};
    PyObject *result = NULL;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(sequences); i++) {
        PyObject *row = PyList_GET_ITEM(sequences, i);
        if (!PyList_Check(row)) {
            PyErr_Format(PyExc_TypeError, "pack: item %zd is not a list", i);
            goto done;
        }
        Py_INCREF(row);
        Py_ssize_t start = ids.size;
        for (Py_ssize_t k = 0; k < PyList_GET_SIZE(row); k++) {
            PyObject *item = PyList_GET_ITEM(row, k);
            Py_INCREF(item);
            long v = PyLong_AsLong(item);
            Py_DECREF(item);
            if (v == -1 && PyErr_Occurred()) {
                if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
                    PyErr_Clear();
                    PyErr_Format(PyExc_ValueError, "pack: item %zd of sequence %zd does not fit in int32", k, i);
                }
                else if (PyErr_ExceptionMatches(PyExc_TypeError)) {
                    PyErr_Clear();
                    PyErr_Format(PyExc_TypeError, "pack: item %zd of sequence %zd is not an int", k, i);
                }
                Py_DECREF(row);
                goto done;
            }
            if (v < INT32_MIN || v > INT32_MAX) {
                PyErr_Format(PyExc_ValueError, "pack: id %ld (item %zd of sequence %zd) does not fit in int32", v, k,
                             i);
                Py_DECREF(row);
                goto done;
            }
            if (reserve(&ids, 1) < 0) {
                Py_DECREF(row);
                goto done;
            }
            ids.ids[ids.size++] = (int32_t)v;
        }
        Py_DECREF(row);
        if (ids.size - start > INT32_MAX) {
            PyErr_Format(PyExc_ValueError, "pack: sequence %zd holds more than 2**31 - 1 ids", i);
            goto done;
        }
        if (reserve(&lengths, 1) < 0)
            goto done;
        lengths.ids[lengths.size++] = (int32_t)(ids.size - start);
    }
    PyObject *len_bytes = PyBytes_FromStringAndSize(lengths.ids ? (const char *)lengths.ids : "", lengths.size * 4);
    PyObject *id_bytes = PyBytes_FromStringAndSize(ids.ids ? (const char *)ids.ids : "", ids.size * 4);
    if (len_bytes != NULL && id_bytes != NULL)
        result = PyTuple_Pack(2, len_bytes, id_bytes);
    Py_XDECREF(len_bytes);
    Py_XDECREF(id_bytes);
done:
    PyMem_Free(lengths.ids);
    PyMem_Free(ids.ids);
    return result;
}

static PyMethodDef Segmenter_methods[] = {
    {"segment", (PyCFunction)Segmenter_segment, METH_O,
     "segment(text) -> list of ids: step 3 of the tokenizer on already rewritten text."},
    {"unpack", (PyCFunction)Segmenter_unpack, METH_VARARGS,
     "unpack(lengths, ids) -> list of lists of ids: the inverse of pack(), sharing the id objects."},
    {NULL, NULL, 0, NULL},
};

static PyMethodDef module_methods[] = {
    {"pack", (PyCFunction)pack, METH_O,
     "pack(sequences) -> (lengths, ids): a list of lists of ids as two int32 byte strings."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject SegmenterType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "neoxja._segment.Segmenter",
    .tp_basicsize = sizeof(Segmenter),
    .tp_dealloc = (destructor)Segmenter_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Segmenter(vocab, kigou_id, u2000_id, byte_ids): the tokenizer's segmentation tables.\n\n"
              "vocab maps each word to its id; byte_ids holds the id of each UTF-8 byte value.",
    .tp_methods = Segmenter_methods,
    .tp_init = (initproc)Segmenter_init,
    .tp_new = PyType_GenericNew,
};

static struct PyModuleDef segment_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_segment",
    .m_doc = "The tokenizer's segmentation step, compiled.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__segment(void)
{
    if (PyType_Ready(&SegmenterType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&segment_module);
    if (module == NULL)
        return NULL;
    Py_INCREF(&SegmenterType);
    if (PyModule_AddObject(module, "Segmenter", (PyObject *)&SegmenterType) < 0) {
        Py_DECREF(&SegmenterType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
