/* fastpath.c - METH_FASTCALL entry points for the hottest calls (get, set, contains).
 *
 * cffi drives the whole engine API.  For these three calls its generic wrapper (argument
 * tuple, per-argument conversion, GIL release and re-acquire, then ffi.unpack for the
 * result) costs about 1,300 instructions per call while the engine's own work is about
 * 400 (callgrind, 100-byte hit).  This file is compiled into the same cffi extension
 * module, so it shares the one copy of the engine and its process state, and exposes a
 * tiny type whose methods take the key and value as Python objects directly.
 *
 * Rules kept here: no segment lock is held while Python is called (the engine copies a
 * value into a thread-local buffer and releases its lock before PyBytes is created);
 * errors are raised through a Python callable given at construction, after the engine
 * has returned.  These calls keep the GIL: their critical sections are short, and a
 * lock wait is bounded by lock_timeout_ms.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "../shmcache.h"

#define FP_ENOTBYTES -1000
#define FP_ECLOSED   -1001
#define FP_ETTL      -1002   /* ttl value out of range */
#define FP_ETTLTYPE  -1003   /* ttl of the wrong type */

typedef struct {
    PyObject_HEAD
    shm_cache *c;
    PyObject *raise;    /* raise(code, message) -> raises the mapped exception */
    Py_ssize_t guess;   /* length of the last large value returned by get()       */
    char *buf;          /* copy-out buffer for small values: these calls hold the GIL */
    uint64_t cap;       /* from start to end and call no Python, so no other thread   */
} FastSeg;              /* can use it meanwhile (cheaper than thread-local storage)   */

/* Values at least this long are copied straight into a bytes object allocated (before
 * the engine takes any lock) at the length last seen; shorter ones go through the
 * engine's thread-local buffer, which is cheaper than a wrong guess. */
#define FP_DIRECT_MIN 1024

static PyTypeObject FastSegType;

static PyObject *fp_raise(FastSeg *self, int code, const char *msg) {
    PyObject *r = PyObject_CallFunction(self->raise, "is", code, msg);
    Py_XDECREF(r);
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_RuntimeError, msg);
    return NULL;
}

static PyObject *fp_engine_error(FastSeg *self, int64_t code) {
    return fp_raise(self, (int)code, shm_last_error());
}

/* Key as bytes: str (UTF-8, cached by CPython for compact strings), bytes, or any
 * other bytes-like object (copied into *tmp, which the caller releases). */
static int fp_key(FastSeg *self, PyObject *key, const char **p, Py_ssize_t *n,
                  PyObject **tmp) {
    *tmp = NULL;
    if (PyUnicode_Check(key)) {
        *p = PyUnicode_AsUTF8AndSize(key, n);
        return *p ? 0 : -1;
    }
    if (!PyBytes_Check(key)) {
        if (!PyObject_CheckBuffer(key)) {
            char msg[160];
            snprintf(msg, sizeof msg, "key must be str or bytes-like, not %.80s",
                     Py_TYPE(key)->tp_name);
            fp_raise(self, FP_ENOTBYTES, msg);
            return -1;
        }
        if (!(*tmp = key = PyBytes_FromObject(key))) return -1;
    }
    *p = PyBytes_AS_STRING(key);
    *n = PyBytes_GET_SIZE(key);
    return 0;
}

static inline int fp_open(FastSeg *self) {
    if (self->c) return 1;
    fp_raise(self, FP_ECLOSED, "segment is closed");
    return 0;
}

static PyObject *fp_get_key(FastSeg *self, const char *k, Py_ssize_t kl, PyObject *dflt,
                            shm_item_info *info);

static PyObject *fp_get(FastSeg *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "get(key, default=None)");
        return NULL;
    }
    const char *k;
    Py_ssize_t kl;
    PyObject *tmp;
    if (!fp_open(self) || fp_key(self, args[0], &k, &kl, &tmp) < 0) return NULL;
    PyObject *r = fp_get_key(self, k, kl, nargs > 1 ? args[1] : Py_None, NULL);
    Py_XDECREF(tmp);
    return r;
}

