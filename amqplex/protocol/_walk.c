/* The frame walkers of framing.py (cut, cut_routed), compiled: they touch
 * every frame of every read, and in Python they were a quarter of a
 * worker's CPU when consuming small messages. Also worker/whole_publish.py's
 * check and renumbering of a whole publish, half a worker's CPU when
 * publishing small messages. The Python versions are the reference: these
 * give the same results (tests/protocol/test_walk.py and tests/worker/
 * test_whole_publish.py check them against each other), and serve
 * wherever this module was not built.
 *
 * A bad frame is not explained here: the walker raises BadFrame(position)
 * and framing.py has its Python walker raise the ConnectionException for
 * the frame there, so RabbitMQ's error texts live in one place.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* framing.py's constants; test_walk.py checks they agree. */
#define FRAME_METHOD 1
#define FRAME_HEADER 2
#define FRAME_BODY 3
#define FRAME_HEARTBEAT 8
#define FRAME_END 0xCE
#define FRAME_HEADER_SIZE 7
#define FRAME_OVERHEAD 8
#define METHOD_ID_SIZE 4
#define LARGE_BODY 2048
#define ROUTED 0
/* More methods than the proxy watches (eight) or counts as deliveries
 * (two); test_walk.py checks. */
#define MAX_INDICES 32

static PyObject *BadFrame;

typedef struct {
    uint32_t values[MAX_INDICES];
    Py_ssize_t count;
} Indices;

typedef struct {
    const unsigned char *buf;
    Py_ssize_t end;
    Py_ssize_t limit; /* frame_max + slack */
    PyObject *source; /* what buf belongs to */
    PyObject *view;   /* a memoryview of source, made at the first large body */
} Walk;

static inline uint32_t
read_u32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* The frame at pos: 1 if complete (its type, channel, size and the position
 * of its end octet set), 0 if incomplete, -1 if bad, in cut()'s order. */
static inline int
frame_at(const Walk *walk, Py_ssize_t pos, int *type, int *channel, uint32_t *size,
         Py_ssize_t *last)
{
    const unsigned char *p = walk->buf + pos;
    *type = p[0];
    *channel = p[1] << 8 | p[2];
    *size = read_u32(p + 3);
    /* size + FRAME_OVERHEAD > limit, without overflow (limit >= 0). */
    if ((*type != FRAME_METHOD && *type != FRAME_HEADER && *type != FRAME_BODY &&
         *type != FRAME_HEARTBEAT) ||
        (uint64_t)*size + FRAME_OVERHEAD > (uint64_t)walk->limit)
        return -1;
    *last = pos + FRAME_HEADER_SIZE + (Py_ssize_t)*size;
    if (*last >= walk->end)
        return 0;
    if (walk->buf[*last] != FRAME_END)
        return -1;
    if (*size < METHOD_ID_SIZE && *type == FRAME_METHOD)
        return -1;
    return 1;
}

/* buf[start:stop], as cut() gives it: a large body as a memoryview of the
 * source, anything else copied into bytes. */
static PyObject *
piece(Walk *walk, Py_ssize_t start, Py_ssize_t stop, int as_view)
{
    if (!as_view)
        return PyBytes_FromStringAndSize((const char *)walk->buf + start, stop - start);
    if (walk->view == NULL) {
        walk->view = PyMemoryView_FromObject(walk->source);
        if (walk->view == NULL)
            return NULL;
    }
    return PySequence_GetSlice(walk->view, start, stop);
}

/* Append (first, second, third) to items, taking the references to second
 * and third (third NULL: an error already set). */
static int
append(PyObject *items, long first, PyObject *second, PyObject *third)
{
    if (third == NULL) {
        Py_XDECREF(second);
        return -1;
    }
    PyObject *head = PyLong_FromLong(first);
    PyObject *item = head == NULL || second == NULL ? NULL : PyTuple_New(3);
    if (item == NULL) {
        Py_XDECREF(head);
        Py_XDECREF(second);
        Py_DECREF(third);
        return -1;
    }
    PyTuple_SET_ITEM(item, 0, head);
    PyTuple_SET_ITEM(item, 1, second);
    PyTuple_SET_ITEM(item, 2, third);
    int failed = PyList_Append(items, item);
    Py_DECREF(item);
    return failed;
}

/* The frame at pos..last onto items as cut() gives it: (type, channel, piece). */
static int
append_frame(PyObject *items, Walk *walk, int type, int channel, uint32_t size, Py_ssize_t pos,
             Py_ssize_t last)
{
    return append(items, type, PyLong_FromLong(channel),
                  piece(walk, pos, last + 1, type == FRAME_BODY && size > LARGE_BODY));
}

static int
bad_frame(Py_ssize_t pos)
{
    PyObject *where = PyLong_FromSsize_t(pos);
    if (where != NULL) {
        PyErr_SetObject(BadFrame, where);
        Py_DECREF(where);
    }
    return -1;
}

