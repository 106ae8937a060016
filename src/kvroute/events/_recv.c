/* kvroute.events._recv: a subscriber's receive loop over libzmq's C API (docs/design.md §8).
 *
 * pyzmq builds a Frame object per frame, or asks the socket for RCVMORE through a getsockopt
 * per frame; either costs ~1.5 us, three times per message. This loop reads a batch of
 * `[topic, seq, payload]` messages with zmq_msg_recv and hands up `(seq, payload)` pairs.
 *
 * It calls the libzmq that pyzmq itself loaded: events/native_receive.py looks the functions up
 * through pyzmq's backend module and passes their addresses to `bind`, so the socket handle
 * (`Socket.underlying`) always belongs to the library that is called. Nothing is parsed here:
 * the frames' bytes are copied out as they are; the seq frame is taken only when it is exactly
 * eight bytes. The message boundary rules are those of `_SourceTask._drain` in
 * events/subscriber.py, which tests/zmq/events/test_subscriber_receive.py runs over both.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#ifdef __linux__
#include <sys/timerfd.h>
#include <unistd.h>
#endif

/* libzmq's message: 64 opaque bytes, pointer-aligned (zmq.h since 4.0). */
typedef struct {
    unsigned char bytes[64];
} __attribute__((aligned(sizeof(void *)))) zmsg;

typedef int (*msg_init_fn)(zmsg *);
typedef int (*msg_recv_fn)(zmsg *, void *, int);
typedef int (*msg_close_fn)(zmsg *);
typedef void *(*msg_data_fn)(zmsg *);
typedef size_t (*msg_size_fn)(const zmsg *);
typedef int (*msg_more_fn)(const zmsg *);
typedef int (*errno_fn)(void);

#define DONTWAIT 1 /* ZMQ_DONTWAIT */

static struct {
    msg_init_fn init;
    msg_recv_fn recv;
    msg_close_fn close;
    msg_data_fn data;
    msg_size_fn size;
    msg_more_fn more;
    errno_fn err;
} z;

static PyObject *bind(PyObject *self, PyObject *args) {
    unsigned long long a[7];
    if (!PyArg_ParseTuple(args, "KKKKKKK", &a[0], &a[1], &a[2], &a[3], &a[4], &a[5], &a[6]))
        return NULL;
    for (int i = 0; i < 7; i++) {
        if (a[i] == 0) {
            PyErr_SetString(PyExc_ValueError, "a libzmq function address is 0");
            return NULL;
        }
    }
    z.init = (msg_init_fn)(uintptr_t)a[0];
    z.recv = (msg_recv_fn)(uintptr_t)a[1];
    z.close = (msg_close_fn)(uintptr_t)a[2];
    z.data = (msg_data_fn)(uintptr_t)a[3];
    z.size = (msg_size_fn)(uintptr_t)a[4];
    z.more = (msg_more_fn)(uintptr_t)a[5];
    z.err = (errno_fn)(uintptr_t)a[6];
    Py_RETURN_NONE;
}

/* One frame into *m; 0, or libzmq's errno. */
static inline int next_frame(zmsg *m, void *sock) {
    z.init(m);
    if (z.recv(m, sock, DONTWAIT) < 0) {
        int e = z.err();
        z.close(m);
        return e ? e : EIO;
    }
    return 0;
}

/* Skip the rest of a message whose last frame read (*m, still open) says more follow. */
static int skip_rest(zmsg *m, void *sock) {
    while (z.more(m)) {
        z.close(m);
        int e = next_frame(m, sock);
        if (e)
            return e;
    }
    z.close(m);
    return 0;
}

static inline uint64_t be64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = (v << 8) | p[i];
    return v;
}

/* drain(handle, limit, out) -> int
 *
 * Appends to `out` up to `limit` messages, each `(seq, payload)` or None for a message of
 * another shape (not three frames, or a seq of another length than eight bytes), which is
 * skipped whole. Returns 0 when the socket had no more (EAGAIN on a message's first frame),
 * 1 when `limit` was reached, or -errno when libzmq failed otherwise. */
