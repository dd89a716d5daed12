/*
 * trc_run: submit one taskring task over TRC01 and wait for its outcome.
 *
 *   trc_run [--strict] [--verbose] [--timeout SECONDS] ENDPOINT TASK_NAME [INT_ARG...]
 *
 * Written from protocol.md alone (TRP version 01, client sub-protocol TRC01):
 * one ZeroMQ DEALER socket, three-frame messages (protocol id, command,
 * msgpack body).  It sends one SUBMIT of one task whose payload is the msgpack
 * of [[INT_ARG...], {}], resends the same frames with backoff until a REPLY or
 * ERROR with the same seq arrives, then polls with GET (watch true) and takes
 * NOTIFY as a hint until the task is final.  It prints
 *
 *   <id> <state> <result or error, as JSON-ish text>
 *
 * Exit codes: 0 succeeded, 1 failed or dead, 2 usage or protocol error (an
 * ERROR from the broker included), 3 the broker did not answer in time or the
 * task was not final before --timeout.
 */
#define _DEFAULT_SOURCE
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include <msgpack.h>
#include <zmq.h>

enum { EXIT_SUCCEEDED = 0, EXIT_TASK_FAILED = 1, EXIT_USAGE = 2, EXIT_UNAVAILABLE = 3 };

#define PROTO_ID "TRC01"
#define PROTO_ID_LEN 5
#define MAX_NAME_LEN 200                  /* characters (code points) */
#define MAX_PAYLOAD_BYTES (1024u * 1024u) /* the broker's default limit */
#define UINT_MAX_WIRE ((uint64_t)INT64_MAX) /* every uint is 0..2^63-1 */
#define REQUEST_TIMEOUT_S 10.0            /* "A client gives up ... default 10 s" */
#define BACKOFF_INITIAL_S 0.5             /* taskring.reliable.Backoff defaults */
#define BACKOFF_FACTOR 2.0
#define BACKOFF_MAX_S 5.0
#define DEFAULT_WAIT_S 60.0
#define MAX_DEPTH 64

static bool verbose; /* --verbose: trace every message on stderr */

typedef struct {
    uint64_t id;
    char *state;  /* queued, running, succeeded, failed, dead */
    char *result; /* msgpack bytes of the return value, or NULL */
    size_t result_len;
    char *error; /* or NULL */
} view_t;

typedef struct {
    void *ctx;
    void *sock;
    uint64_t next_seq;
    uint64_t watched_id; /* 0 until the SUBMIT is answered */
    view_t notified;     /* final view from a NOTIFY, state NULL if none */
} client_t;

typedef struct {
    char cmd[11];
    char *raw; /* copy of frame 2; msgpack-c objects point into it */
    msgpack_unpacked body;
} inmsg_t;

/* ---------------------------------------------------------------- utils */

static void die_msg(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("trc_run: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Valid UTF-8 (no overlongs, no surrogates); returns code points or -1. */
static long utf8_chars(const unsigned char *s, size_t n)
{
    long count = 0;
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        size_t len;
        uint32_t cp;
        if (c < 0x80) { len = 1; cp = c; }
        else if ((c & 0xE0) == 0xC0) { len = 2; cp = c & 0x1F; }
        else if ((c & 0xF0) == 0xE0) { len = 3; cp = c & 0x0F; }
        else if ((c & 0xF8) == 0xF0) { len = 4; cp = c & 0x07; }
        else return -1;
        if (i + len > n) return -1;
        for (size_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xC0) != 0x80) return -1;
            cp = (cp << 6) | (s[i + k] & 0x3F);
        }
        if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
            cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            return -1;
        i += len;
        count++;
    }
    return count;
}

static char *dup_bytes(const char *p, size_t n)
{
    char *d = malloc(n + 1);
    if (d) {
        if (n) memcpy(d, p, n);
        d[n] = '\0';
    }
    return d;
}

static void view_free(view_t *v)
{
    free(v->state);
    free(v->result);
    free(v->error);
    memset(v, 0, sizeof *v);
}

