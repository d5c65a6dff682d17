/**
 * Incremental checkpoints on a real QEMU: a chain of five checkpoints of a running memverify
 * guest (live and cow mixed), each restored lazily and eagerly with the guest verifying its own
 * memory; the middle ones removed (their pages merged into the last), the rest restored again; a
 * byte flipped in a parent caught by `tlc verify` (naming what it breaks) and `restore --verify`.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { describe, it } from 'node:test';
import { takeCheckpoint } from '../../src/checkpoint/take.js';
import { continuationProblems, observeGuest } from '../../src/guest/observe.js';
import { restoreCheckpoint } from '../../src/restore/restore.js';
import type { CheckpointMode } from '../../src/store/manifest.js';
import { loadSigningKey } from '../../src/store/sign.js';
import { CheckpointStore, type StoredCheckpoint } from '../../src/store/store.js';
import { verifyCheckpoint } from '../../src/store/verify.js';
import { killVm, startVm, stopVm } from '../../src/vm/manager.js';
import { isolatedTlc, tlc } from './harness.js';

isolatedTlc();
const store = new CheckpointStore();
const OBSERVE_MS = 3000;
const MODES: CheckpointMode[] = ['live', 'cow', 'live', 'cow', 'live'];

async function restoreAndCheck(ckpt: StoredCheckpoint, name: string, eager: boolean): Promise<string[]> {
  const restored = await restoreCheckpoint({ ref: ckpt.id, store, name, eager });
  const scan = await observeGuest(restored.record.paths.consoleLog, OBSERVE_MS);
  await stopVm(name, { force: true });
  return continuationProblems(scan, ckpt.manifest.guestHeartbeatSeqBefore).map((p) => `${name}: ${p}`);
}

async function restoreAll(ckpts: readonly StoredCheckpoint[], tag: string): Promise<string[]> {
  const problems: string[] = [];
  for (const [i, c] of ckpts.entries()) {
    const both = await Promise.all([
      restoreAndCheck(c, `${tag}-${i}-lazy`, false),
      restoreAndCheck(c, `${tag}-${i}-eager`, true),
    ]);
    problems.push(...both.flat());
  }
  return problems;
}

/** The checkpoint as the store has it now (a merge rewrites manifests). */
const fresh = (c: StoredCheckpoint): StoredCheckpoint => store.exact(c.id);

describe('incremental checkpoints', () => {
  it('a chain of five (live and cow): restored, pruned, restored again, damage caught', async () => {
    const vm = 'incr';
    // A paced rewrite rate: each checkpoint finds some pages changed and most not.
    await startVm({ name: vm, memMiB: 192, workload: 'memverify:48:3000', accel: 'tcg' });
    await sleep(1000);
    const ckpts: StoredCheckpoint[] = [];
    for (const mode of MODES) {
      ckpts.push(await takeCheckpoint({ vm, mode, store, deadlineMs: 10_000 }));
      await sleep(500);
    }
    const [first, ...later] = ckpts as [StoredCheckpoint, ...StoredCheckpoint[]];
    assert.equal(first.manifest.parent, undefined, 'the first checkpoint of a VM is full');
    for (const [i, c] of later.entries()) {
      assert.equal(c.manifest.parent, ckpts[i]?.id, `checkpoint ${i + 1} builds on the one before`);
      const ram = c.manifest.blocks[0];
      assert.ok(
        ram?.storedPages !== undefined && ram.storedPages < ram.dataPages,
        'stores only changed pages',
      );
      assert.ok(
        (c.manifest.storedBytes ?? 0) < (first.manifest.storedBytes ?? 0),
        'stores less than a full one',
      );
    }
    for (const c of ckpts) assert.ok(verifyCheckpoint(c, true).ok, `${c.id} verifies`);
    const ls = await tlc(['ls', '--json']);
    assert.equal(ls.code, 0, ls.stderr);
    const listed = JSON.parse(ls.stdout) as { id: string; parent: string | null; chainBytes: number }[];
    assert.deepEqual(
      listed.map((l) => l.parent),
      ckpts.map((c) => c.manifest.parent ?? null),
    );
    await killVm(vm);

    assert.deepEqual(await restoreAll(ckpts, 'chain'), []);

    // Prune the middle three: the last one takes over the pages it needed from them.
    // Checkpoints are signed (the per-user key): a rewritten one is signed again.
    const signing = loadSigningKey({ create: false });
    assert.ok(signing);
    const removed = store.removeIds(
      ckpts.slice(1, 4).map((c) => c.id),
      { signKey: signing.key },
    );
    assert.equal(removed.length, 3);
    const last = fresh(ckpts[4] as StoredCheckpoint);
    assert.equal(last.manifest.parent, first.id, 'the last checkpoint now builds on the first');
    assert.ok(verifyCheckpoint(last, true).ok, 'the merged checkpoint verifies');
    assert.deepEqual(await restoreAll([first, last], 'pruned'), []);

    // A flipped byte in the parent: verify names it and what it breaks; restore --verify refuses.
    const image = path.join(first.dir, first.manifest.blocks[0]?.file as string);
    const fd = fs.openSync(image, 'r+');
    const at = 40 * 1024 * 1024 + 123;
    const byte = Buffer.alloc(1);
    fs.readSync(fd, byte, 0, 1, at);
    const original = byte[0] as number;
    fs.writeSync(fd, Buffer.from([original ^ 0x5a]), 0, 1, at);
    fs.closeSync(fd);
    const verify = await tlc(['verify', last.id]);
    assert.notEqual(verify.code, 0, 'verify of the child fails');
    assert.match(verify.stderr, new RegExp(`parent ${first.id}: .*do not match their checksum`));
    assert.match(verify.stderr, new RegExp(`${first.id} is damaged; it breaks ${first.id}, ${last.id}`));
    await assert.rejects(
      restoreCheckpoint({ ref: last.id, store, name: 'damaged', verify: true }),
      new RegExp(`${last.id} builds on ${first.id}`),
    );
    const fix = fs.openSync(image, 'r+');
    fs.writeSync(fix, Buffer.from([original]), 0, 1, at);
    fs.closeSync(fix);

    // Prune to one: the last becomes a full checkpoint of its own.
    const prune = await tlc(['prune', vm, '--keep', '1']);
    assert.equal(prune.code, 0, prune.stderr);
    const alone = fresh(last);
    assert.equal(alone.manifest.parent, undefined);
    assert.deepEqual(
      store.list().map((c) => c.id),
      [last.id],
    );
    assert.ok(verifyCheckpoint(alone, true).ok);
    assert.deepEqual(await restoreAll([alone], 'alone'), []);
  });
});