static int
read_indices(PyObject *set, Indices *indices)
{
    indices->count = 0;
    PyObject *iterator = PyObject_GetIter(set);
    if (iterator == NULL)
        return -1;
    PyObject *value;
    while ((value = PyIter_Next(iterator)) != NULL) {
        unsigned long index = PyLong_AsUnsignedLong(value);
        Py_DECREF(value);
        if (index == (unsigned long)-1 && PyErr_Occurred())
            break;
        if (indices->count == MAX_INDICES || index > UINT32_MAX) {
            PyErr_SetString(PyExc_ValueError, "too many method indices, or one too large");
            break;
        }
        indices->values[indices->count++] = (uint32_t)index;
    }
    Py_DECREF(iterator);
    return PyErr_Occurred() ? -1 : 0;
}

/* The frozenset last read for an argument, and its indices: cut_routed is
 * given the same two module-level sets read after read, and iterating a
 * set was 3% of a worker's CPU consuming small messages. A frozenset does
 * not change, so the same object has the same indices. */
typedef struct {
    PyObject *set;
    Indices indices;
} KnownIndices;

static int
read_known_indices(PyObject *set, KnownIndices *known, Indices *indices)
{
    if (set != known->set) {
        Py_CLEAR(known->set);
        if (read_indices(set, &known->indices) < 0)
            return -1;
        if (PyFrozenSet_CheckExact(set))
            known->set = Py_NewRef(set);
    }
    *indices = known->indices;
    return 0;
}

static inline int
contains(const Indices *indices, uint32_t index)
{
    for (Py_ssize_t i = 0; i < indices->count; i++)
        if (indices->values[i] == index)
            return 1;
    return 0;
}

/* The buffer and the bounds of a walk from the first four arguments
 * (buf, pos, end, frame_max) and slack. */
static int
start_walk(PyObject *const *args, Py_buffer *buffer, int flags, Walk *walk, Py_ssize_t *pos)
{
    Py_ssize_t frame_max, slack;
    if ((*pos = PyLong_AsSsize_t(args[1])) == -1 && PyErr_Occurred())
        return -1;
    if ((walk->end = PyLong_AsSsize_t(args[2])) == -1 && PyErr_Occurred())
        return -1;
    if ((frame_max = PyLong_AsSsize_t(args[3])) == -1 && PyErr_Occurred())
        return -1;
    if ((slack = PyLong_AsSsize_t(args[4])) == -1 && PyErr_Occurred())
        return -1;
    if (frame_max < 0 || slack < 0) {
        PyErr_SetString(PyExc_ValueError, "frame_max and slack must not be negative");
        return -1;
    }
    if (PyObject_GetBuffer(args[0], buffer, flags) < 0)
        return -1;
    if (*pos < 0 || *pos > walk->end || walk->end > buffer->len) {
        PyBuffer_Release(buffer);
        PyErr_SetString(PyExc_ValueError, "pos and end must lie within the buffer");
        return -1;
    }
    walk->buf = buffer->buf;
    walk->limit = frame_max > PY_SSIZE_T_MAX - slack ? PY_SSIZE_T_MAX : frame_max + slack;
    walk->source = args[0];
    walk->view = NULL;
    return 0;
}

static PyObject *
finish_walk(Py_buffer *buffer, Walk *walk, PyObject *result)
{
    Py_XDECREF(walk->view);
    PyBuffer_Release(buffer);
    return result;
}

PyDoc_STRVAR(cut_doc, "cut(buf, pos, end, frame_max, slack) -> (frames, pos): framing.cut.");

static PyObject *
cut(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "cut takes 5 arguments");
        return NULL;
    }
    Py_buffer buffer;
    Walk walk;
    Py_ssize_t pos;
    if (start_walk(args, &buffer, PyBUF_SIMPLE, &walk, &pos) < 0)
        return NULL;
    PyObject *frames = PyList_New(0);
    if (frames == NULL)
        return finish_walk(&buffer, &walk, NULL);
    while (walk.end - pos >= FRAME_OVERHEAD) {
        int type, channel, found;
        uint32_t size;
        Py_ssize_t last;
        found = frame_at(&walk, pos, &type, &channel, &size, &last);
        if (found == 0)
            break;
        if (found < 0)
            bad_frame(pos);
        if (found < 0 || append_frame(frames, &walk, type, channel, size, pos, last) < 0) {
            Py_DECREF(frames);
            return finish_walk(&buffer, &walk, NULL);
        }
        pos = last + 1;
    }
    return finish_walk(&buffer, &walk, Py_BuildValue("(Nn)", frames, pos));
}

/* The route of a channel: its new id's octets and whom to, or no target. */
typedef struct {
    int channel; /* -1: the frames since run_start are not routed */
    unsigned char high, low;
    PyObject *target; /* a reference held while the run lasts */
} Run;