/* ------------------------------------------------------- msgpack helpers */

static bool str_eq(const msgpack_object *o, const char *s)
{
    size_t n = strlen(s);
    return o->type == MSGPACK_OBJECT_STR && o->via.str.size == n && memcmp(o->via.str.ptr, s, n) == 0;
}

/* Field of a map; NULL when absent or nil ("both mean use the default"). */
static const msgpack_object *field(const msgpack_object *map, const char *key)
{
    for (uint32_t i = 0; i < map->via.map.size; i++) {
        const msgpack_object_kv *kv = &map->via.map.ptr[i];
        if (str_eq(&kv->key, key))
            return kv->val.type == MSGPACK_OBJECT_NIL ? NULL : &kv->val;
    }
    return NULL;
}

static bool as_uint(const msgpack_object *o, uint64_t *out)
{
    if (!o || o->type != MSGPACK_OBJECT_POSITIVE_INTEGER || o->via.u64 > UINT_MAX_WIRE) return false;
    *out = o->via.u64;
    return true;
}

/* The body rules of "Encoding / Bodies": no ext types, str keys, UTF-8 str. */
static bool body_ok(const msgpack_object *o, int depth)
{
    if (depth > MAX_DEPTH) return false;
    switch (o->type) {
    case MSGPACK_OBJECT_EXT:
        return false;
    case MSGPACK_OBJECT_STR:
        return utf8_chars((const unsigned char *)o->via.str.ptr, o->via.str.size) >= 0;
    case MSGPACK_OBJECT_ARRAY:
        for (uint32_t i = 0; i < o->via.array.size; i++)
            if (!body_ok(&o->via.array.ptr[i], depth + 1)) return false;
        return true;
    case MSGPACK_OBJECT_MAP:
        for (uint32_t i = 0; i < o->via.map.size; i++) {
            const msgpack_object_kv *kv = &o->via.map.ptr[i];
            if (kv->key.type != MSGPACK_OBJECT_STR || !body_ok(&kv->key, depth + 1) ||
                !body_ok(&kv->val, depth + 1))
                return false;
        }
        return true;
    default:
        return true;
    }
}

/* Decode exactly one valid msgpack value, with no trailing bytes. */
static bool decode_one(msgpack_unpacked *up, const char *data, size_t len)
{
    size_t off = 0;
    msgpack_unpacked_init(up);
    if (msgpack_unpack_next(up, data, len, &off) != MSGPACK_UNPACK_SUCCESS || off != len ||
        !body_ok(&up->data, 0)) {
        msgpack_unpacked_destroy(up);
        return false;
    }
    return true;
}

static void print_json_string(FILE *f, const char *p, size_t n)
{
    fputc('"', f);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        switch (c) {
        case '"': fputs("\\\"", f); break;
        case '\\': fputs("\\\\", f); break;
        case '\n': fputs("\\n", f); break;
        case '\r': fputs("\\r", f); break;
        case '\t': fputs("\\t", f); break;
        default:
            if (c < 0x20) fprintf(f, "\\u%04x", c);
            else fputc(c, f);
        }
    }
    fputc('"', f);
}

static void print_double(FILE *f, double d)
{
    char buf[40];
    if (isnan(d)) { fputs("NaN", f); return; }
    if (isinf(d)) { fputs(d > 0 ? "Infinity" : "-Infinity", f); return; }
    for (int prec = 15; prec <= 17; prec++) { /* shortest that round-trips */
        snprintf(buf, sizeof buf, "%.*g", prec, d);
        if (strtod(buf, NULL) == d) break;
    }
    fputs(buf, f);
    if (!strpbrk(buf, ".e")) fputs(".0", f); /* keep it visibly a float */
}

