/* podwire.agent.engine._fastpath: the engine's per-segment loops in C.
 *
 * A profile of the pure-Python data path (bench/segment_costs.py) put its cost per 1,400-byte
 * segment in four loops: cutting a TSO packet into segments, sealing, opening and joining.
 * This module does the first three a batch at a time, so Python pays one call per batch
 * instead of one round per segment. The cipher is OpenSSL's (libcrypto's EVP
 * ChaCha20-Poly1305), never our own. The crypto loops run without the GIL.
 *
 * podwire.agent.engine.fastpath holds the pure-Python twin of every function; the two give
 * byte-identical output (tests/unit/engine/test_fastpath.py) and what is written here in C is
 * only what Python cannot do fast: the protocol's state (counters, the replay window, timers)
 * stays in Python.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <stdint.h>
#include <string.h>

#define KEY_LEN 32
#define TAG_LEN 16
#define HEADER_LEN 16
#define NONCE_LEN 12
#define PADDING 16
#define MESSAGE_TRANSPORT 4

static const unsigned char zeros[PADDING];

/* The cipher, fetched from libcrypto's provider once. EVP_chacha20_poly1305() fetches it anew
 * on every init (a name lookup under a lock), which a profile of lone packets (a ping through
 * an idle tunnel) showed costing more than sealing them. */
static const EVP_CIPHER *chacha;

/* A context per thread and direction, made with the cipher on first use and kept: making and
 * freeing one per call (and the provider's context inside it) was a third of what sealing a
 * lone packet cost after a quiet moment, when none of that code or memory is in cache. Each
 * call sets its key; the key schedule stays in the context until the next call, as the keys
 * themselves stay in the engine's memory. One that failed is freed and made again. */
static _Thread_local EVP_CIPHER_CTX *seal_ctx, *open_ctx;

static EVP_CIPHER_CTX *thread_ctx(EVP_CIPHER_CTX **slot, int encrypt) {
    if (*slot == NULL) {
        EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
        if (ctx == NULL) return NULL;
        if (!EVP_CipherInit_ex(ctx, chacha, NULL, NULL, NULL, encrypt)) {
            EVP_CIPHER_CTX_free(ctx);
            return NULL;
        }
        *slot = ctx;
    }
    return *slot;
}

static void drop_ctx(EVP_CIPHER_CTX **slot) {
    EVP_CIPHER_CTX_free(*slot);
    *slot = NULL;
}

/* A batch of one (a lone packet) keeps the GIL: giving it up and taking it back costs more
 * than the sealing, and no other thread could use the moment. */
#define RELEASE_GIL_FROM 2

static void put_le32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static void put_le64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static uint64_t get_le64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

/* The transport nonce: four zero bytes, then the counter little-endian. */
static void nonce_of(unsigned char nonce[NONCE_LEN], uint64_t counter) {
    memset(nonce, 0, 4);
    put_le64(nonce + 4, counter);
}

/* Buffers taken from a sequence of bytes-like objects, released together. */
typedef struct {
    Py_ssize_t n;
    Py_buffer *views;
} Views;

static void views_release(Views *v) {
    if (v->views == NULL) return;
    for (Py_ssize_t i = 0; i < v->n; i++) {
        if (v->views[i].obj != NULL) PyBuffer_Release(&v->views[i]);
    }
    PyMem_Free(v->views);
    v->views = NULL;
}

static int views_take(PyObject *sequence, Views *v, const char *what) {
    PyObject *fast = PySequence_Fast(sequence, what);
    if (fast == NULL) return -1;
    v->n = PySequence_Fast_GET_SIZE(fast);
    v->views = PyMem_Calloc(v->n ? (size_t)v->n : 1, sizeof(Py_buffer));
    if (v->views == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return -1;
    }
    PyObject **items = PySequence_Fast_ITEMS(fast);
    for (Py_ssize_t i = 0; i < v->n; i++) {
        if (PyObject_GetBuffer(items[i], &v->views[i], PyBUF_SIMPLE) < 0) {
            Py_DECREF(fast);
            views_release(v);
            return -1;
        }
    }
    Py_DECREF(fast);
    return 0;
}

/* ---- seal ---------------------------------------------------------------------------- */

