/*
 * idle — the quietest possible workload: a heartbeat every 100 ms and nothing else.
 * Used to measure checkpoint cost of a VM whose memory is not changing.
 *
 * Output: idle: heartbeat seq=<n>
 */
#include "tlc_guest.h"

int main(void) {
  uint64_t seq = 0;
  uint64_t next = now_ns() + HEARTBEAT_NS;
  for (;;) {
    sleep_until_ns(next); /* absolute deadline: no drift from the time spent printing */
    say("idle: heartbeat seq=%llu", (unsigned long long)++seq);
    next += HEARTBEAT_NS;
    uint64_t t = now_ns();
    if (next <= t) next = t + HEARTBEAT_NS; /* after a pause, resume the cadence without a burst */
  }
}