static int
find_route(PyObject *routes, int channel, Run *run)
{
    Py_CLEAR(run->target);
    run->channel = -1;
    PyObject *key = PyLong_FromLong(channel);
    if (key == NULL)
        return -1;
    PyObject *route = PyDict_GetItemWithError(routes, key);
    Py_DECREF(key);
    if (route == NULL || route == Py_None) /* as routes.get() gives it: not routed */
        return PyErr_Occurred() ? -1 : 0;
    if (!PyTuple_Check(route) || PyTuple_GET_SIZE(route) != 3) {
        PyErr_SetString(PyExc_TypeError, "a route is (high octet, low octet, target)");
        return -1;
    }
    /* Held: converting its octets may run Python code that changes routes. */
    Py_INCREF(route);
    long high = PyLong_AsLong(PyTuple_GET_ITEM(route, 0));
    long low = high == -1 && PyErr_Occurred() ? -1 : PyLong_AsLong(PyTuple_GET_ITEM(route, 1));
    int failed = PyErr_Occurred() != NULL;
    if (!failed && (high < 0 || high > 255 || low < 0 || low > 255)) {
        PyErr_SetString(PyExc_ValueError, "byte must be in range(0, 256)");
        failed = 1;
    }
    if (!failed) {
        run->channel = channel;
        run->high = (unsigned char)high;
        run->low = (unsigned char)low;
        run->target = Py_NewRef(PyTuple_GET_ITEM(route, 2));
    }
    Py_DECREF(route);
    return failed ? -1 : 0;
}

/* (ROUTED, target, the bytes of the run) onto items, if the run has any. */
static int
end_run(PyObject *items, Walk *walk, const Run *run, Py_ssize_t start, Py_ssize_t stop)
{
    if (start >= stop)
        return 0;
    return append(items, ROUTED, Py_NewRef(run->target), piece(walk, start, stop, 0));
}

PyDoc_STRVAR(cut_routed_doc,
             "cut_routed(buf, pos, end, frame_max, slack, routes, watched, deliveries)\n"
             "-> (items, pos, routed, deliveries): framing.cut_routed, with the\n"
             "method indices that count as deliveries given.");

static PyObject *
cut_routed(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "cut_routed takes 8 arguments");
        return NULL;
    }
    PyObject *routes = args[5];
    if (!PyDict_Check(routes)) {
        PyErr_SetString(PyExc_TypeError, "routes must be a dict");
        return NULL;
    }
    static KnownIndices known_watched, known_delivering;
    Indices watched, delivering;
    if (read_known_indices(args[6], &known_watched, &watched) < 0 ||
        read_known_indices(args[7], &known_delivering, &delivering) < 0)
        return NULL;
    Py_buffer buffer;
    Walk walk;
    Py_ssize_t pos;
    if (start_walk(args, &buffer, PyBUF_WRITABLE, &walk, &pos) < 0)
        return NULL;
    unsigned char *buf = buffer.buf;
    PyObject *items = PyList_New(0);
    if (items == NULL)
        return finish_walk(&buffer, &walk, NULL);
    Run run = {-1, 0, 0, NULL};
    Py_ssize_t run_start = pos, routed = 0, deliveries = 0;
    while (walk.end - pos >= FRAME_OVERHEAD) {
        int type, channel;
        uint32_t size, index = 0;
        Py_ssize_t last;
        int found = frame_at(&walk, pos, &type, &channel, &size, &last);
        if (found == 0)
            break;
        if (found < 0) {
            bad_frame(pos);
            goto fail;
        }
        if (channel != run.channel) {
            if (end_run(items, &walk, &run, run_start, pos) < 0 ||
                find_route(routes, channel, &run) < 0)
                goto fail;
            run_start = pos;
        }
        if (type == FRAME_METHOD)
            index = read_u32(buf + pos + FRAME_HEADER_SIZE);
        if (run.channel < 0 || (type == FRAME_METHOD && contains(&watched, index))) {
            /* Not routed: as cut() gives it, after the run before it. */
            if (end_run(items, &walk, &run, run_start, pos) < 0 ||
                append_frame(items, &walk, type, channel, size, pos, last) < 0)
                goto fail;
            pos = run_start = last + 1;
            continue;
        }
        buf[pos + 1] = run.high;
        buf[pos + 2] = run.low;
        routed++;
        if (type == FRAME_METHOD) {
            deliveries += contains(&delivering, index);
        }
        else if (type == FRAME_BODY && size > LARGE_BODY) {
            /* Its payload is not copied: the piece is a view of the buffer. */
            if (end_run(items, &walk, &run, run_start, pos) < 0 ||
                append(items, ROUTED, Py_NewRef(run.target), piece(&walk, pos, last + 1, 1)) < 0)
                goto fail;
            run_start = last + 1;
        }
        pos = last + 1;
    }
    if (run.channel >= 0 && end_run(items, &walk, &run, run_start, pos) < 0)
        goto fail;
    Py_XDECREF(run.target);
    return finish_walk(&buffer, &walk, Py_BuildValue("(Nnnn)", items, pos, routed, deliveries));
fail:
    Py_XDECREF(run.target);
    Py_DECREF(items);
    return finish_walk(&buffer, &walk, NULL);
}

