import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, describe, it } from 'node:test';
import { QmpError } from '../../src/core/errors.js';
import { QmpClient } from '../../src/qmp/client.js';
import { identify, kill } from '../../src/vm/process.js';
import { findQemu } from '../../src/vm/qemu.js';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tlc-qmp-'));
after(() => fs.rmSync(dir, { recursive: true, force: true }));

/** A bare QEMU (firmware only, paused): enough to talk QMP to. */
async function bareQemu(name: string): Promise<{ socket: string; pid: number }> {
  const qemu = await findQemu();
  const socket = path.join(dir, `${name}.sock`);
  const child = spawn(
    qemu.binary,
    [
      '-machine',
      'pc,accel=tcg',
      '-m',
      '32M',
      '-nodefaults',
      '-display',
      'none',
      '-S',
      '-qmp',
      `unix:${socket},server=on,wait=off`,
    ],
    { stdio: 'ignore' },
  );
  const id = identify(child.pid!)!;
  after(() => kill(id));
  for (let i = 0; i < 400 && !fs.existsSync(socket); i++) await sleep(10);
  return { socket, pid: id.pid };
}

async function rejectsWithCode(p: Promise<unknown>, code: string): Promise<void> {
  await assert.rejects(p, (err: unknown) => err instanceof QmpError && err.code === code);
}

describe('QMP client against a real QEMU', () => {
  it('executes typed commands and receives events', async () => {
    const { socket } = await bareQemu('events');
    const qmp = await QmpClient.connect(socket);
    const status = await qmp.execute('query-status');
    assert.equal(status.status, 'prelaunch');
    const version = await qmp.execute('query-version');
    assert.equal(typeof version.qemu.major, 'number');
    const resumed = qmp.waitEvent('RESUME', 5000);
    await qmp.execute('cont');
    assert.equal((await resumed).event, 'RESUME');
    await rejectsWithCode(qmp.execute('migrate', { uri: 'bogus:uri' }), 'E_QMP_EXECUTE');
    qmp.close();
  });

  it('rejects pending calls with E_QMP_CLOSED when QEMU dies mid-call', async () => {
    const { socket, pid } = await bareQemu('dies');
    const qmp = await QmpClient.connect(socket);
    const events = qmp.events();
    const pending = qmp.execute('query-migrate', undefined, { timeoutMs: 30_000 });
    const stopped = qmp.execute('stop', undefined, { timeoutMs: 30_000 });
    process.kill(pid, 'SIGKILL');
    await Promise.allSettled([pending, stopped]).then((results) => {
      // One call may have been answered before the kill landed; any that was not is E_QMP_CLOSED.
      for (const r of results)
        if (r.status === 'rejected') assert.equal((r.reason as QmpError).code, 'E_QMP_CLOSED');
    });
    await rejectsWithCode(qmp.execute('query-status'), 'E_QMP_CLOSED');
    const collected: unknown[] = [];
    for await (const ev of events) collected.push(ev);
    assert.ok(Array.isArray(collected), 'event iterator ends when the connection closes');
  });

  it('times out a call that gets no reply, and refuses peers that are not QMP', async () => {
    const silent = path.join(dir, 'silent.sock');
    const server = net
      .createServer((s) => s.write('{"QMP": {"version": {}, "capabilities": []}}\n'))
      .listen(silent);
    await rejectsWithCode(QmpClient.connect(silent, { timeoutMs: 300 }), 'E_QMP_TIMEOUT');
    server.close();
    const noSocket = path.join(dir, 'absent.sock');
    await rejectsWithCode(QmpClient.connect(noSocket, { timeoutMs: 300 }), 'E_QMP_CONNECT');
  });
});
