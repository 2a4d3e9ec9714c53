/* One churn cycle in C: the load generators' hot loop without the
 * interpreter, whose work at churn rates was a large part of the
 * generators' CPU, taken from the cores of what they measure (the figures:
 * bench/README.md). churn.py keeps the same steps in Python, through
 * wire.py's Wire, for where this is not built.
 *
 * cycle(host, port, timeout, steps) connects, and for each (send, expect)
 * in steps writes `send` and reads up to the next method frame, whose
 * first four payload bytes must be `expect` (heartbeats are skipped); then
 * closes. Returns None, or (step, what, payload) for the frame that was
 * not the one expected: `what` is its frame type, or one of the WRONG_*
 * codes below, for the caller to describe. Raises OSError for what the
 * sockets say, and whatever a signal handler raises while it waits.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#define MAX_STEPS 16
#define FRAME_HEADER 7
#define FRAME_END 0xCE
/* Larger than any reply a churn cycle gets (the broker's Start is the
 * largest, under a kilobyte); a larger frame is refused. */
#define BUFFER_SIZE 65536

/* `what` for a frame that is not wrong by its type (churn.py names them). */
#define WRONG_CLOSED -1   /* the peer closed before the reply */
#define WRONG_END -2      /* bad frame end octet */
#define WRONG_SIZE -3     /* a frame larger than BUFFER_SIZE */
#define SIGNALLED -4      /* a signal handler raised: its exception is set */

/* Per thread: each cycle reads into it with the GIL released. */
static _Thread_local unsigned char buffer[BUFFER_SIZE];

typedef struct {
    const char *send;
    Py_ssize_t send_size;
    const char *expect; /* 4 bytes */
} Step;

typedef struct {
    int error;      /* errno, or 0 */
    int step;       /* the step whose reply was wrong, or -1 */
    int what;       /* frame type or WRONG_*, when step >= 0 */
    Py_ssize_t payload_size;
} Outcome;

/* EINTR: run Python's signal handlers, as socket calls from Python do, so
 * that Ctrl-C or an alarm is not held back until the cycle times out.
 * 0 to retry, -1 if a handler raised. */
static int interrupted(PyThreadState **released) {
    PyEval_RestoreThread(*released);
    int raised = PyErr_CheckSignals();
    *released = PyEval_SaveThread();
    return raised < 0 ? -1 : 0;
}

static int send_all(int fd, const char *data, Py_ssize_t size, PyThreadState **released,
                    Outcome *outcome) {
    while (size > 0) {
        ssize_t sent = send(fd, data, (size_t)size, MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno != EINTR) {
                outcome->error = errno;
                return -1;
            }
            if (interrupted(released) < 0) {
                outcome->what = SIGNALLED;
                return -1;
            }
            continue;
        }
        data += sent;
        size -= sent;
    }
    return 0;
}

/* Read until the next method frame is in: 1 if its id is `expect`, 0 if
 * it is another frame or a wrong one (outcome says which), -1 if the
 * socket failed, closed or a signal handler raised. */
static int expect_method(int fd, size_t *filled, const char *expect, PyThreadState **released,
                         Outcome *outcome) {
    for (;;) {
        while (*filled >= FRAME_HEADER) {
            size_t size = ((size_t)buffer[3] << 24) | ((size_t)buffer[4] << 16) |
                          ((size_t)buffer[5] << 8) | (size_t)buffer[6];
            if (size > BUFFER_SIZE - FRAME_HEADER - 1) {
                outcome->what = WRONG_SIZE;
                return 0;
            }
            size_t end = FRAME_HEADER + size;
            if (*filled < end + 1)
                break;
            int frame_type = buffer[0];
            outcome->payload_size = (Py_ssize_t)size;
            if (buffer[end] != FRAME_END) {
                outcome->what = WRONG_END;
                return 0;
            }
            if ((frame_type != 8 && frame_type != 1) ||
                (frame_type == 1 && (size < 4 || memcmp(buffer + FRAME_HEADER, expect, 4) != 0))) {
                outcome->what = frame_type;
                return 0;
            }
            memmove(buffer, buffer + end + 1, *filled - end - 1);
            *filled -= end + 1;
            if (frame_type == 1)
                return 1;
        }
        ssize_t received = recv(fd, buffer + *filled, BUFFER_SIZE - *filled, 0);
        if (received < 0 && errno == EINTR) {
            if (interrupted(released) == 0)
                continue;
            outcome->what = SIGNALLED;
            return -1;
        }
        if (received < 0)
            outcome->error = errno;
        else if (received == 0)
            outcome->what = WRONG_CLOSED;
        else {
            *filled += (size_t)received;
            continue;
        }
        return -1;
    }
}

