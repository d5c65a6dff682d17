/**
 * The real proof: streams synthesized by MigrationStreamWriter are loaded by a real QEMU 7.2
 * destination (`-incoming "exec:cat <file>"`, tlc's machine arguments). Memory is checked by
 * migrating the restored VM out again and comparing every page with the source fixture.
 * Skipped when qemu-system-x86_64 7.2 is not installed.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { loadFixture, loadSharedRamImage, type FixtureName } from './fixtures/index.js';
import {
  assertSamePages,
  parseStream,
  writeModelToBuffer,
  type StreamModel,
  type WriteModelOptions,
} from './fixtures/model.js';
import {
  GUEST_RAM_BYTES,
  machineArgs,
  migrateToFile,
  qemuAvailable,
  setCapabilities,
  startQemu,
  type RamBackend,
  type RunningQemu,
} from './fixtures/qemu.js';

const skip = qemuAvailable() ? false : 'qemu-system-x86_64 7.2 is not installed';

interface Restored {
  vm: RunningQemu;
  migrateStatus: unknown;
  runStatus: unknown;
}

describe('real QEMU 7.2 destination', { skip, timeout: 120_000 }, () => {
  let dir = '';
  const running: RunningQemu[] = [];
  before(() => {
    dir = mkdtempSync(join(tmpdir(), 'tlc-stream-restore-'));
  });
  after(async () => {
    for (const vm of running) await vm.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  /** Write `stream` to a file and start a destination QEMU that loads it; wait for the load. */
  async function restore(
    stream: Buffer,
    opts: { ram?: RamBackend; autostart?: boolean; capabilities?: Record<string, boolean> } = {},
  ): Promise<Restored> {
    const file = join(dir, `stream-${running.length}.qevm`);
    writeFileSync(file, stream);
    const uri = `exec:cat '${file}'`;
    const defer = opts.capabilities !== undefined;
    const args = [...machineArgs(opts.ram), '-incoming', defer ? 'defer' : uri];
    if (opts.autostart === false) args.push('-S');
    const vm = await startQemu(args);
    running.push(vm);
    if (opts.capabilities !== undefined) {
      await setCapabilities(vm.qmp, opts.capabilities);
      await vm.qmp.execute('migrate-incoming', { uri });
    }
    const deadline = Date.now() + 30_000;
    let migrate: Record<string, unknown> = {};
    for (;;) {
      try {
        migrate = await vm.qmp.execute('query-migrate');
      } catch (err) {
        // A 7.2 destination exits when the load fails: report what it said.
        await sleep(100);
        assert.fail(`destination died: ${String(err)}\n${vm.stderr()}`);
      }
      if (migrate.status === 'completed' || migrate.status === 'failed') break;
      assert.ok(Date.now() < deadline, `destination load still ${String(migrate.status)}`);
      await sleep(20);
    }
    const status = await vm.qmp.execute('query-status');
    return { vm, migrateStatus: migrate.status, runStatus: status.status };
  }

  /** Migrate the restored VM out again and parse what it holds. */
  async function dump(vm: RunningQemu): Promise<StreamModel> {
    const file = join(dir, `dump-${running.length}.qevm`);
    await vm.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 0 });
    await migrateToFile(vm.qmp, file);
    return parseStream(readFileSync(file));
  }

  async function synthesize(
    name: FixtureName,
    opts: WriteModelOptions = {},
  ): Promise<{ model: StreamModel; stream: Buffer }> {
    const model = parseStream(loadFixture(name));
    return { model, stream: await writeModelToBuffer(model, { recordsPerSection: 4096, ...opts }) };
  }

  it('eager: a full synthesized stream of a running VM lands in "running"', async () => {
    const { stream } = await synthesize('precopyRunning');
    const r = await restore(stream);
    assert.equal(r.migrateStatus, 'completed', r.vm.stderr());
    assert.equal(r.runStatus, 'running');
    assert.equal(r.vm.stderr(), '');
  });

  it('eager: a stopped VM lands in "paused" with every page of every block identical', async () => {
    const { model, stream } = await synthesize('precopyStopped');
    const r = await restore(stream);
    assert.equal(r.migrateStatus, 'completed', r.vm.stderr());
    assert.equal(r.runStatus, 'paused');
    const out = await dump(r.vm);
    assertSamePages(out, model);
    assert.equal(out.deviceInfo?.runstate, 'paused');
  });

  it('eager: zero pages may be dropped (a fresh destination reads them as zero)', async () => {
    const { model, stream } = await synthesize('precopyRunning', { dropZeroPages: true });
    const r = await restore(stream, { autostart: false });
    assert.equal(r.migrateStatus, 'completed', r.vm.stderr());
    assert.equal(r.runStatus, 'paused'); // globalstate says running, but -S keeps it paused
    assertSamePages(await dump(r.vm), model);
  });

  it('lazy: no ram0 pages, ram0 mapped privately from the checkpoint image', async () => {
    const { model, stream } = await synthesize('precopyRunning', { omitBlocks: ['ram0'] });
    assert.ok(stream.length < 400_000, `lazy stream of ${stream.length} bytes`);
    const image = join(dir, 'ram0.img');
    const content = model.image('ram0');
    assert.equal(content.length, GUEST_RAM_BYTES);
    writeFileSync(image, content);
    const digest = (): string => createHash('sha256').update(readFileSync(image)).digest('hex');
    const before = digest();

    const r = await restore(stream, { ram: { kind: 'file', path: image, share: false }, autostart: false });
    assert.equal(r.migrateStatus, 'completed', r.vm.stderr());
    assert.equal(r.runStatus, 'paused');
    assertSamePages(await dump(r.vm), model);
    await r.vm.qmp.execute('cont');
    assert.equal((await r.vm.qmp.execute('query-status')).status, 'running');

    const r2 = await restore(stream, { ram: { kind: 'file', path: image, share: false } });
    assert.equal(r2.migrateStatus, 'completed', r2.vm.stderr());
    assert.equal(r2.runStatus, 'running');
    await sleep(200);
    assert.equal(digest(), before, 'share=off keeps the image unchanged');
  });

  it('x-ignore-shared: block entries with mr_addr and the capabilities subsection are accepted', async () => {
    const { stream } = await synthesize('ignoreShared');
    const shared = join(dir, 'ram0.shared');
    writeFileSync(shared, loadSharedRamImage('ignoreShared'));
    const r = await restore(stream, {
      ram: { kind: 'file', path: shared, share: true },
      capabilities: { 'x-ignore-shared': true },
    });
    assert.equal(r.migrateStatus, 'completed', r.vm.stderr());
    assert.equal(r.runStatus, 'running');
  });

  it('a corrupted stream is refused by QEMU too (sanity check of the harness)', async () => {
    const { model, stream } = await synthesize('precopyStopped');
    const bad = Buffer.from(stream);
    const startFooter = 8 + model.configRaw.length + (model.sections[0]?.bytes ?? 0) - 5;
    assert.equal(bad[startFooter], 0x7e);
    bad.writeUInt32BE(0x99, startFooter + 1); // the START section's footer names another section
    const file = join(dir, 'bad.qevm');
    writeFileSync(file, bad);
    const vm = await startQemu([...machineArgs(), '-incoming', `exec:cat '${file}'`]).catch(
      (err: unknown) => err,
    );
    if (vm instanceof Error) return; // exited before QMP came up: refused
    running.push(vm as RunningQemu);
    const deadline = Date.now() + 10_000;
    for (;;) {
      const status = await (vm as RunningQemu).qmp.execute('query-migrate').catch(() => ({ status: 'died' }));
      if (status.status === 'died' || status.status === 'failed') break;
      assert.notEqual(status.status, 'completed');
      assert.ok(Date.now() < deadline);
      await sleep(20);
    }
  });
});
