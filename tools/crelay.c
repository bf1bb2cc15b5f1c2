/*
 * crelay: the C baseline and the traffic tools of tools/bench_relay.py.
 *
 * Built by the benchmark with `gcc -O2 -Wall -Wextra -o tools/build/crelay tools/crelay.c`.
 * One mode per run; every address is 127.0.0.1; arguments are key=value; port=0 binds
 * any free port.  Each server mode prints "READY <port>..." on stdout once its sockets
 * are bound, and on SIGUSR1 the relays (fused, relay, expose) print
 * "FLOWS <flows> <refused> <malformed> <send drops>".  Each traffic mode prints "START"
 * when its measured interval begins and "STOP key=value ..." when it ends, then exits by
 * itself after linger=SECONDS (default 5; the benchmark reads the relay's CPU times while
 * the clients still exist, then kills it).  Sockets bound to a port (public, register,
 * loaders, echo, sinks) get 4 MiB buffers, as udpmux's do; per-flow sockets towards the
 * service keep the defaults, as udpmux expose's do.
 *
 * THE BASELINES (what udpmux is compared with)
 *
 *   fused public=PORT service=PORT [max_flows=N]
 *     One process doing what udpmux's relay + exposer pair does, minus the hop between
 *     them and the authentication:
 *       - epoll on the public socket and on every per-client socket; no logging at all;
 *       - public socket readable: up to 8 recvmmsg() calls of 64 datagrams per wake-up;
 *         each datagram's source address is looked up in an open-addressing hash table
 *         (client address -> flow); a new client gets a flow and its own UDP socket,
 *         connected to the service (so the service sees one source port per client, as
 *         with udpmux expose); consecutive datagrams of one flow in a batch are sent with
 *         one sendmmsg() on that flow's socket, straight from the receive buffers;
 *       - a client socket readable: up to 64 datagrams per wake-up taken with recvmmsg()
 *         straight into the outgoing batch, which goes back to the clients from the public
 *         socket by sendmmsg() (64 at a time, and at the end of every epoll round);
 *       - per flow: last-seen time and datagram/byte counters, updated per datagram;
 *       - no idle expiry and no eviction: flows live until exit, and when the table is
 *         full (max_flows, default 262144) or a socket cannot be opened, a new client's
 *         datagrams are dropped (counted).
 *
 *   relay public=PORT register=PORT [max_flows=N]      (the "C split" relay half)
 *   expose relay=PORT service=PORT [max_flows=N]       (the "C split" exposer half)
 *     The same topology as udpmux relay + udpmux expose, two processes with udpmux's
 *     20-byte header between them (version 1, type DATA, flags KEYED, session, tag,
 *     64-bit nonce) and a 16-byte MAC slot after the datagram, which is written as zeros
 *     and never checked: everything udpmux does on the path except computing and checking
 *     MACs (and the replay window).
 *       relay:  public socket -> look the client up (hash table, as in fused) -> write the
 *               header in front of the datagram in the receive buffer, zero the MAC slot
 *               -> sendmmsg() to the exposer from the register socket; register socket ->
 *               check version, type, session, length -> the tag names the flow (tag =
 *               flow index + 1) -> sendmmsg() the body to the client from the public
 *               socket.  The exposer's address is the source of the last HELLO-typed
 *               message on the register socket (no handshake).
 *       expose: sends one HELLO, then: relay socket -> check the header -> tag -> flow
 *               (hash table keyed by tag; a new tag opens a socket connected to the
 *               service) -> sendmmsg() of consecutive same-flow bodies on the flow's
 *               socket; a flow socket readable -> recvmmsg() into the outgoing batch with
 *               20 bytes of headroom, header and MAC slot written in place -> sendmmsg()
 *               to the relay.
 *     Pointed at a sink instead of an exposer (`sink hello=REGISTER_PORT` registers the
 *     sink), `relay` is the one-way "relay half" of figure 4: a tag table and one upstream
 *     socket, so it holds any number of flows without a descriptor per flow.
 *
 * THE TRAFFIC TOOLS (not measured; they run on the other CPU)
 *
 *   echo port=PORT
 *       recvmmsg()/sendmmsg() echo, 64 at a time.
 *   sink port=PORT [hello=P]  or  sink fd=N
 *       Counts datagrams (recvmmsg, 64 at a time).  hello=P: first send one HELLO header to
 *       127.0.0.1:P, which registers the sink with a C relay as its exposer; fd=N: count on
 *       an inherited socket (bench_relay.py's stand-in udpmux exposer).  Prints
 *       "COUNT <datagrams> <bytes>" on SIGUSR1, and on SIGTERM before it exits.
 *   load port=P flows=F size=S window=W warmup=S seconds=S count=N
 *       Closed-loop throughput: F connected client sockets send S-byte datagrams, up to
 *       64 (and W/F) per sendmmsg(), socket after socket, keeping at most W datagrams
 *       outstanding (sent, not answered, not declared lost; one still unanswered 50 ms
 *       after it was sent is lost, replies being taken as first in, first out); replies
 *       taken with recvmmsg().  Prints START after `warmup` seconds, STOP after `seconds`
 *       more (or after N datagrams) with what was sent, received and lost in between.
 *   latency port=P flows=F size=S rate=R warmup=S seconds=S
 *       Open-loop, paced: one datagram every 1/R seconds, round robin over F sockets, each
 *       carrying its send time (CLOCK_MONOTONIC) and a sequence number; the round-trip
 *       time of every reply to a datagram sent in the measured interval is kept; STOP
 *       reports percentiles in microseconds and how many were lost.
 *   raw port=P flows=F size=S rate=R warmup=S seconds=S
 *       One-way, paced, from F distinct client addresses without F descriptors: one
 *       IPPROTO_RAW socket (send only, IP_HDRINCL implied) writes whole IPv4/UDP packets
 *       from 127.1.0.0 + i, port 40000 (i = 0..F-1, round robin) to 127.0.0.1:P.  Every
 *       millisecond on average (0.5-1.5 ms at random, so that the load never locks to the
 *       scheduler tick that samples CPU times) it sends what the rate says is due, 64 per
 *       sendmmsg().  count=N stops after N datagrams in all (0: no bound but time).  STOP
 *       reports the datagrams sent in the measured interval and in all.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/ip.h>
#include <netinet/udp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64                        /* datagrams per recvmmsg()/sendmmsg() */
#define DRAIN_ROUNDS 8                  /* batches per socket per wake-up (as udpmux) */
#define FLOW_DRAIN 64                   /* datagrams per flow socket per wake-up (as udpmux) */
#define SLOT (65536 + 64)               /* any UDP datagram whole, with headroom */
#define HEADER 20                       /* udpmux's header */
#define MAC 16                          /* udpmux's MAC slot */
#define SOCKBUF (4 << 20)
#define T_HELLO 0x01
#define T_DATA 0x10
#define FLAG_KEYED 0x0001
#define SESSION_ID 0x5EC0DE01u          /* the one session of the C split pair */
#define LOOPBACK 0x7F000001u
#define RAW_BASE 0x7F010000u            /* raw mode's first client address, 127.1.0.0 */
#define RAW_SPORT 40000

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "crelay: ");
    vfprintf(stderr, fmt, ap);
    if (errno)
        fprintf(stderr, ": %s", strerror(errno));
    fprintf(stderr, "\n");
    va_end(ap);
    exit(2);
}