/* -- whole_publishes: worker/whole_publish.py's reference_renumber over a
 * run of messages, for the publishes it can vouch for. */

#define BASIC_PUBLISH 0x003C0028u /* class 60, method 40 */
#define BASIC_CLASS 60
#define PUBLISH_ARGS (FRAME_HEADER_SIZE + 4 + 2) /* after the method index and ticket */
#define CONTENT_HEADER_SIZE (FRAME_HEADER_SIZE + 14) /* class, weight, body size, flags */
#define HEADERS_TABLE 0x2000
/* quiet.py's CHECKED_PROPERTIES: headers, reply_to, user_id. */
#define CHECKED_PROPERTIES 0x2210
#define CONTENT_TYPE 0x8000
#define CONTENT_ENCODING 0x4000
#define DELIVERY_MODE 0x1000
#define PRIORITY 0x0800
#define CORRELATION_ID 0x0400
#define EXPIRATION 0x0100
#define MAX_EXPIRATION_DIGITS 9 /* quiet.py's */
#define RESERVED_KEYS "amq.rabbitmq."
#define DIRECT_REPLY "amq.rabbitmq.reply-to." /* rules.py's _DIRECT_REPLY */

/* Basic's property flags in wire order and the octets each takes: 0 for a
 * short string (its length octet says), -1 for the headers table (left to
 * the reference). content.py's _LAYOUT; test_whole_publish.py checks. */
static const struct {
    unsigned int mask;
    int width;
} LAYOUT[] = {
    {0x8000, 0}, {0x4000, 0}, {0x2000, -1}, {0x1000, 1}, {0x0800, 1},
    {0x0400, 0}, {0x0200, 0}, {0x0100, 0},  {0x0080, 0}, {0x0040, 8},
    {0x0020, 0}, {0x0010, 0}, {0x0008, 0},  {0x0004, 0},
};
#define KNOWN_FLAGS 0xFFFCu

/* Whether the publish's arguments are what check_publish accepts (two short
 * strings, then bits without immediate, then the frame end), leaving the
 * direct reply-to keys it checks on the default exchange to it. */
static int
publish_fits(const unsigned char *p, Py_ssize_t len)
{
    if (len < PUBLISH_ARGS + 1 || read_u32(p + FRAME_HEADER_SIZE) != BASIC_PUBLISH)
        return 0;
    Py_ssize_t pos = PUBLISH_ARGS;
    pos += 1 + p[pos]; /* exchange */
    if (pos >= len)
        return 0;
    const size_t reply = sizeof DIRECT_REPLY - 1;
    if (pos == PUBLISH_ARGS + 1 && p[pos] >= reply && pos + 1 + (Py_ssize_t)reply <= len &&
        memcmp(p + pos + 1, DIRECT_REPLY, reply) == 0)
        return 0;
    pos += 1 + p[pos]; /* routing key */
    if (pos + 2 != len)
        return 0;
    return !(p[pos] & 0x02);
}

/* The body size a content header announces if check_header accepts it
 * without a headers table, else -1. */
static long long
header_body_size(const unsigned char *p, Py_ssize_t len)
{
    if (len < CONTENT_HEADER_SIZE + 1)
        return -1;
    const unsigned char *h = p + FRAME_HEADER_SIZE;
    if ((h[0] << 8 | h[1]) != BASIC_CLASS || h[2] != 0 || h[3] != 0)
        return -1;
    uint64_t size = (uint64_t)read_u32(h + 4) << 32 | read_u32(h + 8);
    unsigned int flags = h[12] << 8 | h[13];
    if (flags & ~KNOWN_FLAGS || flags & HEADERS_TABLE || size > (uint64_t)PY_SSIZE_T_MAX)
        return -1;
    Py_ssize_t end = len - 1, pos = CONTENT_HEADER_SIZE;
    for (size_t i = 0; i < sizeof LAYOUT / sizeof LAYOUT[0]; i++) {
        if (!(flags & LAYOUT[i].mask))
            continue;
        if (LAYOUT[i].width < 0) /* a table: the reference's (excluded above too) */
            return -1;
        if (LAYOUT[i].width > 0) {
            pos += LAYOUT[i].width;
        } else {
            if (pos >= end)
                return -1;
            pos += 1 + p[pos];
        }
        if (pos > end)
            return -1;
    }
    return pos == end ? (long long)size : -1;
}

/* The three frames on upstream channel `uid` (two octets) as one new bytes
 * object, or None (a new reference) if they are not a publish the check
 * vouches for; NULL with an error set only if memory ran out. Of the body
 * frame (body_len octets) the piece holds the first body_kept: all of it,
 * or its 7-byte header alone where the payload goes on as a view. */
