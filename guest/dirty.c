/*
 * dirty <MiB> <random|stream|hotcold|bytes> — a page-dirtying load for checkpoint benchmarks.
 *
 * Each update stores the running update counter into one 8-byte word of one page; that
 * is enough to make the hypervisor see the whole 4 KiB page as dirty. The pattern
 * decides which page:
 *   random   uniform over the working set
 *   stream   every page in order, wrapping (worst case for incremental copies)
 *   hotcold  90% of updates hit the first 10% of pages, 10% hit the rest
 *   bytes    pages filled with pseudo-random bytes first; then every page in order gets one
 *            byte incremented (like QEMU's migration-test guest): a sub-page change, for
 *            measuring sub-page deltas (a page-level copy stores 4096 bytes for 1 changed)
 *
 * Output (one write per line, ~every 100 ms):
 *   dirty: heartbeat seq=<n> updates=<total> rate=<updates/s over the last interval> maxstall_us=<n>
 */
#include <sys/mman.h>

#include "tlc_guest.h"

#define PAGE 4096u
#define BATCH 64u /* updates between clock reads: keeps clock_gettime out of the hot path */

enum pattern { RANDOM, STREAM, HOTCOLD, BYTES };

int main(int argc, char **argv) {
  if (argc != 3) {
    say("usage: dirty <MiB> <random|stream|hotcold>");
    return 2;
  }
  uint64_t mib = parse_arg("dirty", "MiB", argv[1]);
  enum pattern pat;
  if (!strcmp(argv[2], "random")) pat = RANDOM;
  else if (!strcmp(argv[2], "stream")) pat = STREAM;
  else if (!strcmp(argv[2], "hotcold")) pat = HOTCOLD;
  else if (!strcmp(argv[2], "bytes")) pat = BYTES;
  else {
    say("dirty: bad pattern '%s' (want random, stream, hotcold or bytes)", argv[2]);
    return 2;
  }
  if (mib == 0 || mib > 1024 * 1024) {
    say("dirty: MiB must be between 1 and 1048576");
    return 2;
  }
  uint64_t npages = mib * (1024 * 1024 / PAGE);
  uint64_t hot = npages / 10 ? npages / 10 : 1;
  unsigned char *region = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (region == MAP_FAILED) {
    say("dirty: mmap of %llu MiB failed: %s", (unsigned long long)mib, strerror(errno));
    return 1;
  }
  /* Fault every page in first, so the measured rate is dirtying, not page faults. */
  for (uint64_t i = 0; i < npages; i++) region[i * PAGE] = 1;
  if (pat == BYTES) { /* incompressible pages, so only the changed byte is new */
    uint64_t fill = 0x2545F4914F6CDD1DULL;
    for (uint64_t w = 0; w < npages * (PAGE / 8); w++) ((uint64_t *)region)[w] = xorshift64star(&fill);
  }
  say("dirty: ready pages=%llu pattern=%s", (unsigned long long)npages, argv[2]);

  uint64_t rng = 0x9E3779B97F4A7C15ULL, cursor = 0, updates = 0, seq = 0;
  uint64_t t = now_ns(), last = t, max_gap = 0;
  uint64_t hb_start = t, hb_updates = 0;

  for (;;) {
    for (unsigned b = 0; b < BATCH; b++) {
      uint64_t p;
      switch (pat) {
        case BYTES:
          /* One byte per page, every page in turn: the only change a lap makes to a page. */
          region[cursor * PAGE + 64]++;
          cursor = cursor + 1 == npages ? 0 : cursor + 1;
          updates++;
          continue;
        case STREAM:
          p = cursor;
          cursor = cursor + 1 == npages ? 0 : cursor + 1;
          break;
        case HOTCOLD: {
          uint64_t r = xorshift64star(&rng); /* r % 10 picks cold vs hot, r / 10 picks the page */
          p = (r % 10 == 0 && npages > hot) ? hot + (r / 10) % (npages - hot) : (r / 10) % hot;
          break;
        }
        default:
          p = xorshift64star(&rng) % npages;
          break;
      }
      updates++;
      /* Vary the word within the page so consecutive laps do not always hit one cache line. */
      ((volatile uint64_t *)(region + p * PAGE))[updates & 511] = updates;
    }
    t = now_ns();
    if (t - last > max_gap) max_gap = t - last;
    last = t;
    if (t - hb_start >= HEARTBEAT_NS) {
      uint64_t rate = (updates - hb_updates) * 1000000000ULL / (t - hb_start);
      say("dirty: heartbeat seq=%llu updates=%llu rate=%llu maxstall_us=%llu", (unsigned long long)++seq,
          (unsigned long long)updates, (unsigned long long)rate, (unsigned long long)(max_gap / 1000));
      hb_start = t;
      hb_updates = updates;
      max_gap = 0;
    }
  }
}