/* ------------------------------------------------------------------ arguments */

static int g_argc;
static char **g_argv;

static const char *arg(const char *key, const char *dflt)
{
    size_t n = strlen(key);
    for (int i = 2; i < g_argc; i++)
        if (!strncmp(g_argv[i], key, n) && g_argv[i][n] == '=')
            return g_argv[i] + n + 1;
    if (!dflt) {
        errno = 0;
        die("missing %s=", key);
    }
    return dflt;
}

static long arg_long(const char *key, const char *dflt) { return strtol(arg(key, dflt), NULL, 10); }
static double arg_double(const char *key, const char *dflt) { return strtod(arg(key, dflt), NULL); }

/* ------------------------------------------------------------------ time, sockets */

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + ts.tv_nsec;
}

static struct sockaddr_in loopback(int port)
{
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(LOOPBACK);
    return a;
}

static void buffers(int fd)
{
    int size = SOCKBUF;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
}

/* A non-blocking UDP socket on 127.0.0.1:port (0: any), big buffers. */
static int bound_socket(int port)
{
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die("socket");
    buffers(fd);
    struct sockaddr_in a = loopback(port);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0)
        die("bind 127.0.0.1:%d", port);
    return fd;
}

static int port_of(int fd)
{
    struct sockaddr_in a;
    socklen_t len = sizeof a;
    getsockname(fd, (struct sockaddr *)&a, &len);
    return ntohs(a.sin_port);
}

static void connect_to(int fd, const struct sockaddr_in *a)
{
    if (connect(fd, (const struct sockaddr *)a, sizeof *a) < 0)
        die("connect");
}

static void epoll_add(int ep, int fd, uint64_t data)
{
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = data};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0)
        die("epoll_ctl");
}

/* ------------------------------------------------------------------ batches */

/* `n` slots of SLOT bytes; recv[] receives at slot + headroom (names into names[],
 * or no names), send[] sends iov_send[] (filled by the caller) to names[] or to the
 * connected peer. */
struct batch {
    unsigned char *buf;
    size_t headroom;
    struct iovec iov_recv[BATCH], iov_send[BATCH];
    struct sockaddr_in names[BATCH];
    struct mmsghdr recv[BATCH], send[BATCH];
    int n;                              /* datagrams queued in send[] */
};

static void batch_init(struct batch *b, size_t headroom, int recv_names, int send_names)
{
    memset(b, 0, sizeof *b);
    b->buf = aligned_alloc(64, (size_t)BATCH * SLOT);
    if (!b->buf)
        die("out of memory");
    b->headroom = headroom;
    for (int i = 0; i < BATCH; i++) {
        b->iov_recv[i].iov_base = b->buf + (size_t)i * SLOT + headroom;
        b->iov_recv[i].iov_len = SLOT - headroom - MAC;
        b->recv[i].msg_hdr.msg_iov = &b->iov_recv[i];
        b->recv[i].msg_hdr.msg_iovlen = 1;
        if (recv_names) {
            b->recv[i].msg_hdr.msg_name = &b->names[i];
            b->recv[i].msg_hdr.msg_namelen = sizeof b->names[i];
        }
        b->send[i].msg_hdr.msg_iov = &b->iov_send[i];
        b->send[i].msg_hdr.msg_iovlen = 1;
        if (send_names) {
            b->send[i].msg_hdr.msg_name = &b->names[i];
            b->send[i].msg_hdr.msg_namelen = sizeof b->names[i];
        }
    }
}

static inline unsigned char *slot(struct batch *b, int i) { return b->buf + (size_t)i * SLOT; }

