import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, describe, it } from 'node:test';
import { takeCheckpoint } from '../../src/checkpoint/take.js';
import { TlcError } from '../../src/core/errors.js';
import { buildGuest, defaultGuestCacheDir, guestAppendLine } from '../../src/guest/build.js';
import { continuationProblems, observeGuest } from '../../src/guest/observe.js';
import { restoreCheckpoint } from '../../src/restore/restore.js';
import type { CheckpointMode } from '../../src/store/manifest.js';
import { CheckpointStore } from '../../src/store/store.js';
import { lastHeartbeatSeq } from '../../src/vm/console.js';
import { type ProcessIdentity, identify, kill, waitExit } from '../../src/vm/process.js';
import { startVm, stopVm } from '../../src/vm/manager.js';
import { ext4Qcow2, isolatedTlc, readConsole, tlc } from './harness.js';

const { home } = isolatedTlc();
const store = new CheckpointStore();
const MEM_MIB = 160;
const started: ProcessIdentity[] = [];
after(async () => {
  for (const id of started) {
    kill(id);
    await waitExit(id, 5000);
  }
});

/** A QEMU started the way someone else's script would: its own command line, its own QMP socket. */
async function foreignQemu(
  name: string,
  extra: string[],
  workload = 'memverify:16',
): Promise<{ id: ProcessIdentity; qmp: string; console: string }> {
  const guest = await buildGuest({ cacheDir: defaultGuestCacheDir() });
  const dir = path.join(home, 'foreign', name);
  fs.mkdirSync(dir, { recursive: true });
  const qmp = path.join(dir, 'qmp.sock');
  const consoleLog = path.join(dir, 'console.log');
  const child = spawn(
    'qemu-system-x86_64',
    [
      '-machine',
      'pc,accel=tcg',
      '-m',
      String(MEM_MIB),
      '-display',
      'none',
      '-nodefaults',
      '-kernel',
      guest.kernel,
      '-initrd',
      guest.initrd,
      '-append',
      guestAppendLine(workload),
      '-chardev',
      `file,id=s0,path=${consoleLog}`,
      '-serial',
      'chardev:s0',
      '-qmp',
      `unix:${qmp},server=on,wait=off`,
      ...extra,
    ],
    { detached: true, stdio: 'ignore' },
  );
  child.unref();
  const id = identify(child.pid as number);
  assert.ok(id, 'QEMU started');
  started.push(id);
  for (let i = 0; i < 600 && (lastHeartbeatSeq(consoleLog) ?? 0) < 3; i++) await sleep(50);
  assert.ok((lastHeartbeatSeq(consoleLog) ?? 0) >= 3, 'the foreign guest runs');
  return { id, qmp, console: consoleLog };
}

const CASES: { name: string; extra: (dir: string) => string[]; ramBlock: string; modes: CheckpointMode[] }[] =
  [
    { name: 'plain-m', extra: () => [], ramBlock: 'pc.ram', modes: ['cow', 'stop'] },
    {
      name: 'memfd-ram0',
      extra: () => [
        '-object',
        `memory-backend-memfd,id=ram0,size=${MEM_MIB}M,share=on`,
        '-machine',
        'memory-backend=ram0',
      ],
      ramBlock: 'ram0',
      modes: ['live', 'cow', 'stop'],
    },
    {
      name: 'file-mem1',
      extra: (dir) => [
        '-object',
        `memory-backend-file,id=mem1,size=${MEM_MIB}M,mem-path=${path.join(dir, 'guest.ram')},share=on`,
        '-machine',
        'memory-backend=mem1',
      ],
      ramBlock: 'mem1',
      // On a disk filesystem userfaultfd cannot write-protect the file: no background snapshot.
      modes: fs.statfsSync(os.tmpdir()).type === 0x01021994 ? ['live', 'cow', 'stop'] : ['live', 'stop'],
    },
  ];

