import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { describe, it } from 'node:test';
import { HOLD_ENV } from '../../src/checkpoint/hold.js';
import { takeCheckpoint } from '../../src/checkpoint/take.js';
import { TlcError } from '../../src/core/errors.js';
import { qcow2Backing } from '../../src/disk/restore-disks.js';
import { type ConsoleScan, scanConsole } from '../../src/guest/heartbeat.js';
import { continuationProblems } from '../../src/guest/observe.js';
import { QmpClient } from '../../src/qmp/client.js';
import { restoreCheckpoint } from '../../src/restore/restore.js';
import { CheckpointStore } from '../../src/store/store.js';
import { verifyCheckpoint } from '../../src/store/verify.js';
import { killVm, startVm, stopVm } from '../../src/vm/manager.js';
import type { VmRecord } from '../../src/vm/registry.js';
import { ext4Qcow2, heartbeatsAdvance, isolatedTlc, spawnTlc, tlc, waitConsole } from './harness.js';

const { home } = isolatedTlc();
const store = new CheckpointStore();
const disksDir = path.join(home, 'images');
fs.mkdirSync(disksDir, { recursive: true });

function scan(record: VmRecord): ConsoleScan {
  return scanConsole(fs.readFileSync(record.paths.consoleLog, 'latin1'));
}

function lastSynced(s: ConsoleScan): number {
  return s.heartbeats.filter((h) => h.kind === 'diskverify').at(-1)?.seq ?? 0;
}

/** Waits until the VM's console shows what `done` wants (the disk guests are slow to sync). */
function until(record: VmRecord, done: (s: ConsoleScan) => boolean, what: string): Promise<ConsoleScan> {
  return waitConsole(record.paths.consoleLog, done, what, 20_000);
}

/** A fresh ext4 qcow2 holding `fillMiB` MiB of incompressible data beside the guest's records. */
async function diskImage(name: string, fillMiB = 0): Promise<string> {
  const file = path.join(disksDir, `${name}.qcow2`);
  let content: string | undefined;
  if (fillMiB > 0) {
    content = path.join(disksDir, `${name}-content`);
    fs.mkdirSync(content);
    fs.writeFileSync(path.join(content, 'fill'), randomBytes(fillMiB * 2 ** 20));
  }
  await ext4Qcow2(file, 48, content);
  return file;
}

async function bootDiskGuest(name: string, image: string): Promise<VmRecord> {
  const { record } = await startVm({
    name,
    memMiB: 160,
    workload: 'diskverify:0+memverify:16',
    disks: [{ path: image }],
  });
  await until(record, (s) => lastSynced(s) >= 48, 'six synced batches');
  return record;
}

/** Boots a fresh VM on `image`: diskverify checks every record at start (vm start fails if not). */
async function coldBootVerdict(name: string, image: string): Promise<{ ok: boolean; records: number }> {
  const { record } = await startVm({ name, memMiB: 128, workload: 'diskverify:8', disks: [{ path: image }] });
  const s = await until(record, (x) => x.diskVerdicts.length > 0, 'the start-up verdict');
  await stopVm(name, { force: true });
  const verdict = s.diskVerdicts[0];
  assert.ok(verdict);
  return verdict;
}

for (const mode of ['live', 'cow', 'stop'] as const) {
  describe(`a ${mode} checkpoint of a VM writing to its disk`, () => {
    it('restores RAM and disk as one instant, twice identically, and the disk verifies cold', async () => {
      const vm = `dk-${mode}`;
      const image = await diskImage(vm);
      const original = await bootDiskGuest(vm, image);
      const ckpt = await takeCheckpoint({ vm, mode, store });
      const disk = ckpt.manifest.disks?.[0];
      assert.ok(disk?.captured, 'the disk is captured');
      assert.equal(disk.layers.length, mode === 'live' ? 2 : 1);
      assert.ok(ckpt.manifest.metrics.disk, 'the disk step is reported');
      // The original runs on and writes records the checkpoint must not contain.
      const target = lastSynced(scan(original)) + 40;
      const syncedAfter = await until(original, (s) => lastSynced(s) >= target, 'more records');
      await killVm(vm);

      const restores: VmRecord[] = [];
      for (const suffix of ['a', 'b']) {
        const r = await restoreCheckpoint({ ref: ckpt.id, store, name: `${vm}-${suffix}` });
        const overlay = r.record.spec.disks?.[0]?.path as string;
        assert.equal(
          qcow2Backing(overlay),
          path.join(ckpt.dir, disk.layers.at(-1)?.file as string),
          'a new overlay over the checkpoint',
        );
        restores.push(r.record);
      }
      for (const r of restores) {
        const s = await until(r, (x) => lastSynced(x) > 0, 'a synced heartbeat after the restore');
        await sleep(2500);
        const later = scan(r);
        assert.deepEqual(continuationProblems(later, ckpt.manifest.guestHeartbeatSeqBefore), []);
        // Its RAM and disk agree: it appends right after its own records, not the original's later ones.
        const firstSynced = s.heartbeats.find((h) => h.kind === 'diskverify')?.seq ?? 0;
        assert.ok(
          firstSynced < lastSynced(syncedAfter),
          'the restored guest did not see the original run on',
        );
      }
      const restoredSynced = lastSynced(scan(restores[0] as VmRecord));
      for (const r of restores) await killVm(r.spec.name);
      assert.ok(verifyCheckpoint(ckpt, true).ok, 'the checkpoint is unchanged by two restores');

      const verdict = await coldBootVerdict(`${vm}-cold`, restores[0]?.spec.disks?.[0]?.path as string);
      assert.ok(verdict.ok, 'every record on the restored disk verifies');
      assert.ok(
        verdict.records >= restoredSynced,
        `${verdict.records} records, ${restoredSynced} were synced`,
      );
    });
  });
}