/* recvmmsg() up to `max` datagrams into slots from..from+max-1; returns how many. */
static int batch_recv(struct batch *b, int fd, int from, int max)
{
    for (int i = from; i < from + max; i++)
        b->recv[i].msg_hdr.msg_namelen = sizeof b->names[i];
    int n = recvmmsg(fd, b->recv + from, max, MSG_DONTWAIT, NULL);
    return n < 0 ? 0 : n;
}

static uint64_t g_send_drops;

/* sendmmsg() of send[from..from+n-1]; what the kernel refuses is dropped and counted. */
static void send_all(int fd, struct mmsghdr *msgs, int n)
{
    while (n > 0) {
        int sent = sendmmsg(fd, msgs, n, MSG_DONTWAIT);
        if (sent <= 0) {
            if (sent < 0 && errno == EINTR)
                continue;
            if (sent < 0 && errno != EAGAIN && errno != ENOBUFS) {
                /* an error for the first datagram only (ICMP): skip it, send the rest */
                g_send_drops++;
                msgs++;
                n--;
                continue;
            }
            g_send_drops += n;
            return;
        }
        msgs += sent;
        n -= sent;
    }
}

/* ------------------------------------------------------------------ flow table */

struct flow {
    uint64_t key;                       /* client address (fused, relay) or tag (expose) */
    struct sockaddr_in addr;            /* the client's address (fused, relay) */
    int fd;                             /* the socket towards the service (fused, expose) */
    uint32_t tag;
    uint64_t last_seen, pkts_in, bytes_in, pkts_out, bytes_out;
};

static struct flow *flows;
static uint32_t nflows, max_flows;
static int32_t *slots_;                 /* open addressing: flow index or -1 */
static uint32_t slot_mask;
static uint64_t g_refused;              /* datagrams of new flows that could not be opened */

static void table_init(void)
{
    max_flows = arg_long("max_flows", "262144");
    uint32_t size = 1;
    while (size < 2 * max_flows)
        size <<= 1;
    slot_mask = size - 1;
    slots_ = malloc(sizeof *slots_ * size);
    flows = calloc(max_flows, sizeof *flows);
    if (!slots_ || !flows)
        die("out of memory");
    memset(slots_, 0xff, sizeof *slots_ * size);
}

static inline uint32_t hash64(uint64_t key)
{
    return (uint32_t)((key * 0x9E3779B97F4A7C15ull) >> 32);
}

static inline uint64_t addr_key(const struct sockaddr_in *a)
{
    return ((uint64_t)a->sin_addr.s_addr << 16) | a->sin_port;
}

/* The flow for key, or -1 with *hole set to where a new one goes. */
static inline int32_t table_find(uint64_t key, uint32_t *hole)
{
    uint32_t h = hash64(key) & slot_mask;
    for (;;) {
        int32_t f = slots_[h];
        if (f < 0) {
            *hole = h;
            return -1;
        }
        if (flows[f].key == key)
            return f;
        h = (h + 1) & slot_mask;
    }
}

/* A new flow at hole, or -1 when the table is full. */
static int32_t table_insert(uint32_t hole, uint64_t key)
{
    if (nflows >= max_flows)
        return -1;
    int32_t f = nflows++;
    memset(&flows[f], 0, sizeof flows[f]);
    flows[f].key = key;
    flows[f].fd = -1;
    flows[f].tag = f + 1;
    slots_[hole] = f;
    return f;
}

/* A socket connected to the service for flow f, registered with epoll (data = f). */
static int flow_socket(int ep, int32_t f, const struct sockaddr_in *service)
{
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    if (connect(fd, (const struct sockaddr *)service, sizeof *service) < 0) {
        close(fd);
        return -1;
    }
    epoll_add(ep, fd, (uint64_t)f);
    flows[f].fd = fd;
    return fd;
}

/* ------------------------------------------------------------------ header */

struct header {
    uint8_t version, type;
    uint16_t flags;
    uint32_t session, tag;
    uint64_t nonce;
} __attribute__((packed));

static uint64_t g_nonce;

static inline void write_header(unsigned char *p, uint8_t type, uint32_t tag, size_t body)
{
    struct header *h = (struct header *)p;
    h->version = 1;
    h->type = type;
    h->flags = htons(FLAG_KEYED);
    h->session = htonl(SESSION_ID);
    h->tag = htonl(tag);
    h->nonce = htobe64(++g_nonce);
    memset(p + HEADER + body, 0, MAC);  /* the MAC slot: not computed */
}

/* The tag of a DATA message of length len, or 0 if it is not one (counted). */
static uint64_t g_bad;

static inline uint32_t check_data(const unsigned char *p, size_t len)
{
    const struct header *h = (const struct header *)p;
    if (len < HEADER + MAC || h->version != 1 || h->type != T_DATA
        || h->flags != htons(FLAG_KEYED) || h->session != htonl(SESSION_ID)) {
        g_bad++;
        return 0;
    }
    return ntohl(h->tag);
}

/* ------------------------------------------------------------------ shared server parts */

static volatile sig_atomic_t g_stop, g_report;

static void on_signal(int sig)
{
    if (sig == SIGUSR1)
        g_report = 1;
    else
        g_stop = 1;
}

/* SIGUSR1 makes a server print "FLOWS <flows> <refused> <bad> <send drops>" (sink: COUNT);
 * no SA_RESTART, so a blocking wait ends with EINTR and the loop notices at once. */
