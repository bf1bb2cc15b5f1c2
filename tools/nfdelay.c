/*
 * nfdelay: a delay line for the lab's router (tests/lab.py, Lab.set_delay).
 *
 * This kernel has no netem qdisc, but it has the xtables NFQUEUE target: a rule in the
 * router's mangle FORWARD chain hands every forwarded packet to a netlink queue, and
 * the packet waits in the kernel until a program gives its verdict.  nfdelay is that
 * program: it takes each packet's metadata (not its bytes: NFQNL_COPY_META), notes when
 * it is due (now + delay, plus a uniform jitter when asked) and accepts it when that time
 * comes.  The packets themselves never leave the kernel.
 *
 *   nfdelay --queue N --delay MS [--jitter MS] [--reorder] [--seed S]
 *
 * Each packet is delayed once, on its way through the router: a round trip through it
 * takes twice the delay.  With jitter, packets keep their order unless --reorder says a
 * packet may overtake an earlier one whose jitter was larger (a path with several
 * routes).  In order, a run of due packets is accepted with one batch verdict.
 *
 * The queue holds at most QUEUE_MAX packets; past that the kernel drops them, as a
 * router with a full buffer does.  Once bound it prints "nfdelay: queue N ready ..." on
 * standard output (the lab waits for that line before it adds the rule); SIGUSR1 prints
 * its counters on standard error, and SIGTERM or SIGINT accepts every packet still held,
 * prints the counters and exits 0.
 *
 * Build: gcc -O2 -Wall -o tools/build/nfdelay tools/nfdelay.c -lnetfilter_queue
 * (Debian: libnetfilter-queue-dev).  Run as root in the router's namespace.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <linux/netfilter.h>
#include <linux/netlink.h>
#include <sys/socket.h>
#include <libnetfilter_queue/libnetfilter_queue.h>

#define QUEUE_MAX 65536                 /* packets held in the kernel at once */
#define RCVBUF (32 << 20)               /* the netlink socket's receive buffer */

struct held {
    uint64_t due;                       /* CLOCK_MONOTONIC, ns */
    uint64_t seq;                       /* arrival order: ties keep it */
    uint32_t id;                        /* the kernel's packet id */
};

static struct held *heap;
static size_t nheld, capacity;
static uint64_t delay_ns, jitter_ns, last_due, arrivals;
static int reorder;
static uint64_t count_held, count_released, count_most, count_overruns;
static volatile sig_atomic_t stopping, report;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int earlier(const struct held *a, const struct held *b)
{
    return a->due < b->due || (a->due == b->due && a->seq < b->seq);
}

static void push(struct held item)
{
    if (nheld == capacity) {
        capacity = capacity ? capacity * 2 : 1024;
        heap = realloc(heap, capacity * sizeof *heap);
        if (!heap) {
            perror("nfdelay: realloc");
            exit(71);
        }
    }
    size_t i = nheld++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!earlier(&item, &heap[parent]))
            break;
        heap[i] = heap[parent];
        i = parent;
    }
    heap[i] = item;
    if (nheld > count_most)
        count_most = nheld;
}

static struct held pop(void)
{
    struct held top = heap[0], last = heap[--nheld];
    size_t i = 0;
    for (;;) {
        size_t child = 2 * i + 1;
        if (child >= nheld)
            break;
        if (child + 1 < nheld && earlier(&heap[child + 1], &heap[child]))
            child++;
        if (!earlier(&heap[child], &last))
            break;
        heap[i] = heap[child];
        i = child;
    }
    if (nheld)
        heap[i] = last;
    return top;
}

static uint64_t jitter(void)
{
    if (!jitter_ns)
        return 0;
    /* uniform in [0, jitter]: random() gives 31 bits */
    return (uint64_t)((double)random() / 2147483648.0 * (double)jitter_ns);
}

static int on_packet(struct nfq_q_handle *qh, struct nfgenmsg *msg, struct nfq_data *nfa,
                     void *data)
{
    (void)qh, (void)msg, (void)data;
    struct nfqnl_msg_packet_hdr *ph = nfq_get_msg_packet_hdr(nfa);
    if (!ph)
        return 0;
    uint64_t due = now_ns() + delay_ns + jitter();
    if (!reorder && due < last_due)
        due = last_due;                 /* in order: never before the one ahead */
    last_due = due;
    push((struct held){due, arrivals++, ntohl(ph->packet_id)});
    count_held++;
    return 0;
}

/* Accept the packets due by `now` (all of them when `all`). */
static void release(struct nfq_q_handle *qh, uint64_t now, int all)
{
    uint32_t run = 0;
    int pending = 0;
    while (nheld && (all || heap[0].due <= now)) {
        struct held item = pop();
        count_released++;
        if (reorder) {
            nfq_set_verdict(qh, item.id, NF_ACCEPT, 0, NULL);
        } else {
            run = item.id;              /* in order: one verdict for the run below */
            pending = 1;
        }
    }
    if (pending)
        nfq_set_verdict_batch(qh, run, NF_ACCEPT);
}

