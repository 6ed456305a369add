/*
 * memcheck: the test guest's memory checker.
 *
 * Fills N MiB of anonymous memory with a seeded pattern, then verifies it forever, printing on stdout
 * (the serial console):
 *
 *   MEMCHECK start mib=N pages=P seed=S mode=M buffer=0xADDR
 *   HEARTBEAT <counter> t=<seconds since start>     at least every ~50 ms, also mid-pass
 *   FILLED pages=P seconds=T                         once, after the first fill
 *   OK pass=N                                        after each clean verification pass
 *   FAIL page=P word=W expected=0x... got=0x...      a wrong word (at most MAX_FAIL_LINES per pass)
 *   FAIL pass=N bad_pages=M                          after a pass that found wrong pages
 *
 * Every 8-byte word of page p holds base(seed, p, generation) + word_index * STEP, so a page that is
 * stale (older generation), zero, or belongs elsewhere (other index or seed) is detected. In mode
 * "write" each pass is followed by rewriting one slice of the buffer with the next generation.
 * nbd_postcopy/guest.py mirrors the pattern (expected_page) and the line formats.
 *
 * Parameters come from the kernel command line (memcheck.mib=N memcheck.seed=S memcheck.mode=idle|write)
 * and may be overridden by arguments of the form key=value (mib=, seed=, mode=, passes=), which lets the
 * host run it as a normal program in tests. passes=0 (the default) means forever.
 */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE_SIZE 4096UL
#define WORDS_PER_PAGE (PAGE_SIZE / 8)
#define STEP 0x9E3779B97F4A7C15ULL
#define HEARTBEAT_NS 50000000LL /* 50 ms */
#define TICK_PAGES 16           /* look at the clock every this many pages */
#define SLICES 16               /* write mode rewrites 1/SLICES of the buffer per pass */
#define MAX_FAIL_LINES 8
#define RESERVE_MIB 48          /* left to the kernel when mib is not given */

static uint64_t seed = 1;
static unsigned long mib;
static int write_mode;
static unsigned long passes;

static struct timespec start_time;
static long long last_heartbeat_ns = -HEARTBEAT_NS;
static unsigned long heartbeat_counter;