static PyObject *drain(PyObject *self, PyObject *args) {
    PyObject *handle, *out;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "OnO!", &handle, &limit, &PyList_Type, &out))
        return NULL;
    if (z.recv == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_recv.bind was not called");
        return NULL;
    }
    void *sock = PyLong_AsVoidPtr(handle);
    if (sock == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "a null socket handle");
        return NULL;
    }
    zmsg m;
    for (Py_ssize_t n = 0; n < limit; n++) {
        int e = next_frame(&m, sock); /* topic: not looked at */
        if (e)
            return PyLong_FromLong(e == EAGAIN ? 0 : -e);
        int more = z.more(&m);
        z.close(&m);
        PyObject *item = NULL;
        if (more) {
            if ((e = next_frame(&m, sock)))
                return PyLong_FromLong(-e);
            int seq_ok = z.size(&m) == 8;
            uint64_t seq = seq_ok ? be64((const unsigned char *)z.data(&m)) : 0;
            more = z.more(&m);
            z.close(&m);
            if (more) {
                if ((e = next_frame(&m, sock)))
                    return PyLong_FromLong(-e);
                if (z.more(&m) || !seq_ok) {
                    if ((e = skip_rest(&m, sock)))
                        return PyLong_FromLong(-e);
                } else {
                    PyObject *payload =
                        PyBytes_FromStringAndSize((const char *)z.data(&m), (Py_ssize_t)z.size(&m));
                    z.close(&m);
                    if (payload == NULL)
                        return NULL;
                    PyObject *seq_obj = PyLong_FromUnsignedLongLong(seq);
                    if (seq_obj == NULL) {
                        Py_DECREF(payload);
                        return NULL;
                    }
                    item = PyTuple_Pack(2, seq_obj, payload);
                    Py_DECREF(seq_obj);
                    Py_DECREF(payload);
                    if (item == NULL)
                        return NULL;
                }
            }
        }
        int rc = PyList_Append(out, item != NULL ? item : Py_None);
        Py_XDECREF(item);
        if (rc < 0)
            return NULL;
    }
    return PyLong_FromLong(1);
}

/* take_run(items, at, last, decode, floor, budget, rank, cleared, wire_error[, parts])
 *   -> (next, last, first, events, payload)
 *
 * The loop of events/tracker.py `SourceTracker.on_live_run`, which has the rules: takes
 * items[at:] while each is `(last + 1, payload)`, no longer than `floor` (when >= 0), decodes
 * (`decode(payload)`; a `wire_error` ends the run), has no `cleared` event, no skipped or
 * unsupported events, no other rank than `rank`, and `budget.admit(len)` (then
 * `budget.charge_events(n)`; budget None: no budget). `first` is the first batch taken (None:
 * none), `events` every event taken when more than one batch was (else None), `payload` the
 * last one taken. Anything else is left to the caller at `next`.
 *
 * `parts` (events/wire.py `BatchDecoder.plain_parts`, None: not given) = (raw decode, verdict,
 * plain, EventBatch): a payload the raw decode takes and the verdict calls plain is taken
 * without `decode`'s two Python frames and EventBatch (design §12); any other is decoded by
 * `decode`, as before. Both give the same events. */
static PyObject *s_events, *s_rank, *s_skipped, *s_unsupported, *s_admit, *s_charge, *s_ts;

/* 1 when a decoded batch's events and rank are the common case, 0 when not, -1 on error. */
static int plain_events(PyObject *events, PyObject *r, PyObject *rank, PyTypeObject *cleared) {
    if (!PyList_CheckExact(events))
        return 0;
    for (Py_ssize_t k = 0; k < PyList_GET_SIZE(events); k++)
        if (PyObject_TypeCheck(PyList_GET_ITEM(events, k), cleared))
            return 0;
    return r == Py_None ? 1 : PyObject_RichCompareBool(r, rank, Py_EQ);
}

static int plain_batch(PyObject *batch, PyObject *events, PyObject *rank, PyTypeObject *cleared) {
    PyObject *names[2] = {s_skipped, s_unsupported};
    for (int k = 0; k < 2; k++) {
        PyObject *n = PyObject_GetAttr(batch, names[k]);
        if (n == NULL)
            return -1;
        int zero = PyLong_CheckExact(n) && PyLong_AsLong(n) == 0;
        Py_DECREF(n);
        if (!zero)
            return 0;
    }
    PyObject *r = PyObject_GetAttr(batch, s_rank);
    if (r == NULL)
        return -1;
    int same = plain_events(events, r, rank, cleared);
    Py_DECREF(r);
    return same;
}

/* The plain case of wire.py's raw map decode through `parts`: 1 with *evs (a list), *ts and
 * *r (the batch's rank) as new references; 0 when this payload is not taken that way (an error
 * on the way is cleared: `decode` meets it again and answers for it). */
