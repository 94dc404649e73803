/*
 * cudpecho: the limit for UDP echo.  One socket, recvmmsg / sendmmsg.
 *
 * The idea: take up to 64 datagrams per system call with recvmmsg (the
 * batch muxsrv reads per wake-up, one call instead of 64), and send every
 * one back to its sender with one sendmmsg, straight from the buffers they
 * arrived in.  The socket is blocking: MSG_WAITFORONE sleeps until the first
 * datagram and then takes whatever else is queued.  A reply the kernel will
 * not take is dropped, as UDP allows.  SIGTERM ends it with status 0.
 *
 *   cudpecho [--host 127.0.0.1] [--port 0]
 *   prints "cudpecho: listening on HOST:PORT" on stderr once ready.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define BATCH 64
#define DGRAM 65536

static volatile sig_atomic_t stop;

static void on_term(int sig) { (void)sig; stop = 1; }

int main(int argc, char **argv) {
    const char *host = "127.0.0.1";
    int port = 0;
    static struct option opts[] = {
        {"host", required_argument, 0, 'h'}, {"port", required_argument, 0, 'p'}, {0, 0, 0, 0}};
    for (int c; (c = getopt_long(argc, argv, "", opts, NULL)) != -1;) {
        if (c == 'h') host = optarg;
        else if (c == 'p') port = atoi(optarg);
        else return 2;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_term;  /* no SA_RESTART: recvmmsg returns EINTR */
    sigaction(SIGTERM, &sa, NULL);

    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (fd < 0 || inet_pton(AF_INET, host, &addr.sin_addr) != 1 ||
        bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        perror("cudpecho: bind");
        return 1;
    }
    socklen_t len = sizeof addr;
    getsockname(fd, (struct sockaddr *)&addr, &len);
    fprintf(stderr, "cudpecho: listening on %s:%d\n", host, ntohs(addr.sin_port));

    static char bufs[BATCH][DGRAM];
    static struct sockaddr_in from[BATCH];
    static struct iovec iov[BATCH];
    static struct mmsghdr msgs[BATCH];
    while (!stop) {
        for (int i = 0; i < BATCH; i++) {
            iov[i].iov_base = bufs[i];
            iov[i].iov_len = DGRAM;
            msgs[i].msg_hdr = (struct msghdr){.msg_name = &from[i], .msg_namelen = sizeof from[i],
                                              .msg_iov = &iov[i], .msg_iovlen = 1};
        }
        int n = recvmmsg(fd, msgs, BATCH, MSG_WAITFORONE, NULL);
        if (n < 0) {
            if (errno == EINTR) continue;
            perror("cudpecho: recvmmsg");
            return 1;
        }
        for (int i = 0; i < n; i++) iov[i].iov_len = msgs[i].msg_len;  /* echo what came */
        for (int sent = 0; sent < n;) {
            int m = sendmmsg(fd, msgs + sent, n - sent, 0);
            if (m < 0) {
                if (errno == EINTR) continue;
                break;  /* EAGAIN or an error: the rest is lost, as UDP may */
            }
            sent += m;
        }
    }
    return 0;
}