PyDoc_STRVAR(seal_doc,
"seal(key, receiver, counter, packets, mtu) -> list[bytes]\n\n"
"Transport messages for packets, sealed with key under counters counter, counter + 1, ...;\n"
"each padded with zeros to a multiple of 16, but not beyond mtu.");

static PyObject *fp_seal(PyObject *self, PyObject *args) {
    Py_buffer key;
    unsigned long receiver;
    unsigned long long counter;
    PyObject *packets;
    Py_ssize_t mtu;
    if (!PyArg_ParseTuple(args, "y*kKOn:seal", &key, &receiver, &counter, &packets, &mtu))
        return NULL;
    PyObject *result = NULL;
    Views in = {0, NULL};
    unsigned char **outs = NULL;
    int failed = 0;
    if (key.len != KEY_LEN) {
        PyErr_SetString(PyExc_ValueError, "key must be 32 bytes");
        goto done;
    }
    if (receiver > 0xFFFFFFFFUL) {
        PyErr_SetString(PyExc_OverflowError, "receiver index beyond 32 bits");
        goto done;
    }
    if (views_take(packets, &in, "packets must be a sequence") < 0) goto done;
    result = PyList_New(in.n);
    outs = PyMem_Calloc(in.n ? (size_t)in.n : 1, sizeof(unsigned char *));
    if (result == NULL || outs == NULL) {
        if (outs == NULL) PyErr_NoMemory();
        Py_CLEAR(result);
        goto done;
    }
    for (Py_ssize_t i = 0; i < in.n; i++) {
        Py_ssize_t n = in.views[i].len;
        if (n > INT_MAX - HEADER_LEN - TAG_LEN - PADDING) {
            PyErr_SetString(PyExc_ValueError, "packet too large to seal");
            Py_CLEAR(result);
            goto done;
        }
        Py_ssize_t pad = (PADDING - n % PADDING) % PADDING;
        if (pad && n + pad > mtu) pad = mtu > n ? mtu - n : 0;
        PyObject *out = PyBytes_FromStringAndSize(NULL, HEADER_LEN + n + pad + TAG_LEN);
        if (out == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, i, out);
        outs[i] = (unsigned char *)PyBytes_AS_STRING(out);
    }

    unsigned char secret[KEY_LEN];
    memcpy(secret, key.buf, KEY_LEN);
    PyThreadState *released = in.n >= RELEASE_GIL_FROM ? PyEval_SaveThread() : NULL;
    EVP_CIPHER_CTX *ctx = thread_ctx(&seal_ctx, 1);
    if (ctx == NULL || !EVP_EncryptInit_ex(ctx, NULL, NULL, secret, NULL))
        failed = 1;
    for (Py_ssize_t i = 0; !failed && i < in.n; i++) {
        const unsigned char *plain = in.views[i].buf;
        Py_ssize_t n = in.views[i].len;
        unsigned char *out = outs[i];
        Py_ssize_t total = n + (PADDING - n % PADDING) % PADDING;
        if (total > n && total > mtu) total = mtu > n ? mtu : n;
        uint64_t c = (uint64_t)counter + (uint64_t)i;
        unsigned char nonce[NONCE_LEN];
        int len;
        put_le32(out, MESSAGE_TRANSPORT);
        put_le32(out + 4, (uint32_t)receiver);
        put_le64(out + 8, c);
        nonce_of(nonce, c);
        unsigned char *cipher = out + HEADER_LEN;
        if (!EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, nonce)
            || (n && !EVP_EncryptUpdate(ctx, cipher, &len, plain, (int)n))
            || (total > n && !EVP_EncryptUpdate(ctx, cipher + n, &len, zeros, (int)(total - n)))
            || !EVP_EncryptFinal_ex(ctx, cipher + total, &len)
            || !EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, TAG_LEN, cipher + total))
            failed = 1;
    }
    if (failed) drop_ctx(&seal_ctx);
    OPENSSL_cleanse(secret, sizeof secret);
    if (released != NULL) PyEval_RestoreThread(released);
    if (failed) {
        PyErr_SetString(PyExc_RuntimeError, "libcrypto refused to seal");
        Py_CLEAR(result);
    }
done:
    PyMem_Free(outs);
    views_release(&in);
    PyBuffer_Release(&key);
    return result;
}

/* ---- open ---------------------------------------------------------------------------- */