static int plain_decode(PyObject *parts, long plain, PyObject *pl, PyObject **evs, PyObject **ts,
                        PyObject **r) {
    *evs = *ts = *r = NULL;
    PyObject *raw = PyObject_CallOneArg(PyTuple_GET_ITEM(parts, 0), pl);
    if (raw == NULL) {
        PyErr_Clear();
        return 0;
    }
    *evs = PyObject_GetAttr(raw, s_events);
    if (*evs != NULL && PyList_CheckExact(*evs)) {
        PyObject *v = PyObject_CallOneArg(PyTuple_GET_ITEM(parts, 1), *evs);
        long verdict = v != NULL && PyLong_CheckExact(v) ? PyLong_AsLong(v) : plain - 1;
        Py_XDECREF(v);
        if (verdict == plain && (*ts = PyObject_GetAttr(raw, s_ts)) != NULL &&
            (*r = PyObject_GetAttr(raw, s_rank)) != NULL) {
            Py_DECREF(raw);
            return 1;
        }
    }
    PyErr_Clear();
    Py_CLEAR(*evs);
    Py_CLEAR(*ts);
    Py_CLEAR(*r);
    Py_DECREF(raw);
    return 0;
}

static PyObject *take_run(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if ((nargs != 9 && nargs != 10) || !PyList_CheckExact(args[0]) || !PyType_Check(args[7])) {
        PyErr_SetString(PyExc_TypeError, "take_run: (items, at, last, decode, floor, budget, "
                                         "rank, cleared, wire_error[, parts])");
        return NULL;
    }
    PyObject *items = args[0], *decode = args[3], *rank = args[6], *wire_error = args[8];
    PyObject *budget = args[5] == Py_None ? NULL : args[5];
    PyTypeObject *cleared = (PyTypeObject *)args[7];
    PyObject *parts = nargs == 10 && args[9] != Py_None ? args[9] : NULL;
    long plain_value = 0;
    if (parts != NULL) {
        if (!PyTuple_CheckExact(parts) || PyTuple_GET_SIZE(parts) != 4 ||
            !PyLong_CheckExact(PyTuple_GET_ITEM(parts, 2))) {
            PyErr_SetString(PyExc_TypeError, "take_run: parts = (decode, verdict, plain, batch)");
            return NULL;
        }
        plain_value = PyLong_AsLong(PyTuple_GET_ITEM(parts, 2));
    }
    Py_ssize_t at = PyLong_AsSsize_t(args[1]), floor = PyLong_AsSsize_t(args[4]);
    if (PyErr_Occurred())
        return NULL;
    unsigned long long last = PyLong_AsUnsignedLongLong(args[2]);
    if (PyErr_Occurred() || last == ~0ULL) { /* not a u64 seq, or no next one: Python's */
        PyErr_Clear();
        return Py_BuildValue("nOOOO", at, args[2], Py_None, Py_None, Py_None);
    }
    Py_ssize_t end = PyList_GET_SIZE(items), i = at;
    PyObject *first = NULL, *events = NULL, *payload = NULL; /* owned */
    for (; i < end; i++) {
        PyObject *item = PyList_GET_ITEM(items, i);
        if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 2)
            break;
        unsigned long long seq = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(item, 0));
        if (seq == ~0ULL && PyErr_Occurred()) {
            PyErr_Clear();
            break;
        }
        PyObject *pl = PyTuple_GET_ITEM(item, 1);
        if (seq != last + 1 || !PyBytes_CheckExact(pl))
            break;
        Py_ssize_t len = PyBytes_GET_SIZE(pl);
        if (floor >= 0 && len > floor)
            break;
        PyObject *batch = NULL, *evs, *ts, *r;
        int plain;
        if (parts != NULL && plain_decode(parts, plain_value, pl, &evs, &ts, &r)) {
            plain = plain_events(evs, r, rank, cleared);
            if (plain == 1 && first == NULL) { /* the EventBatch `decode` returns */
                PyObject *fields[3] = {ts, evs, r};
                batch = PyObject_Vectorcall(PyTuple_GET_ITEM(parts, 3), fields, 3, NULL);
                if (batch == NULL)
                    plain = -1;
            }
            Py_DECREF(ts);
            Py_DECREF(r);
        } else {
            batch = PyObject_CallOneArg(decode, pl);
            if (batch == NULL) {
                if (!PyErr_ExceptionMatches(wire_error))
                    goto error;
                PyErr_Clear();
                break;
            }
            evs = PyObject_GetAttr(batch, s_events);
            plain = evs == NULL ? -1 : plain_batch(batch, evs, rank, cleared);
        }
        if (plain == 1 && budget != NULL) {
            PyObject *n = PyLong_FromSsize_t(len);
            PyObject *ok = n ? PyObject_CallMethodOneArg(budget, s_admit, n) : NULL;
            Py_XDECREF(n);
            plain = ok == NULL ? -1 : PyObject_IsTrue(ok);
            Py_XDECREF(ok);
            if (plain == 1) {
                PyObject *count = PyLong_FromSsize_t(PyList_GET_SIZE(evs));
                PyObject *done = count ? PyObject_CallMethodOneArg(budget, s_charge, count) : NULL;
                Py_XDECREF(count);
                plain = done == NULL ? -1 : 1;
                Py_XDECREF(done);
            }
        }
        if (plain != 1) {
            Py_XDECREF(evs);
            Py_XDECREF(batch);
            if (plain < 0)
                goto error;
            break;
        }
        if (first == NULL) {
            first = batch;
        } else {
            if (events == NULL) {
                PyObject *first_events = PyObject_GetAttr(first, s_events);
                events = first_events ? PySequence_List(first_events) : NULL;
                Py_XDECREF(first_events);
            }
            int bad = events == NULL ||
                      PyList_SetSlice(events, PyList_GET_SIZE(events), PyList_GET_SIZE(events),
                                      evs) < 0;
            Py_XDECREF(batch);
            if (bad) {
                Py_DECREF(evs);
                goto error;
            }
        }
        Py_DECREF(evs);
        Py_INCREF(pl);
        Py_XSETREF(payload, pl);
        last++;
    }
    PyObject *result = Py_BuildValue("nKOOO", i, last, first ? first : Py_None,
                                     events ? events : Py_None, payload ? payload : Py_None);
    Py_XDECREF(first);
    Py_XDECREF(events);
    Py_XDECREF(payload);
    return result;