/* JSON for what JSON has; bin as h'hex' (CBOR diagnostic notation). */
static void print_jsonish(FILE *f, const msgpack_object *o)
{
    switch (o->type) {
    case MSGPACK_OBJECT_NIL: fputs("null", f); break;
    case MSGPACK_OBJECT_BOOLEAN: fputs(o->via.boolean ? "true" : "false", f); break;
    case MSGPACK_OBJECT_POSITIVE_INTEGER: fprintf(f, "%" PRIu64, o->via.u64); break;
    case MSGPACK_OBJECT_NEGATIVE_INTEGER: fprintf(f, "%" PRId64, o->via.i64); break;
    case MSGPACK_OBJECT_FLOAT32:
    case MSGPACK_OBJECT_FLOAT64: print_double(f, o->via.f64); break;
    case MSGPACK_OBJECT_STR: print_json_string(f, o->via.str.ptr, o->via.str.size); break;
    case MSGPACK_OBJECT_BIN:
        fputs("h'", f);
        for (uint32_t i = 0; i < o->via.bin.size; i++) fprintf(f, "%02x", (unsigned char)o->via.bin.ptr[i]);
        fputc('\'', f);
        break;
    case MSGPACK_OBJECT_ARRAY:
        fputc('[', f);
        for (uint32_t i = 0; i < o->via.array.size; i++) {
            if (i) fputs(", ", f);
            print_jsonish(f, &o->via.array.ptr[i]);
        }
        fputc(']', f);
        break;
    case MSGPACK_OBJECT_MAP:
        fputc('{', f);
        for (uint32_t i = 0; i < o->via.map.size; i++) {
            if (i) fputs(", ", f);
            print_jsonish(f, &o->via.map.ptr[i].key);
            fputs(": ", f);
            print_jsonish(f, &o->via.map.ptr[i].val);
        }
        fputc('}', f);
        break;
    default: fputs("<ext>", f); break; /* rejected by body_ok before */
    }
}

/* --------------------------------------------------------------- frames */

