/*
 * udpgen: a closed-loop load generator for UDP echo servers.
 *
 * The idea: one thread, one epoll set, --socks connected UDP sockets, each
 * with one datagram in flight.  A request is --size bytes of a fixed
 * pseudo-random buffer of lowercase letters at an offset derived from
 * (socket, sequence number), so a reply is checked byte for byte without
 * storing what was sent; a reply to an earlier request of the same socket
 * (late, after its request was given up) is recognised as late, anything
 * else that does not match is corrupt.  A request with no reply after
 * --lost-ms is counted lost and the socket sends its next one: UDP loses
 * datagrams, and a load generator must not stall on one.
 *
 * Like loadgen it never sleeps in epoll_wait while loading: it polls, and
 * calls sched_yield when there is nothing to do ("spare": its headroom).
 * --warmup seconds of load, then --duration seconds measured, then one JSON
 * line on stdout:
 *   {"requests": N, "rps": R, "p50_us": A, "p99_us": B, "lost": L, "late": T,
 *    "corrupt": C, "spare": S, "cpu_s": U, "error": "..."}
 * The exit status is 0 only if nothing was corrupt and some replies came.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define OFFSETS 4096
#define LATE_WINDOW 8            /* earlier requests a late reply may belong to */
#define HIST_SUB 64
#define HIST_BUCKETS (HIST_SUB * 40)

struct sock { int fd; uint64_t seq; double sent_at; };

static struct { const char *host; int port, socks, size; double warmup, duration, lost_s; } o = {
    "127.0.0.1", 0, 100, 64, 1.0, 5.0, 0.2};
static struct sock *socks;
static unsigned char *pat;
static uint64_t completed, lost, late, corrupt, hist[HIST_BUCKETS];
static int measuring;
static double spare;

static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

static size_t payload_off(int s, uint64_t seq) {
    return (size_t)((s * 2654435761u + seq * 40503u) % OFFSETS);
}

static int hist_index(uint64_t v) {  /* v in ns: 64 linear buckets, then 64 per octave */
    if (v < HIST_SUB) return (int)v;
    int octave = 63 - __builtin_clzll(v) - 6;
    int idx = HIST_SUB + octave * HIST_SUB + (int)((v >> octave) & (HIST_SUB - 1));
    return idx < HIST_BUCKETS ? idx : HIST_BUCKETS - 1;
}

static double hist_value(int idx) {
    if (idx < HIST_SUB) return idx;
    int octave = (idx - HIST_SUB) / HIST_SUB;
    int sub = (idx - HIST_SUB) % HIST_SUB;
    return (double)((uint64_t)(HIST_SUB + sub) << octave);
}

static double percentile_us(double p) {
    uint64_t total = 0, seen = 0;
    for (int i = 0; i < HIST_BUCKETS; i++) total += hist[i];
    if (!total) return 0;
    uint64_t want = (uint64_t)(p * total);
    for (int i = 0; i < HIST_BUCKETS; i++) {
        seen += hist[i];
        if (seen > want) return hist_value(i) / 1000.0;
    }
    return hist_value(HIST_BUCKETS - 1) / 1000.0;
}

static void send_next(int s, double now) {
    struct sock *k = &socks[s];
    k->sent_at = now;
    /* A full buffer (ENOBUFS, EAGAIN) counts as lost once --lost-ms passes. */
    (void)send(k->fd, pat + payload_off(s, k->seq), o.size, 0);
}

static void on_reply(int s, const unsigned char *buf, ssize_t n, double now) {
    struct sock *k = &socks[s];
    if (n == o.size && !memcmp(buf, pat + payload_off(s, k->seq), o.size)) {
        if (measuring) {
            completed++;
            hist[hist_index((uint64_t)((now - k->sent_at) * 1e9))]++;
        }
        k->seq++;
        send_next(s, now);
        return;
    }
    for (uint64_t back = 1; back <= LATE_WINDOW && back <= k->seq; back++)
        if (n == o.size && !memcmp(buf, pat + payload_off(s, k->seq - back), o.size)) {
            late++;
            return;
        }
    corrupt++;
}

