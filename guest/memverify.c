/*
 * memverify <MiB> [rate [grow]] — detects guest memory corruption across checkpoint/restore.
 *
 * Every 4096-byte page of an anonymous region holds:
 *   bytes 0..7   "MEMVRFY!"  (lets an outside tool find our pages in guest RAM)
 *   bytes 8..11  u32 page index
 *   bytes 12..15 u32 version (how many times this page has been written)
 *   bytes 16..   a pattern that is a pure function of (index, version)
 * The expected version of every page is kept in a separate array, so each page can be
 * verified completely before it is rewritten. Each loop iteration verifies and rewrites
 * one page chosen by a seeded PRNG and additionally verifies one page of a sequential
 * sweep, so a corrupted page is found within one sweep of n iterations at the latest.
 *
 * With "grow", the region starts untouched (zero in guest RAM) and is filled while the loop
 * already runs: FILL_BATCH pages per iteration, unpaced, and the rewrites and the sweep cover
 * only the filled part. That is an allocation phase: guest RAM goes from mostly zero to full
 * as fast as the vCPU can write it, which is what makes a live checkpoint's estimate of the
 * remaining work jump (the time-bound controller must survive it).
 *
 * All state (PRNG, versions, digest) lives in process memory: after a VM restore the
 * sequence continues exactly, so the digest after N rewrites is the same in every run.
 *
 * Output (one write per line, ~every 100 ms):
 *   memverify: heartbeat seq=<n> pages=<rewrites> digest=<16 hex> maxstall_us=<n> corrupt=<n>
 *   memverify: CORRUPT page=<i> offset=<byte offset of 8-byte word> expected=<hex> got=<hex>
 */
#include <sys/mman.h>

#include "tlc_guest.h"

#define PAGE 4096u
#define WORDS (PAGE / 8u)
#define MAGIC "MEMVRFY!"
#define MAX_REPORTS_PER_HEARTBEAT 3 /* a badly corrupted region must not flood the console */
#define FILL_BATCH 16u /* pages filled per loop iteration in grow mode: fast, but heartbeats stay on time */

static unsigned char *region;
static uint32_t *versions; /* last version written to each page */
static uint64_t npages;
static uint64_t corrupt_total;
static unsigned reports_left = MAX_REPORTS_PER_HEARTBEAT;

static uint64_t magic_word(void) {
  uint64_t m;
  memcpy(&m, MAGIC, 8);
  return m;
}

/* Expected value of word w (w >= 2) of page (index, version): a xorshift stream seeded
 * from (index, version), cheap enough to regenerate for every verification. */
static void fill_pattern(uint64_t *words, uint32_t index, uint32_t version) {
  uint64_t s = mix64(((uint64_t)index << 32) | version) | 1;
  for (unsigned w = 2; w < WORDS; w++) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    words[w] = s;
  }
}

static void write_page(uint64_t i, uint32_t version) {
  uint64_t *words = (uint64_t *)(region + i * PAGE);
  words[0] = magic_word();
  words[1] = ((uint64_t)version << 32) | (uint32_t)i; /* little-endian: index, then version */
  fill_pattern(words, (uint32_t)i, version);
}

/* Returns 1 if page i matches what was last written; otherwise reports and returns 0. */
static int verify_page(uint64_t i) {
  const uint64_t *words = (const uint64_t *)(region + i * PAGE);
  uint32_t version = versions[i];
  uint64_t expect[WORDS];
  expect[0] = magic_word();
  expect[1] = ((uint64_t)version << 32) | (uint32_t)i;
  fill_pattern(expect, (uint32_t)i, version);
  for (unsigned w = 0; w < WORDS; w++) {
    if (words[w] == expect[w]) continue;
    corrupt_total++;
    if (reports_left > 0) {
      reports_left--;
      say("memverify: CORRUPT page=%llu offset=%u expected=%016llx got=%016llx", (unsigned long long)i,
          w * 8u, (unsigned long long)expect[w], (unsigned long long)words[w]);
    }
    return 0;
  }
  return 1;
}