static void print_counters(const char *why)
{
    fprintf(stderr, "nfdelay: %s: held %llu, released %llu, holding %zu, most at once %llu, "
            "overruns %llu\n", why, (unsigned long long)count_held,
            (unsigned long long)count_released, nheld, (unsigned long long)count_most,
            (unsigned long long)count_overruns);
}

static void on_signal(int signum)
{
    if (signum == SIGUSR1)
        report = 1;
    else
        stopping = 1;
}

static double number(const char *option, const char *text)
{
    char *end;
    double value = strtod(text, &end);
    if (!*text || *end || value < 0 || value > 60000) {
        fprintf(stderr, "nfdelay: %s: expected milliseconds from 0 to 60000, got '%s'\n",
                option, text);
        exit(64);
    }
    return value;
}

static void usage(void)
{
    fprintf(stderr, "usage: nfdelay --queue N --delay MS [--jitter MS] [--reorder] "
            "[--seed S]\n");
    exit(64);
}

int main(int argc, char **argv)
{
    long queue = -1;
    double delay = -1, jitter_ms = 0;
    unsigned seed = 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--reorder")) {
            reorder = 1;
        } else if (i + 1 < argc && !strcmp(a, "--queue")) {
            queue = strtol(argv[++i], NULL, 10);
        } else if (i + 1 < argc && !strcmp(a, "--delay")) {
            delay = number(a, argv[++i]);
        } else if (i + 1 < argc && !strcmp(a, "--jitter")) {
            jitter_ms = number(a, argv[++i]);
        } else if (i + 1 < argc && !strcmp(a, "--seed")) {
            seed = (unsigned)strtoul(argv[++i], NULL, 10);
        } else {
            usage();
        }
    }
    if (queue < 0 || queue > 65535 || delay < 0)
        usage();
    delay_ns = (uint64_t)(delay * 1e6);
    jitter_ns = (uint64_t)(jitter_ms * 1e6);
    srandom(seed);

    struct nfq_handle *h = nfq_open();
    if (!h) {
        perror("nfdelay: nfq_open");
        return 71;
    }
    struct nfq_q_handle *qh = nfq_create_queue(h, (uint16_t)queue, on_packet, NULL);
    if (!qh) {
        fprintf(stderr, "nfdelay: cannot bind queue %ld: %s (root, and the nfnetlink_queue "
                "module?)\n", queue, strerror(errno));
        return 71;
    }
    if (nfq_set_mode(qh, NFQNL_COPY_META, 0) < 0 || nfq_set_queue_maxlen(qh, QUEUE_MAX) < 0) {
        perror("nfdelay: configuring the queue");
        return 71;
    }
    int fd = nfq_fd(h), one = 1, size = RCVBUF;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size);
    /* A full socket buffer loses queue messages (the packets stay held in the kernel until
     * the queue overflows); say so in the counters rather than fail the recv. */
    setsockopt(fd, SOL_NETLINK, NETLINK_NO_ENOBUFS, &one, sizeof one);

    struct sigaction sa = {0};
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGUSR1, &sa, NULL);
    sigset_t blocked, during;
    sigemptyset(&blocked);
    sigaddset(&blocked, SIGTERM);
    sigaddset(&blocked, SIGINT);
    sigaddset(&blocked, SIGUSR1);
    sigprocmask(SIG_BLOCK, &blocked, &during);  /* delivered only inside ppoll() */

    printf("nfdelay: queue %ld ready, delay %g ms, jitter %g ms%s\n", queue, delay, jitter_ms,
           reorder ? ", reordering" : "");
    fflush(stdout);

    static char buf[1 << 16] __attribute__((aligned));
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    while (!stopping) {
        uint64_t now = now_ns();
        release(qh, now, 0);
        struct timespec wait, *timeout = NULL;
        if (nheld) {
            uint64_t left = heap[0].due > now ? heap[0].due - now : 0;
            wait.tv_sec = (time_t)(left / 1000000000u);
            wait.tv_nsec = (long)(left % 1000000000u);
            timeout = &wait;
        }
        int ready = ppoll(&pfd, 1, timeout, &during);
        if (report) {
            report = 0;
            print_counters("now");
        }
        if (ready <= 0)
            continue;
        for (int n = 0; n < 256; n++) {     /* a bounded drain, then the due list again */
            ssize_t got = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
            if (got < 0) {
                if (errno == ENOBUFS) {
                    count_overruns++;
                    continue;
                }
                break;
            }
            nfq_handle_packet(h, buf, (int)got);
        }
    }
    release(qh, 0, 1);
    print_counters("stopping");
    nfq_destroy_queue(qh);
    nfq_close(h);
    free(heap);
    return 0;
}