static PyObject *fp_get_key(FastSeg *self, const char *k, Py_ssize_t kl, PyObject *dflt,
                            shm_item_info *info) {
    uint32_t klen = (uint32_t)(kl > 0xffffffffLL ? 0xffffffff : kl);
    int64_t n;
    while (self->guess >= FP_DIRECT_MIN) {
        PyObject *b = PyBytes_FromStringAndSize(NULL, self->guess);
        if (!b) return NULL;
        n = shm_get(self->c, k, klen, PyBytes_AS_STRING(b), (uint64_t)self->guess, info);
        if (n == self->guess) return b;
        if (n >= 0 && n < self->guess) {
            self->guess = (Py_ssize_t)n;
            if (_PyBytes_Resize(&b, (Py_ssize_t)n) < 0) return NULL;
            return b;
        }
        Py_DECREF(b);
        if (n < 0) goto done;
        self->guess = (Py_ssize_t)n;   /* larger than guessed: nothing copied, retry */
    }
    for (;;) {
        n = shm_get(self->c, k, klen, self->buf, self->cap, info);
        if (n < 0 || (uint64_t)n <= self->cap) break;
        char *nb = PyMem_RawRealloc(self->buf, (size_t)n);   /* no lock is held here */
        if (!nb) return PyErr_NoMemory();
        self->buf = nb;
        self->cap = (uint64_t)n;
    }
    if (n >= 0) {
        if (n >= FP_DIRECT_MIN) self->guess = (Py_ssize_t)n;
        return PyBytes_FromStringAndSize(self->buf, (Py_ssize_t)n);
    }
done:
    if (n == SHM_MISS) {
        Py_INCREF(dflt);
        return dflt;
    }
    return fp_engine_error(self, n);
}

/* get_info(key) -> (value, version, flags) or None: value and metadata of one entry,
 * read under one lock (what a per-process object cache needs to fill itself). */
static PyObject *fp_get_info(FastSeg *self, PyObject *key) {
    const char *k;
    Py_ssize_t kl;
    PyObject *tmp;
    if (!fp_open(self) || fp_key(self, key, &k, &kl, &tmp) < 0) return NULL;
    shm_item_info info;
    PyObject *v = fp_get_key(self, k, kl, Py_None, &info);
    Py_XDECREF(tmp);
    if (v == NULL || v == Py_None) return v;   /* values are bytes: None means a miss */
    PyObject *r = Py_BuildValue("(NKI)", v, (unsigned long long)info.version,
                                (unsigned)info.flags);
    return r;
}

/* The per-process object cache check shared by l0_get and HotCall: objects maps
 * key -> (version, object, meta); a hit needs meta None and the entry's version in the
 * segment unchanged (counted as a hit there, and in the native int64 held by the
 * optional bytearray hits, at least 8 bytes).  1 and a new reference in *out on a hit,
 * 0 on a miss, -1 with an exception set on an error. */
static int fp_l0_lookup(FastSeg *self, PyObject *objects, PyObject *key, PyObject *hits,
                        PyObject **out) {
    PyObject *e = PyDict_GetItemWithError(objects, key);   /* borrowed */
    if (!e) return PyErr_Occurred() ? -1 : 0;
    if (!PyTuple_Check(e) || PyTuple_GET_SIZE(e) != 3 || PyTuple_GET_ITEM(e, 2) != Py_None ||
        !PyLong_Check(PyTuple_GET_ITEM(e, 0)))
        return 0;
    unsigned long long want = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(e, 0));
    if (want == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    Py_INCREF(e);   /* the dict may change when the key's str is encoded */
    const char *k;
    Py_ssize_t kl;
    PyObject *tmp;
    if (!fp_open(self) || fp_key(self, key, &k, &kl, &tmp) < 0) {
        Py_DECREF(e);
        return -1;
    }
    shm_item_info info;
    int r = shm_hit_info(self->c, k, (uint32_t)(kl > 0xffffffffLL ? 0xffffffff : kl), &info);
    Py_XDECREF(tmp);
    if (r == 0 && info.version == want) {
        if (hits) {   /* the caller's hit counter: an int64 in a bytearray */
            char *p = PyByteArray_AS_STRING(hits);
            int64_t n;
            memcpy(&n, p, 8);
            n++;
            memcpy(p, &n, 8);
        }
        *out = PyTuple_GET_ITEM(e, 1);
        Py_INCREF(*out);
        Py_DECREF(e);
        return 1;
    }
    Py_DECREF(e);
    if (r < 0 && r != SHM_MISS) {
        fp_engine_error(self, r);
        return -1;
    }
    return 0;
}