static sigset_t g_waitmask;              /* the mask while waiting: SIGUSR1 let through */

static void report_on_usr1(void)
{
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGUSR1, &sa, NULL);
    sigset_t usr1;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    sigprocmask(SIG_BLOCK, &usr1, &g_waitmask);    /* blocked except inside epoll_pwait */
    sigdelset(&g_waitmask, SIGUSR1);
}

static void maybe_report(void)
{
    if (g_report) {
        g_report = 0;
        printf("FLOWS %u %llu %llu %llu\n", nflows, (unsigned long long)g_refused,
               (unsigned long long)g_bad, (unsigned long long)g_send_drops);
        fflush(stdout);
    }
}

/* Datagrams waiting on flow f's service socket go into `out` (headroom already set),
 * addressed to the flow's client (names) or to the connected relay; a full batch is sent
 * on out_fd.  framed: write the udpmux header and MAC slot around each body. */
static void drain_flow(int32_t f, struct batch *out, int out_fd, int framed)
{
    struct flow *fl = &flows[f];
    int taken = 0;
    while (taken < FLOW_DRAIN) {
        if (out->n == BATCH) {
            send_all(out_fd, out->send, out->n);
            out->n = 0;
        }
        int room = BATCH - out->n;
        if (room > FLOW_DRAIN - taken)
            room = FLOW_DRAIN - taken;
        int n = batch_recv(out, fl->fd, out->n, room);
        if (n == 0)
            break;
        for (int i = out->n; i < out->n + n; i++) {
            size_t len = out->recv[i].msg_len;
            if (framed) {
                write_header(slot(out, i), T_DATA, fl->tag, len);
                out->iov_send[i].iov_base = slot(out, i);
                out->iov_send[i].iov_len = HEADER + len + MAC;
            } else {
                out->names[i] = fl->addr;
                out->iov_send[i].iov_base = out->iov_recv[i].iov_base;
                out->iov_send[i].iov_len = len;
            }
            fl->pkts_out++;
            fl->bytes_out += len;
        }
        out->n += n;
        taken += n;
        if (n < room)
            break;
    }
}

static void flush(struct batch *out, int fd)
{
    if (out->n) {
        send_all(fd, out->send, out->n);
        out->n = 0;
    }
}

/* Send run [start, end) of `fwd` on flow f's socket. */
static inline void send_run(int32_t f, struct mmsghdr *fwd, int start, int end)
{
    if (f >= 0 && end > start)
        send_all(flows[f].fd, fwd + start, end - start);
}

/* ------------------------------------------------------------------ fused */

static _Noreturn void run_fused(void)
{
    struct sockaddr_in service = loopback(arg_long("service", NULL));
    int pub = bound_socket(arg_long("public", "0"));
    table_init();
    int ep = epoll_create1(EPOLL_CLOEXEC);
    epoll_add(ep, pub, UINT64_MAX);
    static struct batch in, back;
    batch_init(&in, 0, 1, 0);           /* from clients; forwarded on connected sockets */
    batch_init(&back, 0, 0, 1);         /* from the service; sent to clients by name */
    printf("READY %d\n", port_of(pub));
    fflush(stdout);
    report_on_usr1();
    struct epoll_event evs[256];
    for (;;) {
        maybe_report();
        int ne = epoll_pwait(ep, evs, 256, -1, &g_waitmask);
        for (int e = 0; e < ne; e++) {
            uint64_t id = evs[e].data.u64;
            if (id != UINT64_MAX) {
                drain_flow((int32_t)id, &back, pub, 0);
                continue;
            }
            for (int round = 0; round < DRAIN_ROUNDS; round++) {
                int n = batch_recv(&in, pub, 0, BATCH);
                if (!n)
                    break;
                uint64_t now = now_ns();
                int32_t run = -1;
                int run_start = 0, k = 0;
                for (int i = 0; i < n; i++) {
                    uint32_t hole;
                    uint64_t key = addr_key(&in.names[i]);
                    int32_t f = table_find(key, &hole);
                    if (f < 0) {
                        f = table_insert(hole, key);
                        if (f >= 0) {
                            flows[f].addr = in.names[i];
                            if (flow_socket(ep, f, &service) < 0) {
                                /* undo: the client is refused until a socket opens */
                                slots_[hole] = -1;
                                nflows--;
                                f = -1;
                            }
                        }
                        if (f < 0) {
                            g_refused++;
                            continue;
                        }
                    }
                    size_t len = in.recv[i].msg_len;
                    struct flow *fl = &flows[f];
                    fl->last_seen = now;
                    fl->pkts_in++;
                    fl->bytes_in += len;
                    if (f != run) {
                        send_run(run, in.send, run_start, k);
                        run = f;
                        run_start = k;
                    }
                    in.iov_send[k].iov_base = in.iov_recv[i].iov_base;
                    in.iov_send[k].iov_len = len;
                    k++;
                }
                send_run(run, in.send, run_start, k);
                if (n < BATCH)
                    break;
            }
        }
        flush(&back, pub);
    }
}

/* ------------------------------------------------------------------ split: relay half */

