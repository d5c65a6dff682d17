import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { describe, it } from 'node:test';
import { startVm, stopVm } from '../../src/vm/manager.js';
import { isolatedTlc, readConsole } from './harness.js';

const { home } = isolatedTlc();
const PAGE = 4096;
const MAGIC = Buffer.from('MEMVRFY!');

describe('memverify detects corruption of its memory', () => {
  it('reports a byte flipped from outside the VM in a shared RAM file', async () => {
    const ramFile = path.join(home, 'guest-ram');
    fs.mkdirSync(home, { recursive: true });
    const vm = await startVm({
      name: 'victim',
      memMiB: 128,
      workload: 'memverify:16',
      memory: { kind: 'file', path: ramFile, share: true },
    });
    await sleep(500);
    assert.equal(readConsole(vm.record.paths.consoleLog).corruptions.length, 0, 'clean before the flip');

    // Find one of memverify's pages by its header and flip a byte in the middle of its body.
    const fd = fs.openSync(ramFile, 'r+');
    const page = Buffer.alloc(PAGE);
    let victim = -1;
    let pageIndex = -1;
    const size = fs.fstatSync(fd).size;
    for (let off = 0; off < size && victim < 0; off += PAGE) {
      fs.readSync(fd, page, 0, PAGE, off);
      if (page.subarray(0, 8).equals(MAGIC)) {
        victim = off;
        pageIndex = page.readUInt32LE(8);
      }
    }
    assert.ok(victim >= 0, 'found a memverify page in guest RAM');
    const at = victim + 2048;
    const byte = Buffer.alloc(1);
    fs.readSync(fd, byte, 0, 1, at);
    byte[0] = (byte[0] as number) ^ 0xff;
    fs.writeSync(fd, byte, 0, 1, at);
    fs.closeSync(fd);

    let corruptions = readConsole(vm.record.paths.consoleLog).corruptions;
    for (let i = 0; i < 200 && corruptions.length === 0; i++) {
      await sleep(100);
      corruptions = readConsole(vm.record.paths.consoleLog).corruptions;
    }
    assert.ok(corruptions.length > 0, 'memverify printed a CORRUPT line');
    assert.equal(corruptions[0]?.page, pageIndex, 'it names the page we damaged');
    assert.equal(corruptions[0]?.offset, 2048, 'and the word we damaged');
    await stopVm('victim');
  });
});
