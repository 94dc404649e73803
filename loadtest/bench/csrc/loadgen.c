/*
 * loadgen: a closed-loop load generator for length-prefixed echo servers.
 *
 * The idea: one thread, one epoll set, many non-blocking connections, each
 * keeping DEPTH requests in flight.  A request is a 4-byte big-endian length
 * and SIZE payload bytes taken from a fixed pseudo-random buffer of lowercase
 * letters at an offset derived from (connection, sequence number), so every
 * reply can be checked byte for byte against the same buffer (or its
 * upper-cased twin with --upper) without storing what was sent, and a reply
 * that comes back on the wrong connection or out of order does not match.
 * Replies are checked as they stream in, so 1 MiB messages are never copied.
 *
 * Every connection first proves itself with one echo (the "connect phase",
 * at most --window connections in it at once so no listen backlog overflows).
 *
 * While loading it never sleeps in epoll_wait (a sleeping generator adds the
 * wake-up latency of its CPU to every round trip): --spin 1 polls, --spin 2
 * (default) polls and calls sched_yield when there is nothing to do, so the
 * kernel's softirq thread on this CPU still runs promptly; --spin 0 blocks.
 * Time spent finding nothing to do is reported as "spare": generator headroom.
 *
 *   --mode load   connect, then --warmup seconds of load, then --duration
 *                 seconds measured (replies completed, payload bytes, latency
 *                 histogram), then stop issuing and drain every reply.
 *   --mode hold   connect up to --conns (stopping at the first failure), print
 *                 a "ready" JSON line, wait for a line on stdin (or
 *                 --hold-timeout), then ask every connection for one more
 *                 echo and report how many answered.
 *
 * Built with -DLOADGEN_TLS (and -lssl -lcrypto) it can speak TLS (--tls): each
 * connection does its handshake in the connect phase, on memory BIOs so the
 * socket I/O stays ours; pipelined requests that go out together are
 * encrypted with one SSL_write, as a real client would send them.  The plain
 * build has none of this code.  --auth-token-file FILE sends `AUTH <token>`
 * (the file's first token line) as each connection's first frame, pipelined
 * with its first echo, and expects the frame `OK` before any echo.
 *
 * Output is one JSON object per line on stdout.  The exit status is 0 only if
 * nothing failed.  Every phase has a deadline; the program always ends.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#ifdef LOADGEN_TLS
#include <openssl/err.h>
#include <openssl/ssl.h>
#endif

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

#define RBUF_SIZE (256 * 1024)   /* one read drains many small replies */
#define OFFSETS 4096             /* payload offsets into the pattern */
#define MAX_IOV 64               /* frames batched into one writev: 2 iovecs each */
#define HIST_SUB 64              /* histogram: 64 linear buckets, then 32 per octave */
#define HIST_BUCKETS (HIST_SUB + 40 * 32)
#define NO_CAP UINT64_MAX

enum state { ST_FREE, ST_CONNECTING, ST_HANDSHAKE, ST_FIRST, ST_READY, ST_DEAD };
#define CONNECT_PHASE(st) ((st) == ST_CONNECTING || (st) == ST_HANDSHAKE || (st) == ST_FIRST)

struct conn {
    int fd;
    uint8_t state;
    uint8_t hdr_got;
    uint8_t want_out;    /* EPOLLOUT currently registered */
    uint8_t auth_wait;   /* AUTH sent, its OK not yet read */
    uint8_t hdr[4];
    uint32_t body_len;   /* payload length of the reply being read */
    uint32_t body_pos;
    uint64_t send_seq;   /* next request to start sending */
    uint32_t send_off;   /* bytes of request send_seq already sent */
    uint64_t recv_seq;   /* next reply expected */
    uint64_t cap;        /* never send a request with seq >= cap */
    double started;      /* connect-phase start, for its timeout */
#ifdef LOADGEN_TLS
    SSL *ssl;            /* NULL without --tls */
    unsigned char *cout; /* ciphertext not yet sent: cout[cout_off..cout_len) */
    size_t cout_off, cout_len, cout_cap;
#endif
};

static struct {
    const char *host, *auth_file, *tls_ca;
    int tls, port, conns, depth, window, src, upper, hold, spin;
    size_t size;
    double warmup, duration, connect_timeout, conn_timeout, drain_timeout, hold_timeout;
} opt = {"127.0.0.1", NULL, NULL, 0, 0, 1, 1, 100, 0, 0, 0, 2, 64, 0.5, 3.0, 60.0, 5.0, 5.0, 120.0};