/* l0_get(objects, key, default, hits=None): a per-process object cache hit in one
 * call (see fp_l0_lookup): the object, else default.  For the cached decorator's hot
 * path when HotCall cannot take it. */
static PyObject *fp_l0_get(FastSeg *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 3 || nargs > 4 || !PyDict_Check(args[0]) ||
        (nargs == 4 && !(PyByteArray_Check(args[3]) && PyByteArray_GET_SIZE(args[3]) >= 8))) {
        PyErr_SetString(PyExc_TypeError, "l0_get(objects: dict, key, default, "
                        "hits: bytearray(8) = None)");
        return NULL;
    }
    PyObject *v;
    int r = fp_l0_lookup(self, args[0], args[1], nargs == 4 ? args[3] : NULL, &v);
    if (r > 0) return v;
    if (r < 0) return NULL;
    Py_INCREF(args[2]);
    return args[2];
}

static PyObject *fp_contains(FastSeg *self, PyObject *key) {
    const char *k;
    Py_ssize_t kl;
    PyObject *tmp;
    if (!fp_open(self) || fp_key(self, key, &k, &kl, &tmp) < 0) return NULL;
    int r = shm_contains(self->c, k, (uint32_t)(kl > 0xffffffffLL ? 0xffffffff : kl));
    Py_XDECREF(tmp);
    if (r < 0) return fp_engine_error(self, r);
    return PyBool_FromLong(r);
}

static PyObject *fp_set_key(FastSeg *self, const char *k, Py_ssize_t kl, PyObject *val,
                            PyObject *ttl, uint32_t flags, uint64_t expect, int mode);

/* set(key, value, ttl=None, *, flags=0, expect_version=0) -> int version
 * add(key, value, ttl=None, *, flags=0) -> int version, or None if the key exists */
static PyObject *fp_write(FastSeg *self, PyObject *const *args, Py_ssize_t nargs,
                          PyObject *kwnames, int mode) {
    PyObject *ttl = nargs > 2 ? args[2] : Py_None;
    unsigned long long flags = 0, expect = 0;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs < 2 || nargs > 3) {
        PyErr_SetString(PyExc_TypeError, "set(key, value, ttl=None, *, flags=0, "
                        "expect_version=0)");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, i), *v = args[nargs + i];
        if (PyUnicode_CompareWithASCIIString(name, "ttl") == 0 && nargs == 2) {
            ttl = v;
        } else if (PyUnicode_CompareWithASCIIString(name, "journal") == 0) {
            int on = PyObject_IsTrue(v);
            if (on < 0) return NULL;
            if (!on) mode |= SHM_NOJOURNAL;
        } else if (PyUnicode_CompareWithASCIIString(name, "flags") == 0 ||
                   PyUnicode_CompareWithASCIIString(name, "expect_version") == 0) {
            int is_flags = PyUnicode_CompareWithASCIIString(name, "flags") == 0;
            if (!PyLong_Check(v) || PyBool_Check(v)) {
                PyErr_Format(PyExc_TypeError, "%U must be an int", name);
                return NULL;
            }
            unsigned long long x = PyLong_AsUnsignedLongLong(v);
            if (x == (unsigned long long)-1 && PyErr_Occurred()) {
                PyErr_Clear();
                PyErr_Format(PyExc_ValueError, "%U must be a non-negative 64-bit int", name);
                return NULL;
            }
            if (is_flags) flags = x;
            else if ((mode & ~SHM_NOJOURNAL) == SHM_SET) expect = x;
            else {
                PyErr_SetString(PyExc_TypeError, "add() takes no expect_version");
                return NULL;
            }
        } else {
            PyErr_Format(PyExc_TypeError, "set() got an unexpected keyword argument %R", name);
            return NULL;
        }
    }
    if (flags > 0xffff) {
        PyErr_SetString(PyExc_ValueError, "flags must fit in 16 bits");
        return NULL;
    }
    const char *k;
    Py_ssize_t kl;
    PyObject *tmp;
    if (!fp_open(self) || fp_key(self, args[0], &k, &kl, &tmp) < 0) return NULL;
    PyObject *r = fp_set_key(self, k, kl, args[1], ttl, (uint32_t)flags, expect, mode);
    Py_XDECREF(tmp);
    return r;
}