static PyObject *
renumbered(PyObject *method_frame, PyObject *header_frame, const unsigned char *body,
           Py_ssize_t body_len, Py_ssize_t body_kept, const unsigned char *uid)
{
    const unsigned char *method = (const unsigned char *)PyBytes_AS_STRING(method_frame);
    const unsigned char *header = (const unsigned char *)PyBytes_AS_STRING(header_frame);
    Py_ssize_t method_len = PyBytes_GET_SIZE(method_frame);
    Py_ssize_t header_len = PyBytes_GET_SIZE(header_frame);
    /* The length checks also keep every memcpy below at 0 octets or more
     * (publish_fits and header_body_size want longer frames still). */
    if (method_len < 3 || header_len < 3 || body_len < FRAME_OVERHEAD ||
        !publish_fits(method, method_len))
        Py_RETURN_NONE;
    long long size = header_body_size(header, header_len);
    if (size <= 0 || size != body_len - FRAME_OVERHEAD)
        Py_RETURN_NONE;
    PyObject *piece = PyBytes_FromStringAndSize(NULL, method_len + header_len + body_kept);
    if (piece == NULL)
        return NULL;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(piece);
    const unsigned char *frames[3] = {method, header, body};
    Py_ssize_t lens[3] = {method_len, header_len, body_kept};
    for (int i = 0; i < 3; i++) {
        out[0] = frames[i][0];
        out[1] = uid[0];
        out[2] = uid[1];
        memcpy(out + 3, frames[i] + 3, (size_t)(lens[i] - 3));
        out += lens[i];
    }
    return piece;
}

/* Whether `value` is the exact int `wanted`: converting nothing else runs no
 * Python code while the caller holds borrowed items of the frame list. */
static int
is_int(PyObject *value, long wanted)
{
    if (!PyLong_CheckExact(value))
        return 0;
    long got = PyLong_AsLong(value);
    if (got == -1 && PyErr_Occurred()) {
        PyErr_Clear(); /* too large for a long: no type or channel */
        return 0;
    }
    return got == wanted;
}

/* frames[i] as (type, channel, frame) if it is one of cut()'s tuples with an
 * exact bytes frame (or, if views_too, a memoryview: a large body) of that
 * type on that channel, else NULL (no error). */
static PyObject *
frame_on(PyObject *frames, Py_ssize_t i, long type, long channel, int views_too)
{
    PyObject *item = PyList_GET_ITEM(frames, i);
    if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 3)
        return NULL;
    PyObject *frame = PyTuple_GET_ITEM(item, 2);
    if (!(PyBytes_CheckExact(frame) || (views_too && PyMemoryView_Check(frame))) ||
        !is_int(PyTuple_GET_ITEM(item, 0), type) || !is_int(PyTuple_GET_ITEM(item, 1), channel))
        return NULL;
    return frame;
}

/* A body frame's octets: a bytes frame's own, or those a memoryview of
 * octets (what cut() makes of a large body) shows; 0 and no error set for
 * a view of anything else, or released. Release `buffer` after if 1. */
static int
body_octets(PyObject *body, Py_buffer *buffer)
{
    if (PyBytes_CheckExact(body)) {
        buffer->obj = NULL;
        buffer->buf = PyBytes_AS_STRING(body);
        buffer->len = PyBytes_GET_SIZE(body);
        return 1;
    }
    if (PyObject_GetBuffer(body, buffer, PyBUF_RECORDS_RO) < 0) {
        PyErr_Clear();
        return 0;
    }
    if (buffer->ndim != 1 || buffer->itemsize != 1 || buffer->strides[0] != 1 ||
        strcmp(buffer->format, "B") != 0) {
        PyBuffer_Release(buffer);
        return 0;
    }
    return 1;
}

/* quiet.py's quiet_method and quiet_header, for a publish and header that
 * renumbered() took (header_body_size walked the property list, so
 * every property's octets are inside the frame). */
static int
quiet(const unsigned char *method, const unsigned char *header)
{
    if (method[PUBLISH_ARGS] != 0) /* not the default exchange */
        return 0;
    const size_t reserved = sizeof RESERVED_KEYS - 1;
    const unsigned char *key = method + PUBLISH_ARGS + 2;
    if (key[-1] >= reserved && memcmp(key, RESERVED_KEYS, reserved) == 0)
        return 0;
    unsigned int flags = header[CONTENT_HEADER_SIZE - 2] << 8 | header[CONTENT_HEADER_SIZE - 1];
    if (flags & CHECKED_PROPERTIES)
        return 0;
    if (!(flags & (DELIVERY_MODE | EXPIRATION)))
        return 1;
    /* content_type and content_encoding come first (no headers table here) */
    Py_ssize_t pos = CONTENT_HEADER_SIZE;
    if (flags & CONTENT_TYPE)
        pos += 1 + header[pos];
    if (flags & CONTENT_ENCODING)
        pos += 1 + header[pos];
    if (flags & DELIVERY_MODE) {
        if (header[pos] != 1 && header[pos] != 2)
            return 0;
        pos += 1;
    }
    if (!(flags & EXPIRATION))
        return 1;
    if (flags & PRIORITY)
        pos += 1;
    if (flags & CORRELATION_ID)
        pos += 1 + header[pos];
    unsigned int size = header[pos]; /* no reply_to before it: that one is checked */
    if (size == 0 || size > MAX_EXPIRATION_DIGITS)
        return 0;
    for (unsigned int i = 1; i <= size; i++)
        if (header[pos + i] < '0' || header[pos + i] > '9')
            return 0;
    return 1;
}