static struct conn *conns;
static double *sent_at;          /* conns * depth send timestamps */
static unsigned char *pat, *expect;
static unsigned char hdr_req[4];
static unsigned char rbuf[RBUF_SIZE];
static int ep;
static double now;
static int measuring;
static double spare;             /* seconds of the measured window spent in empty polls */
static int spinning;             /* poll without sleeping: no wake-up latency on our side */
static uint64_t completed, bytes_in, hist[HIST_BUCKETS];
static long n_established, n_failed, n_error_frames, n_mismatch, n_closed, n_in_connect;
static char first_error[160];
static unsigned char auth_msg[4 + 5 + 1024]; /* the AUTH frame, if --auth-token-file */
static size_t auth_len;

static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec * 1e-6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec * 1e-6;
}

static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void note_error(const char *what, int err) {
    if (first_error[0]) return;
    if (err)
        snprintf(first_error, sizeof first_error, "%s: %s", what, strerror(err));
    else
        snprintf(first_error, sizeof first_error, "%s", what);
}

static size_t payload_off(const struct conn *c, uint64_t seq) {
    uint64_t i = (uint64_t)(c - conns);
    return (size_t)((seq * 2654435761u + i * 40503u) % OFFSETS);
}

static int hist_index(uint64_t v) {
    if (v < HIST_SUB) return (int)v;
    int msb = 63 - __builtin_clzll(v);
    int e = msb - 5;
    int idx = HIST_SUB + (e - 1) * 32 + (int)((v >> e) - 32);
    return idx < HIST_BUCKETS ? idx : HIST_BUCKETS - 1;
}

static double hist_value(int idx) {
    if (idx < HIST_SUB) return idx;
    int j = idx - HIST_SUB, e = j / 32 + 1;
    uint64_t m = (uint64_t)(j % 32 + 32);
    return (double)(m << e) + (double)(1ull << e) / 2.0;
}

static double percentile_us(double p) {
    uint64_t total = 0, seen = 0;
    for (int i = 0; i < HIST_BUCKETS; i++) total += hist[i];
    if (!total) return 0.0;
    uint64_t want = (uint64_t)(p * (double)total);
    if (want < 1) want = 1;
    for (int i = 0; i < HIST_BUCKETS; i++) {
        seen += hist[i];
        if (seen >= want) return hist_value(i) / 1000.0;
    }
    return 0.0;
}

static void set_events(struct conn *c, int want_out) {
    if (c->want_out == want_out) return;
    struct epoll_event ev = {.events = EPOLLIN | (want_out ? EPOLLOUT : 0),
                             .data.u32 = (uint32_t)(c - conns)};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
    c->want_out = (uint8_t)want_out;
}

static void kill_conn(struct conn *c, const char *why, int err) {
    note_error(why, err);
    if (CONNECT_PHASE(c->state)) {
        n_in_connect--;
        n_failed++;
    } else if (c->state == ST_READY) {
        n_closed++;
    }
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
    c->state = ST_DEAD;
#ifdef LOADGEN_TLS
    SSL_free(c->ssl);
    c->ssl = NULL;
    free(c->cout);
    c->cout = NULL;
    c->cout_off = c->cout_len = c->cout_cap = 0;
#endif
}

static uint64_t send_limit(const struct conn *c) {
    uint64_t lim = c->recv_seq + (uint64_t)opt.depth;
    return lim < c->cap ? lim : c->cap;
}

#ifdef LOADGEN_TLS
static void pump_tls(struct conn *c);
#endif

