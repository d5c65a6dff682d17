import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { describe, it } from 'node:test';
import { promisify } from 'node:util';
import { buildGuest, defaultGuestCacheDir } from '../../src/guest/build.js';
import type { ConsoleScan } from '../../src/guest/heartbeat.js';
import { startVm, stopVm } from '../../src/vm/manager.js';
import { loadVm } from '../../src/vm/registry.js';
import { ext4Image, isolatedTlc, qemuPidsMentioning, readConsole, tlc, waitConsole } from './harness.js';

const run = promisify(execFile);
const { home } = isolatedTlc();
const RECORD = 512;
const MAGIC = Buffer.from('DSKVRFY!');

/** FNV-1a 64, as guest/diskverify.c checksums its records. */
function fnv1a64(data: Buffer): bigint {
  let h = 0xcbf29ce484222325n;
  for (const byte of data) h = ((h ^ BigInt(byte)) * 0x100000001b3n) & 0xffffffffffffffffn;
  return h;
}

/**
 * Records 1..count as guest/diskverify.c writes them (any payload will do: only the checksum
 * covers it), then `tail` bytes of a next record, as a crash between two fsyncs can leave.
 */
function recordsFile(count: number, tail: number): Buffer {
  const out = Buffer.alloc(count * RECORD + tail);
  let prev = 0n;
  for (let seq = 1; seq <= count + (tail ? 1 : 0); seq++) {
    const rec = Buffer.alloc(RECORD, seq);
    MAGIC.copy(rec, 0);
    rec.writeBigUInt64LE(BigInt(seq), 8);
    rec.writeBigUInt64LE(prev, 16);
    rec.writeBigUInt64LE(BigInt(seq) * 7919n, 24);
    prev = fnv1a64(rec.subarray(0, RECORD - 8));
    rec.writeBigUInt64LE(prev, RECORD - 8);
    rec.copy(out, (seq - 1) * RECORD, 0, Math.min(RECORD, out.length - (seq - 1) * RECORD));
  }
  return out;
}

/** Polls the console until `done` holds for what it shows. */
function syncedSeqs(scan: ConsoleScan): number[] {
  return scan.heartbeats.filter((h) => h.kind === 'diskverify').map((h) => h.seq);
}