static void say(const char *fmt, ...)
{
    char line[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if (n > (int)sizeof line - 2)
        n = sizeof line - 2;
    line[n++] = '\n';
    for (int off = 0; off < n;) {
        ssize_t w = write(1, line + off, n - off);
        if (w <= 0)
            return;
        off += w;
    }
}

static long long elapsed_ns(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (now.tv_sec - start_time.tv_sec) * 1000000000LL + (now.tv_nsec - start_time.tv_nsec);
}

static void tick(void)
{
    long long now = elapsed_ns();
    if (now - last_heartbeat_ns < HEARTBEAT_NS)
        return;
    last_heartbeat_ns = now;
    say("HEARTBEAT %lu t=%lld.%03lld", ++heartbeat_counter, now / 1000000000LL, now / 1000000LL % 1000);
}

/* splitmix64's finaliser: a bijective mix of 64 bits. */
static uint64_t mix(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xBF58476D1CE4E5B9ULL;
    x ^= x >> 27;
    x *= 0x94D049BB133111EBULL;
    x ^= x >> 31;
    return x;
}

/* Odd, so that no page of the pattern is all zeros. */
static uint64_t page_base(uint64_t page, uint64_t generation)
{
    return mix(seed ^ mix(page ^ mix(generation + STEP))) | 1;
}

static void fill_page(uint64_t *words, uint64_t page, uint64_t generation)
{
    uint64_t value = page_base(page, generation);
    for (unsigned long i = 0; i < WORDS_PER_PAGE; i++, value += STEP)
        words[i] = value;
}

/* Returns 1 when the page is right; otherwise reports the first wrong word (while lines remain). */
static int check_page(const uint64_t *words, uint64_t page, uint64_t generation, int report)
{
    uint64_t value = page_base(page, generation);
    for (unsigned long i = 0; i < WORDS_PER_PAGE; i++, value += STEP) {
        if (words[i] != value) {
            if (report)
                say("FAIL page=%llu word=%lu expected=0x%016llx got=0x%016llx", (unsigned long long)page, i,
                    (unsigned long long)value, (unsigned long long)words[i]);
            return 0;
        }
    }
    return 1;
}

static unsigned long default_mib(void)
{
    FILE *f = fopen("/proc/meminfo", "r");
    unsigned long total_kib = 0, available_kib = 0;
    char line[128];
    if (f) {
        while (fgets(line, sizeof line, f)) {
            sscanf(line, "MemTotal: %lu kB", &total_kib);
            sscanf(line, "MemAvailable: %lu kB", &available_kib);
        }
        fclose(f);
    }
    unsigned long by_total = total_kib / 1024 > RESERVE_MIB ? total_kib / 1024 - RESERVE_MIB : 0;
    unsigned long by_available = available_kib / 1024 > 16 ? available_kib / 1024 - 16 : 0;
    unsigned long n = by_total < by_available ? by_total : by_available;
    return n ? n : 1;
}

static void set_option(const char *key, const char *value)
{
    if (!strcmp(key, "mib"))
        mib = strtoul(value, NULL, 0);
    else if (!strcmp(key, "seed"))
        seed = strtoull(value, NULL, 0);
    else if (!strcmp(key, "mode"))
        write_mode = !strcmp(value, "write");
    else if (!strcmp(key, "passes"))
        passes = strtoul(value, NULL, 0);
    else
        say("MEMCHECK ignoring unknown option %s=%s", key, value);
}

static void parse_token(char *token, const char *prefix)
{
    size_t plen = strlen(prefix);
    if (strncmp(token, prefix, plen))
        return;
    char *eq = strchr(token + plen, '=');
    if (!eq)
        return;
    *eq = 0;
    set_option(token + plen, eq + 1);
}

static void parse_kernel_cmdline(void)
{
    static char cmdline[4096];
    FILE *f = fopen("/proc/cmdline", "r");
    if (!f)
        return;
    size_t n = fread(cmdline, 1, sizeof cmdline - 1, f);
    fclose(f);
    cmdline[n] = 0;
    for (char *save, *tok = strtok_r(cmdline, " \n", &save); tok; tok = strtok_r(NULL, " \n", &save))
        parse_token(tok, "memcheck.");
}

int main(int argc, char **argv)
{
    clock_gettime(CLOCK_MONOTONIC, &start_time);
    parse_kernel_cmdline();
    for (int i = 1; i < argc; i++)
        parse_token(argv[i], "");
    if (!mib)
        mib = default_mib();

    uint64_t pages = mib * (1024 * 1024 / PAGE_SIZE);
    uint64_t *buffer = mmap(NULL, pages * PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buffer == MAP_FAILED) {
        say("MEMCHECK cannot allocate %lu MiB", mib);
        return 1;
    }
    say("MEMCHECK start mib=%lu pages=%llu seed=%llu mode=%s buffer=%p", mib, (unsigned long long)pages,
        (unsigned long long)seed, write_mode ? "write" : "idle", (void *)buffer);

    uint64_t slice_pages = (pages + SLICES - 1) / SLICES;
    uint64_t generation[SLICES] = {0};

    for (uint64_t p = 0; p < pages; p++) {
        if (p % TICK_PAGES == 0)
            tick();
        fill_page(buffer + p * WORDS_PER_PAGE, p, 0);
    }
    long long filled = elapsed_ns();
    say("FILLED pages=%llu seconds=%lld.%03lld", (unsigned long long)pages, filled / 1000000000LL,
        filled / 1000000LL % 1000);

    for (unsigned long pass = 1; !passes || pass <= passes; pass++) {
        uint64_t bad = 0;
        for (uint64_t p = 0; p < pages; p++) {
            if (p % TICK_PAGES == 0)
                tick();
            if (!check_page(buffer + p * WORDS_PER_PAGE, p, generation[p / slice_pages], bad < MAX_FAIL_LINES))
                bad++;
        }
        if (bad)
            say("FAIL pass=%lu bad_pages=%llu", pass, (unsigned long long)bad);
        else
            say("OK pass=%lu", pass);
        if (write_mode) {
            unsigned slice = (pass - 1) % SLICES;
            uint64_t end = (slice + 1) * slice_pages < pages ? (slice + 1) * slice_pages : pages;
            generation[slice]++;
            for (uint64_t p = slice * slice_pages; p < end; p++) {
                if (p % TICK_PAGES == 0)
                    tick();
                fill_page(buffer + p * WORDS_PER_PAGE, p, generation[slice]);
            }
        }
    }
    return 0;
}
