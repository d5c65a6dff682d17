import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { describe, it } from 'node:test';
import { TlcError } from '../../src/core/errors.js';
import { buildGuest, defaultGuestCacheDir, guestAppendLine } from '../../src/guest/build.js';
import { BOOT_OK_PREFIX } from '../../src/guest/heartbeat.js';
import { QmpClient } from '../../src/qmp/client.js';
import { KVM_PROBE_TIMEOUT_MS, chooseAccel } from '../../src/vm/accel.js';
import { attachVm, startVm, stopVm, vmStatus } from '../../src/vm/manager.js';
import { identify, isAlive, waitExit } from '../../src/vm/process.js';
import { findQemu } from '../../src/vm/qemu.js';
import { loadVm } from '../../src/vm/registry.js';
import { isolatedTlc, qemuPidsMentioning, readConsole, tlc } from './harness.js';

const { home } = isolatedTlc();

async function expectCode(p: Promise<unknown>, code: string): Promise<TlcError> {
  try {
    await p;
  } catch (err) {
    assert.ok(err instanceof TlcError, `expected a TlcError, got ${String(err)}`);
    assert.equal(err.code, code, err.message);
    assert.ok(!err.message.includes('\n'), 'error is one line');
    return err;
  }
  assert.fail(`expected ${code}`);
}

describe('VM lifecycle on a real TCG guest', () => {
  it('boots the bundled guest, sees heartbeats, reports status, stops cleanly', async () => {
    const started = await startVm({ name: 'life', memMiB: 128, workload: 'memverify:16', accel: 'tcg' });
    const pid = started.record.process?.pid;
    assert.ok(pid && isAlive(started.record.process!));
    await sleep(1500);
    const scan = readConsole(started.record.paths.consoleLog);
    assert.equal(scan.boots, 1);
    assert.ok(scan.heartbeats.length >= 5, `only ${scan.heartbeats.length} heartbeats`);
    const seqs = scan.heartbeats.map((h) => h.seq);
    assert.deepEqual(
      seqs,
      seqs.map((_, i) => i + 1),
      'heartbeat seq counts up from 1',
    );
    assert.equal(scan.corruptions.length, 0);
    const status = await vmStatus(loadVm('life'));
    assert.equal(status.state, 'running');
    assert.equal(status.runState, 'running');
    const spec = JSON.parse(fs.readFileSync(path.join(home, 'vms', 'life', 'vm.json'), 'utf8')).spec;
    assert.equal(spec.machine, 'pc-i440fx-7.2');
    assert.equal(spec.memMiB, 128);
    assert.match(spec.qemu.version, /^\d+\.\d+\.\d+$/);
    assert.equal(fs.statSync(started.record.paths.qmpSocket).mode & 0o077, 0, 'QMP socket is private');

    const cli = await tlc(['vm', 'ls', '--json']);
    assert.equal(cli.code, 0);
    assert.equal(JSON.parse(cli.stdout)[0].name, 'life');

    assert.deepEqual(await stopVm('life'), { wasRunning: true });
    assert.ok(!isAlive(started.record.process!));
    assert.equal((await vmStatus(loadVm('life'))).state, 'stopped');
  });

  it('refuses an occupied name, a missing kernel, and a QEMU that dies during boot', async () => {
    await startVm({ name: 'busy', memMiB: 96, workload: 'idle', bootTimeoutMs: 30_000 });
    const before = qemuPidsMentioning(home).length;
    await expectCode(startVm({ name: 'busy', memMiB: 96 }), 'E_VM_EXISTS');
    await expectCode(startVm({ name: 'nokernel', memMiB: 96, kernel: '/nonexistent/vmlinuz' }), 'E_VM_START');
    // Not a kernel: QEMU exits at once with its own message.
    const err = await expectCode(
      startVm({ name: 'badkernel', memMiB: 96, kernel: '/etc/hostname' }),
      'E_VM_START',
    );
    assert.match(err.message, /QEMU exited/);
    assert.equal(qemuPidsMentioning(home).length, before, 'no stray QEMU after failures');
    await stopVm('busy');

    const cli = await tlc(['vm', 'start', '--name', 'x', '--kernel', '/nonexistent']);
    assert.notEqual(cli.code, 0);
    assert.equal(cli.stderr.trim().split('\n').length, 1);
    assert.match(cli.stderr, /^tlc: --kernel \/nonexistent: no such file/);
  });

  it('adopts a QEMU started outside tlc and refuses a socket that is not QMP', async () => {
    const guest = await buildGuest({ cacheDir: defaultGuestCacheDir() });
    const qemu = await findQemu();
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tlc-foreign-'));
    const qmpPath = path.join(dir, 'qmp.sock');
    const consoleLog = path.join(dir, 'serial.log');
    const child = spawn(
      qemu.binary,
      [
        '-machine',
        'pc,accel=tcg',
        '-m',
        '96M',
        '-nodefaults',
        '-display',
        'none',
        '-serial',
        `file:${consoleLog}`,
        '-qmp',
        `unix:${qmpPath},server=on,wait=off`,
        '-kernel',
        guest.kernel,
        '-initrd',
        guest.initrd,
        '-append',
        guestAppendLine('idle'),
      ],
      { stdio: 'ignore' },
    );
    const id = identify(child.pid!)!;
    try {
      for (let i = 0; i < 200 && !fs.existsSync(qmpPath); i++) await sleep(25);
      const record = await attachVm('foreign', qmpPath);
      assert.equal(record.adopted, true);
      assert.equal(record.process?.pid, child.pid);
      assert.equal(record.spec.machine, 'pc-i440fx-7.2');
      assert.equal(record.spec.memMiB, 96);
      assert.ok(record.spec.adoptedArgv?.includes('-kernel'));
      assert.equal((await vmStatus(loadVm('foreign'))).state, 'running');
      await stopVm('foreign');
      assert.ok(await waitExit(id, 5000), 'adopted QEMU quit on tlc vm stop');
    } finally {
      if (isAlive(id)) process.kill(id.pid, 'SIGKILL');
      fs.rmSync(dir, { recursive: true, force: true });
    }

    const fake = path.join(os.tmpdir(), `tlc-notqmp-${process.pid}.sock`);
    const server = net.createServer((s) => s.end('HTTP/1.1 400 Bad Request\r\n\r\n')).listen(fake);
    try {
      await expectCode(QmpClient.connect(fake, { timeoutMs: 2000 }), 'E_QMP_GREETING');
      await expectCode(attachVm('fake', fake), 'E_QMP_GREETING');
    } finally {
      server.close();
      fs.rmSync(fake, { force: true });
    }
  });

  it('auto accelerator falls back within its bound when KVM guests do not run', async () => {
    const guest = await buildGuest({ cacheDir: defaultGuestCacheDir() });
    const qemu = await findQemu();
    fs.rmSync(path.join(home, 'kvm-probe.json'), { force: true });
    const t0 = performance.now();
    const choice = await chooseAccel('auto', {
      qemuBinary: qemu.binary,
      qemuVersion: qemu.version,
      kernel: guest.kernel,
      initrd: guest.initrd,
      append: guestAppendLine('idle'),
      readyMarker: BOOT_OK_PREFIX,
    });
    const ms = performance.now() - t0;
    assert.ok(ms < KVM_PROBE_TIMEOUT_MS + 3000, `auto took ${ms} ms`);
    assert.ok(choice.accel === 'tcg' || choice.accel === 'kvm');
    assert.equal(qemuPidsMentioning('accel=kvm').length, 0, 'probe QEMU is gone');
  });
});
