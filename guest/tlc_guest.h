/*
 * Helpers shared by the tlc guest workloads (memverify, dirty, idle, diskverify).
 *
 * Every workload prints one line per write(2) to stdout, which /init wires to the
 * serial console. Lines are formatted into a stack buffer first so that a line is
 * never split across writes (stdio buffering would delay or tear lines).
 * All state lives in ordinary process memory, so a checkpoint/restore of the VM
 * carries it along and the workload simply continues where it was.
 */
#ifndef TLC_GUEST_H
#define TLC_GUEST_H

#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define HEARTBEAT_NS 100000000ULL /* 100 ms between heartbeat lines */

static inline uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* Sleep until an absolute CLOCK_MONOTONIC time; restarts after signals. */
static inline void sleep_until_ns(uint64_t t) {
  struct timespec ts = {(time_t)(t / 1000000000ULL), (long)(t % 1000000000ULL)};
  while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
  }
}

/* printf-style output of exactly one line with a single write(2). */
__attribute__((format(printf, 1, 2))) static inline void say(const char *fmt, ...) {
  char buf[256];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
  va_end(ap);
  if (n < 0) return;
  if ((size_t)n > sizeof buf - 2) n = (int)sizeof buf - 2;
  buf[n++] = '\n';
  const char *p = buf;
  while (n > 0) {
    ssize_t w = write(1, p, (size_t)n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return;
    p += w;
    n -= (int)w;
  }
}

/* Parses a non-negative decimal argument; exits with a usage line on garbage. */
static inline uint64_t parse_arg(const char *prog, const char *what, const char *s) {
  char *end;
  errno = 0;
  unsigned long long v = strtoull(s, &end, 10);
  if (errno || end == s || *end || s[0] == '-') {
    say("%s: bad %s '%s'", prog, what, s);
    exit(2);
  }
  return (uint64_t)v;
}

/* xorshift64*: tiny, fast, good enough to scatter page picks; state must be non-zero. */
static inline uint64_t xorshift64star(uint64_t *state) {
  uint64_t x = *state;
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  *state = x;
  return x * 0x2545F4914F6CDD1DULL;
}

/* splitmix64 finalizer: turns structured input (index, version) into well-mixed bits. */
static inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

#endif