/* Send every request the window allows; register for EPOLLOUT only if some is left. */
static void pump(struct conn *c) {
#ifdef LOADGEN_TLS
    if (c->ssl) {
        pump_tls(c);
        return;
    }
#endif
    while (c->state == ST_FIRST || c->state == ST_READY) {
        uint64_t lim = send_limit(c);
        if (c->send_seq >= lim) break;
        struct iovec iov[MAX_IOV];
        int n = 0;
        uint32_t off = c->send_off;
        for (uint64_t s = c->send_seq; s < lim && n + 2 <= MAX_IOV; s++) {
            if (off < 4) {
                iov[n++] = (struct iovec){hdr_req + off, 4 - off};
                off = 4;
            }
            iov[n++] = (struct iovec){pat + payload_off(c, s) + (off - 4), opt.size - (off - 4)};
            if (c->send_off == 0 || s != c->send_seq) sent_at[(size_t)(c - conns) * (size_t)opt.depth + s % (uint64_t)opt.depth] = now;
            off = 0;
        }
        ssize_t w = writev(c->fd, iov, n);
        if (w < 0) {
            if (errno == EAGAIN || errno == EINTR) break;
            kill_conn(c, "send", errno);
            return;
        }
        size_t left = (size_t)w, frame = 4 + opt.size;
        while (left > 0) {
            size_t rest = frame - c->send_off;
            if (left >= rest) {
                left -= rest;
                c->send_seq++;
                c->send_off = 0;
            } else {
                c->send_off += (uint32_t)left;
                left = 0;
            }
        }
    }
    if (c->state == ST_FIRST || c->state == ST_READY)
        set_events(c, c->send_seq < send_limit(c));
}

static void reply_done(struct conn *c) {
    if (measuring && c->state == ST_READY) {
        double t0 = sent_at[(size_t)(c - conns) * (size_t)opt.depth + c->recv_seq % (uint64_t)opt.depth];
        double ns = (now - t0) * 1e9;
        hist[hist_index(ns > 0 ? (uint64_t)ns : 0)]++;
        completed++;
    }
    c->recv_seq++;
    if (c->state == ST_FIRST) {
        c->state = ST_READY;
        n_in_connect--;
        n_established++;
    }
}

/* Check a chunk of reply bytes against what the request must have produced. */
static int consume(struct conn *c, const unsigned char *p, size_t n) {
    while (n > 0) {
        if (c->hdr_got < 4) {
            size_t want = 4u - c->hdr_got;
            size_t k = want < n ? want : n;
            memcpy(c->hdr + c->hdr_got, p, k);
            c->hdr_got = (uint8_t)(c->hdr_got + k);
            p += k;
            n -= k;
            if (c->hdr_got < 4) break;
            uint32_t len = (uint32_t)c->hdr[0] << 24 | (uint32_t)c->hdr[1] << 16 |
                           (uint32_t)c->hdr[2] << 8 | c->hdr[3];
            if (len & 0x80000000u) {
                n_error_frames++;
                kill_conn(c, "error frame from server", 0);
                return -1;
            }
            if (c->auth_wait) {
                if (len != 2) {
                    n_mismatch++;
                    kill_conn(c, "AUTH answered with something other than OK", 0);
                    return -1;
                }
            } else if (len != opt.size || c->recv_seq >= c->send_seq + (c->send_off ? 1 : 0)) {
                n_mismatch++;
                kill_conn(c, "reply length or unsolicited reply", 0);
                return -1;
            }
            c->body_len = len;
            c->body_pos = 0;
            if (len == 0) {
                c->hdr_got = 0;
                reply_done(c);
            }
            continue;
        }
        size_t k = c->body_len - c->body_pos < n ? c->body_len - c->body_pos : n;
        const unsigned char *want = c->auth_wait
                                        ? (const unsigned char *)"OK" + c->body_pos
                                        : expect + payload_off(c, c->recv_seq) + c->body_pos;
        if (memcmp(p, want, k) != 0) {
            n_mismatch++;
            kill_conn(c, c->auth_wait ? "AUTH answered with something other than OK"
                                      : "reply bytes differ", 0);
            return -1;
        }
        if (measuring && !c->auth_wait) bytes_in += k;
        c->body_pos += (uint32_t)k;
        p += k;
        n -= k;
        if (c->body_pos == c->body_len) {
            c->hdr_got = 0;
            if (c->auth_wait)
                c->auth_wait = 0;
            else
                reply_done(c);
        }
    }
    return 0;
}

#ifdef LOADGEN_TLS
static void on_readable_tls(struct conn *c, ssize_t r);
#endif

static void on_readable(struct conn *c) {
    ssize_t r = read(c->fd, rbuf, sizeof rbuf);
    if (r == 0) {
        kill_conn(c, "server closed the connection", 0);
        return;
    }
    if (r < 0) {
        if (errno != EAGAIN && errno != EINTR) kill_conn(c, "recv", errno);
        return;
    }
#ifdef LOADGEN_TLS
    if (c->ssl) {
        on_readable_tls(c, r);
        return;
    }
#endif
    if (consume(c, rbuf, (size_t)r) == 0) pump(c);
}