PyDoc_STRVAR(whole_publishes_doc,
             "whole_publishes(frames, start, channel, uid)\n"
             "-> (pieces, end, mandatory, unsettled, largest):\n"
             "whole_publish.py's reference_renumber over the run of publishes on\n"
             "`channel` that starts at frames[start] (cut()'s tuples), each with its\n"
             "header and one body, for those it can vouch for: their\n"
             "pieces (one a message, and a body cut() left a memoryview goes on as a\n"
             "view of its payload after it), the index after the last one taken,\n"
             "whether any was mandatory, whether any was not quiet (quiet.py), and the\n"
             "largest body (-1 for none).\n"
             "It stops at the first message it cannot vouch for: the reference's.");

static PyObject *
whole_publishes(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "whole_publishes takes 4 arguments");
        return NULL;
    }
    PyObject *frames = args[0];
    if (!PyList_Check(frames) || !PyBytes_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "whole_publishes takes a list and bytes");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[1]);
    if (start == -1 && PyErr_Occurred())
        return NULL;
    long channel = PyLong_AsLong(args[2]);
    if (channel == -1 && PyErr_Occurred())
        return NULL;
    PyObject *pieces = PyList_New(0);
    if (pieces == NULL)
        return NULL;
    int mandatory = 0, unsettled = 0;
    Py_ssize_t largest = -1;
    if (start >= 0 && PyBytes_GET_SIZE(args[3]) == 2) {
        const unsigned char *uid = (const unsigned char *)PyBytes_AS_STRING(args[3]);
        while (start < PyList_GET_SIZE(frames) - 2) { /* no start + 2: it may overflow */
            PyObject *method = frame_on(frames, start, FRAME_METHOD, channel, 0);
            PyObject *header =
                method ? frame_on(frames, start + 1, FRAME_HEADER, channel, 0) : NULL;
            PyObject *body = header ? frame_on(frames, start + 2, FRAME_BODY, channel, 1) : NULL;
            Py_buffer octets;
            if (body == NULL || !body_octets(body, &octets))
                break;
            /* A view's payload stays where it was read: the piece ends with
             * the body's 7-byte header and the payload follows it as a view,
             * as retarget() hands a large body on. */
            int viewed = octets.obj != NULL;
            PyObject *piece = renumbered(method, header, octets.buf, octets.len,
                                         viewed ? FRAME_HEADER_SIZE : octets.len, uid);
            if (piece == NULL || piece == Py_None) {
                if (viewed)
                    PyBuffer_Release(&octets);
                if (piece == NULL) {
                    Py_DECREF(pieces);
                    return NULL;
                }
                Py_DECREF(piece);
                break;
            }
            /* Read before the payload's view is made: a GC-tracked object,
             * whose allocation may run a collection, and method and header
             * are borrowed from the list (octets holds the body). The bits
             * octet before the frame end: mandatory is its lowest. */
            mandatory |= PyBytes_AS_STRING(method)[PyBytes_GET_SIZE(method) - 2] & 0x01;
            unsettled |= !quiet((const unsigned char *)PyBytes_AS_STRING(method),
                                (const unsigned char *)PyBytes_AS_STRING(header));
            if (octets.len - FRAME_OVERHEAD > largest)
                largest = octets.len - FRAME_OVERHEAD;
            PyObject *payload = NULL;
            if (viewed) {
                payload = PySequence_GetSlice(body, FRAME_HEADER_SIZE, octets.len);
                PyBuffer_Release(&octets);
            }
            int failed = (viewed && payload == NULL) || PyList_Append(pieces, piece) < 0 ||
                         (payload != NULL && PyList_Append(pieces, payload) < 0);
            Py_DECREF(piece);
            Py_XDECREF(payload);
            if (failed) {
                Py_DECREF(pieces);
                return NULL;
            }
            start += 3;
        }
    }
    return Py_BuildValue("(NnOOn)", pieces, start, mandatory ? Py_True : Py_False,
                         unsettled ? Py_True : Py_False, largest);
}

/* -- writer.py's interleaved -------------------------------------------------
 * Every chunk of an upstream's flush goes through it, and in Python it was
 * a fifth of a worker's CPU publishing small messages. A chunk is bytes (a
 * whole frame or message) or a memoryview (a large body's payload, which
 * goes with the chunk before it). */

#define PAYLOAD (-1) /* a chunk's kind when it is a payload; else its frame type */

/* Which segment slot each channel has while one segment is grouped; -1
 * when none. Reset after each segment, so always all -1 between calls. */
static int32_t slot_of[65536];

