/*
 * tern-load: the workload inside tern's Linux test guests (runs as /init of
 * the initramfs, built static with the host's gcc by scripts/guest-kernel.sh).
 *
 * It keeps rewriting a working set at a set rate and reports on the serial
 * console, one line per tick:
 *
 *   tern-load tick=T sum=S ok=1
 *
 * Every page of the working set always holds a pattern that is a pure
 * function of (page, tick that last wrote it), and which tick last wrote a
 * page follows from T alone. So `sum` (a checksum the guest computes from its
 * memory) is a pure function of T and the parameters, and `ok` says whether
 * every page held exactly what it must. tern checks both after a migration:
 * the counter continues and memory is what it was at switchover. The same
 * formula lives in Rust (tern_drivers::qemu::load::expected_sum).
 *
 * Parameters come from the kernel command line (unknown `k=v` words become
 * init's environment): tern_ws_mib (16), tern_dirty_mib (8, MiB/s written),
 * tern_tick_ms (100), tern_verify_every (10 ticks; 0 never).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include <sys/reboot.h>

#define PAGE 4096u
#define WORDS (PAGE / 8u)

static uint64_t env_u64(const char *name, uint64_t dflt) {
    const char *v = getenv(name);
    return v && *v ? strtoull(v, NULL, 10) : dflt;
}

/* Word w of page p as written at tick t (splitmix64 of the three). */
static inline uint64_t pattern(uint64_t p, uint64_t t, uint64_t w) {
    uint64_t z = (p << 40) ^ (t << 12) ^ w;
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* The tick that last wrote page p once `tick` ticks of `per_tick` pages have
 * run round-robin over n pages (tick 0 wrote every page). */
static uint64_t last_tick(uint64_t p, uint64_t tick, uint64_t per_tick, uint64_t n) {
    uint64_t writes = tick * per_tick;
    if (writes <= p) return 0;
    uint64_t g = p + ((writes - 1 - p) / n) * n; /* last global write index of p */
    return g / per_tick + 1;
}

static void write_page(uint64_t *page, uint64_t p, uint64_t t) {
    for (uint64_t w = 0; w < WORDS; w++) page[w] = pattern(p, t, w);
}

static uint64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int main(void) {
    uint64_t ws_mib = env_u64("tern_ws_mib", 16);
    uint64_t dirty_mib = env_u64("tern_dirty_mib", 8);
    uint64_t tick_ms = env_u64("tern_tick_ms", 100);
    uint64_t verify_every = env_u64("tern_verify_every", 10);
    if (ws_mib == 0) ws_mib = 1;
    if (tick_ms == 0) tick_ms = 100;
    uint64_t n = ws_mib * 1024 * 1024 / PAGE;
    uint64_t per_tick = dirty_mib * 1024 * 1024 / PAGE * tick_ms / 1000;
    if (per_tick == 0) per_tick = 1;
    if (per_tick > n) per_tick = n;
    uint64_t *ws = mmap(NULL, n * PAGE, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (ws == MAP_FAILED) {
        printf("tern-load failed: cannot map %llu MiB\n", (unsigned long long)ws_mib);
        fflush(stdout);
        reboot(RB_POWER_OFF);
        return 1;
    }
    for (uint64_t p = 0; p < n; p++) write_page(ws + p * WORDS, p, 0);
    printf("tern-load ready ws_mib=%llu pages_per_tick=%llu tick_ms=%llu\n",
           (unsigned long long)ws_mib, (unsigned long long)per_tick,
           (unsigned long long)tick_ms);
    fflush(stdout);
    uint64_t next = now_ms() + tick_ms, cursor = 0;
    for (uint64_t tick = 1;; tick++) {
        for (uint64_t i = 0; i < per_tick; i++) {
            write_page(ws + cursor * WORDS, cursor, tick);
            cursor = cursor + 1 == n ? 0 : cursor + 1;
        }
        if (verify_every && tick % verify_every == 0) {
            uint64_t sum = 0;
            int ok = 1;
            for (uint64_t p = 0; p < n; p++) {
                uint64_t t = last_tick(p, tick, per_tick, n);
                const uint64_t *page = ws + p * WORDS;
                for (uint64_t w = 0; w < WORDS; w++) {
                    uint64_t v = page[w];
                    if (v != pattern(p, t, w)) ok = 0;
                    sum = (sum ^ v) * 0x100000001b3ull;
                }
            }
            printf("tern-load tick=%llu sum=%016llx ok=%d\n", (unsigned long long)tick,
                   (unsigned long long)sum, ok);
        } else {
            printf("tern-load tick=%llu\n", (unsigned long long)tick);
        }
        fflush(stdout);
        uint64_t now = now_ms();
        if (next > now) usleep((useconds_t)((next - now) * 1000));
        next += tick_ms;
        if (next < now) next = now; /* fell behind (paused): do not burst */
    }
}