describe('incremental disk checkpoints', () => {
  it('store only changed clusters, and an older checkpoint keeps its own disk state', async () => {
    const vm = 'dk-incr';
    const original = await bootDiskGuest(vm, await diskImage(vm, 12));
    const first = await takeCheckpoint({ vm, mode: 'stop', store });
    await sleep(500);
    const second = await takeCheckpoint({ vm, mode: 'cow', store });
    const a = first.manifest.disks?.[0];
    const b = second.manifest.disks?.[0];
    assert.ok(a && b);
    assert.equal(b.parent?.checkpoint, first.id, 'the second builds on the first');
    const bytesA = a.layers.reduce((n, l) => n + l.bytes, 0);
    const bytesB = b.layers.reduce((n, l) => n + l.bytes, 0);
    assert.ok(bytesA > 12 * 2 ** 20, `the first holds the disk's data (${bytesA} bytes)`);
    assert.ok(bytesB < bytesA / 8, `the second holds only changes: ${bytesB} against ${bytesA} bytes`);
    assert.ok(b.copiedBytes < 4 * 2 ** 20, `copied ${b.copiedBytes} bytes`);

    // rm never breaks the chain.
    const rm = await tlc(['rm', first.id]);
    assert.notEqual(rm.code, 0);
    assert.match(rm.stderr, new RegExp(second.id));
    await killVm(vm);

    const restored = await restoreCheckpoint({ ref: first.id, store, name: `${vm}-first` });
    const s = await until(restored.record, (x) => lastSynced(x) > 0, 'a synced heartbeat');
    assert.deepEqual(continuationProblems(s, first.manifest.guestHeartbeatSeqBefore), []);
    assert.ok(lastSynced(s) < lastSynced(scan(original)), 'the first checkpoint, not the second');
    await killVm(`${vm}-first`);
    const verdict = await coldBootVerdict(`${vm}-cold`, restored.record.spec.disks?.[0]?.path as string);
    assert.ok(verdict.ok);
  });
});

describe('a disk tlc cannot save consistently', () => {
  it('is refused, and with --allow-inconsistent-disks marked not captured', async () => {
    const vm = 'dk-foreign';
    const foreign = await diskImage('foreign');
    await startVm({
      name: vm,
      memMiB: 128,
      workload: 'memverify:16',
      extraArgs: [
        '-drive',
        `file=${foreign},if=none,id=xd,format=qcow2`,
        '-device',
        'virtio-blk-pci,drive=xd',
      ],
    });
    const before = store.list().length;
    await assert.rejects(takeCheckpoint({ vm, mode: 'stop', store }), (err: unknown) => {
      assert.ok(err instanceof TlcError);
      assert.match(err.message, /writable but not a disk tlc manages.*--allow-inconsistent-disks/);
      return true;
    });
    assert.equal(store.list().length, before, 'nothing published');
    const ckpt = await takeCheckpoint({ vm, mode: 'stop', store, allowInconsistentDisks: true });
    assert.equal(ckpt.manifest.disks?.[0]?.captured, false);
    const show = await tlc(['show', ckpt.id]);
    assert.match(show.stdout, /NOT CAPTURED/, JSON.stringify(show));
    await stopVm(vm, { force: true });
  });
});

describe('tlc killed during the disk copy', () => {
  it('leaves the VM running on its own disk chain with no job, bitmap or node of tlc left', async () => {
    const vm = 'dk-kill';
    const image = await diskImage(vm, 12);
    const record = await bootDiskGuest(vm, image);
    for (const sig of ['SIGINT', 'SIGKILL'] as const) {
      const cli = spawnTlc(['checkpoint', vm, '--mode', 'cow'], { [HOLD_ENV]: 'disk-copy' });
      await cli.waitFor(/holding at disk-copy/);
      cli.child.kill(sig);
      await cli.exited;
      if (sig === 'SIGKILL') {
        const status = await tlc(['vm', 'status', vm]);
        assert.match(status.stderr, /removed its unfinished disk copies/);
      }
      const qmp = await QmpClient.connect(record.paths.qmpSocket, { timeoutMs: 5000 });
      try {
        assert.deepEqual(await qmp.execute('query-block-jobs'), []);
        const nodes = await qmp.execute('query-named-block-nodes', { flat: true });
        assert.deepEqual(nodes.map((n) => n['node-name']).sort(), ['tlc-disk0', 'tlc-disk0-file']);
        assert.equal(nodes.find((n) => n['node-name'] === 'tlc-disk0')?.image.filename, image);
        assert.deepEqual(
          nodes.flatMap((n) => n['dirty-bitmaps'] ?? []),
          [],
          'no bitmap of a checkpoint that never was',
        );
        assert.equal((await qmp.execute('query-status')).status, 'running');
      } finally {
        qmp.close();
      }
      assert.ok(await heartbeatsAdvance(record.paths.consoleLog), `${sig}: the guest works on`);
      assert.equal(store.list().filter((c) => c.manifest.vm.name === vm).length, 0);
    }
    await stopVm(vm, { force: true });
  });
});