typedef struct {
    PyObject **items; /* the flush's chunks, borrowed */
    short *kinds; /* a chunk's frame type, or PAYLOAD */
    int *keys;
    PyObject *out;
    Py_ssize_t filled;
} Interleave;

static inline void
emit(Interleave *il, Py_ssize_t i)
{
    Py_INCREF(il->items[i]);
    PyList_SET_ITEM(il->out, il->filled++, il->items[i]);
}

static void
emit_range(Interleave *il, Py_ssize_t start, Py_ssize_t stop)
{
    for (Py_ssize_t i = start; i < stop; i++)
        emit(il, i);
}

/* _taking_turns over items[start:stop]: each channel's chunks in turns of
 * `turn` or so (a turn ends only before a method frame), the channels in
 * the order they first appear; as it was when fewer than two channels, or
 * none with more than `turn`. 0, or -1 out of memory. */
static int
taking_turns(Interleave *il, Py_ssize_t start, Py_ssize_t stop, Py_ssize_t turn)
{
    Py_ssize_t count = stop - start;
    if (count == 0)
        return 0;
    if (il->kinds[start] == PAYLOAD) { /* never first, by construction */
        emit_range(il, start, stop);
        return 0;
    }
    /* Each channel's chunks as a linked list through next, in order. */
    Py_ssize_t *next = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)count * 4);
    if (next == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t *head = next + count, *tail = head + count, *length = tail + count;
    Py_ssize_t slots = 0, longest = 0, slot = 0;
    for (Py_ssize_t i = start; i < stop; i++) {
        Py_ssize_t at = i - start;
        if (il->kinds[i] != PAYLOAD) {
            int key = il->keys[i];
            if (slot_of[key] < 0) {
                slot_of[key] = (int32_t)slots;
                head[slots] = at;
                length[slots] = 0;
                slots++;
            } else {
                next[tail[slot_of[key]]] = at;
            }
            slot = slot_of[key];
        } else {
            next[tail[slot]] = at;
        }
        tail[slot] = at;
        next[at] = -1;
        if (++length[slot] > longest)
            longest = length[slot];
    }
    for (Py_ssize_t s = 0; s < slots; s++)
        slot_of[il->keys[start + head[s]]] = -1;
    if (slots < 2 || longest <= turn) {
        emit_range(il, start, stop);
    } else {
        Py_ssize_t left = slots; /* channels with chunks still to go */
        while (left > 0) {
            for (Py_ssize_t s = 0; s < slots; s++) {
                Py_ssize_t at = head[s];
                if (at < 0)
                    continue;
                for (Py_ssize_t taken = 0; at >= 0 && taken < turn; taken++) {
                    emit(il, start + at);
                    at = next[at];
                }
                while (at >= 0 && il->kinds[start + at] != FRAME_METHOD) {
                    emit(il, start + at);
                    at = next[at];
                }
                head[s] = at;
                if (at < 0)
                    left--;
            }
        }
    }
    PyMem_Free(next);
    return 0;
}

PyDoc_STRVAR(interleaved_doc,
             "interleaved(chunks, turn, streamed) -> list\n\n"
             "writer.interleaved(chunks) with TURN and the streamed methods' indices.");

static PyObject *
interleaved(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyList_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "interleaved takes a list, a turn and method indices");
        return NULL;
    }
    Py_ssize_t turn = PyLong_AsSsize_t(args[1]);
    if (turn == -1 && PyErr_Occurred())
        return NULL;
    if (turn < 1) { /* no chunk would ever leave a turn of none */
        PyErr_SetString(PyExc_ValueError, "a turn is at least one chunk");
        return NULL;
    }
    Indices streamed;
    if (read_indices(args[2], &streamed) < 0)
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(args[0]);
    Interleave il = {.filled = 0};
    il.kinds = PyMem_Malloc(sizeof(short) * ((size_t)count + 1));
    il.keys = PyMem_Malloc(sizeof(int) * ((size_t)count + 1));
    il.out = PyList_New(count);
    if (il.kinds == NULL || il.keys == NULL || il.out == NULL) {
        if (il.out != NULL)
            PyErr_NoMemory();
        goto fail;
    }
    /* Only now: making the list may run a collection, and a finalizer could
     * change the chunks' list, leaving an earlier pointer to its items
     * dangling or the arrays above sized for another length. */
    if (PyList_GET_SIZE(args[0]) != count) {
        PyErr_SetString(PyExc_RuntimeError, "the chunks' list changed during interleaved");
        goto fail;
    }
    il.items = PySequence_Fast_ITEMS(args[0]);
    /* Kinds and channels first: nothing below calls back into Python, so
     * the list cannot change under the walk. */
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *chunk = il.items[i];
        if (PyMemoryView_Check(chunk)) {
            il.kinds[i] = PAYLOAD;
            il.keys[i] = 0;
            continue;
        }
        if (!PyBytes_Check(chunk) || PyBytes_GET_SIZE(chunk) < FRAME_HEADER_SIZE) {
            PyErr_SetString(PyExc_TypeError, "a chunk is a frame as bytes, or a memoryview");
            goto fail;
        }
        const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(chunk);
        il.kinds[i] = p[0];
        il.keys[i] = p[1] << 8 | p[2];
    }
    /* A method frame that is not a stream's is a fence nothing crosses. */
    Py_ssize_t segment = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *chunk = il.items[i];
        if (il.kinds[i] == FRAME_METHOD &&
            (PyBytes_GET_SIZE(chunk) < FRAME_HEADER_SIZE + METHOD_ID_SIZE ||
             !contains(&streamed,
                       read_u32((const unsigned char *)PyBytes_AS_STRING(chunk) +
                                FRAME_HEADER_SIZE)))) {
            if (taking_turns(&il, segment, i, turn) < 0)
                goto fail;
            emit(&il, i);
            segment = i + 1;
        }
    }
    if (taking_turns(&il, segment, count, turn) < 0)
        goto fail;
    PyMem_Free(il.kinds);
    PyMem_Free(il.keys);
    return il.out;