static _Noreturn void run_relay(void)
{
    int pub = bound_socket(arg_long("public", "0"));
    int reg = bound_socket(arg_long("register", "0"));
    table_init();
    int ep = epoll_create1(EPOLL_CLOEXEC);
    epoll_add(ep, pub, 0);
    epoll_add(ep, reg, 1);
    static struct batch in, back;
    batch_init(&in, HEADER, 1, 1);      /* from clients, header written in the headroom */
    batch_init(&back, 0, 1, 1);         /* from the exposer, bodies sent to clients */
    struct sockaddr_in exposer;
    int have_exposer = 0;
    printf("READY %d %d\n", port_of(pub), port_of(reg));
    fflush(stdout);
    report_on_usr1();
    struct epoll_event evs[4];
    for (;;) {
        maybe_report();
        int ne = epoll_pwait(ep, evs, 4, -1, &g_waitmask);
        for (int e = 0; e < ne; e++) {
            if (evs[e].data.u64 == 0) {
                for (int round = 0; round < DRAIN_ROUNDS; round++) {
                    int n = batch_recv(&in, pub, 0, BATCH);
                    if (!n)
                        break;
                    uint64_t now = now_ns();
                    int k = 0;
                    for (int i = 0; i < n; i++) {
                        uint32_t hole;
                        uint64_t key = addr_key(&in.names[i]);
                        int32_t f = table_find(key, &hole);
                        if (f < 0) {
                            f = table_insert(hole, key);
                            if (f < 0) {
                                g_refused++;
                                continue;
                            }
                            flows[f].addr = in.names[i];
                        }
                        if (!have_exposer) {
                            g_refused++;
                            continue;
                        }
                        size_t len = in.recv[i].msg_len;
                        struct flow *fl = &flows[f];
                        fl->last_seen = now;
                        fl->pkts_in++;
                        fl->bytes_in += len;
                        write_header(slot(&in, i), T_DATA, fl->tag, len);
                        in.iov_send[k].iov_base = slot(&in, i);
                        in.iov_send[k].iov_len = HEADER + len + MAC;
                        in.send[k].msg_hdr.msg_name = &exposer;
                        in.send[k].msg_hdr.msg_namelen = sizeof exposer;
                        k++;
                    }
                    send_all(reg, in.send, k);
                    if (n < BATCH)
                        break;
                }
            } else {
                for (int round = 0; round < DRAIN_ROUNDS; round++) {
                    int n = batch_recv(&back, reg, 0, BATCH);
                    if (!n)
                        break;
                    uint64_t now = now_ns();
                    int k = 0;
                    for (int i = 0; i < n; i++) {
                        unsigned char *p = back.iov_recv[i].iov_base;
                        size_t len = back.recv[i].msg_len;
                        if (len >= HEADER && p[0] == 1 && p[1] == T_HELLO) {
                            exposer = back.names[i];
                            have_exposer = 1;
                            continue;
                        }
                        uint32_t tag = check_data(p, len);
                        if (tag == 0 || tag > nflows) {
                            g_bad++;
                            continue;
                        }
                        struct flow *fl = &flows[tag - 1];
                        size_t body = len - HEADER - MAC;
                        fl->last_seen = now;
                        fl->pkts_out++;
                        fl->bytes_out += body;
                        /* send[k] goes to names[k]: the client's address */
                        back.names[k] = fl->addr;
                        back.iov_send[k].iov_base = p + HEADER;
                        back.iov_send[k].iov_len = body;
                        k++;
                    }
                    send_all(pub, back.send, k);
                    if (n < BATCH)
                        break;
                }
            }
        }
    }
}

/* ------------------------------------------------------------------ split: exposer half */

static _Noreturn void run_expose(void)
{
    struct sockaddr_in relay = loopback(arg_long("relay", NULL));
    struct sockaddr_in service = loopback(arg_long("service", NULL));
    int rel = bound_socket(0);
    connect_to(rel, &relay);
    table_init();
    int ep = epoll_create1(EPOLL_CLOEXEC);
    epoll_add(ep, rel, UINT64_MAX);
    static struct batch in, out;
    batch_init(&in, 0, 0, 0);           /* from the relay; bodies sent on flow sockets */
    batch_init(&out, HEADER, 0, 0);     /* from the service; framed, sent to the relay */
    unsigned char hello[HEADER + MAC];
    write_header(hello, T_HELLO, 0, 0);
    if (send(rel, hello, sizeof hello, 0) < 0)
        die("send HELLO");
    printf("READY %d\n", port_of(rel));
    fflush(stdout);
    report_on_usr1();
    struct epoll_event evs[256];
    for (;;) {
        maybe_report();
        int ne = epoll_pwait(ep, evs, 256, -1, &g_waitmask);
        for (int e = 0; e < ne; e++) {
            uint64_t id = evs[e].data.u64;
            if (id != UINT64_MAX) {
                drain_flow((int32_t)id, &out, rel, 1);
                continue;
            }
            for (int round = 0; round < DRAIN_ROUNDS; round++) {
                int n = batch_recv(&in, rel, 0, BATCH);
                if (!n)
                    break;
                uint64_t now = now_ns();
                int32_t run = -1;
                int run_start = 0, k = 0;
                for (int i = 0; i < n; i++) {
                    unsigned char *p = in.iov_recv[i].iov_base;
                    size_t len = in.recv[i].msg_len;
                    uint32_t tag = check_data(p, len);
                    if (!tag)
                        continue;
                    uint32_t hole;
                    int32_t f = table_find(tag, &hole);
                    if (f < 0) {
                        f = table_insert(hole, tag);
                        if (f >= 0) {
                            flows[f].tag = tag;
                            if (flow_socket(ep, f, &service) < 0) {
                                slots_[hole] = -1;
                                nflows--;
                                f = -1;
                            }
                        }
                        if (f < 0) {
                            g_refused++;
                            continue;
                        }
                    }
                    struct flow *fl = &flows[f];
                    size_t body = len - HEADER - MAC;
                    fl->last_seen = now;
                    fl->pkts_in++;
                    fl->bytes_in += body;
                    if (f != run) {
                        send_run(run, in.send, run_start, k);
                        run = f;
                        run_start = k;
                    }
                    in.iov_send[k].iov_base = p + HEADER;
                    in.iov_send[k].iov_len = body;
                    k++;
                }
                send_run(run, in.send, run_start, k);
                if (n < BATCH)
                    break;
            }
        }
        flush(&out, rel);
    }
}