PyDoc_STRVAR(open_doc,
"open(keys, datagrams) -> list[bytes | None]\n\n"
"The plaintext of each transport message, opened with the key beside it (under the counter\n"
"its header carries), or None where it does not authenticate or is too short to.");

static PyObject *fp_open(PyObject *self, PyObject *args) {
    PyObject *keys_arg, *datagrams_arg;
    if (!PyArg_ParseTuple(args, "OO:open", &keys_arg, &datagrams_arg)) return NULL;
    PyObject *result = NULL;
    Views keys = {0, NULL}, in = {0, NULL};
    unsigned char **outs = NULL;
    char *ok = NULL;
    int failed = 0;
    if (views_take(keys_arg, &keys, "keys must be a sequence") < 0) goto done;
    if (views_take(datagrams_arg, &in, "datagrams must be a sequence") < 0) goto done;
    if (keys.n != in.n) {
        PyErr_SetString(PyExc_ValueError, "one key per datagram");
        goto done;
    }
    for (Py_ssize_t i = 0; i < keys.n; i++) {
        if (keys.views[i].len != KEY_LEN) {
            PyErr_SetString(PyExc_ValueError, "keys must be 32 bytes");
            goto done;
        }
    }
    result = PyList_New(in.n);
    outs = PyMem_Calloc(in.n ? (size_t)in.n : 1, sizeof(unsigned char *));
    ok = PyMem_Calloc(in.n ? (size_t)in.n : 1, 1);
    if (result == NULL || outs == NULL || ok == NULL) {
        if (result != NULL) PyErr_NoMemory();
        Py_CLEAR(result);
        goto done;
    }
    for (Py_ssize_t i = 0; i < in.n; i++) {
        Py_ssize_t n = in.views[i].len;
        PyObject *out;
        if (n < HEADER_LEN + TAG_LEN || n - HEADER_LEN - TAG_LEN > INT_MAX) {
            out = Py_NewRef(Py_None);
        } else {
            out = PyBytes_FromStringAndSize(NULL, n - HEADER_LEN - TAG_LEN);
            if (out == NULL) {
                Py_CLEAR(result);
                goto done;
            }
            outs[i] = (unsigned char *)PyBytes_AS_STRING(out);
        }
        PyList_SET_ITEM(result, i, out);
    }

    PyThreadState *released = in.n >= RELEASE_GIL_FROM ? PyEval_SaveThread() : NULL;
    EVP_CIPHER_CTX *ctx = thread_ctx(&open_ctx, 0);
    const unsigned char *keyed = NULL;
    if (ctx == NULL) failed = 1;
    for (Py_ssize_t i = 0; !failed && i < in.n; i++) {
        if (outs[i] == NULL) continue;
        const unsigned char *data = in.views[i].buf;
        const unsigned char *key = keys.views[i].buf;
        int n = (int)(in.views[i].len - HEADER_LEN - TAG_LEN);
        unsigned char nonce[NONCE_LEN];
        unsigned char tag[TAG_LEN];
        int len;
        nonce_of(nonce, get_le64(data + 8));
        memcpy(tag, data + HEADER_LEN + n, TAG_LEN);
        /* A run of datagrams under one key sets it once. */
        int same = keyed != NULL && (keyed == key || memcmp(keyed, key, KEY_LEN) == 0);
        if (!EVP_DecryptInit_ex(ctx, NULL, NULL, same ? NULL : key, nonce)) {
            failed = 1;
            break;
        }
        keyed = key;
        ok[i] = (n == 0 || EVP_DecryptUpdate(ctx, outs[i], &len, data + HEADER_LEN, n))
            && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, TAG_LEN, tag)
            && EVP_DecryptFinal_ex(ctx, outs[i] + n, &len) > 0;
        if (!ok[i]) OPENSSL_cleanse(outs[i], (size_t)n);
    }
    if (failed) drop_ctx(&open_ctx);
    if (released != NULL) PyEval_RestoreThread(released);
    if (failed) {
        PyErr_SetString(PyExc_RuntimeError, "libcrypto refused to open");
        Py_CLEAR(result);
        goto done;
    }
    for (Py_ssize_t i = 0; i < in.n; i++) {
        if (outs[i] != NULL && !ok[i]) {
            PyObject *old = PyList_GET_ITEM(result, i);
            PyList_SET_ITEM(result, i, Py_NewRef(Py_None));
            Py_DECREF(old);
        }
    }
