/*
 * diskverify <records> — detects lost, rewritten, zero-filled or torn disk writes across
 * checkpoint/restore.
 *
 * Mounts /dev/vda (ext4, made on the host) at /mnt and keeps /mnt/records: a file of fixed-size
 * records, record <seq> at byte offset (seq - 1) * 512. Each record (little-endian):
 *
 *   offset  size  field
 *   0       8     magic "DSKVRFY!" (lets an outside tool find records in a disk image)
 *   8       8     seq: 1, 2, 3, ... in file order
 *   16      8     prev: checksum of record seq - 1 (0 for seq 1): chains each record to its history
 *   24      8     nonce: from the clock at write time, so that two histories (a VM and its
 *                 restored copy) never write the same bytes for the same seq
 *   32      472   payload: a pattern that is a pure function of (seq, nonce)
 *   504     8     checksum: FNV-1a 64 of bytes 0..503
 *
 * On start it verifies the whole file: every record must have the magic, its own seq, a valid
 * checksum and the previous record's checksum as prev. A crash may leave the records written
 * since the last fsync missing, zero-filled or torn; records are synced in batches that end at
 * multiples of SYNC_EVERY, so a bad region that lies entirely within the file's last batch is
 * what a crash can leave: it is truncated (and reported). Anything else fails the verification,
 * naming the first bad record, and diskverify exits without touching the file.
 *
 * Then it appends <records> records (0: forever), one every 100 ms / RECORDS_PER_TICK, and
 * fsyncs after every SYNC_EVERY-th record. All its state (next seq, previous checksum) lives in
 * process memory, so a restored VM continues its own history.
 *
 * Output (one write per line):
 *   diskverify: torn tail truncated record=<first bad seq> dropped=<records> bytes=<n> reason=<r>
 *   diskverify: verify ok records=<n>
 *   diskverify: verify FAILED record=<seq> reason=<r> valid=<n> records=<records in file>
 *   diskverify: synced seq=<last synced seq> fsync_us=<n> maxstall_us=<n>
 *   diskverify: done appended=<n> records=<n>
 *   reasons: zero (all bytes zero), magic, seq, checksum, chain (prev does not match), partial
 *   maxstall_us: the longest delay of a record write past its due time since the last synced
 *   line (a paused VM or a slow fsync shows up there).
 */
#include <fcntl.h>
#include <sys/mount.h>
#include <sys/stat.h>

#include "tlc_guest.h"

#define DEVICE "/dev/vda"
#define MOUNT_POINT "/mnt"
#define RECORDS_FILE MOUNT_POINT "/records"
#define DEVICE_WAIT_NS 10000000000ULL /* the virtio-blk driver probes the disk asynchronously */

#define REC 512u
#define MAGIC "DSKVRFY!"
#define OFF_MAGIC 0u
#define OFF_SEQ 8u
#define OFF_PREV 16u
#define OFF_NONCE 24u
#define OFF_PAYLOAD 32u
#define OFF_CHECKSUM (REC - 8u)
#define SYNC_EVERY 8u
#define RECORDS_PER_TICK 8u
#define VERIFY_CHUNK_RECORDS 128u

static uint64_t get64(const unsigned char *p) {
  uint64_t v;
  memcpy(&v, p, 8);
  return v;
}

static void put64(unsigned char *p, uint64_t v) { memcpy(p, &v, 8); }

static uint64_t fnv1a64(const unsigned char *p, size_t n) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (size_t i = 0; i < n; i++) {
    h ^= p[i];
    h *= 0x100000001b3ULL;
  }
  return h;
}

static void build_record(unsigned char *r, uint64_t seq, uint64_t prev, uint64_t nonce) {
  memcpy(r + OFF_MAGIC, MAGIC, 8);
  put64(r + OFF_SEQ, seq);
  put64(r + OFF_PREV, prev);
  put64(r + OFF_NONCE, nonce);
  uint64_t s = mix64(seq ^ nonce) | 1;
  for (unsigned off = OFF_PAYLOAD; off < OFF_CHECKSUM; off += 8) put64(r + off, xorshift64star(&s));
  put64(r + OFF_CHECKSUM, fnv1a64(r, OFF_CHECKSUM));
}

/* Why record `seq` is bad, or NULL if it is good and follows the record whose checksum is prev. */
static const char *check_record(const unsigned char *r, uint64_t seq, uint64_t prev) {
  int zero = 1;
  for (unsigned i = 0; i < REC && zero; i++) zero = r[i] == 0;
  if (zero) return "zero";
  if (memcmp(r + OFF_MAGIC, MAGIC, 8) != 0) return "magic";
  if (get64(r + OFF_SEQ) != seq) return "seq";
  if (get64(r + OFF_CHECKSUM) != fnv1a64(r, OFF_CHECKSUM)) return "checksum";
  if (get64(r + OFF_PREV) != prev) return "chain";
  return NULL;
}

static int full_pread(int fd, unsigned char *buf, size_t n, off_t off) {
  while (n > 0) {
    ssize_t got = pread(fd, buf, n, off);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) return -1;
    buf += got;
    n -= (size_t)got;
    off += got;
  }
  return 0;
}

static int full_pwrite(int fd, const unsigned char *buf, size_t n, off_t off) {
  while (n > 0) {
    ssize_t put = pwrite(fd, buf, n, off);
    if (put < 0 && errno == EINTR) continue;
    if (put <= 0) return -1;
    buf += put;
    n -= (size_t)put;
    off += put;
  }
  return 0;
}