/* Connected (and through the TLS handshake): AUTH if asked, then the first echo. */
static void start_first(struct conn *c) {
    c->state = ST_FIRST;
    c->cap = 1;
    if (auth_len) {
        c->auth_wait = 1;
#ifdef LOADGEN_TLS
        if (c->ssl) {
            if (SSL_write(c->ssl, auth_msg, (int)auth_len) <= 0) {
                kill_conn(c, "SSL_write (AUTH)", 0);
                return;
            }
        } else
#endif
        if (write(c->fd, auth_msg, auth_len) != (ssize_t)auth_len) {
            kill_conn(c, "sending AUTH", errno);
            return;
        }
    }
    pump(c);
}

#ifdef LOADGEN_TLS
static SSL_CTX *tls_ctx;
static unsigned char pbuf[RBUF_SIZE];  /* plaintext out of SSL_read */
static unsigned char *gbuf;            /* requests gathered for one SSL_write */
static size_t gbuf_cap;

static void tls_fail(struct conn *c, const char *what) {
    char msg[140];
    unsigned long e = ERR_get_error();
    const char *why = e ? ERR_reason_error_string(e) : NULL;
    snprintf(msg, sizeof msg, "%s: %s", what, why ? why : "failed");
    ERR_clear_error();
    kill_conn(c, msg, 0);
}

/* Queue what OpenSSL wrote, send what the socket takes: 1 all sent, 0 some left, -1 dead. */
static int tls_flush(struct conn *c) {
    BIO *w = SSL_get_wbio(c->ssl);
    size_t pend = BIO_ctrl_pending(w);
    if (pend) {
        if (c->cout_off == c->cout_len) c->cout_off = c->cout_len = 0;
        if (c->cout_len + pend > c->cout_cap) {
            if (c->cout_off) {
                memmove(c->cout, c->cout + c->cout_off, c->cout_len - c->cout_off);
                c->cout_len -= c->cout_off;
                c->cout_off = 0;
            }
            if (c->cout_len + pend > c->cout_cap) {
                size_t cap = c->cout_len + pend + 64 * 1024;
                unsigned char *p = realloc(c->cout, cap);
                if (!p) {
                    kill_conn(c, "out of memory", 0);
                    return -1;
                }
                c->cout = p;
                c->cout_cap = cap;
            }
        }
        int got = BIO_read(w, c->cout + c->cout_len, (int)pend);
        if (got > 0) c->cout_len += (size_t)got;
    }
    while (c->cout_off < c->cout_len) {
        ssize_t s = send(c->fd, c->cout + c->cout_off, c->cout_len - c->cout_off, MSG_NOSIGNAL);
        if (s < 0) {
            if (errno == EAGAIN || errno == EINTR) return 0;
            kill_conn(c, "send", errno);
            return -1;
        }
        c->cout_off += (size_t)s;
    }
    return 1;
}

/* pump for TLS: encrypt only when the ciphertext queue is empty (our send-side flow
   control); requests that go out together are one SSL_write. */
static void pump_tls(struct conn *c) {
    size_t frame = 4 + opt.size;
    for (;;) {
        int f = tls_flush(c);
        if (f < 0) return;
        if (f == 0) {
            set_events(c, 1);
            return;
        }
        if (c->state != ST_FIRST && c->state != ST_READY) break;
        uint64_t lim = send_limit(c), s = c->send_seq;
        if (s >= lim) break;
        size_t len = 0;
        for (; s < lim && len + frame <= gbuf_cap; s++) {
            memcpy(gbuf + len, hdr_req, 4);
            memcpy(gbuf + len + 4, pat + payload_off(c, s), opt.size);
            sent_at[(size_t)(c - conns) * (size_t)opt.depth + s % (uint64_t)opt.depth] = now;
            len += frame;
        }
        if (SSL_write(c->ssl, gbuf, (int)len) <= 0) {
            tls_fail(c, "SSL_write");
            return;
        }
        c->send_seq = s;
    }
    set_events(c, 0);
}

