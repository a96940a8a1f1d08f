/*
 * tern's container workload for checkpoint/restore tests: state a
 * checkpoint must carry, in every form CRIU has to save.
 *
 * A parent and a child process share one page of anonymous shared memory.
 * Ten times a second the parent increments the counter in it and sends the
 * new value down a pipe; the child reads the pipe, checks the value against
 * the shared page (continuity: nothing lost, nothing repeated), appends it
 * to an open log file, and publishes it in /run/tern-counter. Any break
 * makes the child write /run/tern-broken and exit.
 *
 *   tern-counter [--listen PORT] [--dirty-mib N --rate-mib R]
 *
 * --listen: answers each line a TCP client sends with the current count
 *           (one connection at a time kept open across checkpoints).
 * --dirty-mib/--rate-mib: writes R MiB/s over an N MiB buffer, so a
 *           checkpoint has that much memory to move.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what) {
    int fd = open("/run/tern-broken", O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) {
        dprintf(fd, "%s: %s\n", what, strerror(errno));
        close(fd);
    }
    exit(1);
}

static void publish(uint64_t n) {
    char buf[32];
    int len = snprintf(buf, sizeof buf, "%llu\n", (unsigned long long)n);
    int fd = open("/run/tern-counter.new", O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || write(fd, buf, len) != len || close(fd) != 0)
        die("publish");
    if (rename("/run/tern-counter.new", "/run/tern-counter") != 0)
        die("rename");
}

/* The child: checks each value against the shared page, logs, publishes. */
static void follow(int rd, volatile uint64_t *shared) {
    int log = open("/run/tern-counter.log", O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (log < 0)
        die("log");
    uint64_t last = 0, n;
    for (;;) {
        ssize_t r = read(rd, &n, sizeof n);
        if (r == 0)
            exit(0);
        if (r != sizeof n)
            die("pipe");
        if (n != last + 1 || n > *shared) {
            errno = 0;
            die("counter broke");
        }
        last = n;
        dprintf(log, "%llu\n", (unsigned long long)n);
        publish(n);
    }
}

static int listener(int port) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) != 0 || listen(s, 8) != 0)
        die("listen");
    return s;
}

/* Answers every line waiting on `c` with the count; -1 when it closed. */
static int answer(int c, uint64_t n) {
    char in[256], out[32];
    ssize_t r = read(c, in, sizeof in);
    if (r <= 0)
        return -1;
    for (ssize_t i = 0; i < r; i++) {
        if (in[i] != '\n')
            continue;
        int len = snprintf(out, sizeof out, "%llu\n", (unsigned long long)n);
        if (write(c, out, len) != len)
            return -1;
    }
    return 0;
}

int main(int argc, char **argv) {
    int port = 0;
    size_t dirty_mib = 0, rate_mib = 0;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--listen"))
            port = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--dirty-mib"))
            dirty_mib = strtoul(argv[i + 1], 0, 10);
        else if (!strcmp(argv[i], "--rate-mib"))
            rate_mib = strtoul(argv[i + 1], 0, 10);
    }
    volatile uint64_t *shared =
        mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    int p[2];
    if (shared == MAP_FAILED || pipe(p) != 0)
        die("setup");
    pid_t child = fork();
    if (child < 0)
        die("fork");
    if (child == 0) {
        close(p[1]);
        follow(p[0], shared);
    }
    close(p[0]);
    signal(SIGPIPE, SIG_IGN);

    size_t dirty_len = dirty_mib << 20;
    unsigned char *dirty = dirty_len ? malloc(dirty_len) : 0;
    size_t cursor = 0, per_tick = (rate_mib << 20) / 10;
    int lst = port ? listener(port) : -1, conn = -1;
    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    for (uint64_t n = 1;; n++) {
        *shared = n;
        if (write(p[1], &n, sizeof n) != sizeof n)
            die("pipe write");
        for (size_t done = 0; dirty && done < per_tick; done += 4096) {
            dirty[cursor] = (unsigned char)n;
            cursor = (cursor + 4096) % dirty_len;
        }
        next.tv_nsec += 100 * 1000 * 1000;
        if (next.tv_nsec >= 1000000000) {
            next.tv_sec++;
            next.tv_nsec -= 1000000000;
        }
        /* Serve clients until the next tick. */
        for (;;) {
            struct timespec now;
            clock_gettime(CLOCK_MONOTONIC, &now);
            long ms = (next.tv_sec - now.tv_sec) * 1000 + (next.tv_nsec - now.tv_nsec) / 1000000;
            if (ms <= 0)
                break;
            struct pollfd fds[2] = {{.fd = lst, .events = POLLIN}, {.fd = conn, .events = POLLIN}};
            int r = poll(fds, 2, (int)ms);
            if (r < 0 && errno != EINTR)
                die("poll");
            if (r > 0 && (fds[0].revents & POLLIN)) {
                int c = accept(lst, 0, 0);
                if (c >= 0) {
                    if (conn >= 0)
                        close(conn);
                    conn = c;
                }
            }
            if (r > 0 && conn >= 0 && (fds[1].revents & (POLLIN | POLLHUP)) && answer(conn, n) < 0) {
                close(conn);
                conn = -1;
            }
        }
    }
}