static void mount_disk(void) {
  uint64_t deadline = now_ns() + DEVICE_WAIT_NS;
  while (access(DEVICE, F_OK) != 0) {
    if (now_ns() > deadline) {
      say("diskverify: no " DEVICE " after 10 s (does the VM have a virtio disk?)");
      exit(1);
    }
    sleep_until_ns(now_ns() + 10000000ULL);
  }
  if (mkdir(MOUNT_POINT, 0755) != 0 && errno != EEXIST) {
    say("diskverify: cannot create " MOUNT_POINT ": %s", strerror(errno));
    exit(1);
  }
  if (mount(DEVICE, MOUNT_POINT, "ext4", MS_NOATIME, "") != 0) {
    say("diskverify: cannot mount " DEVICE " (ext4) on " MOUNT_POINT ": %s", strerror(errno));
    exit(1);
  }
}

/* Verifies the file; returns how many good records it keeps (after truncating a torn tail),
 * with the checksum of the last one in *last_sum. Exits on a failed verification. */
static uint64_t verify(int fd, uint64_t *last_sum) {
  struct stat st;
  if (fstat(fd, &st) != 0) {
    say("diskverify: cannot stat " RECORDS_FILE ": %s", strerror(errno));
    exit(1);
  }
  uint64_t size = (uint64_t)st.st_size;
  uint64_t full = size / REC;
  uint64_t slots = full + (size % REC ? 1 : 0); /* a partial record counts as a slot */
  static unsigned char buf[VERIFY_CHUNK_RECORDS * REC];
  uint64_t prev = 0, bad = 0;
  const char *reason = NULL;
  for (uint64_t first = 1; first <= full && !bad; first += VERIFY_CHUNK_RECORDS) {
    uint64_t n = full - first + 1 < VERIFY_CHUNK_RECORDS ? full - first + 1 : VERIFY_CHUNK_RECORDS;
    if (full_pread(fd, buf, n * REC, (off_t)((first - 1) * REC)) != 0) {
      say("diskverify: cannot read " RECORDS_FILE " at record %llu: %s", (unsigned long long)first,
          strerror(errno));
      exit(1);
    }
    for (uint64_t i = 0; i < n; i++) {
      const unsigned char *r = buf + i * REC;
      reason = check_record(r, first + i, prev);
      if (reason) {
        bad = first + i;
        break;
      }
      prev = get64(r + OFF_CHECKSUM);
    }
  }
  if (!bad && slots > full) {
    bad = slots;
    reason = "partial";
  }
  if (!bad) {
    say("diskverify: verify ok records=%llu", (unsigned long long)full);
    *last_sum = prev;
    return full;
  }
  /* Records since the last completed fsync all lie in the file's last batch. */
  if ((bad - 1) / SYNC_EVERY != (slots - 1) / SYNC_EVERY) {
    say("diskverify: verify FAILED record=%llu reason=%s valid=%llu records=%llu", (unsigned long long)bad,
        reason, (unsigned long long)(bad - 1), (unsigned long long)slots);
    exit(1);
  }
  uint64_t keep = bad - 1;
  if (ftruncate(fd, (off_t)(keep * REC)) != 0 || fsync(fd) != 0) {
    say("diskverify: cannot truncate " RECORDS_FILE ": %s", strerror(errno));
    exit(1);
  }
  say("diskverify: torn tail truncated record=%llu dropped=%llu bytes=%llu reason=%s", (unsigned long long)bad,
      (unsigned long long)(slots - keep), (unsigned long long)(size - keep * REC), reason);
  say("diskverify: verify ok records=%llu", (unsigned long long)keep);
  *last_sum = prev;
  return keep;
}

static void sync_file(int fd) {
  if (fsync(fd) != 0) {
    say("diskverify: fsync FAILED: %s", strerror(errno));
    exit(1);
  }
}

int main(int argc, char **argv) {
  if (argc != 2) {
    say("usage: diskverify <records>");
    return 2;
  }
  uint64_t target = parse_arg("diskverify", "records", argv[1]);
  mount_disk();
  int fd = open(RECORDS_FILE, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) {
    say("diskverify: cannot open " RECORDS_FILE ": %s", strerror(errno));
    return 1;
  }
  int dir = open(MOUNT_POINT, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir < 0 || fsync(dir) != 0) { /* the file's directory entry is durable too */
    say("diskverify: cannot fsync " MOUNT_POINT ": %s", strerror(errno));
    return 1;
  }
  close(dir);

  uint64_t prev = 0;
  uint64_t seq = verify(fd, &prev); /* last record in the file */
  uint64_t appended = 0, synced = seq;
  uint64_t interval = HEARTBEAT_NS / RECORDS_PER_TICK;
  uint64_t due = now_ns(), max_late = 0;
  unsigned char rec[REC];

  while (target == 0 || appended < target) {
    sleep_until_ns(due);
    uint64_t t = now_ns();
    if (t - due > max_late) max_late = t - due;
    due += interval;
    if (due + HEARTBEAT_NS < t) due = t; /* after a long pause, no catch-up burst */

    seq++;
    build_record(rec, seq, prev, mix64(t ^ (seq * 0x9E3779B97F4A7C15ULL)));
    if (full_pwrite(fd, rec, REC, (off_t)((seq - 1) * REC)) != 0) {
      say("diskverify: write FAILED seq=%llu: %s", (unsigned long long)seq, strerror(errno));
      return 1;
    }
    prev = get64(rec + OFF_CHECKSUM);
    appended++;
    if (seq % SYNC_EVERY == 0 || appended == target) {
      uint64_t t0 = now_ns();
      sync_file(fd);
      synced = seq;
      say("diskverify: synced seq=%llu fsync_us=%llu maxstall_us=%llu", (unsigned long long)synced,
          (unsigned long long)((now_ns() - t0) / 1000), (unsigned long long)(max_late / 1000));
      max_late = 0;
    }
  }
  say("diskverify: done appended=%llu records=%llu", (unsigned long long)appended, (unsigned long long)synced);
  for (;;) pause();
}