static void converse(const struct sockaddr_in *addr, double timeout, Step *steps, int count,
                     PyThreadState **released, Outcome *outcome) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) {
        outcome->error = errno;
        return;
    }
    /* Bounded by the kernel, as in wire.py (SO_SNDTIMEO bounds connect too);
     * small frames go out at once, as clients send them. */
    struct timeval bound = {(time_t)timeout, (suseconds_t)((timeout - (time_t)timeout) * 1e6)};
    int one = 1;
    if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &bound, sizeof bound) < 0 ||
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &bound, sizeof bound) < 0 ||
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0) {
        outcome->error = errno;
        close(fd);
        return;
    }
    while (connect(fd, (const struct sockaddr *)addr, sizeof *addr) < 0) {
        int failure = errno;
        /* Interrupted, the connect goes on in the kernel, and connecting
         * again waits for it (Linux), as Python's socket.connect waits. */
        if (failure == EINTR) {
            if (interrupted(released) == 0)
                continue;
            outcome->what = SIGNALLED;
        } else if (failure == EISCONN) {
            break;
        } else { /* EALREADY: that wait ran out (SO_SNDTIMEO) */
            outcome->error = failure == EALREADY ? ETIMEDOUT : failure;
        }
        close(fd);
        return;
    }
    size_t filled = 0;
    for (int i = 0; i < count; i++) {
        if (send_all(fd, steps[i].send, steps[i].send_size, released, outcome) < 0 ||
            expect_method(fd, &filled, steps[i].expect, released, outcome) != 1) {
            outcome->step = i;
            break;
        }
    }
    close(fd);
}

static PyObject *cycle(PyObject *Py_UNUSED(module), PyObject *args) {
    const char *host;
    int port;
    double timeout;
    PyObject *sequence;
    if (!PyArg_ParseTuple(args, "sidO!", &host, &port, &timeout, &PyTuple_Type, &sequence))
        return NULL;
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    if (port < 0 || port > 65535 || inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
        PyErr_Format(PyExc_ValueError, "not an IPv4 address and port: %s, %d", host, port);
        return NULL;
    }
    addr.sin_port = htons((uint16_t)port);
    if (!isfinite(timeout) || timeout < 0 || timeout > 86400) {
        PyErr_SetString(PyExc_ValueError, "timeout must be 0 to 86400 seconds");
        return NULL;
    }
    Py_ssize_t count = PyTuple_GET_SIZE(sequence);
    if (count > MAX_STEPS) {
        PyErr_SetString(PyExc_ValueError, "too many steps");
        return NULL;
    }
    Step steps[MAX_STEPS];
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *step = PyTuple_GET_ITEM(sequence, i);
        if (!PyTuple_Check(step) || PyTuple_GET_SIZE(step) != 2 ||
            !PyBytes_Check(PyTuple_GET_ITEM(step, 0)) ||
            !PyBytes_Check(PyTuple_GET_ITEM(step, 1)) ||
            PyBytes_GET_SIZE(PyTuple_GET_ITEM(step, 1)) != 4) {
            PyErr_SetString(PyExc_TypeError, "a step is (bytes to send, 4-byte method id)");
            return NULL;
        }
        steps[i].send = PyBytes_AS_STRING(PyTuple_GET_ITEM(step, 0));
        steps[i].send_size = PyBytes_GET_SIZE(PyTuple_GET_ITEM(step, 0));
        steps[i].expect = PyBytes_AS_STRING(PyTuple_GET_ITEM(step, 1));
    }
    Outcome outcome = {.step = -1};
    /* The steps' bytes stay referenced by `args` while the GIL is released. */
    PyThreadState *released = PyEval_SaveThread();
    converse(&addr, timeout, steps, (int)count, &released, &outcome);
    PyEval_RestoreThread(released);
    if (outcome.what == SIGNALLED)
        return NULL;
    if (outcome.error) {
        errno = outcome.error;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (outcome.step < 0)
        Py_RETURN_NONE;
    Py_ssize_t shown = outcome.what >= 0 ? outcome.payload_size : 0;
    return Py_BuildValue("(iiy#)", outcome.step, outcome.what,
                         (const char *)buffer + FRAME_HEADER, shown);
}

static PyMethodDef methods[] = {
    {"cycle", cycle, METH_VARARGS, "One churn cycle; None, or (step, what, payload)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_cycle", .m_size = -1, .m_methods = methods,
};

PyMODINIT_FUNC PyInit__cycle(void) { return PyModule_Create(&module); }