static PyObject *fp_set(FastSeg *self, PyObject *const *args, Py_ssize_t nargs,
                        PyObject *kwnames) {
    return fp_write(self, args, nargs, kwnames, SHM_SET);
}

static PyObject *fp_add(FastSeg *self, PyObject *const *args, Py_ssize_t nargs,
                        PyObject *kwnames) {
    return fp_write(self, args, nargs, kwnames, SHM_ADD);
}

/* delete(key, *, expect_version=0, journal=True) -> bool */
static PyObject *fp_delete(FastSeg *self, PyObject *const *args, Py_ssize_t nargs,
                           PyObject *kwnames) {
    unsigned long long expect = 0;
    int opts = 0;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs != 1 || nkw > 2) {
        PyErr_SetString(PyExc_TypeError, "delete(key, *, expect_version=0, journal=True)");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, i), *v = args[1 + i];
        if (PyUnicode_CompareWithASCIIString(name, "journal") == 0) {
            int on = PyObject_IsTrue(v);
            if (on < 0) return NULL;
            if (!on) opts = SHM_NOJOURNAL;
        } else if (PyUnicode_CompareWithASCIIString(name, "expect_version") == 0) {
            if (!PyLong_Check(v) || PyBool_Check(v)) {
                PyErr_SetString(PyExc_TypeError, "expect_version must be an int");
                return NULL;
            }
            expect = PyLong_AsUnsignedLongLong(v);
            if (expect == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
        } else {
            PyErr_SetString(PyExc_TypeError, "delete(key, *, expect_version=0, journal=True)");
            return NULL;
        }
    }
    const char *k;
    Py_ssize_t kl;
    PyObject *tmp;
    if (!fp_open(self) || fp_key(self, args[0], &k, &kl, &tmp) < 0) return NULL;
    int rc = shm_delete_ex(self->c, k, (uint32_t)(kl > 0xffffffffLL ? 0xffffffff : kl), expect,
                           opts);
    Py_XDECREF(tmp);
    if (rc == SHM_MISS) Py_RETURN_FALSE;
    if (rc < 0) return fp_engine_error(self, rc);
    Py_RETURN_TRUE;
}

