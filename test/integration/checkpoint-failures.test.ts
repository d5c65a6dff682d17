import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { describe, it } from 'node:test';
import { takeCheckpoint } from '../../src/checkpoint/take.js';
import { TlcError } from '../../src/core/errors.js';
import { continuationProblems, observeGuest } from '../../src/guest/observe.js';
import { QmpClient } from '../../src/qmp/client.js';
import { restoreCheckpoint } from '../../src/restore/restore.js';
import { MANIFEST_FILE, sealManifest } from '../../src/store/manifest.js';
import { loadSigningKey } from '../../src/store/sign.js';
import { CheckpointStore } from '../../src/store/store.js';
import { verifyCheckpoint } from '../../src/store/verify.js';
import { killVm, startVm, stopVm } from '../../src/vm/manager.js';
import { isAlive } from '../../src/vm/process.js';
import { loadVm, removeVm } from '../../src/vm/registry.js';
import { HOLD_ENV } from '../../src/checkpoint/hold.js';
import { heartbeatsAdvance, isolatedTlc, spawnTlc, tlc } from './harness.js';

const { store: storeDir } = isolatedTlc();
const store = new CheckpointStore();
const PAGE = 4096;

async function rejectsWith(p: Promise<unknown>, code: string): Promise<TlcError> {
  try {
    await p;
  } catch (err) {
    assert.ok(err instanceof TlcError, String(err));
    assert.equal(err.code, code, err.message);
    return err;
  }
  assert.fail(`expected ${code}`);
}

function listedIds(): string[] {
  return store.list().map((c) => c.id);
}