static void on_readable_tls(struct conn *c, ssize_t r) {
    BIO_write(SSL_get_rbio(c->ssl), rbuf, (int)r);
    if (c->state == ST_HANDSHAKE) {
        int h = SSL_do_handshake(c->ssl);
        if (h != 1) {
            if (SSL_get_error(c->ssl, h) != SSL_ERROR_WANT_READ) {
                tls_fail(c, "TLS handshake");
                return;
            }
            pump_tls(c);  /* whatever the handshake has to say */
            return;
        }
        start_first(c);
        if (c->state == ST_DEAD) return;
    }
    for (;;) {
        int n = SSL_read(c->ssl, pbuf, (int)sizeof pbuf);
        if (n <= 0) {
            int e = SSL_get_error(c->ssl, n);
            if (e == SSL_ERROR_WANT_READ) break;
            if (e == SSL_ERROR_ZERO_RETURN) {
                kill_conn(c, "server sent close_notify", 0);
                return;
            }
            tls_fail(c, "SSL_read");
            return;
        }
        if (consume(c, pbuf, (size_t)n) < 0) return;
    }
    pump_tls(c);
}

static void start_tls(struct conn *c) {
    c->ssl = SSL_new(tls_ctx);
    if (!c->ssl) {
        tls_fail(c, "SSL_new");
        return;
    }
    SSL_set_bio(c->ssl, BIO_new(BIO_s_mem()), BIO_new(BIO_s_mem()));
    if (opt.tls_ca) SSL_set1_host(c->ssl, opt.host);
    SSL_set_connect_state(c->ssl);
    c->state = ST_HANDSHAKE;
    int h = SSL_do_handshake(c->ssl);
    if (h != 1 && SSL_get_error(c->ssl, h) != SSL_ERROR_WANT_READ) {
        tls_fail(c, "TLS handshake");
        return;
    }
    pump_tls(c);  /* the ClientHello */
}

static void setup_tls(void) {
    tls_ctx = SSL_CTX_new(TLS_client_method());
    if (!tls_ctx) {
        fprintf(stderr, "loadgen: SSL_CTX_new failed\n");
        exit(2);
    }
    SSL_CTX_set_min_proto_version(tls_ctx, TLS1_2_VERSION);
    if (opt.tls_ca) {
        if (SSL_CTX_load_verify_locations(tls_ctx, opt.tls_ca, NULL) != 1) {
            fprintf(stderr, "loadgen: cannot load --tls-ca %s\n", opt.tls_ca);
            exit(2);
        }
        SSL_CTX_set_verify(tls_ctx, SSL_VERIFY_PEER, NULL);
    } else {
        SSL_CTX_set_verify(tls_ctx, SSL_VERIFY_NONE, NULL);
    }
    size_t frame = 4 + opt.size;
    gbuf_cap = frame > RBUF_SIZE ? frame : RBUF_SIZE;
    gbuf = malloc(gbuf_cap);
    if (!gbuf) {
        perror("malloc");
        exit(2);
    }
}

/* The version and cipher of some established connection, for the report. */
static void print_tls(void) {
    for (int i = 0; i < opt.conns; i++) {
        if (conns[i].ssl && conns[i].state == ST_READY) {
            printf(",\"tls\":\"%s %s\"", SSL_get_version(conns[i].ssl),
                   SSL_get_cipher_name(conns[i].ssl));
            return;
        }
    }
}
#endif

static void on_connected(struct conn *c) {
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) {
        kill_conn(c, "connect", err);
        return;
    }
#ifdef LOADGEN_TLS
    if (opt.tls) {
        start_tls(c);
        return;
    }
#endif
    start_first(c);
}

static void dispatch(int timeout_ms) {
    struct epoll_event evs[512];
    double before = spinning ? mono() : 0.0;
    int n = epoll_wait(ep, evs, 512, spinning ? 0 : timeout_ms);
    now = mono();
    if (n == 0 && spinning) {
        double idle = now - before;
        if (opt.spin == 2) {
            sched_yield(); /* let ksoftirqd (and anyone else) run: it carries our packets */
            double after = mono();
            /* A quick return means nobody else wanted this CPU: that time was ours to spare.
               A long one means someone ran (perhaps softirq work for our own packets). */
            if (after - now < 20e-6) idle += after - now;
            now = after;
        }
        if (measuring) spare += idle; /* generator headroom */
    }
    for (int i = 0; i < n; i++) {
        struct conn *c = &conns[evs[i].data.u32];
        if (c->state == ST_DEAD || c->state == ST_FREE) continue;
        if (c->state == ST_CONNECTING) {
            on_connected(c);
            continue;
        }
        if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) on_readable(c);
        if (c->state != ST_DEAD && (evs[i].events & EPOLLOUT)) pump(c);
    }
}