static PyObject *fp_set_key(FastSeg *self, const char *k, Py_ssize_t kl, PyObject *val,
                            PyObject *ttl, uint32_t flags, uint64_t expect, int mode) {
    int64_t ttl_ms = 0;
    if (ttl != Py_None) {
        if (PyBool_Check(ttl) || !(PyLong_Check(ttl) || PyFloat_Check(ttl)))
            return fp_raise(self, FP_ETTLTYPE, "ttl must be seconds as int/float or None");
        double secs = PyFloat_AsDouble(ttl);
        if (secs == -1.0 && PyErr_Occurred()) return NULL;
        if (!(secs > 0)) return fp_raise(self, FP_ETTL, "ttl must be > 0 seconds (or None "
                                         "for no expiry)");
        ttl_ms = secs * 1000.0 < 1.0 ? 1 : (int64_t)(secs * 1000.0);
    }
    uint64_t ver = 0;
    int rc;
    uint32_t klen = (uint32_t)(kl > 0xffffffffLL ? 0xffffffff : kl);
    if (PyBytes_Check(val)) {
        rc = shm_set(self->c, k, klen, PyBytes_AS_STRING(val),
                     (uint64_t)PyBytes_GET_SIZE(val), ttl_ms, flags, mode,
                     expect, &ver);
    } else if (PyByteArray_Check(val) || PyMemoryView_Check(val)) {
        Py_buffer view;
        if (PyObject_GetBuffer(val, &view, PyBUF_SIMPLE) < 0) return NULL;
        rc = shm_set(self->c, k, klen, view.buf, (uint64_t)view.len, ttl_ms, flags,
                     mode, expect, &ver);
        PyBuffer_Release(&view);
    } else {
        char msg[200];
        snprintf(msg, sizeof msg, "value must be bytes-like (bytes, bytearray, memoryview), "
                 "not %.80s; serialize it first or use shmcache.Cache", Py_TYPE(val)->tp_name);
        return fp_raise(self, FP_ENOTBYTES, msg);
    }
    if (rc == SHM_EEXISTS && (mode & ~SHM_NOJOURNAL) == SHM_ADD) Py_RETURN_NONE;
    if (rc < 0) return fp_engine_error(self, rc);
    return PyLong_FromUnsignedLongLong(ver);
}

/* version(key) -> (version, flags) or None: a hit served from a per-process copy of the
 * value (counted, recorded for eviction), validated by the entry's version. */
static PyObject *fp_version(FastSeg *self, PyObject *key) {
    const char *k;
    Py_ssize_t kl;
    PyObject *tmp;
    if (!fp_open(self) || fp_key(self, key, &k, &kl, &tmp) < 0) return NULL;
    shm_item_info info;
    int r = shm_hit_info(self->c, k, (uint32_t)(kl > 0xffffffffLL ? 0xffffffff : kl), &info);
    Py_XDECREF(tmp);
    if (r == SHM_MISS) Py_RETURN_NONE;
    if (r < 0) return fp_engine_error(self, r);
    return Py_BuildValue("(KI)", (unsigned long long)info.version, (unsigned)info.flags);
}

static PyObject *fp_detach(FastSeg *self, PyObject *unused) {
    (void)unused;
    self->c = NULL;
    Py_RETURN_NONE;
}

static void fp_dealloc(FastSeg *self) {
    Py_XDECREF(self->raise);
    PyMem_RawFree(self->buf);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* HotCall: the base type of shmcache.cache.CachedFunction.  Calling one serves the
 * decorator's hot path without a Python frame: one positional int or str argument, no
 * keywords -> key = prefix + repr(arg); if that key is short and its object is in the
 * per-process object cache at the segment's current version (fp_l0_lookup), that
 * object is the result.  A key longer than key_limit code points is never looked up
 * (the slow path shortens it); only one of at most short_limit code points (so at most
 * key_limit UTF-8 bytes: never shortened) is handed to the slow path as checked.  Anything else -- other arguments, a long key, a miss, or no
 * hot path configured (async functions, key builders, namespaces, object cache off) --
 * calls slow(self, key_or_None, *args, **kwargs), a plain function (not a bound
 * method, so no reference cycle through self); key is the key built here when it was
 * checked and missed, so the slow path need not build it again.  An engine error
 * (closed segment) raises, as l0_get does.  No lock is held while Python runs. */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *seg;         /* FastSeg whose l0_get was given, or NULL: no hot path */
    PyObject *prefix;      /* str: "<function name>|" */
    PyObject *objects;     /* dict: the Cache's object cache */
    PyObject *hits;        /* bytearray(>= 8): the function's hit counter */
    PyObject *slow;        /* slow(self, key, *args, **kwargs) */
    Py_ssize_t short_limit;   /* pass the key on a miss only up to this length */
    Py_ssize_t key_limit;     /* look up only keys up to this length */
} HotCall;

#define HC_STACK_ARGS 8