static int send_message(client_t *c, const char *cmd, const msgpack_sbuffer *body)
{
    if (verbose) fprintf(stderr, "trc_run: -> %s (%zu bytes)\n", cmd, body->size);
    /* DONTWAIT: if the pipe is full the send is dropped and resent later. */
    if (zmq_send(c->sock, PROTO_ID, PROTO_ID_LEN, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0 ||
        zmq_send(c->sock, cmd, strlen(cmd), ZMQ_SNDMORE) < 0 ||
        zmq_send(c->sock, body->data, body->size, 0) < 0) {
        if (errno == EAGAIN) return 0;
        die_msg("cannot send %s: %s", cmd, zmq_strerror(errno));
        return -1;
    }
    return 0;
}

static void inmsg_free(inmsg_t *m)
{
    msgpack_unpacked_destroy(&m->body);
    free(m->raw);
    m->raw = NULL;
}

/*
 * Receive one message within timeout_ms.  Returns 1 with *m filled (a valid
 * TRC01 message whose body is a map), 0 on timeout or a discarded message,
 * -1 on a socket error.
 */
static int recv_message(client_t *c, long timeout_ms, inmsg_t *m)
{
    zmq_pollitem_t item = { .socket = c->sock, .events = ZMQ_POLLIN };
    int rc = zmq_poll(&item, 1, timeout_ms < 0 ? 0 : timeout_ms);
    if (rc < 0) {
        if (errno == EINTR) return 0;
        die_msg("zmq_poll: %s", zmq_strerror(errno));
        return -1;
    }
    if (rc == 0) return 0;

    zmq_msg_t frame[3];
    int nframes = 0, more = 1;
    bool ok = true;
    while (more) {
        zmq_msg_t part;
        zmq_msg_init(&part);
        if (zmq_msg_recv(&part, c->sock, 0) < 0) {
            die_msg("cannot receive: %s", zmq_strerror(errno));
            zmq_msg_close(&part);
            for (int i = 0; i < nframes && i < 3; i++) zmq_msg_close(&frame[i]);
            return -1;
        }
        more = zmq_msg_more(&part);
        if (nframes < 3) frame[nframes] = part;
        else zmq_msg_close(&part);
        nframes++;
    }
    if (nframes != 3) {
        die_msg("warning: discarded a message of %d frames (TRP has 3)", nframes);
        ok = false;
    } else if (zmq_msg_size(&frame[0]) != PROTO_ID_LEN || memcmp(zmq_msg_data(&frame[0]), PROTO_ID, PROTO_ID_LEN) != 0) {
        die_msg("warning: discarded a message whose protocol id is not " PROTO_ID);
        ok = false;
    } else {
        size_t n = zmq_msg_size(&frame[1]);
        const char *p = zmq_msg_data(&frame[1]);
        ok = n >= 1 && n <= 10;
        for (size_t i = 0; ok && i < n; i++) ok = p[i] >= 'A' && p[i] <= 'Z';
        if (ok) {
            memcpy(m->cmd, p, n);
            m->cmd[n] = '\0';
            if (verbose) fprintf(stderr, "trc_run: <- %s (%zu bytes)\n", m->cmd, zmq_msg_size(&frame[2]));
            size_t blen = zmq_msg_size(&frame[2]);
            /* "A body frame of zero bytes is read as the empty map" */
            m->raw = blen ? dup_bytes(zmq_msg_data(&frame[2]), blen) : dup_bytes("\x80", 1);
            if (!m->raw) {
                die_msg("out of memory");
                ok = false;
            } else if (!decode_one(&m->body, m->raw, blen ? blen : 1) || m->body.data.type != MSGPACK_OBJECT_MAP) {
                msgpack_unpacked_destroy(&m->body); /* no-op if decode_one failed */
                die_msg("warning: discarded a %s whose body is not a valid msgpack map", m->cmd);
                free(m->raw);
                m->raw = NULL;
                ok = false;
            }
        } else {
            die_msg("warning: discarded a message with a malformed command frame");
        }
    }
    for (int i = 0; i < nframes && i < 3; i++) zmq_msg_close(&frame[i]);
    return ok ? 1 : 0;
}

/* --------------------------------------------------------------- views */

static const char *const FINAL_STATES[] = { "succeeded", "failed", "dead" };

static bool is_final(const char *state)
{
    for (size_t i = 0; i < sizeof FINAL_STATES / sizeof *FINAL_STATES; i++)
        if (strcmp(state, FINAL_STATES[i]) == 0) return true;
    return false;
}

/* Parse the fields of a task view this client needs. */
static bool parse_view(const msgpack_object *o, view_t *v)
{
    memset(v, 0, sizeof *v);
    if (o->type != MSGPACK_OBJECT_MAP) return false;
    const msgpack_object *state = field(o, "state"), *result = field(o, "result"), *error = field(o, "error");
    if (!as_uint(field(o, "id"), &v->id) || !state || state->type != MSGPACK_OBJECT_STR) return false;
    if ((result && result->type != MSGPACK_OBJECT_BIN) || (error && error->type != MSGPACK_OBJECT_STR)) return false;
    v->state = dup_bytes(state->via.str.ptr, state->via.str.size);
    if (result) {
        v->result = dup_bytes(result->via.bin.ptr, result->via.bin.size);
        v->result_len = result->via.bin.size;
    }
    if (error) v->error = dup_bytes(error->via.str.ptr, error->via.str.size);
    if (!v->state || (result && !v->result) || (error && !v->error)) {
        view_free(v);
        return false;
    }
    return true;
}

/* NOTIFY is a hint: keep a final view of the watched task, ignore the rest. */
static void handle_notify(client_t *c, const inmsg_t *m)
{
    const msgpack_object *tasks = field(&m->body.data, "tasks");
    if (!tasks || tasks->type != MSGPACK_OBJECT_ARRAY) {
        die_msg("warning: ignored a NOTIFY without a tasks array");
        return;
    }
    for (uint32_t i = 0; i < tasks->via.array.size; i++) {
        view_t v;
        if (!parse_view(&tasks->via.array.ptr[i], &v)) {
            die_msg("warning: ignored a malformed task view in a NOTIFY");
            continue;
        }
        if (c->watched_id && v.id == c->watched_id && is_final(v.state) && !c->notified.state)
            c->notified = v;
        else
            view_free(&v);
    }
}

/* ------------------------------------------------------------- requests */

/*
 * Send a request and wait for its REPLY, resending the same frames with
 * backoff (0.5 s, 1 s, 2 s, 4 s, 5 s ...) and giving up after 10 s.  NOTIFYs
 * that arrive meanwhile are handled.  Returns 0 with *reply filled, or an
 * exit code (2 for ERROR, 3 for no answer, 2 for a socket error).
 */
static int request(client_t *c, const char *cmd, uint64_t seq, const msgpack_sbuffer *body, inmsg_t *reply)
{
    double start = now_s(), deadline = start + REQUEST_TIMEOUT_S, next_send = start;
    double wait = BACKOFF_INITIAL_S;
    for (;;) {
        double t = now_s();
        if (t >= deadline) {
            die_msg("the broker did not answer %s (seq %" PRIu64 ") within %.0f s", cmd, seq, REQUEST_TIMEOUT_S);
            return EXIT_UNAVAILABLE;
        }
        if (t >= next_send) {
            if (send_message(c, cmd, body) < 0) return EXIT_USAGE;
            next_send = t + wait;
            wait = wait * BACKOFF_FACTOR > BACKOFF_MAX_S ? BACKOFF_MAX_S : wait * BACKOFF_FACTOR;
        }
        double until = next_send < deadline ? next_send : deadline;
        inmsg_t m = { 0 };
        int rc = recv_message(c, (long)((until - t) * 1000.0) + 1, &m);
        if (rc < 0) return EXIT_USAGE;
        if (rc == 0) continue;

        const msgpack_object *b = &m.body.data;
        if (strcmp(m.cmd, "NOTIFY") == 0) {
            handle_notify(c, &m);
            inmsg_free(&m);
            continue;
        }
        bool is_reply = strcmp(m.cmd, "REPLY") == 0, is_error = strcmp(m.cmd, "ERROR") == 0;
        if (!is_reply && !is_error) {
            die_msg("warning: ignored unknown command %s from the broker", m.cmd);
            inmsg_free(&m);
            continue;
        }
        uint64_t got;
        const msgpack_object *code = field(b, "code"), *message = field(b, "message");
        if (!as_uint(field(b, "seq"), &got) || got != seq) {
            /* a duplicate answer to an earlier request, or an ERROR with seq nil */
            if (is_error && !field(b, "seq"))
                die_msg("warning: broker ERROR without seq: %.*s: %.*s",
                        code && code->type == MSGPACK_OBJECT_STR ? (int)code->via.str.size : 1,
                        code && code->type == MSGPACK_OBJECT_STR ? code->via.str.ptr : "?",
                        message && message->type == MSGPACK_OBJECT_STR ? (int)message->via.str.size : 1,
                        message && message->type == MSGPACK_OBJECT_STR ? message->via.str.ptr : "?");
            inmsg_free(&m);
            continue;
        }
        if (is_error) {
            /* A client MUST fail the request and MUST NOT resend it. */
            if (!code || code->type != MSGPACK_OBJECT_STR || !message || message->type != MSGPACK_OBJECT_STR)
                die_msg("broker rejected %s (seq %" PRIu64 ") with a malformed ERROR", cmd, seq);
            else
                die_msg("broker rejected %s (seq %" PRIu64 "): %.*s: %.*s", cmd, seq, (int)code->via.str.size,
                        code->via.str.ptr, (int)message->via.str.size, message->via.str.ptr);
            inmsg_free(&m);
            return EXIT_USAGE;
        }
        *reply = m;
        return 0;
    }
}

static int pack_str(msgpack_packer *pk, const char *s)
{
    size_t n = strlen(s);
    return msgpack_pack_str(pk, n) || msgpack_pack_str_body(pk, s, n);
}

static int submit(client_t *c, const char *name, const int64_t *args, int nargs, bool strict, uint64_t *id)
{
    msgpack_sbuffer payload, body;
    msgpack_packer pk;
    msgpack_sbuffer_init(&payload);
    msgpack_sbuffer_init(&body);

    /* payload: msgpack of [[args...], {}] */
    msgpack_packer_init(&pk, &payload, msgpack_sbuffer_write);
    int err = msgpack_pack_array(&pk, 2) || msgpack_pack_array(&pk, (size_t)nargs);
    for (int i = 0; i < nargs && !err; i++) err = msgpack_pack_int64(&pk, args[i]);
    err = err || msgpack_pack_map(&pk, 0);

    uint64_t seq = c->next_seq++;
    msgpack_packer_init(&pk, &body, msgpack_sbuffer_write);
    err = err || msgpack_pack_map(&pk, 4) || pack_str(&pk, "seq") || msgpack_pack_uint64(&pk, seq) ||
          pack_str(&pk, "tasks") || msgpack_pack_array(&pk, 1) || msgpack_pack_map(&pk, 2) ||
          pack_str(&pk, "name") || pack_str(&pk, name) || pack_str(&pk, "payload") ||
          msgpack_pack_bin(&pk, payload.size) || msgpack_pack_bin_body(&pk, payload.data, payload.size) ||
          pack_str(&pk, "watch") || msgpack_pack_true(&pk) || pack_str(&pk, "strict") ||
          (strict ? msgpack_pack_true(&pk) : msgpack_pack_false(&pk));
    int rc = EXIT_USAGE;
    if (err) {
        die_msg("out of memory while encoding SUBMIT");
    } else if (payload.size > MAX_PAYLOAD_BYTES) {
        die_msg("payload of %zu bytes exceeds max_payload_bytes (%u)", payload.size, MAX_PAYLOAD_BYTES);
    } else {
        inmsg_t reply = { 0 };
        rc = request(c, "SUBMIT", seq, &body, &reply);
        if (rc == 0) {
            const msgpack_object *ids = field(&reply.body.data, "ids"), *unknown = field(&reply.body.data, "unknown");
            if (!ids || ids->type != MSGPACK_OBJECT_ARRAY || ids->via.array.size != 1 ||
                !as_uint(&ids->via.array.ptr[0], id)) {
                die_msg("protocol error: REPLY to SUBMIT has no single uint in ids");
                rc = EXIT_USAGE;
            } else if (unknown && unknown->type == MSGPACK_OBJECT_ARRAY && unknown->via.array.size > 0) {
                fprintf(stderr, "trc_run: warning: no worker has registered %s yet; the task is queued\n", name);
            }
            inmsg_free(&reply);
        }
    }
    msgpack_sbuffer_destroy(&payload);
    msgpack_sbuffer_destroy(&body);
    return rc;
}

/* GET one id with watch true.  Returns 0 with *v filled, or an exit code. */
static int get_view(client_t *c, uint64_t id, view_t *v)
{
    msgpack_sbuffer body;
    msgpack_packer pk;
    msgpack_sbuffer_init(&body);
    msgpack_packer_init(&pk, &body, msgpack_sbuffer_write);
    uint64_t seq = c->next_seq++;
    int rc = EXIT_USAGE;
    if (msgpack_pack_map(&pk, 3) || pack_str(&pk, "seq") || msgpack_pack_uint64(&pk, seq) ||
        pack_str(&pk, "ids") || msgpack_pack_array(&pk, 1) || msgpack_pack_uint64(&pk, id) ||
        pack_str(&pk, "watch") || msgpack_pack_true(&pk)) {
        die_msg("out of memory while encoding GET");
    } else {
        inmsg_t reply = { 0 };
        rc = request(c, "GET", seq, &body, &reply);
        if (rc == 0) {
            const msgpack_object *tasks = field(&reply.body.data, "tasks");
            rc = EXIT_USAGE;
            if (!tasks || tasks->type != MSGPACK_OBJECT_ARRAY || tasks->via.array.size != 1)
                die_msg("protocol error: REPLY to GET does not hold one entry in tasks");
            else if (tasks->via.array.ptr[0].type == MSGPACK_OBJECT_NIL)
                die_msg("protocol error: the broker says task %" PRIu64 " does not exist", id);
            else if (!parse_view(&tasks->via.array.ptr[0], v) || v->id != id)
                die_msg("protocol error: malformed task view in REPLY to GET");
            else
                rc = 0;
            inmsg_free(&reply);
        }
    }
    msgpack_sbuffer_destroy(&body);
    return rc;
}

/* Wait for NOTIFY until the deadline; returns 0, or an exit code. */
static int wait_notify(client_t *c, double until)
{
    while (!c->notified.state) {
        double t = now_s();
        if (t >= until) return 0;
        inmsg_t m = { 0 };
        int rc = recv_message(c, (long)((until - t) * 1000.0) + 1, &m);
        if (rc < 0) return EXIT_USAGE;
        if (rc == 0) continue;
        if (strcmp(m.cmd, "NOTIFY") == 0) handle_notify(c, &m);
        /* anything else is a late duplicate answer: ignored */
        inmsg_free(&m);
    }
    return 0;
}

static int print_outcome(const view_t *v)
{
    printf("%" PRIu64 " %s ", v->id, v->state);
    if (v->result) {
        msgpack_unpacked up;
        if (!decode_one(&up, v->result, v->result_len)) {
            printf("\n");
            die_msg("protocol error: the result of task %" PRIu64 " is not valid msgpack", v->id);
            return EXIT_USAGE;
        }
        print_jsonish(stdout, &up.data);
        msgpack_unpacked_destroy(&up);
    } else if (v->error) {
        print_json_string(stdout, v->error, strlen(v->error));
    } else {
        fputs("null", stdout);
    }
    putchar('\n');
    if (fflush(stdout) != 0) return EXIT_USAGE;
    return strcmp(v->state, "succeeded") == 0 ? EXIT_SUCCEEDED : EXIT_TASK_FAILED;
}

/* ------------------------------------------------------------ the socket */

static int open_client(client_t *c, const char *endpoint)
{
    unsigned char uuid[16];
    char rid[2 + 32 + 1] = "c-";
    if (getrandom(uuid, sizeof uuid, 0) != (ssize_t)sizeof uuid) {
        die_msg("getrandom: %s", strerror(errno));
        return -1;
    }
    uuid[6] = (uuid[6] & 0x0F) | 0x40; /* a version 4 (random) UUID */
    uuid[8] = (uuid[8] & 0x3F) | 0x80;
    for (int i = 0; i < 16; i++) snprintf(rid + 2 + 2 * i, 3, "%02x", uuid[i]);

    c->ctx = zmq_ctx_new();
    if (!c->ctx) return -1;
    c->sock = zmq_socket(c->ctx, ZMQ_DEALER);
    if (!c->sock) {
        die_msg("zmq_socket: %s", zmq_strerror(errno));
        return -1;
    }
    struct { int opt; int value; } opts[] = {
        { ZMQ_LINGER, 0 },           { ZMQ_RECONNECT_IVL, 100 },    { ZMQ_RECONNECT_IVL_MAX, 1000 },
        { ZMQ_HEARTBEAT_IVL, 1000 }, { ZMQ_HEARTBEAT_TIMEOUT, 3000 },
    };
#ifdef ZMQ_ROUTING_ID
    int rid_opt = ZMQ_ROUTING_ID;
#else
    int rid_opt = ZMQ_IDENTITY;
#endif
    if (zmq_setsockopt(c->sock, rid_opt, rid, strlen(rid)) != 0) {
        die_msg("cannot set the routing id: %s", zmq_strerror(errno));
        return -1;
    }
    for (size_t i = 0; i < sizeof opts / sizeof *opts; i++)
        if (zmq_setsockopt(c->sock, opts[i].opt, &opts[i].value, sizeof opts[i].value) != 0) {
            die_msg("zmq_setsockopt(%d): %s", opts[i].opt, zmq_strerror(errno));
            return -1;
        }
    if (zmq_connect(c->sock, endpoint) != 0) {
        die_msg("cannot connect to %s: %s", endpoint, zmq_strerror(errno));
        return -1;
    }
    c->next_seq = 1;
    return 0;
}

static void close_client(client_t *c)
{
    if (c->sock) zmq_close(c->sock);
    if (c->ctx) zmq_ctx_term(c->ctx);
    view_free(&c->notified);
}

/* ----------------------------------------------------------------- main */

static int usage(void)
{
    fputs("usage: trc_run [--strict] [--verbose] [--timeout SECONDS] ENDPOINT TASK_NAME [INT_ARG...]\n"
          "  submits TASK_NAME(INT_ARG...) over TRC01 and prints '<id> <state> <result>'\n"
          "  exit 0 succeeded, 1 failed/dead, 2 usage or protocol error, 3 no answer or not final in time\n",
          stderr);
    return EXIT_USAGE;
}

int main(int argc, char **argv)
{
    bool strict = false;
    double wait_s = DEFAULT_WAIT_S;
    int i = 1;
    for (; i < argc && strncmp(argv[i], "--", 2) == 0; i++) {
        if (strcmp(argv[i], "--") == 0) { i++; break; }
        if (strcmp(argv[i], "--strict") == 0) { strict = true; continue; }
        if (strcmp(argv[i], "--verbose") == 0) { verbose = true; continue; }
        if (strcmp(argv[i], "--timeout") == 0 && i + 1 < argc) {
            char *end;
            errno = 0;
            wait_s = strtod(argv[++i], &end);
            if (errno || *end || !(wait_s > 0)) {
                die_msg("--timeout needs a positive number of seconds, not '%s'", argv[i]);
                return usage();
            }
            continue;
        }
        if (strcmp(argv[i], "--help") == 0) { usage(); return EXIT_USAGE; }
        die_msg("unknown option '%s'", argv[i]);
        return usage();
    }
    if (argc - i < 2) return usage();
    const char *endpoint = argv[i], *name = argv[i + 1];
    int nargs = argc - i - 2;

    long chars = utf8_chars((const unsigned char *)name, strlen(name));
    if (chars < 1 || chars > MAX_NAME_LEN) {
        die_msg("TASK_NAME must be valid UTF-8 of 1 to %d characters", MAX_NAME_LEN);
        return EXIT_USAGE;
    }
    int64_t *args = calloc(nargs ? (size_t)nargs : 1, sizeof *args);
    if (!args) {
        die_msg("out of memory");
        return EXIT_USAGE;
    }
    for (int k = 0; k < nargs; k++) {
        const char *s = argv[i + 2 + k];
        char *end;
        errno = 0;
        long long v = strtoll(s, &end, 10);
        if (errno || end == s || *end) {
            die_msg("INT_ARG '%s' is not a 64-bit integer", s);
            free(args);
            return usage();
        }
        args[k] = (int64_t)v;
    }

    client_t c = { 0 };
    int rc = EXIT_USAGE;
    uint64_t id = 0;
    if (open_client(&c, endpoint) == 0 && (rc = submit(&c, name, args, nargs, strict, &id)) == 0) {
        c.watched_id = id;
        double deadline = now_s() + wait_s, poll = BACKOFF_INITIAL_S;
        view_t v = { 0 };
        for (;;) {
            if (c.notified.state) { /* a NOTIFY carried the final view */
                rc = print_outcome(&c.notified);
                break;
            }
            if ((rc = get_view(&c, id, &v)) != 0) break;
            if (is_final(v.state)) {
                rc = print_outcome(&v);
                break;
            }
            if (now_s() >= deadline) {
                die_msg("task %" PRIu64 " is still %s after %.1f s", id, v.state, wait_s);
                rc = EXIT_UNAVAILABLE;
                break;
            }
            view_free(&v);
            double until = now_s() + poll;
            if ((rc = wait_notify(&c, until < deadline ? until : deadline)) != 0) break;
            poll = poll * BACKOFF_FACTOR > BACKOFF_MAX_S ? BACKOFF_MAX_S : poll * BACKOFF_FACTOR;
        }
        view_free(&v);
    }
    close_client(&c);
    free(args);
    return rc;
}