describe('the bundled guest on a disk (diskverify)', () => {
  const dir = path.join(home, 'disks');

  it('keeps every synced record across a stop, and names a record damaged on the host', async () => {
    fs.mkdirSync(dir, { recursive: true });
    const fresh = path.join(dir, 'fresh.raw');
    const qcow2 = path.join(dir, 'root,1.qcow2'); // a comma: option strings must escape it
    const content = path.join(dir, 'content');
    fs.mkdirSync(content);
    // 20 records written here, then 100 bytes of record 21: a torn tail the guest truncates.
    fs.writeFileSync(path.join(content, 'records'), recordsFile(20, 100));
    await ext4Image(fresh, 32, content);
    await run('qemu-img', ['convert', '-O', 'qcow2', fresh, qcow2]);

    // First boot: the host's records verify, the torn one goes, the guest appends and syncs.
    const first = await startVm({
      name: 'db',
      memMiB: 128,
      workload: 'diskverify:0',
      disks: [{ path: qcow2 }],
    });
    assert.deepEqual(first.record.spec.disks, [
      { path: qcow2, format: 'qcow2', node: 'tlc-disk0', device: 'tlc-vd0' },
    ]);
    const console1 = first.record.paths.consoleLog;
    const before = await waitConsole(console1, (s) => syncedSeqs(s).length >= 4, 'four synced heartbeats');
    assert.deepEqual(before.diskTornTails, [{ record: 21, dropped: 1, bytes: 100, reason: 'partial' }]);
    assert.deepEqual(before.diskVerdicts, [{ ok: true, records: 20 }]);
    assert.deepEqual(syncedSeqs(before).slice(0, 4), [24, 32, 40, 48]);
    await stopVm('db');
    const synced = Math.max(...syncedSeqs(readConsole(console1)));

    // Second boot on the same image: everything synced is there and verifies, and it appends on.
    const second = await startVm({
      name: 'db-again',
      memMiB: 128,
      workload: 'diskverify:0',
      disks: [{ path: qcow2 }],
    });
    const console2 = second.record.paths.consoleLog;
    const again = await waitConsole(console2, (s) => syncedSeqs(s).length >= 1, 'a synced heartbeat');
    const verdict = again.diskVerdicts[0];
    assert.equal(again.diskVerdicts.length, 1);
    assert.ok(verdict?.ok, `verdict: ${JSON.stringify(verdict)}`);
    assert.ok(verdict.records >= synced, `verified ${verdict.records} records, ${synced} were synced`);
    assert.ok((syncedSeqs(again)[0] ?? 0) > verdict.records, 'appends after the verified records');
    await stopVm('db-again');

    // Flip one byte of a record the guest wrote, in a raw copy: the next boot names that record.
    const raw = path.join(dir, 'data.raw');
    await run('qemu-img', ['convert', '-O', 'raw', qcow2, raw]);
    const victimSeq = 30;
    const fd = fs.openSync(raw, 'r+');
    const rec = Buffer.alloc(RECORD);
    let victim = -1;
    for (let off = 0; off < fs.fstatSync(fd).size && victim < 0; off += RECORD) {
      fs.readSync(fd, rec, 0, RECORD, off);
      if (rec.subarray(0, 8).equals(MAGIC) && rec.readBigUInt64LE(8) === BigInt(victimSeq)) victim = off;
    }
    assert.ok(victim >= 0, `found record ${victimSeq} in the image`);
    const at = victim + 100;
    const byte = Buffer.alloc(1);
    fs.readSync(fd, byte, 0, 1, at);
    byte[0] = (byte[0] as number) ^ 0x5a;
    fs.writeSync(fd, byte, 0, 1, at);
    fs.closeSync(fd);

    const cli = await tlc([
      'vm',
      'start',
      '--name',
      'db-raw',
      '--mem',
      '128',
      '--disk',
      `${raw},format=raw`,
      '--workload',
      'diskverify:0',
    ]);
    assert.notEqual(cli.code, 0, 'vm start fails when the guest finds its disk damaged');
    assert.match(
      cli.stderr,
      new RegExp(
        `^tlc: Guest "db-raw" found its disk damaged: record ${victimSeq} is bad \\(checksum\\)`,
        'm',
      ),
    );
    const damaged = readConsole(loadVm('db-raw').paths.consoleLog).diskVerdicts;
    assert.equal(damaged.length, 1);
    const failed = damaged[0];
    assert.ok(failed && !failed.ok, `verdict: ${JSON.stringify(failed)}`);
    assert.deepEqual([failed.record, failed.reason, failed.valid], [victimSeq, 'checksum', victimSeq - 1]);
    assert.ok(failed.records >= verdict.records, `${failed.records} records in the damaged file`);
    assert.equal(qemuPidsMentioning(raw).length, 0, 'the failed VM is gone');
  });

  it('starts a custom guest that waits for its own ready line and shows as custom', async () => {
    const guest = await buildGuest({ cacheDir: defaultGuestCacheDir() });
    const cli = await tlc([
      'vm',
      'start',
      '--name',
      'own',
      '--mem',
      '128',
      '--kernel',
      guest.kernel,
      '--initrd',
      guest.initrd,
      '--append',
      'console=ttyS0 quiet tlc.workload=idle',
      '--ready',
      'tlc-guest: boot ok',
      '--qemu-arg=-device',
      '--qemu-arg',
      'virtio-rng-pci,id=rng0',
    ]);
    assert.equal(cli.code, 0, cli.stderr);
    const record = loadVm('own');
    assert.equal(record.spec.workload, undefined);
    assert.deepEqual(record.spec.extraArgs, ['-device', 'virtio-rng-pci,id=rng0']);
    assert.match(fs.readFileSync(record.paths.consoleLog, 'latin1'), /tlc-guest: boot ok/);
    const ls = await tlc(['vm', 'ls']);
    assert.match(ls.stdout, /^own\s+running\S*\s+\d+\s+tcg\s+128M\s+custom\s/m);
    const status = JSON.parse((await tlc(['vm', 'status', 'own', '--json'])).stdout) as { guest: string };
    assert.equal(status.guest, 'custom');
    await stopVm('own');
  });
});