static PyObject *hc_slow(HotCall *self, PyObject *hk, PyObject *const *args,
                         Py_ssize_t nargs, PyObject *kwnames) {
    PyObject *slow = self->slow;
    if (!slow) {
        Py_XDECREF(hk);
        PyErr_SetString(PyExc_TypeError, "cached function is not initialized");
        return NULL;
    }
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    Py_ssize_t total = 2 + nargs + nkw;
    /* One spare slot in front so the callee may use PY_VECTORCALL_ARGUMENTS_OFFSET. */
    PyObject *stack[1 + HC_STACK_ARGS], **buf = stack;
    if (total > HC_STACK_ARGS) {
        buf = PyMem_Malloc((size_t)(1 + total) * sizeof(PyObject *));
        if (!buf) {
            Py_XDECREF(hk);
            return PyErr_NoMemory();
        }
    }
    buf[1] = (PyObject *)self;
    buf[2] = hk ? hk : Py_None;
    if (nargs + nkw) memcpy(buf + 3, args, (size_t)(nargs + nkw) * sizeof(PyObject *));
    Py_INCREF(slow);   /* a call may re-configure or clear self */
    Py_INCREF(self);
    PyObject *r = PyObject_Vectorcall(slow, buf + 1,
                                      (size_t)(2 + nargs) | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                      kwnames);
    Py_DECREF(self);
    Py_DECREF(slow);
    Py_XDECREF(hk);
    if (buf != stack) PyMem_Free(buf);
    return r;
}

static PyObject *hc_vectorcall(PyObject *op, PyObject *const *args, size_t nargsf,
                               PyObject *kwnames) {
    HotCall *self = (HotCall *)op;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *hk = NULL;
    if (self->seg && nargs == 1 && (!kwnames || PyTuple_GET_SIZE(kwnames) == 0)) {
        PyTypeObject *t = Py_TYPE(args[0]);
        if (t == &PyLong_Type || t == &PyUnicode_Type) {   /* exact types: repr is fixed */
            PyObject *r = PyObject_Repr(args[0]);
            if (!r) return NULL;
            hk = PyUnicode_Concat(self->prefix, r);
            Py_DECREF(r);
            if (!hk) return NULL;
            if (PyUnicode_GET_LENGTH(hk) > self->key_limit) {
                Py_CLEAR(hk);   /* the slow path shortens it */
            } else {
                /* Hold what the lookup uses: a hit counter or a key's encoding can run
                 * no Python, but the dict lookup can (__eq__ of a colliding key). */
                PyObject *seg = self->seg, *objects = self->objects, *hits = self->hits;
                Py_INCREF(seg);
                Py_INCREF(objects);
                Py_INCREF(hits);
                PyObject *v = NULL;
                int rc = fp_l0_lookup((FastSeg *)seg, objects, hk, hits, &v);
                Py_DECREF(seg);
                Py_DECREF(objects);
                Py_DECREF(hits);
                if (rc != 0) {
                    Py_DECREF(hk);
                    return rc > 0 ? v : NULL;
                }
                if (PyUnicode_GET_LENGTH(hk) > self->short_limit)
                    Py_CLEAR(hk);   /* may need shortening: the slow path decides */
            }
        }
    }
    return hc_slow(self, hk, args, nargs, kwnames);
}

static PyObject *hc_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    (void)args;
    (void)kwds;
    HotCall *self = (HotCall *)type->tp_alloc(type, 0);
    if (self) self->vectorcall = hc_vectorcall;
    return (PyObject *)self;
}

static int hc_traverse(HotCall *self, visitproc visit, void *arg) {
    Py_VISIT(self->seg);
    Py_VISIT(self->prefix);
    Py_VISIT(self->objects);
    Py_VISIT(self->hits);
    Py_VISIT(self->slow);
    return 0;
}

static int hc_clear(HotCall *self) {
    Py_CLEAR(self->seg);
    Py_CLEAR(self->prefix);
    Py_CLEAR(self->objects);
    Py_CLEAR(self->hits);
    Py_CLEAR(self->slow);
    return 0;
}