int main(int argc, char **argv) {
  if (argc < 2 || argc > 4 || (argc == 4 && strcmp(argv[3], "grow") != 0)) {
    say("usage: memverify <MiB> [rate [grow]]");
    return 2;
  }
  uint64_t mib = parse_arg("memverify", "MiB", argv[1]);
  uint64_t rate = argc >= 3 ? parse_arg("memverify", "rate", argv[2]) : 0;
  int grow = argc == 4;
  if (mib == 0 || mib > 1024 * 1024) {
    say("memverify: MiB must be between 1 and 1048576");
    return 2;
  }
  npages = mib * (1024 * 1024 / PAGE);
  region = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  versions = mmap(NULL, npages * sizeof *versions, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (region == MAP_FAILED || versions == MAP_FAILED) {
    say("memverify: mmap of %llu MiB failed: %s", (unsigned long long)mib, strerror(errno));
    return 1;
  }
  say("memverify: start mib=%llu pages=%llu rate=%llu%s", (unsigned long long)mib, (unsigned long long)npages,
      (unsigned long long)rate, grow ? " grow" : "");
  uint64_t filled = 0; /* pages [0, filled) hold data; the rest are untouched */
  if (!grow) {
    for (; filled < npages; filled++) {
      versions[filled] = 1;
      write_page(filled, 1);
    }
    say("memverify: filled pages=%llu", (unsigned long long)npages);
  }

  uint64_t rng = 0x9E3779B97F4A7C15ULL; /* fixed seed: same page sequence in every run */
  uint64_t digest = 0, rewrites = 0, seq = 0, sweep = 0;
  uint64_t interval = rate ? 1000000000ULL / rate : 0;
  uint64_t t = now_ns(), last = t, max_gap = 0;
  uint64_t next_hb = t + HEARTBEAT_NS, next_due = t;

  for (;;) {
    if (filled < npages) {
      for (unsigned b = 0; b < FILL_BATCH && filled < npages; b++, filled++) {
        versions[filled] = 1;
        write_page(filled, 1);
      }
      if (filled == npages) say("memverify: filled pages=%llu", (unsigned long long)npages);
    }
    t = now_ns();
    if (t - last > max_gap) max_gap = t - last; /* a paused VM shows up as one long gap */
    last = t;
    if (t >= next_hb) {
      say("memverify: heartbeat seq=%llu pages=%llu digest=%016llx maxstall_us=%llu corrupt=%llu",
          (unsigned long long)++seq, (unsigned long long)rewrites, (unsigned long long)digest,
          (unsigned long long)(max_gap / 1000), (unsigned long long)corrupt_total);
      max_gap = 0;
      reports_left = MAX_REPORTS_PER_HEARTBEAT;
      next_hb += HEARTBEAT_NS;
      if (next_hb <= t) next_hb = t + HEARTBEAT_NS; /* after a long stall, do not burst */
    }
    if (rate) {
      if (t < next_due) { /* paced: sleep, but wake for the next heartbeat */
        sleep_until_ns(next_due < next_hb ? next_due : next_hb);
        continue;
      }
      next_due += interval;
      if (next_due + HEARTBEAT_NS < t) next_due = t; /* fell far behind (VM paused): no catch-up burst */
    }

    uint64_t i = xorshift64star(&rng) % filled;
    verify_page(i); /* counted and reported; the rewrite below repairs it either way */
    versions[i]++;
    write_page(i, versions[i]);
    digest = mix64(digest ^ (((uint64_t)i << 32) | versions[i]));
    rewrites++;

    uint64_t j = sweep;
    sweep = sweep + 1 >= filled ? 0 : sweep + 1;
    if (!verify_page(j)) write_page(j, versions[j]); /* repair without bumping the version */
  }
}