/* ------------------------------------------------------------------ echo, sink */

static _Noreturn void run_echo(void)
{
    int fd = bound_socket(arg_long("port", "0"));
    int fl = fcntl(fd, F_GETFL);
    fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
    static struct batch b;
    batch_init(&b, 0, 1, 1);
    printf("READY %d\n", port_of(fd));
    fflush(stdout);
    for (;;) {
        for (int i = 0; i < BATCH; i++)
            b.recv[i].msg_hdr.msg_namelen = sizeof b.names[i];
        int n = recvmmsg(fd, b.recv, BATCH, MSG_WAITFORONE, NULL);
        if (n <= 0)
            continue;
        for (int i = 0; i < n; i++) {
            b.iov_send[i].iov_base = b.iov_recv[i].iov_base;
            b.iov_send[i].iov_len = b.recv[i].msg_len;
        }
        send_all(fd, b.send, n);
    }
}


static int run_sink(void)
{
    int fd;
    const char *inherited = arg("fd", "");
    if (*inherited) {
        fd = atoi(inherited);
    } else {
        fd = bound_socket(arg_long("port", "0"));
        long hello_port = arg_long("hello", "0");
        if (hello_port) {
            struct sockaddr_in to = loopback(hello_port);
            unsigned char hello[HEADER + MAC];
            write_header(hello, T_HELLO, 0, 0);
            sendto(fd, hello, sizeof hello, 0, (struct sockaddr *)&to, sizeof to);
        }
    }
    int fl = fcntl(fd, F_GETFL);
    fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
    /* wake up now and then, so a SIGTERM between two checks is never missed */
    struct timeval tv = {.tv_sec = 0, .tv_usec = 100000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    struct sigaction sa = {.sa_handler = on_signal};     /* no SA_RESTART: EINTR ends the wait */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGUSR1, &sa, NULL);
    static struct batch b;
    batch_init(&b, 0, 0, 0);
    printf("READY %d\n", port_of(fd));
    fflush(stdout);
    uint64_t count = 0, bytes = 0;
    while (!g_stop) {
        if (g_report) {
            g_report = 0;
            printf("COUNT %llu %llu\n", (unsigned long long)count, (unsigned long long)bytes);
            fflush(stdout);
        }
        int n = recvmmsg(fd, b.recv, BATCH, MSG_WAITFORONE, NULL);
        if (n <= 0)
            continue;
        count += n;
        for (int i = 0; i < n; i++)
            bytes += b.recv[i].msg_len;
    }
    printf("COUNT %llu %llu\n", (unsigned long long)count, (unsigned long long)bytes);
    fflush(stdout);
    return 0;
}

/* ------------------------------------------------------------------ loaders */

static int *client_sockets(int n, int port)
{
    struct sockaddr_in target = loopback(port);
    int *fds = malloc(sizeof *fds * n);
    for (int i = 0; i < n; i++) {
        fds[i] = bound_socket(0);
        connect_to(fds[i], &target);
    }
    return fds;
}

static void say(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    fflush(stdout);
}

/* After STOP a loader keeps its sockets open for `linger` seconds (default 5) or until it
 * is killed, so that the relay behind it sees no client vanish (socat's children exit when
 * theirs does) before the benchmark has read the relay's CPU times. */