static void hc_dealloc(HotCall *self) {
    PyObject_GC_UnTrack(self);
    hc_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* _hot_configure(slow, l0_get=None, prefix=None, objects=None, hits=None,
 * short_limit=0, key_limit=0) -> bool: set the slow path, and the hot path when l0_get is a
 * segment's direct-call l0_get (True: the hot path is on). */
static PyObject *hc_configure(HotCall *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 1 && nargs != 7) goto usage;
    PyObject *slow = args[0];
    if (!PyCallable_Check(slow)) goto usage;
    PyObject *seg = NULL;
    Py_ssize_t limit = 0, klimit = 0;
    if (nargs == 7 && args[1] != Py_None) {
        PyObject *l0get = args[1];
        if (!PyUnicode_Check(args[2]) || !PyDict_Check(args[3]) ||
            !(PyByteArray_Check(args[4]) && PyByteArray_GET_SIZE(args[4]) >= 8) ||
            !PyLong_Check(args[5]) || !PyLong_Check(args[6]))
            goto usage;
        limit = PyLong_AsSsize_t(args[5]);
        if (limit == -1 && PyErr_Occurred()) return NULL;
        klimit = PyLong_AsSsize_t(args[6]);
        if (klimit == -1 && PyErr_Occurred()) return NULL;
        if (klimit < limit) klimit = limit;
        if (PyCFunction_Check(l0get) &&
            PyCFunction_GET_FUNCTION(l0get) == (PyCFunction)(void (*)(void))fp_l0_get &&
            PyCFunction_GET_SELF(l0get) &&
            Py_TYPE(PyCFunction_GET_SELF(l0get)) == &FastSegType)
            seg = PyCFunction_GET_SELF(l0get);
    }
    Py_INCREF(slow);
    Py_XSETREF(self->slow, slow);
    if (seg) {
        Py_INCREF(seg);
        Py_INCREF(args[2]);
        Py_INCREF(args[3]);
        Py_INCREF(args[4]);
        Py_XSETREF(self->prefix, args[2]);
        Py_XSETREF(self->objects, args[3]);
        Py_XSETREF(self->hits, args[4]);
        self->short_limit = limit;
        self->key_limit = klimit;
    }
    Py_XSETREF(self->seg, seg);   /* last: a call never sees a half-set hot path */
#if PY_VERSION_HEX < 0x030C0000
    /* Before 3.12 a Python subclass does not inherit Py_TPFLAGS_HAVE_VECTORCALL, so
     * calls would build an argument tuple for tp_call; set it on the subclass unless it
     * overrides __call__ (3.12+ inherits it the same way, and drops it on override). */
    PyTypeObject *tp = Py_TYPE(self);
    if (tp->tp_call == PyVectorcall_Call &&
        tp->tp_vectorcall_offset == offsetof(HotCall, vectorcall))
        tp->tp_flags |= Py_TPFLAGS_HAVE_VECTORCALL;
#endif
    return PyBool_FromLong(seg != NULL);
usage:
    PyErr_SetString(PyExc_TypeError, "_hot_configure(slow, l0_get=None, prefix: str, "
                    "objects: dict, hits: bytearray(8), short_limit: int, "
                    "key_limit: int)");
    return NULL;
}

static PyMethodDef hc_methods[] = {
    {"__class_getitem__", Py_GenericAlias, METH_O | METH_CLASS,
     "HotCall[P, R]: generic in annotations, as its Python subclass is."},
    {"_hot_configure", (PyCFunction)(void (*)(void))hc_configure, METH_FASTCALL,
     "_hot_configure(slow, l0_get=None, prefix=None, objects=None, hits=None, "
     "short_limit=0, key_limit=0) -> bool: the slow path, and the hot path if l0_get is a "
     "segment's direct-call l0_get (internal)."},
    {NULL, NULL, 0, NULL}};

