/* One churn cycle in C: the load generators' hot loop without the
 * interpreter. wire.py's Wire does the same conversation in Python (and
 * remains what every other scenario uses, and churn.py's fallback): at
 * churn rates a Python cycle cost a generator 128-134 us of CPU against
 * 79-82 in C, and the generators share the machine's cores with what
 * they measure.
 *
 * cycle(host, port, timeout, steps) connects, and for each (send, expect)
 * in steps writes `send` and reads up to the next method frame, whose
 * first four payload bytes must be `expect` (heartbeats are skipped); then
 * closes. Returns None, or (step, frame type, payload) for the frame that
 * was not the one expected (the caller describes it); raises OSError for
 * what the sockets say.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#define MAX_STEPS 16
#define FRAME_END 0xCE
/* Larger than any reply a churn cycle gets (the broker's Start is the
 * largest, under a kilobyte). */
#define BUFFER_SIZE 65536

static unsigned char buffer[BUFFER_SIZE];

typedef struct {
    const char *send;
    Py_ssize_t send_size;
    const char *expect; /* 4 bytes */
} Step;

/* What went wrong, for the caller to turn into an exception or a tuple. */
typedef struct {
    int error;      /* errno, or 0 */
    int step;       /* the step whose reply was wrong, or -1 */
    int frame_type;
    Py_ssize_t payload_at, payload_size;
    int closed;     /* the peer closed before the reply */
} Outcome;

static int send_all(int fd, const char *data, Py_ssize_t size) {
    while (size > 0) {
        ssize_t sent = send(fd, data, (size_t)size, MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        data += sent;
        size -= sent;
    }
    return 0;
}

/* Read until the next method frame is in: 1 if its id is `expect`, 0 if it
 * is another frame (outcome says which), -1 on a socket error or close. */
static int expect_method(int fd, size_t *filled, const char *expect, Outcome *outcome) {
    for (;;) {
        while (*filled >= 7) {
            size_t size = ((size_t)buffer[3] << 24) | ((size_t)buffer[4] << 16) |
                          ((size_t)buffer[5] << 8) | (size_t)buffer[6];
            size_t end = 7 + size;
            if (end + 1 > BUFFER_SIZE) {
                outcome->frame_type = buffer[0];
                outcome->payload_at = 7;
                outcome->payload_size = 0;
                return 0;
            }
            if (*filled < end + 1)
                break;
            int frame_type = buffer[0];
            if (buffer[end] != FRAME_END || (frame_type != 8 && frame_type != 1) ||
                (frame_type == 1 && (size < 4 || memcmp(buffer + 7, expect, 4) != 0))) {
                outcome->frame_type = frame_type;
                outcome->payload_at = 7;
                outcome->payload_size = (Py_ssize_t)size;
                return 0;
            }
            memmove(buffer, buffer + end + 1, *filled - end - 1);
            *filled -= end + 1;
            if (frame_type == 1)
                return 1;
        }
        ssize_t received = recv(fd, buffer + *filled, BUFFER_SIZE - *filled, 0);
        if (received < 0 && errno == EINTR)
            continue;
        if (received <= 0) {
            outcome->closed = received == 0;
            return -1;
        }
        *filled += (size_t)received;
    }
}

static void converse(const char *host, int port, double timeout, Step *steps, int count,
                     Outcome *outcome) {
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
        outcome->error = EINVAL;
        return;
    }
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) {
        outcome->error = errno;
        return;
    }
    /* Bounded by the kernel, as in wire.py (SO_SNDTIMEO bounds connect too);
     * small frames go out at once, as clients send them. */
    struct timeval bound = {(time_t)timeout, (suseconds_t)((timeout - (time_t)timeout) * 1e6)};
    int one = 1;
    size_t filled = 0;
    if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &bound, sizeof bound) < 0 ||
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &bound, sizeof bound) < 0 ||
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0 ||
        connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        outcome->error = errno;
        close(fd);
        return;
    }
    for (int i = 0; i < count; i++) {
        if (send_all(fd, steps[i].send, steps[i].send_size) < 0) {
            outcome->error = errno;
            break;
        }
        int got = expect_method(fd, &filled, steps[i].expect, outcome);
        if (got != 1) {
            outcome->step = i;
            if (got < 0 && !outcome->closed)
                outcome->error = errno;
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
    Outcome outcome = {0, -1, 0, 0, 0, 0};
    /* The tuple (and so its bytes) stays referenced by the caller's frame. */
    Py_BEGIN_ALLOW_THREADS
    converse(host, port, timeout, steps, (int)count, &outcome);
    Py_END_ALLOW_THREADS
    if (outcome.error) {
        errno = outcome.error;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (outcome.step < 0)
        Py_RETURN_NONE;
    if (outcome.closed)
        return Py_BuildValue("(iiy#)", outcome.step, -1, "", (Py_ssize_t)0);
    return Py_BuildValue("(iiy#)", outcome.step, outcome.frame_type,
                         (const char *)buffer + outcome.payload_at, outcome.payload_size);
}

static PyMethodDef methods[] = {
    {"cycle", cycle, METH_VARARGS, "One churn cycle; None, or (step, frame type, payload)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cycle", NULL, -1, methods};

PyMODINIT_FUNC PyInit__cycle(void) { return PyModule_Create(&module); }