static int open_one(struct conn *c, struct sockaddr_in *dst) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        note_error("socket (generator)", errno);
        n_failed++;
        return -1;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (opt.src > 0) {
        /* Spread over 127.0.0.2.. so each source address has its own port range. */
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        struct sockaddr_in src = {.sin_family = AF_INET};
        src.sin_addr.s_addr = htonl(0x7f000002u + (uint32_t)((c - conns) % opt.src));
        if (bind(fd, (struct sockaddr *)&src, sizeof src) < 0) {
            note_error("bind source address", errno);
            n_failed++;
            close(fd);
            return -1;
        }
    }
    c->fd = fd;
    c->state = ST_CONNECTING;
    c->started = now;
    n_in_connect++;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.u32 = (uint32_t)(c - conns)};
    c->want_out = 1;
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    if (connect(fd, (struct sockaddr *)dst, sizeof *dst) < 0 && errno != EINPROGRESS) {
        kill_conn(c, "connect", errno);
        return -1;
    }
    return 0;
}

/* Open connections, at most --window in the connect phase at once. */
static long connect_phase(struct sockaddr_in *dst, int stop_at_first_failure) {
    double deadline = mono() + opt.connect_timeout;
    int next = 0, stop_opening = 0, n_inprog = 0;
    int *inprog = malloc((size_t)opt.window * sizeof *inprog);
    now = mono();
    while ((next < opt.conns && !stop_opening) || n_in_connect > 0) {
        int kept = 0;
        for (int j = 0; j < n_inprog; j++) {
            struct conn *c = &conns[inprog[j]];
            if (CONNECT_PHASE(c->state) &&
                (now - c->started > opt.conn_timeout || now > deadline + opt.conn_timeout))
                kill_conn(c, "no answer to the first echo in time", 0);
            if (CONNECT_PHASE(c->state)) inprog[kept++] = inprog[j];
        }
        n_inprog = kept;
        while (!stop_opening && next < opt.conns && n_inprog < opt.window) {
            int i = next++;
            if (open_one(&conns[i], dst) < 0) {
                if (stop_at_first_failure) stop_opening = 1;
            } else if (conns[i].state == ST_CONNECTING) {
                inprog[n_inprog++] = i;
            }
        }
        dispatch(20);
        if (stop_at_first_failure && n_failed > 0) stop_opening = 1;
        if (now > deadline) stop_opening = 1;
    }
    free(inprog);
    return next;
}

static void set_caps(uint64_t add_from_recv, int stop) {
    for (int i = 0; i < opt.conns; i++) {
        struct conn *c = &conns[i];
        if (c->state != ST_READY) continue;
        if (stop)
            c->cap = c->send_seq + (c->send_off ? 1 : 0);
        else
            c->cap = add_from_recv == NO_CAP ? NO_CAP : c->recv_seq + add_from_recv;
        pump(c);
    }
}

/* Wait until every live connection has its replies, or the deadline passes. */
static long drain(double timeout) {
    double deadline = mono() + timeout;
    for (;;) {
        long pending = 0;
        for (int i = 0; i < opt.conns; i++) {
            struct conn *c = &conns[i];
            if (c->state == ST_READY && c->recv_seq < c->cap) pending++;
        }
        if (pending == 0 || now > deadline) return pending;
        dispatch(20);
    }
}

static void run_phase(double seconds) {
    double end = mono() + seconds;
    spinning = opt.spin;
    while (now < end) dispatch(10);
    spinning = 0;
}

static void usage(void) {
    fprintf(stderr,
            "usage: loadgen --port P [--host H] [--mode load|hold] [--conns N] [--depth D]\n"
            "  [--size BYTES] [--warmup S] [--duration S] [--upper] [--src K] [--window W]\n"
            "  [--connect-timeout S] [--conn-timeout S] [--drain-timeout S] [--hold-timeout S]\n"
            "  [--spin 0|1|2] [--no-spin] [--auth-token-file F] [--tls [--tls-ca PEM]]\n");
    exit(2);
}