static PyTypeObject HotCallType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmcache._native.HotCall",
    .tp_basicsize = sizeof(HotCall),
    .tp_dealloc = (destructor)hc_dealloc,
    .tp_vectorcall_offset = offsetof(HotCall, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC |
                Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "Base of shmcache.cache.CachedFunction: its hot path in C (internal).",
    .tp_traverse = (traverseproc)hc_traverse,
    .tp_clear = (inquiry)hc_clear,
    .tp_methods = hc_methods,
    .tp_new = hc_new,
};

static PyObject *fp_hotcall_type(FastSeg *self, PyObject *unused) {
    (void)self;
    (void)unused;
    if (!(HotCallType.tp_flags & Py_TPFLAGS_READY) && PyType_Ready(&HotCallType) < 0)
        return NULL;
    Py_INCREF(&HotCallType);
    return (PyObject *)&HotCallType;
}

static PyMethodDef fp_methods[] = {
    {"get", (PyCFunction)(void (*)(void))fp_get, METH_FASTCALL,
     "get(key, default=None) -> bytes: copy of the value, or default on a miss."},
    {"set", (PyCFunction)(void (*)(void))fp_set, METH_FASTCALL | METH_KEYWORDS,
     "set(key, value, ttl=None, *, flags=0, expect_version=0) -> int: store bytes; "
     "returns the new version."},
    {"add", (PyCFunction)(void (*)(void))fp_add, METH_FASTCALL | METH_KEYWORDS,
     "add(key, value, ttl=None, *, flags=0) -> int | None: store only if absent."},
    {"delete", (PyCFunction)(void (*)(void))fp_delete, METH_FASTCALL | METH_KEYWORDS,
     "delete(key, *, expect_version=0) -> bool: remove; True if it was present."},
    {"get_info", (PyCFunction)fp_get_info, METH_O,
     "get_info(key) -> (value, version, flags) | None: value and metadata, one read."},
    {"l0_get", (PyCFunction)(void (*)(void))fp_l0_get, METH_FASTCALL,
     "l0_get(objects, key, default, hits=None): per-process object cache hit validated by "
     "version; counts it in the int64 of bytearray hits."},
    {"contains", (PyCFunction)fp_contains, METH_O,
     "contains(key) -> bool: present and not expired."},
    {"version", (PyCFunction)fp_version, METH_O,
     "version(key) -> (version, flags) | None: count a hit served from a caller's own "
     "copy of the value, without copying it."},
    {"hotcall_type", (PyCFunction)fp_hotcall_type, METH_NOARGS,
     "hotcall_type() -> type: the C base type of the cached decorator (HotCall)."},
    {"detach", (PyCFunction)fp_detach, METH_NOARGS,
     "Forget the engine handle (called by Segment.close before it is freed)."},
    {NULL, NULL, 0, NULL}};

static PyTypeObject FastSegType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmcache._native.FastSeg",
    .tp_basicsize = sizeof(FastSeg),
    .tp_dealloc = (destructor)fp_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Direct-call get/set/contains on one engine handle (internal).",
    .tp_methods = fp_methods,
};

/* Called through cffi (whose wrapper releases the GIL, so take it back here).  Appends
 * a new FastSeg for handle c to the Python list out_list; 0 on success. */
int shm_py_fastseg(shm_cache *c, void *raise_fn, void *out_list) {
    PyGILState_STATE g = PyGILState_Ensure();
    int rc = -1;
    if ((FastSegType.tp_flags & Py_TPFLAGS_READY) || PyType_Ready(&FastSegType) == 0) {
        FastSeg *f = PyObject_New(FastSeg, &FastSegType);
        if (f) {
            f->c = c;
            f->guess = 0;
            f->cap = FP_DIRECT_MIN;
            f->buf = PyMem_RawMalloc(FP_DIRECT_MIN);
            if (!f->buf) f->cap = 0;
            f->raise = (PyObject *)raise_fn;
            Py_INCREF(f->raise);
            rc = PyList_Append((PyObject *)out_list, (PyObject *)f);
            Py_DECREF(f);
        }
    }
    if (rc < 0) PyErr_Clear();
    PyGILState_Release(g);
    return rc;
}