fail:
    PyMem_Free(il.kinds);
    PyMem_Free(il.keys);
    Py_XDECREF(il.out);
    return NULL;
}

static PyMethodDef methods[] = {
    {"cut", (PyCFunction)(void (*)(void))cut, METH_FASTCALL, cut_doc},
    {"cut_routed", (PyCFunction)(void (*)(void))cut_routed, METH_FASTCALL, cut_routed_doc},
    {"whole_publishes", (PyCFunction)(void (*)(void))whole_publishes, METH_FASTCALL,
     whole_publishes_doc},
    {"interleaved", (PyCFunction)(void (*)(void))interleaved, METH_FASTCALL, interleaved_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "amqplex.protocol._walk",
    .m_doc = "framing.py's frame walkers, compiled.",
    .m_size = -1,
    .m_methods = methods,
};

/* LAYOUT as ((mask, width), ...), for test_whole_publish.py to compare. */
static PyObject *
property_layout(void)
{
    size_t count = sizeof LAYOUT / sizeof LAYOUT[0];
    PyObject *layout = PyTuple_New((Py_ssize_t)count);
    if (layout == NULL)
        return NULL;
    for (size_t i = 0; i < count; i++) {
        PyObject *item = Py_BuildValue("(Ii)", LAYOUT[i].mask, LAYOUT[i].width);
        if (item == NULL) {
            Py_DECREF(layout);
            return NULL;
        }
        PyTuple_SET_ITEM(layout, (Py_ssize_t)i, item);
    }
    return layout;
}

/* Single-phase initialisation: the module is made once per process, and
 * BadFrame with it. */
PyMODINIT_FUNC
PyInit__walk(void)
{
    if (BadFrame != NULL) {
        PyErr_SetString(PyExc_ImportError, "amqplex.protocol._walk is loaded once per process");
        return NULL;
    }
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL)
        return NULL;
    memset(slot_of, 0xFF, sizeof slot_of); /* every slot -1 */
    BadFrame = PyErr_NewExceptionWithDoc(
        "amqplex.protocol._walk.BadFrame",
        "A frame cut() refuses, at the position in args[0].", NULL, NULL);
    if (BadFrame == NULL || PyModule_AddObjectRef(module, "BadFrame", BadFrame) < 0 ||
        PyModule_AddIntConstant(module, "LARGE_BODY", LARGE_BODY) < 0 ||
        PyModule_AddIntConstant(module, "ROUTED", ROUTED) < 0 ||
        PyModule_AddIntConstant(module, "FRAME_END", FRAME_END) < 0 ||
        PyModule_AddIntConstant(module, "FRAME_HEADER_SIZE", FRAME_HEADER_SIZE) < 0 ||
        PyModule_AddIntConstant(module, "FRAME_OVERHEAD", FRAME_OVERHEAD) < 0 ||
        PyModule_AddIntConstant(module, "FRAME_METHOD", FRAME_METHOD) < 0 ||
        PyModule_AddIntConstant(module, "FRAME_HEADER", FRAME_HEADER) < 0 ||
        PyModule_AddIntConstant(module, "FRAME_BODY", FRAME_BODY) < 0 ||
        PyModule_AddIntConstant(module, "FRAME_HEARTBEAT", FRAME_HEARTBEAT) < 0 ||
        PyModule_AddIntConstant(module, "METHOD_ID_SIZE", METHOD_ID_SIZE) < 0 ||
        PyModule_AddIntConstant(module, "MAX_INDICES", MAX_INDICES) < 0) {
        Py_CLEAR(BadFrame);
        Py_DECREF(module);
        return NULL;
    }
    PyObject *layout = property_layout();
    if (layout == NULL || PyModule_AddObjectRef(module, "PROPERTY_LAYOUT", layout) < 0) {
        Py_XDECREF(layout);
        Py_CLEAR(BadFrame);
        Py_DECREF(module);
        return NULL;
    }
    Py_DECREF(layout);
    return module;
}