done:
    PyMem_Free(ok);
    PyMem_Free(outs);
    views_release(&in);
    views_release(&keys);
    return result;
}

/* ---- split_tcp ----------------------------------------------------------------------- */

/* The ones' complement sum of data as big-endian 16-bit words (an odd last byte padded with
 * a zero), before folding. */
static uint64_t sum16(const unsigned char *p, Py_ssize_t n) {
    uint64_t total = 0;
    Py_ssize_t i = 0;
    for (; i + 1 < n; i += 2) total += ((uint32_t)p[i] << 8) | p[i + 1];
    if (i < n) total += (uint32_t)p[i] << 8;
    return total;
}

/* The checksum field for a sum, as offload.py writes it: the sum taken modulo 0xffff, its
 * complement, and 0xffff (never 0) for a sum of zero. */
static unsigned field_of(uint64_t total) {
    unsigned folded = (unsigned)(total % 0xFFFF);
    return folded ? 0xFFFF - folded : 0xFFFF;
}

static void put_be16(unsigned char *p, unsigned v) {
    p[0] = (unsigned char)(v >> 8);
    p[1] = (unsigned char)v;
}

static void put_be32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (24 - 8 * i));
}

static uint32_t get_be32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

#define FIN 0x01
#define PSH 0x08
#define CWR 0x80

PyDoc_STRVAR(split_tcp_doc,
"split_tcp(packet, mss, v6) -> list[bytes]\n\n"
"A TSO packet cut into segments of mss payload bytes, as offload.split_tcp cuts it;\n"
"ValueError for what it refuses.");

static PyObject *fp_split_tcp(PyObject *self, PyObject *args) {
    Py_buffer view;
    Py_ssize_t mss;
    int v6;
    if (!PyArg_ParseTuple(args, "y*np:split_tcp", &view, &mss, &v6)) return NULL;
    const unsigned char *p = view.buf;
    Py_ssize_t n = view.len;
    PyObject *result = NULL;
    const char *error = NULL;
    Py_ssize_t ihl;
    if (n == 0) {
        error = "empty packet";
        goto done;
    }
    int version = p[0] >> 4;
    if (version == 4) {
        ihl = (p[0] & 0x0F) * 4;
        if (ihl < 20 || n < ihl) {
            error = "bad IPv4 header length";
            goto done;
        }
    } else if (version == 6) {
        if (n < 40) {
            error = "short IPv6 header";
            goto done;
        }
        ihl = 40;
    } else {
        error = "IP version";
        goto done;
    }
    if (version != (v6 ? 6 : 4)) {
        error = "GSO type does not match the IP version";
        goto done;
    }
    int proto = version == 4 ? p[9] : p[6];
    if (proto != 6 || n < ihl + 20) {
        error = "TSO packet is not TCP";
        goto done;
    }
    Py_ssize_t thl = (p[ihl + 12] >> 4) * 4;
    Py_ssize_t head_len = ihl + thl;
    if (thl < 20 || n < head_len) {
        error = "bad TCP header length";
        goto done;
    }
    if (mss <= 0) {
        error = "zero GSO size";
        goto done;
    }
    Py_ssize_t payload = n - head_len;
    Py_ssize_t count = payload ? (payload + mss - 1) / mss : 1;
    result = PyList_New(count);
    if (result == NULL) goto done;

    /* What every segment's sums share, as offload.split_tcp reckons them. */
    unsigned char tcp[60];
    memcpy(tcp, p + ihl, (size_t)thl);
    uint32_t seq = get_be32(tcp + 4);
    unsigned flags = tcp[13];
    memset(tcp + 4, 0, 4);
    tcp[13] = 0;
    tcp[16] = tcp[17] = 0;
    uint64_t pseudo = (version == 4 ? sum16(p + 12, 8) : sum16(p + 8, 32)) + 6;
    uint64_t tcp_base = sum16(tcp, thl) % 0xFFFF + pseudo % 0xFFFF + (uint64_t)thl;
    unsigned ident = 0;
    uint64_t ip_base = 0;
    if (version == 4) {
        unsigned char ip[60];
        memcpy(ip, p, (size_t)ihl);
        ident = ((unsigned)p[4] << 8) | p[5];
        memset(ip + 2, 0, 4);
        ip[10] = ip[11] = 0;
        ip_base = sum16(ip, ihl) % 0xFFFF;
    }
    for (Py_ssize_t index = 0; index < count; index++) {
        Py_ssize_t start = index * mss;
        Py_ssize_t size = payload - start < mss ? payload - start : mss;
        if (size < 0) size = 0;
        PyObject *segment = PyBytes_FromStringAndSize(NULL, head_len + size);
        if (segment == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, index, segment);
        unsigned char *out = (unsigned char *)PyBytes_AS_STRING(segment);
        memcpy(out, p, (size_t)head_len);
        memcpy(out + head_len, p + head_len + start, (size_t)size);
        unsigned char *t = out + ihl;
        uint32_t this_seq = seq + (uint32_t)start;
        unsigned this_flags = index == count - 1 ? flags : flags & ~(FIN | PSH);
        if (index) this_flags &= ~CWR;
        uint64_t total = sum16(out + head_len, size) % 0xFFFF + tcp_base + (this_seq >> 16)
            + (this_seq & 0xFFFF) + this_flags + (uint64_t)size;
        put_be32(t + 4, this_seq);
        t[13] = (unsigned char)this_flags;
        put_be16(t + 16, field_of(total));
        if (version == 4) {
            unsigned length = (unsigned)(head_len + size);
            unsigned this_id = (ident + (unsigned)index) & 0xFFFF;
            put_be16(out + 2, length);
            put_be16(out + 4, this_id);
            put_be16(out + 10, field_of(ip_base + length + this_id));
        } else {
            put_be16(out + 4, (unsigned)(thl + size));
        }
    }
done:
    PyBuffer_Release(&view);
    if (error != NULL) PyErr_SetString(PyExc_ValueError, error);
    return result;
}