static void linger(void)
{
    double seconds = arg_double("linger", "5");
    struct timespec ts = {.tv_sec = (time_t)seconds,
                          .tv_nsec = (long)((seconds - (time_t)seconds) * 1e9)};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

#define LOSS_NS 50000000ull             /* a datagram unanswered this long is lost */
#define RING 65536

static int run_load(void)
{
    int port = arg_long("port", NULL), nf = arg_long("flows", "8");
    int size = arg_long("size", "64"), window = arg_long("window", "512");
    double warmup = arg_double("warmup", "0.5"), seconds = arg_double("seconds", "2");
    long long max_count = atoll(arg("count", "100000000"));
    if (size < 16 || size > SLOT - 64)
        die("size: 16..%d", SLOT - 64);
    int *fds = client_sockets(nf, port);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    for (int i = 0; i < nf; i++)
        epoll_add(ep, fds[i], i);
    static struct batch b;
    batch_init(&b, 0, 0, 0);
    unsigned char *payload = calloc(1, size);
    for (int i = 0; i < BATCH; i++) {
        b.iov_send[i].iov_base = payload;
        b.iov_send[i].iov_len = size;
    }
    /* ring of (time, datagrams sent by then), for declaring losses */
    uint64_t *ring_t = malloc(sizeof(uint64_t) * RING), *ring_c = malloc(sizeof(uint64_t) * RING);
    unsigned head = 0, tail = 0;
    uint64_t sent = 0, recvd = 0, lost = 0;
    uint64_t t0 = now_ns(), t_start = t0 + (uint64_t)(warmup * 1e9);
    uint64_t t_end = t_start + (uint64_t)(seconds * 1e9);
    uint64_t sent0 = 0, recvd0 = 0, lost0 = 0, started = 0, now = t0;
    int rr = 0, per_flow = window / nf;
    if (per_flow < 1)
        per_flow = 1;
    if (per_flow > BATCH)
        per_flow = BATCH;
    struct epoll_event evs[1024];
    for (;;) {
        now = now_ns();
        if (!started && now >= t_start) {
            started = now;
            sent0 = sent;
            recvd0 = recvd;
            lost0 = lost;
            say("START\n");
        }
        if (now >= t_end || (started && (long long)(sent - sent0) >= max_count))
            break;
        /* losses: whatever was sent more than LOSS_NS ago and is not answered */
        while (tail != head && ring_t[tail % RING] + LOSS_NS < now) {
            uint64_t due = ring_c[tail % RING];
            if (due > recvd + lost)
                lost = due - recvd;
            tail++;
        }
        long outstanding = (long)(sent - recvd - lost);
        if (outstanding < 0)
            outstanding = 0;
        long room = window - outstanding;
        while (room > 0) {
            int n = room < per_flow ? room : per_flow;
            int s = sendmmsg(fds[rr], b.send, n, MSG_DONTWAIT);
            rr = (rr + 1) % nf;
            if (s <= 0)
                break;
            sent += s;
            room -= s;
            if (head - tail < RING) {
                ring_t[head % RING] = now;
                ring_c[head % RING] = sent;
                head++;
            }
        }
        int ne = epoll_wait(ep, evs, 1024, room > 0 ? 0 : 1);
        for (int e = 0; e < ne; e++) {
            int fd = fds[evs[e].data.u64];
            for (;;) {
                int n = recvmmsg(fd, b.recv, BATCH, MSG_DONTWAIT, NULL);
                if (n <= 0)
                    break;
                recvd += n;
                if (n < BATCH)
                    break;
            }
        }
    }
    double secs = (now - started) / 1e9;
    say("STOP seconds=%.6f sent=%llu received=%llu lost=%llu\n", secs,
        (unsigned long long)(sent - sent0), (unsigned long long)(recvd - recvd0),
        (unsigned long long)(lost - lost0));
    linger();
    return 0;
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static double pct(uint32_t *v, size_t n, double p)
{
    if (!n)
        return -1;
    size_t i = (size_t)(p * (n - 1) + 0.5);
    return v[i] / 1000.0;
}

static int run_latency(void)
{
    int port = arg_long("port", NULL), nf = arg_long("flows", "8");
    int size = arg_long("size", "64");
    double rate = arg_double("rate", "10000");
    double warmup = arg_double("warmup", "0.3"), seconds = arg_double("seconds", "2");
    if (size < 16 || size > 65000)
        die("size: 16..65000");
    prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);
    int *fds = client_sockets(nf, port);
    struct pollfd *pfds = calloc(nf, sizeof *pfds);
    for (int i = 0; i < nf; i++) {
        pfds[i].fd = fds[i];
        pfds[i].events = POLLIN;
    }
    unsigned char *out = calloc(1, size), *in = calloc(1, 65536);
    size_t cap = (size_t)(rate * seconds * 1.05) + 1024, nrtt = 0;
    uint32_t *rtts = malloc(sizeof *rtts * cap);
    uint64_t interval = (uint64_t)(1e9 / rate);
    uint64_t t0 = now_ns(), t_start = t0 + (uint64_t)(warmup * 1e9);
    uint64_t t_end = t_start + (uint64_t)(seconds * 1e9), t_drain = t_end + 200000000ull;
    uint64_t next = t0, seq = 0, sent_win = 0, started = 0, late = 0;
    for (;;) {
        uint64_t now = now_ns();
        if (!started && now >= t_start) {
            started = 1;
            say("START\n");
        }
        if (now >= t_drain || (now >= t_end && nrtt >= sent_win))
            break;
        if (now < t_end && now >= next) {
            memcpy(out, &now, 8);
            memcpy(out + 8, &seq, 8);
            if (send(fds[seq % nf], out, size, MSG_DONTWAIT) == size && now >= t_start)
                sent_win++;
            seq++;
            next += interval;
            if (next + 1000000 < now) {         /* more than 1 ms behind: no burst */
                late++;
                next = now + interval;
            }
            continue;
        }
        uint64_t until = now < t_end ? next : t_drain;
        struct timespec ts = {.tv_sec = (until - now) / 1000000000u,
                              .tv_nsec = (until - now) % 1000000000u};
        if (ppoll(pfds, nf, &ts, NULL) <= 0)
            continue;
        for (int i = 0; i < nf; i++) {
            if (!(pfds[i].revents & POLLIN))
                continue;
            for (;;) {
                ssize_t n = recv(fds[i], in, 65536, MSG_DONTWAIT);
                if (n < 16)
                    break;
                uint64_t sent_at, t = now_ns();
                memcpy(&sent_at, in, 8);
                if (sent_at >= t_start && sent_at < t_end && nrtt < cap)
                    rtts[nrtt++] = (uint32_t)(t - sent_at);
            }
        }
    }
    qsort(rtts, nrtt, sizeof *rtts, cmp_u32);
    double sum = 0;
    for (size_t i = 0; i < nrtt; i++)
        sum += rtts[i];
    say("STOP sent=%llu received=%zu late=%llu mean=%.1f p50=%.1f p90=%.1f p99=%.1f "
        "p999=%.1f max=%.1f\n", (unsigned long long)sent_win, nrtt, (unsigned long long)late,
        nrtt ? sum / nrtt / 1000.0 : -1.0, pct(rtts, nrtt, 0.5), pct(rtts, nrtt, 0.9),
        pct(rtts, nrtt, 0.99), pct(rtts, nrtt, 0.999), pct(rtts, nrtt, 1.0));
    linger();
    return 0;
}

static int run_raw(void)
{
    int port = arg_long("port", NULL);
    long nf = arg_long("flows", "1"), size = arg_long("size", "64");
    double rate = arg_double("rate", "50000");
    double warmup = arg_double("warmup", "0.5"), seconds = arg_double("seconds", "2");
    uint64_t count = (uint64_t)atoll(arg("count", "0"));       /* 0: no bound but time */
    if (nf < 1 || nf > 0xFE0000)
        die("flows: 1..%d", 0xFE0000);
    if (size < 16 || size > 65000)
        die("size: 16..65000");
    prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);
    int fd = socket(AF_INET, SOCK_RAW | SOCK_CLOEXEC, IPPROTO_RAW);   /* send only */
    if (fd < 0)
        die("raw socket (needs CAP_NET_RAW)");
    int sndbuf = SOCKBUF;
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
    size_t plen = sizeof(struct iphdr) + sizeof(struct udphdr) + size;
    unsigned char *pkts = calloc(BATCH, plen);
    struct iovec iov[BATCH];
    struct mmsghdr msgs[BATCH];
    struct sockaddr_in dst = loopback(port);
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < BATCH; i++) {
        unsigned char *p = pkts + i * plen;
        struct iphdr *ip = (struct iphdr *)p;
        struct udphdr *udp = (struct udphdr *)(p + sizeof *ip);
        ip->version = 4;
        ip->ihl = 5;
        ip->tot_len = htons(plen);      /* filled in by the kernel anyway */
        ip->ttl = 64;
        ip->protocol = IPPROTO_UDP;
        ip->daddr = htonl(LOOPBACK);    /* checksum and id: filled in by the kernel */
        udp->source = htons(RAW_SPORT);
        udp->dest = htons(port);
        udp->len = htons(sizeof *udp + size);
        udp->check = 0;                 /* no checksum (IPv4 allows it) */
        iov[i].iov_base = p;
        iov[i].iov_len = plen;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_name = &dst;
        msgs[i].msg_hdr.msg_namelen = sizeof dst;
    }
    uint64_t t0 = now_ns(), t_start = t0 + (uint64_t)(warmup * 1e9);
    uint64_t t_end = t_start + (uint64_t)(seconds * 1e9);
    uint64_t sent = 0, sent0 = 0, started = 0, failed = 0, now = t0;
    uint64_t tick = t0;
    for (;;) {
        now = now_ns();
        if (!started && now >= t_start) {
            started = now;
            sent0 = sent;
            say("START\n");
        }
        if (now >= t_end || (count && sent >= count))
            break;
        uint64_t due = (uint64_t)((now - t0) / 1e9 * rate);
        if (count && due > count)
            due = count;
        while (sent < due) {
            int n = due - sent < BATCH ? (int)(due - sent) : BATCH;
            for (int i = 0; i < n; i++) {
                struct iphdr *ip = (struct iphdr *)(pkts + i * plen);
                ip->saddr = htonl(RAW_BASE + (uint32_t)((sent + i) % nf));
                memcpy(pkts + i * plen + sizeof(struct iphdr) + sizeof(struct udphdr),
                       &sent, sizeof sent);
            }
            int s = sendmmsg(fd, msgs, n, 0);
            if (s <= 0) {               /* no room: skip what is due rather than burst */
                failed += n;
                sent += n;
                continue;
            }
            sent += s;
        }
        /* every millisecond on average, at random: a period locked to the scheduler
         * tick (4 ms) would bias the tick-sampled CPU times of whoever we wake */
        tick += 500000 + (uint64_t)(random() % 1000000);
        if (tick < now)
            tick = now;
        struct timespec ts = {.tv_sec = tick / 1000000000u, .tv_nsec = tick % 1000000000u};
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
    }
    say("STOP seconds=%.6f sent=%llu failed=%llu total=%llu\n", (now - started) / 1e9,
        (unsigned long long)(sent - sent0), (unsigned long long)failed,
        (unsigned long long)sent);
    linger();
    return 0;
}

/* ------------------------------------------------------------------ main */

int main(int argc, char **argv)
{
    g_argc = argc;
    g_argv = argv;
    signal(SIGPIPE, SIG_IGN);
    if (argc < 2) {
        fprintf(stderr, "usage: crelay fused|relay|expose|echo|sink|load|latency|raw key=value...\n"
                        "(see the comment at the top of tools/crelay.c)\n");
        return 64;
    }
    const char *mode = argv[1];
    if (!strcmp(mode, "fused"))
        run_fused();
    if (!strcmp(mode, "relay"))
        run_relay();
    if (!strcmp(mode, "expose"))
        run_expose();
    if (!strcmp(mode, "echo"))
        run_echo();
    if (!strcmp(mode, "sink"))
        return run_sink();
    if (!strcmp(mode, "load"))
        return run_load();
    if (!strcmp(mode, "latency"))
        return run_latency();
    if (!strcmp(mode, "raw"))
        return run_raw();
    fprintf(stderr, "crelay: unknown mode %s\n", mode);
    return 64;
}