describe('checkpoints under failure and bad input', () => {
  it('one checkpoint restored twice gives two independent, correct VMs', async () => {
    await startVm({ name: 'twice', memMiB: 128, workload: 'memverify:32' });
    await sleep(800);
    const ckpt = await takeCheckpoint({ vm: 'twice', mode: 'cow', store });
    await killVm('twice');
    const [a, b] = await Promise.all([
      restoreCheckpoint({ ref: ckpt.id, store, name: 'twice-a' }),
      restoreCheckpoint({ ref: ckpt.id, store, name: 'twice-b' }),
    ]);
    assert.notEqual(a.record.process?.pid, b.record.process?.pid);
    const [sa, sb] = await Promise.all([
      observeGuest(a.record.paths.consoleLog, 5000),
      observeGuest(b.record.paths.consoleLog, 5000),
    ]);
    assert.deepEqual(continuationProblems(sa, ckpt.manifest.guestHeartbeatSeqBefore), []);
    assert.deepEqual(continuationProblems(sb, ckpt.manifest.guestHeartbeatSeqBefore), []);
    await stopVm('twice-a', { force: true });
    await stopVm('twice-b', { force: true });
    assert.ok(verifyCheckpoint(ckpt, true).ok, 'image unchanged by two restores');
  });

  it('a flipped byte in the RAM image is caught by verify and by memverify', async () => {
    await startVm({ name: 'flip', memMiB: 128, workload: 'memverify:32' });
    await sleep(800);
    const ckpt = await takeCheckpoint({ vm: 'flip', mode: 'stop', store });
    await killVm('flip');
    const ram = ckpt.manifest.blocks.find((b) => b.name === 'ram0')!;
    const image = path.join(ckpt.dir, ram.file);
    const fd = fs.openSync(image, 'r+');
    const page = Buffer.alloc(PAGE);
    let victim = -1;
    for (let off = 0; victim < 0 && off < ram.usedLength; off += PAGE) {
      fs.readSync(fd, page, 0, PAGE, off);
      if (page.toString('latin1', 0, 8) === 'MEMVRFY!') victim = off;
    }
    assert.ok(victim >= 0);
    const pageIndex = page.readUInt32LE(8);
    fs.writeSync(fd, Buffer.from([page[1000]! ^ 0x5a]), 0, 1, victim + 1000);
    fs.closeSync(fd);

    const report = verifyCheckpoint(ckpt, true);
    assert.equal(report.ok, false);
    assert.match(report.problems.join('\n'), /block-0\.img \(ram0\): bytes \d+-\d+ do not match/);
    const cli = await tlc(['verify', ckpt.id]);
    assert.notEqual(cli.code, 0);
    assert.match(cli.stderr, /do not match their checksum/);
    await rejectsWith(restoreCheckpoint({ ref: ckpt.id, store, name: 'flip-v', verify: true }), 'E_CORRUPT');
    assert.throws(() => loadVm('flip-v'), 'no VM started for a refused restore');

    // Without --verify, the guest itself finds the damage on the page we changed.
    const restored = await restoreCheckpoint({ ref: ckpt.id, store, name: 'flip-r' });
    let scan = await observeGuest(restored.record.paths.consoleLog, 1000);
    for (let i = 0; i < 20 && scan.corruptions.length === 0; i++)
      scan = await observeGuest(restored.record.paths.consoleLog, 500);
    await stopVm('flip-r', { force: true });
    assert.equal(scan.corruptions[0]?.page, pageIndex, 'memverify names the damaged page');
  });

  it('refuses a checkpoint from another QEMU version, and a damaged manifest', async () => {
    await startVm({ name: 'ver', memMiB: 96, workload: 'idle' });
    const ckpt = await takeCheckpoint({ vm: 'ver', mode: 'stop', store });
    await stopVm('ver', { force: true });
    const copyDir = path.join(storeDir, 'ver-copy');
    fs.cpSync(ckpt.dir, copyDir, { recursive: true });
    const manifest = { ...ckpt.manifest, id: 'ver-copy', qemuVersion: '6.2.0' };
    const key = loadSigningKey({ create: false })?.key;
    assert.ok(key, 'the first checkpoint created the per-user signing key');
    // Signed with our key, as a checkpoint taken by an older QEMU on another of our hosts would be.
    fs.writeFileSync(path.join(copyDir, MANIFEST_FILE), sealManifest(manifest, key));
    const err = await rejectsWith(restoreCheckpoint({ ref: 'ver-copy', store, name: 'ver2' }), 'E_MISMATCH');
    assert.match(err.message, /taken with QEMU 6\.2\.0/);

    // The same edit by someone without the key: the plain checksum is redone, the signature cannot be.
    fs.writeFileSync(
      path.join(copyDir, MANIFEST_FILE),
      sealManifest({
        ...manifest,
        qemuVersion: ckpt.manifest.qemuVersion,
        vmWasRunning: !ckpt.manifest.vmWasRunning,
      }),
    );
    const forged = await tlc(['restore', 'ver-copy', '--name', 'ver4']);
    assert.notEqual(forged.code, 0);
    assert.match(forged.stderr, /not signed.*--allow-unsigned/);
    assert.throws(() => loadVm('ver4'), 'no VM started for a forged checkpoint');

    // An edited manifest no longer matches its checksum: not listed, not restorable.
    const edited = sealManifest({ ...ckpt.manifest, id: 'ver-copy' }).replace('"memMiB": 96', '"memMiB": 97');
    fs.writeFileSync(path.join(copyDir, MANIFEST_FILE), edited);
    assert.ok(!listedIds().includes('ver-copy'), 'a damaged manifest is not listed');
    const cli = await tlc(['restore', 'ver-copy', '--name', 'ver3']);
    assert.notEqual(cli.code, 0);
    assert.match(cli.stderr, /manifest checksum mismatch/);
  });

  it('replays QEMU arguments from a checkpoint only when told to, and prints them', async () => {
    const extraArgs = ['-smbios', 'type=1,serial=tlc-args-test'];
    await startVm({ name: 'args', memMiB: 96, workload: 'idle', extraArgs });
    const ckpt = await takeCheckpoint({ vm: 'args', mode: 'stop', store });
    await stopVm('args', { force: true });
    removeVm('args'); // as on another host, which has no record of this VM
    const refused = await rejectsWith(restoreCheckpoint({ ref: ckpt.id, store }), 'E_UNTRUSTED');
    assert.match(refused.message, /serial=tlc-args-test/);
    assert.match(refused.message, /--trust-checkpoint-args/);
    const lines: string[] = [];
    const restored = await restoreCheckpoint({
      ref: ckpt.id,
      store,
      trustCheckpointArgs: true,
      log: (l) => lines.push(l),
    });
    assert.match(
      lines.join('\n'),
      /running QEMU with the checkpoint's arguments: -smbios type=1,serial=tlc-args-test/,
    );
    assert.deepEqual(restored.record.spec.extraArgs, extraArgs);
    await stopVm('args', { force: true });
  });

  it('leaves a paused VM paused in every mode', async () => {
    const { record } = await startVm({ name: 'paused', memMiB: 96, workload: 'memverify:16' });
    const qmp = await QmpClient.connect(record.paths.qmpSocket, { timeoutMs: 5000 });
    await qmp.execute('stop');
    qmp.close();
    for (const mode of ['live', 'cow', 'stop'] as const) {
      const ckpt = await takeCheckpoint({ vm: 'paused', mode, store });
      assert.equal(ckpt.manifest.vmWasRunning, false);
      const check = await QmpClient.connect(record.paths.qmpSocket, { timeoutMs: 5000 });
      let status = (await check.execute('query-status')).status;
      // cow: QEMU starts the guest itself; tlc pauses it again as soon as it hears of it.
      for (let i = 0; i < 50 && status !== 'paused'; i++) {
        await sleep(20);
        status = (await check.execute('query-status')).status;
      }
      check.close();
      // Plain `paused`, not QEMU's `postmigrate`, which would refuse the next checkpoint.
      assert.equal(status, 'paused', `${mode}: still paused`);
    }
    await stopVm('paused', { force: true });
  });

  it('killing QEMU or tlc mid-checkpoint leaves earlier checkpoints intact and nothing partial listed', async () => {
    await startVm({ name: 'crash', memMiB: 256, workload: 'memverify:128' });
    await sleep(800);
    const good = await takeCheckpoint({ vm: 'crash', mode: 'live', store });
    const before = listedIds();

    // tlc dies while QEMU streams: the guest keeps running (QEMU's migration fails).
    const cli = spawnTlc(['checkpoint', 'crash', '--mode', 'live'], { [HOLD_ENV]: 'streaming' });
    await cli.waitFor(/holding at streaming/);
    cli.child.kill('SIGKILL');
    await cli.exited;
    assert.deepEqual(listedIds(), before);
    const record = loadVm('crash');
    assert.ok(record.process && isAlive(record.process), 'QEMU survives a dead tlc');
    assert.ok(await heartbeatsAdvance(record.paths.consoleLog), 'and its guest works on');

    // QEMU dies mid-checkpoint, once the stream is flowing: a typed error, nothing published.
    let killed: Promise<unknown> | undefined;
    const pending = takeCheckpoint({
      vm: 'crash',
      mode: 'live',
      store,
      onStage: (line) => {
        if (!killed && line.startsWith('setup:')) killed = killVm('crash');
      },
    });
    await assert.rejects(pending, (err: unknown) => err instanceof TlcError);
    assert.ok(killed, 'QEMU was killed while migrating');
    await killed;
    assert.deepEqual(listedIds(), before);
    assert.ok(verifyCheckpoint(store.resolve(good.id), true).ok, 'earlier checkpoint intact');
    assert.deepEqual(
      fs.readdirSync(storeDir).filter((e) => e.startsWith('.tmp-') && e.endsWith(`-${process.pid}`)),
      [],
      'our staging directories are gone',
    );
  });
});
