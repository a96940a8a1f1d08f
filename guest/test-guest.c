/*
 * tern's test guest: a freestanding 64-bit program that tern-vmm loads as an
 * ELF and enters in long mode (flat segments, identity-mapped first GiB, a
 * stack). It uses only instructions KVM's emulator handles, so it runs on
 * hosts without hardware virtualization (PVM) as well.
 *
 * It reports through two port-I/O devices:
 *   serial 0x3f8   text lines ("tern-guest: ready", ...)
 *   agent  0x510-0x513   32-bit writes: counter lo/hi (hi commits),
 *                        checksum lo/hi (hi commits a report)
 *   i8042  0x64          0xfe: pulse the reset line (ends the VM)
 * Parameters sit at PARAMS (written by the monitor before entry).
 */
typedef unsigned long u64;
typedef unsigned int u32;

#define SERIAL 0x3f8
#define AGENT_COUNTER_LO 0x510
#define AGENT_COUNTER_HI 0x511
#define AGENT_SUM_LO 0x512
#define AGENT_SUM_HI 0x513
#define PARAMS 0x6000UL

struct params {
    u64 magic;              /* 0x7465726e67756573 "ternguest" */
    u64 ws_base;            /* working set start (guest physical) */
    u64 ws_pages;           /* working set size in 4 KiB pages */
    u64 pages_per_tick;     /* pages dirtied between counter reports */
    u64 ticks_per_sum;      /* counter reports between checksums */
    u64 exit_after;         /* reset through the i8042 after this many reports (0: never) */
};

static inline void outb(unsigned short port, unsigned char v) {
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}
static inline void outl(unsigned short port, u32 v) {
    __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port));
}
static void puts(const char *s) {
    while (*s)
        outb(SERIAL, (unsigned char)*s++);
}
static void report(unsigned short lo, unsigned short hi, u64 v) {
    outl(lo, (u32)v);
    outl(hi, (u32)(v >> 32));
}

/* FNV-1a over the working set, one 64-bit word per page slot we write. */
static u64 checksum(volatile u64 *ws, u64 pages) {
    u64 h = 0xcbf29ce484222325UL;
    for (u64 p = 0; p < pages; p++) {
        h ^= ws[p * 512];
        h *= 0x100000001b3UL;
        h ^= ws[p * 512 + 511];
        h *= 0x100000001b3UL;
    }
    return h;
}

void _start(void) {
    volatile struct params *prm = (volatile struct params *)PARAMS;
    if (prm->magic != 0x7465726e67756573UL) {
        puts("tern-guest: bad parameters\n");
        for (;;)
            __asm__ volatile("hlt");
    }
    volatile u64 *ws = (volatile u64 *)prm->ws_base;
    u64 pages = prm->ws_pages, per_tick = prm->pages_per_tick, per_sum = prm->ticks_per_sum;
    u64 exit_after = prm->exit_after;
    puts("tern-guest: ready\n");
    u64 counter = 0, next = 0;
    for (;;) {
        counter++;
        /* Dirty `per_tick` pages, round robin: first and last word of each. */
        for (u64 i = 0; i < per_tick; i++) {
            ws[next * 512] = counter ^ (next << 32);
            ws[next * 512 + 511] = ~counter;
            next = next + 1 == pages ? 0 : next + 1;
        }
        report(AGENT_COUNTER_LO, AGENT_COUNTER_HI, counter);
        if (per_sum && counter % per_sum == 0)
            report(AGENT_SUM_LO, AGENT_SUM_HI, checksum(ws, pages));
        if (exit_after && counter == exit_after) {
            puts("tern-guest: done, resetting\n");
            outb(0x64, 0xfe);
        }
    }
}
