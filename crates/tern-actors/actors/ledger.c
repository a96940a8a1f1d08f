/*
 * The bank ledger actor, in C (built for wasm32 by scripts/build-actors.sh
 * with clang --target=wasm32 and lld; no libc).
 *
 * Accounts 1..=1024, each a signed 64-bit balance, plus a journal of every
 * transfer (the state that makes it worth checkpointing). Messages, all
 * little-endian:
 *   op 1 deposit  {u8 op=1, pad[7], u64 account, i64 amount}   -> i64 balance
 *   op 2 transfer {u8 op=2, pad[7], u64 from, u64 to, i64 amount} -> i64 from's balance
 *        refused (reply -2) when `from` has less than `amount`
 *   op 3 balance  {u8 op=3, pad[7], u64 account}               -> i64 balance
 *   op 4 audit    {u8 op=4}  -> {i64 sum of balances, u64 transfers}
 * Money is neither made nor lost by transfers: the audit's sum is what was
 * deposited, wherever the actor ran.
 */
typedef unsigned long long u64;
typedef long long i64;
typedef unsigned char u8;

#define ACCOUNTS 1024
#define JOURNAL 16384

struct entry { u64 from, to; i64 amount; };

static i64 balances[ACCOUNTS + 1];
static struct entry journal[JOURNAL];
static u64 transfers;
static u8 inbox[256];

static u64 load64(const u8 *p) {
    u64 v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static void store64(u8 *p, u64 v) {
    for (int i = 0; i < 8; i++) { p[i] = (u8)v; v >>= 8; }
}

static int reply64(i64 v) {
    store64(inbox, (u64)v);
    return 8;
}

static int valid(u64 account) { return account >= 1 && account <= ACCOUNTS; }

__attribute__((export_name("tern_inbox"))) int tern_inbox(void) {
    return (int)(long)inbox;
}

__attribute__((export_name("tern_handle"))) int tern_handle(int len) {
    if (len < 1) return -1;
    switch (inbox[0]) {
    case 1: {
        if (len != 24) return -1;
        u64 a = load64(inbox + 8);
        if (!valid(a)) return -3;
        balances[a] += (i64)load64(inbox + 16);
        return reply64(balances[a]);
    }
    case 2: {
        if (len != 32) return -1;
        u64 from = load64(inbox + 8), to = load64(inbox + 16);
        i64 amount = (i64)load64(inbox + 24);
        if (!valid(from) || !valid(to) || amount < 0) return -3;
        if (balances[from] < amount) return -2;
        balances[from] -= amount;
        balances[to] += amount;
        struct entry *e = &journal[transfers % JOURNAL];
        e->from = from; e->to = to; e->amount = amount;
        transfers++;
        return reply64(balances[from]);
    }
    case 3: {
        if (len != 16) return -1;
        u64 a = load64(inbox + 8);
        if (!valid(a)) return -3;
        return reply64(balances[a]);
    }
    case 4: {
        i64 sum = 0;
        for (int a = 1; a <= ACCOUNTS; a++) sum += balances[a];
        store64(inbox, (u64)sum);
        store64(inbox + 8, transfers);
        return 16;
    }
    default:
        return -1;
    }
}