static void parse_args(int argc, char **argv) {
    static struct option longopts[] = {
        {"host", 1, 0, 'h'}, {"port", 1, 0, 'p'}, {"mode", 1, 0, 'm'},
        {"conns", 1, 0, 'c'}, {"depth", 1, 0, 'd'}, {"size", 1, 0, 's'},
        {"warmup", 1, 0, 'w'}, {"duration", 1, 0, 't'}, {"upper", 0, 0, 'u'},
        {"src", 1, 0, 'S'}, {"window", 1, 0, 'W'}, {"connect-timeout", 1, 0, 'C'},
        {"conn-timeout", 1, 0, 'T'}, {"drain-timeout", 1, 0, 'D'},
        {"hold-timeout", 1, 0, 'H'}, {"no-spin", 0, 0, 'N'},
        {"spin", 1, 0, 'Y'}, {"auth-token-file", 1, 0, 'A'}, {"tls", 0, 0, 'L'},
        {"tls-ca", 1, 0, 'R'}, {0, 0, 0, 0}};
    int ch;
    while ((ch = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (ch) {
        case 'h': opt.host = optarg; break;
        case 'p': opt.port = atoi(optarg); break;
        case 'm': opt.hold = strcmp(optarg, "hold") == 0; break;
        case 'c': opt.conns = atoi(optarg); break;
        case 'd': opt.depth = atoi(optarg); break;
        case 's': opt.size = (size_t)atol(optarg); break;
        case 'w': opt.warmup = atof(optarg); break;
        case 't': opt.duration = atof(optarg); break;
        case 'u': opt.upper = 1; break;
        case 'S': opt.src = atoi(optarg); break;
        case 'W': opt.window = atoi(optarg); break;
        case 'C': opt.connect_timeout = atof(optarg); break;
        case 'T': opt.conn_timeout = atof(optarg); break;
        case 'D': opt.drain_timeout = atof(optarg); break;
        case 'H': opt.hold_timeout = atof(optarg); break;
        case 'N': opt.spin = 0; break;
        case 'Y': opt.spin = atoi(optarg); break;
        case 'A': opt.auth_file = optarg; break;
        case 'L': opt.tls = 1; break;
        case 'R': opt.tls_ca = optarg; break;
        default: usage();
        }
    }
    if (opt.port <= 0 || opt.conns < 1 || opt.depth < 1 || opt.window < 1 ||
        opt.size > 0x7fffffffu || opt.src < 0 || opt.src > 250)
        usage();
#ifndef LOADGEN_TLS
    if (opt.tls) {
        fprintf(stderr, "loadgen: built without OpenSSL: --tls needs the loadgen-tls build\n");
        exit(2);
    }
#endif
}

/* The AUTH frame from the first token line of --auth-token-file (blank and # lines skipped). */
static void load_auth(void) {
    FILE *f = fopen(opt.auth_file, "r");
    if (!f) {
        fprintf(stderr, "loadgen: cannot open --auth-token-file: %s\n", strerror(errno));
        exit(2);
    }
    char line[1100];
    size_t n = 0;
    const char *tok = NULL;
    while (fgets(line, sizeof line, f)) {
        char *p = line, *end = line + strlen(line);
        while (p < end && (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n')) p++;
        while (end > p && (end[-1] == ' ' || end[-1] == '\t' || end[-1] == '\r' || end[-1] == '\n'))
            end--;
        if (p == end || *p == '#') continue;
        tok = p;
        n = (size_t)(end - p);
        break;
    }
    fclose(f);
    if (!tok || n > 1024) {
        fprintf(stderr, "loadgen: no usable token in --auth-token-file\n");
        exit(2);
    }
    uint32_t len = (uint32_t)(5 + n);
    auth_msg[0] = (unsigned char)(len >> 24);
    auth_msg[1] = (unsigned char)(len >> 16);
    auth_msg[2] = (unsigned char)(len >> 8);
    auth_msg[3] = (unsigned char)len;
    memcpy(auth_msg + 4, "AUTH ", 5);
    memcpy(auth_msg + 9, tok, n);
    auth_len = 4 + len;
    memset(line, 0, sizeof line);
}

static void make_pattern(void) {
    size_t n = opt.size + OFFSETS + 8;
    pat = malloc(n);
    expect = malloc(n);
    if (!pat || !expect) {
        perror("malloc");
        exit(2);
    }
    uint64_t x = 0x9e3779b97f4a7c15ull;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        pat[i] = (unsigned char)('a' + x % 26);
        expect[i] = opt.upper ? (unsigned char)(pat[i] - 'a' + 'A') : pat[i];
    }
    uint32_t len = (uint32_t)opt.size;
    hdr_req[0] = (unsigned char)(len >> 24);
    hdr_req[1] = (unsigned char)(len >> 16);
    hdr_req[2] = (unsigned char)(len >> 8);
    hdr_req[3] = (unsigned char)len;
}

static rlim_t raise_nofile(void) {
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    getrlimit(RLIMIT_NOFILE, &rl);
    return rl.rlim_cur;
}

static void print_common(const char *phase, long attempted, rlim_t nofile) {
    printf("{\"phase\":\"%s\",\"conns\":%d,\"attempted\":%ld,\"established\":%ld,"
           "\"failed\":%ld,\"closed\":%ld,\"error_frames\":%ld,\"mismatches\":%ld,"
           "\"nofile\":%llu,\"first_error\":\"%s\"",
           phase, opt.conns, attempted, n_established, n_failed, n_closed, n_error_frames,
           n_mismatch, (unsigned long long)nofile, first_error);
}

int main(int argc, char **argv) {
    parse_args(argc, argv);
    rlim_t nofile = raise_nofile();
    make_pattern();
    if (opt.auth_file) load_auth();
#ifdef LOADGEN_TLS
    if (opt.tls) setup_tls();
#endif
    conns = calloc((size_t)opt.conns, sizeof *conns);
    sent_at = calloc((size_t)opt.conns * (size_t)opt.depth, sizeof *sent_at);
    if (!conns || !sent_at) {
        perror("calloc");
        return 2;
    }
    for (int i = 0; i < opt.conns; i++) conns[i].fd = -1;
    ep = epoll_create1(EPOLL_CLOEXEC);
    struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons((uint16_t)opt.port)};
    if (inet_pton(AF_INET, opt.host, &dst.sin_addr) != 1) usage();

    long attempted = connect_phase(&dst, opt.hold);
    if (!opt.hold) {
        set_caps(NO_CAP, 0);
        run_phase(opt.warmup);
        /* The bench samples the server's CPU time at these two lines. */
        printf("{\"phase\":\"measure-start\"}\n");
        fflush(stdout);
        measuring = 1;
        double t0 = mono(), cpu0 = cpu_seconds();
        run_phase(opt.duration);
        double elapsed = mono() - t0, cpu = cpu_seconds() - cpu0;
        measuring = 0;
        printf("{\"phase\":\"measure-end\"}\n");
        fflush(stdout);
        set_caps(0, 1);
        long undrained = drain(opt.drain_timeout);
        print_common("done", attempted, nofile);
        printf(",\"depth\":%d,\"size\":%zu,\"elapsed\":%.4f,\"completed\":%llu,\"rps\":%.1f,"
               "\"gbps\":%.5f,\"p50_us\":%.2f,\"p99_us\":%.2f,\"p999_us\":%.2f,"
               "\"max_us\":%.2f,\"undrained\":%ld,\"cpu_s\":%.4f,\"spare\":%.4f",
               opt.depth, opt.size, elapsed, (unsigned long long)completed,
               (double)completed / elapsed, (double)bytes_in / elapsed / 1e9,
               percentile_us(0.50), percentile_us(0.99), percentile_us(0.999),
               percentile_us(1.0), undrained, cpu, spare / elapsed);
#ifdef LOADGEN_TLS
        if (opt.tls) print_tls();
#endif
        printf("}\n");
        int ok = !n_failed && !n_closed && !n_error_frames && !n_mismatch && !undrained;
        return ok ? 0 : 1;
    }
    print_common("ready", attempted, nofile);
    printf("}\n");
    fflush(stdout);
    struct pollfd pfd = {.fd = 0, .events = POLLIN};
    poll(&pfd, 1, (int)(opt.hold_timeout * 1000));
    long before = n_established - n_closed;
    now = mono();
    set_caps(1, 0);
    long unanswered = drain(opt.conn_timeout + opt.conns / 1000.0); /* threads are slow */
    long answered = 0;
    for (int i = 0; i < opt.conns; i++)
        if (conns[i].state == ST_READY && conns[i].recv_seq >= conns[i].cap) answered++;
    print_common("verified", attempted, nofile);
    printf(",\"held\":%ld,\"answered\":%ld,\"unanswered\":%ld}\n", before, answered, unanswered);
    fflush(stdout);
    return answered == before ? 0 : 1;
}