error:
    Py_XDECREF(first);
    Py_XDECREF(events);
    Py_XDECREF(payload);
    return NULL;
}

#ifdef __linux__
/* A pause timer for the subscriber's coalescing (events/subscriber.py `_coalesce`): asyncio's
 * own timers round a wait up to whole milliseconds (its epoll timeout), a timerfd wakes the
 * same epoll with microsecond precision. */
static PyObject *timer_new(PyObject *self, PyObject *unused) {
    int fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (fd < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLong(fd);
}

static PyObject *timer_arm(PyObject *self, PyObject *args) {
    int fd;
    long long ns;
    if (!PyArg_ParseTuple(args, "iL", &fd, &ns))
        return NULL;
    struct itimerspec its;
    memset(&its, 0, sizeof its);
    if (ns < 1)
        ns = 1; /* a zero it_value would disarm it */
    its.it_value.tv_sec = (time_t)(ns / 1000000000LL);
    its.it_value.tv_nsec = (long)(ns % 1000000000LL);
    if (timerfd_settime(fd, 0, &its, NULL) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *timer_ack(PyObject *self, PyObject *arg) {
    int fd = (int)PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    uint64_t expired = 0;
    if (read(fd, &expired, sizeof expired) != (ssize_t)sizeof expired) {
        if (errno == EAGAIN)
            return PyLong_FromLong(0);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromUnsignedLongLong(expired);
}
#endif

static PyMethodDef methods[] = {
    {"bind", bind, METH_VARARGS,
     "bind(init, recv, close, data, size, more, errno): the addresses of zmq_msg_init, "
     "zmq_msg_recv, zmq_msg_close, zmq_msg_data, zmq_msg_size, zmq_msg_more and zmq_errno."},
    {"drain", drain, METH_VARARGS,
     "drain(handle, limit, out) -> 0 (socket empty), 1 (limit reached) or -errno: appends "
     "(seq, payload), or None for a malformed message, per message received."},
#ifdef __linux__
    {"timer_new", timer_new, METH_NOARGS, "timer_new() -> a non-blocking monotonic timerfd."},
    {"timer_arm", timer_arm, METH_VARARGS, "timer_arm(fd, ns): fire once, ns from now."},
    {"timer_ack", timer_ack, METH_O, "timer_ack(fd) -> expirations read (0: none yet)."},
#endif
    {"take_run", (PyCFunction)(void (*)(void))take_run, METH_FASTCALL,
     "take_run(items, at, last, decode, floor, budget, rank, cleared, wire_error[, parts]) -> "
     "(next, last, first, events, payload): events/tracker.py on_live_run's loop."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "kvroute.events._recv",
    "A subscriber's receive loop over libzmq's C API.", -1, methods,
};

PyMODINIT_FUNC PyInit__recv(void) {
    const char *names[] = {"events", "data_parallel_rank", "skipped_events",
                           "unsupported_events", "admit", "charge_events", "ts"};
    PyObject **slots[] = {&s_events, &s_rank, &s_skipped, &s_unsupported, &s_admit, &s_charge,
                          &s_ts};
    for (int k = 0; k < 7; k++)
        if ((*slots[k] = PyUnicode_InternFromString(names[k])) == NULL)
            return NULL;
    return PyModule_Create(&module);
}