/* ---- complete_checksum --------------------------------------------------------------- */

PyDoc_STRVAR(complete_checksum_doc,
"complete_checksum(packet, start, offset) -> bytes\n\n"
"The packet with the partial checksum at start + offset completed over packet[start:], as\n"
"offload.complete_checksum completes it; ValueError for offsets beyond the packet.");

static PyObject *fp_complete_checksum(PyObject *self, PyObject *args) {
    Py_buffer view;
    Py_ssize_t start, offset;
    if (!PyArg_ParseTuple(args, "y*nn:complete_checksum", &view, &start, &offset)) return NULL;
    PyObject *out = NULL;
    Py_ssize_t n = view.len;
    if (start < 0 || offset < 0 || start >= n || start + offset + 2 > n) {
        PyErr_SetString(PyExc_ValueError, "checksum offsets beyond the packet");
    } else {
        out = PyBytes_FromStringAndSize(view.buf, n);
        if (out != NULL) {
            unsigned char *p = (unsigned char *)PyBytes_AS_STRING(out);
            put_be16(p + start + offset, field_of(sum16(p + start, n - start)));
        }
    }
    PyBuffer_Release(&view);
    return out;
}

/* ---- coalesce ------------------------------------------------------------------------ */

#define ACK 0x10
#define MAX_LENGTH 65535
#define VNET_LEN 10

/* A run of segments of one TCP flow that follow each other, as offload._Run keeps it. */
typedef struct {
    Py_ssize_t first, last; /* packet indices; members chain through next[] */
    Py_ssize_t ihl, head_len, size, length;
    uint32_t next_seq;
    unsigned next_id;
    int open, psh, count;
} Run;

/* Where a packet stands: its flow key (addresses and ports) and header lengths, or none. */
static int tcp_flow(const unsigned char *p, Py_ssize_t n, Py_ssize_t *ihl, Py_ssize_t *head_len,
                    const unsigned char **flow, Py_ssize_t *flow_len) {
    if (n < 40) return 0;
    int version = p[0] >> 4;
    if (version == 4) {
        if (p[0] != 0x45 || p[9] != 6 || (p[6] & 0x3F) || p[7]) return 0;
        *ihl = 20;
        *flow = p + 12;
        *flow_len = 12;
    } else if (version == 6) {
        if (n < 60 || p[6] != 6) return 0;
        *ihl = 40;
        *flow = p + 8;
        *flow_len = 36;
    } else {
        return 0;
    }
    Py_ssize_t thl = (p[*ihl + 12] >> 4) * 4;
    *head_len = *ihl + thl;
    if (thl < 20 || n <= *head_len || (p[*ihl + 13] & ~PSH) != ACK) return 0;
    return 1;
}