int main(int argc, char **argv) {
    static struct option opts[] = {
        {"host", required_argument, 0, 'h'}, {"port", required_argument, 0, 'p'},
        {"socks", required_argument, 0, 'c'}, {"size", required_argument, 0, 's'},
        {"warmup", required_argument, 0, 'w'}, {"duration", required_argument, 0, 'd'},
        {"lost-ms", required_argument, 0, 'l'}, {0, 0, 0, 0}};
    for (int c; (c = getopt_long(argc, argv, "", opts, NULL)) != -1;) {
        switch (c) {
        case 'h': o.host = optarg; break;
        case 'p': o.port = atoi(optarg); break;
        case 'c': o.socks = atoi(optarg); break;
        case 's': o.size = atoi(optarg); break;
        case 'w': o.warmup = atof(optarg); break;
        case 'd': o.duration = atof(optarg); break;
        case 'l': o.lost_s = atof(optarg) / 1000.0; break;
        default: return 2;
        }
    }
    if (o.port <= 0 || o.socks <= 0 || o.size <= 0 || o.size > 65507) {
        fprintf(stderr, "udpgen: --port, --socks and --size (1..65507) are needed\n");
        return 2;
    }
    pat = malloc(OFFSETS + o.size);
    uint32_t x = 12345;
    for (int i = 0; i < OFFSETS + o.size; i++) {
        x = x * 1103515245u + 12345u;
        pat[i] = 'a' + (x >> 16) % 26;
    }
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(o.port)};
    inet_pton(AF_INET, o.host, &to.sin_addr);
    int ep = epoll_create1(0);
    socks = calloc(o.socks, sizeof *socks);
    double now = mono();
    for (int s = 0; s < o.socks; s++) {
        int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
        if (fd < 0 || connect(fd, (struct sockaddr *)&to, sizeof to) < 0) {
            perror("udpgen: socket");
            return 1;
        }
        socks[s].fd = fd;
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)s};
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
        send_next(s, now);
    }
    double start = now, measure_at = start + o.warmup, end = measure_at + o.duration;
    double cpu0 = 0, last_sweep = now;
    unsigned char buf[65536];
    struct epoll_event evs[256];
    while ((now = mono()) < end) {
        if (!measuring && now >= measure_at) {
            measuring = 1;
            cpu0 = cpu_seconds();
        }
        int n = epoll_wait(ep, evs, 256, 0);
        if (n <= 0) {
            double t = mono();
            sched_yield();
            if (measuring) spare += mono() - t;
        }
        now = mono();
        for (int i = 0; i < n; i++) {
            int s = (int)evs[i].data.u32;
            ssize_t got;
            while ((got = recv(socks[s].fd, buf, sizeof buf, 0)) >= 0) on_reply(s, buf, got, now);
        }
        if (now - last_sweep > 0.005) {  /* requests with no reply: lost, send the next */
            last_sweep = now;
            for (int s = 0; s < o.socks; s++)
                if (now - socks[s].sent_at > o.lost_s) {
                    if (measuring) lost++;
                    socks[s].seq++;
                    send_next(s, now);
                }
        }
    }
    double cpu = measuring ? cpu_seconds() - cpu0 : 0;
    printf("{\"requests\": %llu, \"rps\": %.1f, \"p50_us\": %.1f, \"p99_us\": %.1f, "
           "\"lost\": %llu, \"late\": %llu, \"corrupt\": %llu, \"spare\": %.3f, \"cpu_s\": %.3f}\n",
           (unsigned long long)completed, completed / o.duration, percentile_us(0.50),
           percentile_us(0.99), (unsigned long long)lost, (unsigned long long)late,
           (unsigned long long)corrupt, spare / o.duration, cpu);
    return corrupt == 0 && completed > 0 ? 0 : 1;
}