describe('an adopted QEMU with a qcow2 disk (-drive)', () => {
  it('checkpoints the disk with memory and restores it on a new overlay; the disk verifies cold', async () => {
    const vm = 'adopt-disk';
    const dir = path.join(home, 'foreign', vm);
    fs.mkdirSync(dir, { recursive: true });
    const image = path.join(dir, 'root.qcow2');
    await ext4Qcow2(image, 48);
    const foreign = await foreignQemu(
      vm,
      [
        '-object',
        `memory-backend-memfd,id=ram0,size=${MEM_MIB}M,share=on`,
        '-machine',
        'memory-backend=ram0',
        '-drive',
        `file=${image},if=virtio,format=qcow2`,
      ],
      'diskverify:0+memverify:16',
    );
    const attach = await tlc(['vm', 'attach', '--name', vm, '--qmp', foreign.qmp]);
    assert.equal(attach.code, 0, attach.stderr);
    const ckpt = await takeCheckpoint({ vm, mode: 'live', store });
    const disk = ckpt.manifest.disks?.[0];
    assert.ok(disk?.captured, 'the adopted disk is captured');
    assert.equal(disk.path, image);
    kill(foreign.id);
    await waitExit(foreign.id, 5000);
    const restored = await restoreCheckpoint({ ref: ckpt.id, store, name: `${vm}-r` });
    const scan = await observeGuest(restored.record.paths.consoleLog, 3000);
    assert.deepEqual(continuationProblems(scan, ckpt.manifest.guestHeartbeatSeqBefore), []);
    assert.ok(
      scan.heartbeats.some((h) => h.kind === 'diskverify'),
      'the restored guest writes its disk',
    );
    const argv = fs.readFileSync(`/proc/${restored.record.process?.pid}/cmdline`, 'latin1').split('\0');
    const drive = argv.find((a) => a.includes('if=virtio')) ?? '';
    assert.doesNotMatch(drive, /root\.qcow2/, 'the restored VM does not write the original image');
    await stopVm(`${vm}-r`, { force: true });
    const overlay = /file=([^,]+)/.exec(drive)?.[1] as string;
    const { record } = await startVm({
      name: `${vm}-cold`,
      memMiB: 128,
      workload: 'diskverify:8',
      disks: [{ path: overlay }],
    });
    const verdict = readConsole(record.paths.consoleLog).diskVerdicts[0];
    await stopVm(`${vm}-cold`, { force: true });
    assert.ok(verdict?.ok, `cold boot verdict ${JSON.stringify(verdict)}`);
  });
});

for (const c of CASES) {
  describe(`an adopted QEMU (${c.name})`, () => {
    it('reports what it supports, checkpoints in each such mode, and restores lazily and eagerly', async () => {
      const vm = `adopt-${c.name}`;
      const foreign = await foreignQemu(vm, c.extra(path.join(home, 'foreign', vm)));
      const attach = await tlc(['vm', 'attach', '--name', vm, '--qmp', foreign.qmp, '--json']);
      assert.equal(attach.code, 0, attach.stderr);
      const info = JSON.parse(attach.stdout) as {
        ramBlock: string;
        modes: Record<CheckpointMode, { ok: boolean; why: string }>;
      };
      assert.equal(info.ramBlock, c.ramBlock);
      assert.deepEqual(
        (['live', 'cow', 'stop'] as const).filter((m) => info.modes[m].ok),
        c.modes,
        JSON.stringify(info.modes),
      );
      if (!c.modes.includes('live')) {
        const before = store.list().length;
        await assert.rejects(takeCheckpoint({ vm, mode: 'live', store }), (err: unknown) => {
          assert.ok(err instanceof TlcError);
          assert.match(err.message, /--mode live cannot work.*anonymous RAM.*Use --mode cow/);
          return true;
        });
        assert.equal(store.list().length, before, 'a refused mode publishes nothing');
      }
      const ids: string[] = [];
      for (const mode of c.modes) ids.push((await takeCheckpoint({ vm, mode, store })).id);
      const consoleBytes = fs.statSync(foreign.console).size;
      kill(foreign.id);
      await waitExit(foreign.id, 5000);

      const restores = [
        ...ids.map((id) => ({ id, eager: false })),
        { id: ids.at(-1) as string, eager: true },
      ];
      for (const [i, r] of restores.entries()) {
        const name = `${vm}-r${i}`;
        const restored = await restoreCheckpoint({ ref: r.id, store, name, eager: r.eager });
        const scan = await observeGuest(restored.record.paths.consoleLog, 2500);
        assert.deepEqual(
          continuationProblems(scan, restored.checkpoint.manifest.guestHeartbeatSeqBefore),
          [],
          `${r.id} (${r.eager ? 'eager' : 'lazy'})`,
        );
        assert.notEqual(restored.record.paths.consoleLog, foreign.console);
        await stopVm(name, { force: true });
      }
      assert.ok(fs.statSync(foreign.console).size >= consoleBytes, "the original's console log is untouched");
    });
  });
}