/* offload._fixed: what must be equal between the segments of a run besides their flow. */
static int same_fixed(const unsigned char *a, const unsigned char *b, Py_ssize_t ihl,
                      Py_ssize_t head_len) {
    if (ihl == 20) {
        if (a[1] != b[1] || a[8] != b[8] || a[6] != b[6]) return 0;
    } else if (memcmp(a, b, 4) != 0 || a[7] != b[7]) {
        return 0;
    }
    return memcmp(a + ihl + 8, b + ihl + 8, 5) == 0 && memcmp(a + ihl + 14, b + ihl + 14, 2) == 0
        && memcmp(a + ihl + 20, b + ihl + 20, (size_t)(head_len - ihl - 20)) == 0;
}

static uint64_t flow_hash(const unsigned char *flow, Py_ssize_t len) {
    uint64_t h = 1469598103934665603ULL;
    for (Py_ssize_t i = 0; i < len; i++) h = (h ^ flow[i]) * 1099511628211ULL;
    return h;
}

static void put_le16(unsigned char *p, unsigned v) {
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
}

PyDoc_STRVAR(coalesce_doc,
"coalesce(packets) -> list[bytes]\n\n"
"The writes to TUN for packets, each a virtio_net_hdr and its packet, as offload.coalesce\n"
"makes them: consecutive segments of a TCP flow joined into one GSO packet.");

static PyObject *fp_coalesce(PyObject *self, PyObject *args) {
    PyObject *packets_arg;
    if (!PyArg_ParseTuple(args, "O:coalesce", &packets_arg)) return NULL;
    Views in = {0, NULL};
    if (views_take(packets_arg, &in, "packets must be a sequence") < 0) return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = in.n;
    size_t slots = 16;
    while (slots < (size_t)n * 2) slots <<= 1;
    Run *runs = PyMem_Calloc(n ? (size_t)n : 1, sizeof(Run));
    Py_ssize_t *next = PyMem_Calloc(n ? (size_t)n : 1, sizeof(Py_ssize_t));
    Py_ssize_t *table = PyMem_Malloc(slots * sizeof(Py_ssize_t)); /* flow -> run, or -1 */
    if (runs == NULL || next == NULL || table == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (size_t i = 0; i < slots; i++) table[i] = -1;
    Py_ssize_t nruns = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        const unsigned char *p = in.views[i].buf;
        Py_ssize_t len = in.views[i].len, ihl, head_len, flow_len;
        const unsigned char *flow;
        next[i] = -1;
        if (!tcp_flow(p, len, &ihl, &head_len, &flow, &flow_len)) {
            runs[nruns] = (Run){.first = i, .last = i, .count = 1, .length = len, .ihl = 0};
            nruns++;
            continue;
        }
        size_t slot = (size_t)flow_hash(flow, flow_len) & (slots - 1);
        Py_ssize_t *entry = NULL;
        for (;;) {
            Py_ssize_t r = table[slot];
            if (r < 0) break;
            const unsigned char *q = in.views[runs[r].first].buf;
            const unsigned char *qflow = q + (runs[r].ihl == 20 ? 12 : 8);
            if (runs[r].ihl == ihl && memcmp(qflow, flow, (size_t)flow_len) == 0) {
                entry = &table[slot];
                break;
            }
            slot = (slot + 1) & (slots - 1);
        }
        if (entry != NULL) {
            Run *run = &runs[*entry];
            const unsigned char *first = in.views[run->first].buf;
            Py_ssize_t size = len - head_len;
            if (run->open && size <= run->size && run->length + size <= MAX_LENGTH
                && get_be32(p + ihl + 4) == run->next_seq
                && (ihl != 20 || (((unsigned)p[4] << 8) | p[5]) == run->next_id)
                && head_len == run->head_len && same_fixed(first, p, ihl, head_len)) {
                next[run->last] = i;
                run->last = i;
                run->count++;
                run->length += size;
                run->next_seq += (uint32_t)size;
                run->next_id = (run->next_id + 1) & 0xFFFF;
                if (size < run->size || (p[ihl + 13] & PSH)) {
                    run->open = 0;
                    if (p[ihl + 13] & PSH) run->psh = 1;
                }
                continue;
            }
        }
        Run *run = &runs[nruns];
        *run = (Run){.first = i, .last = i, .ihl = ihl, .head_len = head_len,
                     .size = len - head_len, .length = len, .count = 1};
        run->next_seq = get_be32(p + ihl + 4) + (uint32_t)run->size;
        run->next_id = ((((unsigned)p[4] << 8) | p[5]) + 1) & 0xFFFF;
        run->open = !(p[ihl + 13] & PSH);
        if (entry != NULL) *entry = nruns;
        else table[slot] = nruns;
        nruns++;
    }
    result = PyList_New(nruns);
    if (result == NULL) goto done;
    for (Py_ssize_t w = 0; w < nruns; w++) {
        Run *run = &runs[w];
        const unsigned char *first = in.views[run->first].buf;
        PyObject *out = PyBytes_FromStringAndSize(NULL, VNET_LEN + run->length);
        if (out == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, w, out);
        unsigned char *o = (unsigned char *)PyBytes_AS_STRING(out);
        memset(o, 0, VNET_LEN);
        if (run->count == 1) {
            o[0] = 2; /* VIRTIO_NET_HDR_F_DATA_VALID: WireGuard authenticated it */
            memcpy(o + VNET_LEN, first, (size_t)in.views[run->first].len);
            continue;
        }
        Py_ssize_t ihl = run->ihl, head_len = run->head_len;
        o[0] = 1; /* VIRTIO_NET_HDR_F_NEEDS_CSUM */
        o[1] = ihl == 20 ? 1 : 4; /* GSO_TCPV4, GSO_TCPV6 */
        put_le16(o + 2, (unsigned)head_len);
        put_le16(o + 4, (unsigned)run->size);
        put_le16(o + 6, (unsigned)ihl);
        put_le16(o + 8, 16);
        unsigned char *head = o + VNET_LEN;
        memcpy(head, first, (size_t)in.views[run->first].len);
        if (run->psh) head[ihl + 13] |= PSH;
        if (ihl == 20) {
            put_be16(head + 2, (unsigned)run->length);
            head[10] = head[11] = 0;
            put_be16(head + 10, field_of(sum16(head, 20)));
        } else {
            put_be16(head + 4, (unsigned)(run->length - 40));
        }
        /* NEEDS_CSUM: the field holds the pseudo-header's sum; the kernel adds the rest. */
        uint64_t pseudo = (ihl == 20 ? sum16(head + 12, 8) : sum16(head + 8, 32)) + 6
            + (uint64_t)(run->length - ihl);
        unsigned folded = (unsigned)(pseudo % 0xFFFF);
        put_be16(head + ihl + 16, folded ? folded : 0xFFFF);
        unsigned char *tail = head + in.views[run->first].len;
        for (Py_ssize_t i = next[run->first]; i >= 0; i = next[i]) {
            Py_ssize_t size = in.views[i].len - head_len;
            memcpy(tail, (const unsigned char *)in.views[i].buf + head_len, (size_t)size);
            tail += size;
        }
    }
done:
    PyMem_Free(table);
    PyMem_Free(next);
    PyMem_Free(runs);
    views_release(&in);
    return result;
}

static PyMethodDef methods[] = {
    {"seal", fp_seal, METH_VARARGS, seal_doc},
    {"open", fp_open, METH_VARARGS, open_doc},
    {"split_tcp", fp_split_tcp, METH_VARARGS, split_tcp_doc},
    {"coalesce", fp_coalesce, METH_VARARGS, coalesce_doc},
    {"complete_checksum", fp_complete_checksum, METH_VARARGS, complete_checksum_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_fastpath",
    .m_doc = "The engine's per-segment loops in C (see podwire.agent.engine.fastpath).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__fastpath(void) {
    if (chacha == NULL) {
#if OPENSSL_VERSION_NUMBER >= 0x30000000L
        chacha = EVP_CIPHER_fetch(NULL, "ChaCha20-Poly1305", NULL);
#endif
        if (chacha == NULL) chacha = EVP_chacha20_poly1305();
        if (chacha == NULL) {
            PyErr_SetString(PyExc_ImportError, "libcrypto has no ChaCha20-Poly1305");
            return NULL;
        }
    }
    return PyModule_Create(&module);
}
