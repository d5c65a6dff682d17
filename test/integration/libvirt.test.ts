/**
 * tlc's libvirt building blocks against a real libvirt 9.0 (Debian 12, stock qemu.conf: QEMU runs
 * as libvirt-qemu), started by this test where nothing else runs it:
 *   1. virtlogd + libvirtd started by hand, stopped by pid afterwards;
 *   2. a domain booting the bundled guest with memverify (TCG, 128 MiB, no network);
 *   3. QMP through libvirt (LibvirtMonitor): commands, events, per-command latency;
 *   4. a stop-mode migration out of the domain through a passed descriptor, parsed by tlc's reader
 *      and written at the same time as a libvirt save image;
 *   5. `virsh restore` of that image: the guest continues from the checkpoint, memory verified.
 * Skips, saying why, where libvirt cannot run (not root, not installed: scripts/setup.sh --test
 * installs it). TLC_SKIP_LIBVIRT=1 skips it on purpose.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, describe, it } from 'node:test';
import { buildGuest, defaultGuestCacheDir, guestAppendLine } from '../../src/guest/build.js';
import { scanConsole } from '../../src/guest/heartbeat.js';
import { continuationProblems } from '../../src/guest/observe.js';
import { type LibvirtDaemons, libvirtUnavailable, startLibvirtDaemons } from '../../src/libvirt/daemon.js';
import { LIBVIRT_IMAGES_DIR, guestDomainXml, stageGuestFiles } from '../../src/libvirt/domain-xml.js';
import { LibvirtMonitor } from '../../src/libvirt/monitor.js';
import { SaveImageWriter, decodeSaveImagePrefix } from '../../src/libvirt/save-image.js';
import { migrateToFd } from '../../src/libvirt/stream-fd.js';
import { domainInfo, domainState, runVirsh, virsh } from '../../src/libvirt/virsh.js';
import { MigrationStreamReader, type DeviceStateInfo, type StreamSink } from '../../src/stream/reader.js';
import { lastHeartbeatSeq } from '../../src/vm/console.js';
import { HOLD_ENV } from '../../src/checkpoint/hold.js';
import { type CliResult, ext4Qcow2, spawnTlc, tlc } from './harness.js';

const URI = 'qemu:///system';
const MEM_MIB = 128;
const WORKLOAD = 'memverify:32';
const MiB = 1024 * 1024;

const skip = process.env.TLC_SKIP_LIBVIRT ? 'TLC_SKIP_LIBVIRT is set' : libvirtUnavailable();

/** Numbers for the report, printed at the end. */
const report: Record<string, string> = {};

/** A tlc of its own for a describe block: state, store and signing key under `base`. */
function privateTlcEnv(base: string): NodeJS.ProcessEnv {
  return {
    ...process.env,
    TLC_HOME: path.join(base, 'home'),
    TLC_STORE: path.join(base, 'store'),
    XDG_CONFIG_HOME: path.join(base, 'config'),
  };
}

function fmtMs(ms: number): string {
  return `${ms.toFixed(ms < 10 ? 1 : 0)} ms`;
}

async function waitFor(
  what: string,
  timeoutMs: number,
  ok: () => boolean | Promise<boolean>,
): Promise<number> {
  const t0 = performance.now();
  while (!(await ok())) {
    if (performance.now() - t0 > timeoutMs) assert.fail(`${what}: not within ${timeoutMs} ms`);
    await sleep(50);
  }
  return performance.now() - t0;
}

function consoleText(file: string, from = 0): string {
  const buf = fs.readFileSync(file);
  return buf.subarray(from).toString('latin1');
}

describe('libvirt 9.0: daemons, domain, QMP passthrough, fd migration, save image restore', { skip }, () => {
  const name = `tlc-test-${process.pid}`;
  const base = fs.mkdtempSync(path.join(os.tmpdir(), 'tlc-libvirt-'));
  const stageDir = path.join(LIBVIRT_IMAGES_DIR, name);
  const consoleLog = path.join(base, 'console.log');
  const image = path.join(base, `${name}.save`);
  let daemons: LibvirtDaemons | undefined;
  let monitor: LibvirtMonitor | undefined;
  /** The newest heartbeat printed before the guest was stopped for the capture. */
  let seqAtCheckpoint = 0;

  before(async () => {
    daemons = await startLibvirtDaemons({ uri: URI, logDir: path.join(base, 'daemons'), timeoutMs: 60_000 });
    report['daemons'] =
      daemons.started.length > 0
        ? `started ${daemons.started.map((d) => `${d.name} (pid ${d.pid})`).join(', ')} in ${fmtMs(daemons.startMs)}`
        : 'already running (not started here)';
    report['host changes while running'] = daemons.changes.join('; ') || 'none';
  });

  after(async () => {
    monitor?.close();
    await runVirsh(['destroy', name], { uri: URI }).catch(() => undefined);
    await runVirsh(['undefine', name], { uri: URI }).catch(() => undefined);
    await daemons?.stop();
    fs.rmSync(stageDir, { recursive: true, force: true });
    fs.rmSync(`/var/log/libvirt/qemu/${name}.log`, { force: true });
    fs.rmSync(base, { recursive: true, force: true });
    for (const [k, v] of Object.entries(report)) console.log(`# libvirt ${k}: ${v}`);
  });

  it('defines and starts a domain that boots the bundled guest with memverify', async () => {
    const guest = await stageGuestFiles(await buildGuest({ cacheDir: defaultGuestCacheDir() }), stageDir);
    const xml = guestDomainXml({
      name,
      memMiB: MEM_MIB,
      kernel: guest.kernel,
      initrd: guest.initrd,
      cmdline: guestAppendLine(WORKLOAD),
      consoleLog,
    });
    const xmlFile = path.join(base, 'domain.xml');
    fs.writeFileSync(xmlFile, xml);
    let t0 = performance.now();
    await virsh(['define', xmlFile], { uri: URI, timeoutMs: 120_000 });
    report['define'] = fmtMs(performance.now() - t0);
    t0 = performance.now();
    await virsh(['start', name], { uri: URI, timeoutMs: 60_000 });
    report['start'] = fmtMs(performance.now() - t0);
    assert.equal(await domainState(name, { uri: URI }), 'running');
    const bootMs = await waitFor('three heartbeats', 30_000, () => (lastHeartbeatSeq(consoleLog) ?? 0) >= 3);
    report['boot to 3 heartbeats'] = fmtMs(bootMs);
    const scan = scanConsole(consoleText(consoleLog));
    assert.equal(scan.boots, 1);
    const seqs = scan.heartbeats.map((h) => h.seq);
    assert.deepEqual(
      seqs,
      seqs.map((_, i) => i + 1),
      'heartbeats count up from 1',
    );
    assert.equal(scan.corruptions.length, 0);
    // QEMU runs as libvirt-qemu (Debian's qemu.conf) and the console file is libvirt's descriptor.
    const qemuPid = Number(fs.readFileSync(`/run/libvirt/qemu/${name}.pid`, 'utf8').trim());
    const status = fs.readFileSync(`/proc/${qemuPid}/status`, 'utf8');
    const uid = Number(/^Uid:\s+(\d+)/m.exec(status)?.[1]);
    const passwd = fs.readFileSync('/etc/passwd', 'utf8');
    assert.equal(uid, Number(/^libvirt-qemu:[^:]*:(\d+):/m.exec(passwd)?.[1]), 'QEMU runs as libvirt-qemu');
  });

  it('runs QMP commands and receives events through libvirt', async () => {
    const t0 = performance.now();
    monitor = await LibvirtMonitor.connect(name, { uri: URI, timeoutMs: 10_000 });
    report['monitor connect'] = fmtMs(performance.now() - t0);
    const m = monitor;
    const status = await m.execute('query-status');
    assert.equal(status.status, 'running');
    const version = await m.execute('query-version');
    assert.equal(version.qemu.major, 7);
    const times: number[] = [];
    for (let i = 0; i < 10; i++) {
      const s = performance.now();
      await m.execute('query-status');
      times.push(performance.now() - s);
    }
    times.sort((a, b) => a - b);
    report['command latency (query-status, 10 runs)'] =
      `median ${fmtMs(times[5] ?? 0)}, min ${fmtMs(times[0] ?? 0)}, max ${fmtMs(times[9] ?? 0)}`;

    const stopped = m.waitEvent('STOP', 10_000);
    await m.execute('stop');
    const stopEvent = await stopped;
    assert.ok(stopEvent.timestamp && stopEvent.timestamp.seconds > 1_600_000_000, 'QEMU timestamp');
    assert.equal(await domainState(name, { uri: URI }), 'paused', 'libvirt follows STOP');
    const resumed = m.waitEvent('RESUME', 10_000);
    await m.execute('cont');
    await resumed;
    assert.equal(await domainState(name, { uri: URI }), 'running', 'libvirt follows RESUME');

    const err = await m.executeRaw('no-such-command').catch((e: unknown) => e);
    assert.ok(err instanceof Error && 'code' in err && err.code === 'E_QMP_EXECUTE', String(err));
    assert.equal((err as { qmpClass?: string }).qmpClass, 'CommandNotFound');
    const info = await virsh(['dominfo', name], { uri: URI });
    assert.match(info, /tainted: custom monitor control commands issued/);
  });

  it('streams a stop-mode migration into tlc through a passed descriptor and writes a save image', async () => {
    const m = monitor;
    assert.ok(m);
    const xml = await virsh(['dumpxml', '--migratable', name], { uri: URI });
    const paramsBefore = await m.execute('query-migrate-parameters');
    const writer = await SaveImageWriter.create(image, { xml, wasRunning: true });
    let pages = 0;
    let zeroPages = 0;
    let device: DeviceStateInfo | undefined;
    let machine = '';
    let blocks: string[] = [];
    const sink: StreamSink = {
      onConfiguration: (machineType) => (machine = machineType),
      onRamStart: () => undefined,
      onBlockList: (list) => (blocks = list.map((b) => `${b.name}:${b.usedLength}`)),
      onPage: () => void pages++,
      onZeroPage: () => void zeroPages++,
      onXbzrlePage: () => assert.fail('no xbzrle pages expected'),
      onRamSectionEnd: () => undefined,
      onDeviceState: (_blob, info) => (device = info),
    };
    const reader = new MigrationStreamReader(sink, { requireVmdesc: true });
    let writes: Promise<void> = Promise.resolve();
    const migrationEvents: string[] = [];
    const onEvent = (ev: { event: string; data?: Record<string, unknown> }): void => {
      if (ev.event === 'MIGRATION') migrationEvents.push(String(ev.data?.status));
    };
    m.on('event', onEvent);
    let first = true;
    const result = await migrateToFd(m, {
      onData: (chunk) => {
        if (first) {
          // The guest is stopped by now: its newest heartbeat is the checkpoint's.
          seqAtCheckpoint = lastHeartbeatSeq(consoleLog) ?? 0;
          first = false;
        }
        reader.push(chunk);
        writes = writer.write(chunk);
      },
    });
    m.off('event', onEvent);
    reader.end();
    await writes;
    const size = await writer.finish();

    assert.equal(reader.complete, true, 'a complete stream');
    assert.ok(device?.verified, 'the device state matches its VM description');
    assert.equal(device?.runstate, 'paused', 'stop mode: QEMU saved a paused guest');
    assert.match(machine, /^pc-i440fx-/);
    assert.ok(
      blocks.some((b) => b === `pc.ram:${MEM_MIB * MiB}`),
      `RAM block pc.ram in ${blocks.join(', ')}`,
    );
    assert.equal(result.info.status, 'completed');
    assert.equal(result.wasRunning, true);
    assert.equal(
      size,
      result.bytes + decodeSaveImagePrefix(fs.readFileSync(image).subarray(0, 200_000)).streamOffset,
    );
    assert.equal(await domainState(name, { uri: URI }), 'running', 'resumed after the capture');
    assert.deepEqual(await m.execute('query-migrate-parameters'), paramsBefore, 'parameters put back');
    const advanced = lastHeartbeatSeq(consoleLog) ?? 0;
    await waitFor(
      'heartbeats after the capture',
      10_000,
      () => (lastHeartbeatSeq(consoleLog) ?? 0) > advanced,
    );
    const mibps = result.bytes / MiB / (result.streamMs / 1000);
    report['fd migration (stop mode)'] =
      `${(result.bytes / MiB).toFixed(1)} MiB in ${fmtMs(result.streamMs)} = ${mibps.toFixed(0)} MiB/s ` +
      `(parsed and written to the save image on the way), ${pages} pages + ${zeroPages} zero pages, ` +
      `guest paused ${fmtMs(result.pausedMs ?? 0)}; MIGRATION events: ${migrationEvents.join(' ') || 'none'}`;

    // libvirt itself reads the header and XML of the image tlc wrote.
    const back = await virsh(['save-image-dumpxml', image], { uri: URI });
    assert.match(back, new RegExp(`<name>${name}</name>`));
  });

  it('restores the save image with virsh restore: the guest continues from the capture, memory verified', async () => {
    // Let the original run on past the capture, so that a restore visibly goes back to it.
    await waitFor(
      'the guest to run on',
      10_000,
      () => (lastHeartbeatSeq(consoleLog) ?? 0) > seqAtCheckpoint + 5,
    );
    const m = monitor;
    assert.ok(m);
    const closed = new Promise<void>((resolve) => m.once('close', resolve));
    await virsh(['destroy', name], { uri: URI });
    assert.equal(await domainState(name, { uri: URI }), 'shut off');
    // The monitor learns from libvirt's lifecycle event that its QEMU is gone, as a QMP socket closes.
    await Promise.race([closed, sleep(5000).then(() => assert.fail('the monitor did not close'))]);
    const gone = await m.execute('query-status').catch((e: unknown) => e);
    assert.ok(gone instanceof Error && 'code' in gone && gone.code === 'E_QMP_CLOSED', String(gone));
    monitor = undefined;
    const lastBefore = lastHeartbeatSeq(consoleLog) ?? 0;
    const offset = fs.statSync(consoleLog).size;

    const t0 = performance.now();
    await virsh(['restore', image], { uri: URI, timeoutMs: 120_000 });
    const restoreMs = performance.now() - t0;
    const info = await domainInfo(name, { uri: URI });
    assert.equal(info.state, 'running');
    assert.match(
      (await virsh(['domstate', '--reason', name], { uri: URI })).trim(),
      /^running \(restored\)$/,
    );
    const firstMs = await waitFor(
      'a heartbeat from the restored guest',
      20_000,
      () => scanConsole(consoleText(consoleLog, offset)).heartbeats.length >= 1,
    );
    await waitFor(
      'five heartbeats from the restored guest',
      20_000,
      () => scanConsole(consoleText(consoleLog, offset)).heartbeats.length >= 5,
    );
    const scan = scanConsole(consoleText(consoleLog, offset));
    assert.deepEqual(continuationProblems(scan, seqAtCheckpoint), []);
    const first = scan.heartbeats[0]?.seq ?? 0;
    assert.ok(
      first <= seqAtCheckpoint + 2 && first < lastBefore,
      `restored guest starts at seq ${first}: the capture was at ${seqAtCheckpoint}, the original reached ${lastBefore}`,
    );
    report['virsh restore'] =
      `${fmtMs(restoreMs)} until virsh returned (running), first heartbeat ${fmtMs(firstMs)} later; ` +
      `heartbeats continue at seq ${first} (capture at ${seqAtCheckpoint}, original reached ${lastBefore})`;

    // The restored domain is an ordinary libvirt domain again: its monitor works, and so do
    // shutdown (accepted; the bundled guest has no ACPI daemon, so it keeps running) and destroy.
    const again = await LibvirtMonitor.connect(name, { uri: URI, timeoutMs: 10_000 });
    assert.equal((await again.execute('query-status')).status, 'running');
    again.close();
    await virsh(['shutdown', name], { uri: URI });
    await virsh(['destroy', name], { uri: URI });
    assert.equal(await domainState(name, { uri: URI }), 'shut off');
  });
});

describe(
  'tlc with a libvirt domain: attach, live and stop checkpoints, restore under libvirt',
  { skip },
  () => {
    const name = `tlc-lv-${process.pid}`;
    const base = fs.mkdtempSync(path.join(os.tmpdir(), 'tlc-libvirt-tlc-'));
    const stageDir = path.join(LIBVIRT_IMAGES_DIR, name);
    const consoleLog = path.join(base, 'console.log');
    const env = privateTlcEnv(base);
    let daemons: LibvirtDaemons | undefined;

    const cli = (args: string[]): Promise<CliResult> => tlc(args, 180_000, env);

    async function migrationConfig(): Promise<unknown> {
      const m = await LibvirtMonitor.connect(name, { uri: URI, timeoutMs: 10_000 });
      try {
        return {
          capabilities: await m.execute('query-migrate-capabilities'),
          parameters: await m.execute('query-migrate-parameters'),
        };
      } finally {
        m.close();
      }
    }

    before(async () => {
      daemons = await startLibvirtDaemons({
        uri: URI,
        logDir: path.join(base, 'daemons'),
        timeoutMs: 60_000,
      });
      const guest = await stageGuestFiles(await buildGuest({ cacheDir: defaultGuestCacheDir() }), stageDir);
      // memfd RAM: tlc can read it, which a live checkpoint needs on TCG (the fix-up).
      const xml = guestDomainXml({
        name,
        memMiB: MEM_MIB,
        kernel: guest.kernel,
        initrd: guest.initrd,
        cmdline: guestAppendLine(WORKLOAD),
        consoleLog,
        memfd: true,
      });
      fs.writeFileSync(path.join(base, 'domain.xml'), xml);
      await virsh(['define', path.join(base, 'domain.xml')], { uri: URI, timeoutMs: 120_000 });
      await virsh(['start', name], { uri: URI, timeoutMs: 60_000 });
      await waitFor('three heartbeats', 30_000, () => (lastHeartbeatSeq(consoleLog) ?? 0) >= 3);
    });

    after(async () => {
      await runVirsh(['destroy', name], { uri: URI }).catch(() => undefined);
      await runVirsh(['undefine', name], { uri: URI }).catch(() => undefined);
      await daemons?.stop();
      fs.rmSync(stageDir, { recursive: true, force: true });
      fs.rmSync(`/var/log/libvirt/qemu/${name}.log`, { force: true });
      fs.rmSync(base, { recursive: true, force: true });
    });

    it('attaches by domain name, checkpoints live and stop leaving QEMU as found, and restores after virsh destroy', async () => {
      const attach = await cli([
        'vm',
        'attach',
        '--name',
        'lv',
        '--libvirt',
        name,
        '--connect',
        URI,
        '--json',
      ]);
      assert.equal(attach.code, 0, attach.stderr);
      const info = JSON.parse(attach.stdout) as { modes: Record<string, { ok: boolean; why: string }> };
      assert.ok(info.modes.live?.ok, info.modes.live?.why);
      assert.ok(info.modes.stop?.ok);
      if (!info.modes.cow?.ok) assert.match(info.modes.cow?.why ?? '', /vm\.unprivileged_userfaultfd/);

      const configBefore = await migrationConfig();
      const ids: string[] = [];
      for (const mode of ['stop', 'live']) {
        const r = await cli(['checkpoint', 'lv', '--mode', mode]);
        assert.equal(r.code, 0, r.stderr);
        ids.push(r.stdout.trim().split('\n').at(-1) as string);
        assert.deepEqual(
          await migrationConfig(),
          configBefore,
          `${mode}: QEMU's migration settings as found`,
        );
        assert.equal(await domainState(name, { uri: URI }), 'running');
      }
      // cow needs userfaultfd for libvirt-qemu: with the sysctl off it is refused naming it; with it
      // on (set here and put back), a background snapshot through libvirt works.
      const sysctl = '/proc/sys/vm/unprivileged_userfaultfd';
      const uffd = fs.readFileSync(sysctl, 'utf8').trim();
      try {
        fs.writeFileSync(sysctl, '0');
        const refused = await cli(['checkpoint', 'lv', '--mode', 'cow']);
        assert.notEqual(refused.code, 0);
        assert.match(refused.stderr, /vm\.unprivileged_userfaultfd/);
        fs.writeFileSync(sysctl, '1');
        const cow = await cli(['checkpoint', 'lv', '--mode', 'cow']);
        assert.equal(cow.code, 0, cow.stderr);
        assert.deepEqual(await migrationConfig(), configBefore, "cow: QEMU's migration settings as found");
        assert.equal(await domainState(name, { uri: URI }), 'running');
        const seq = lastHeartbeatSeq(consoleLog) ?? 0;
        await waitFor(
          'heartbeats after the background snapshot',
          10_000,
          () => (lastHeartbeatSeq(consoleLog) ?? 0) > seq,
        );
      } finally {
        fs.writeFileSync(sysctl, uffd);
      }
      const show = JSON.parse((await cli(['show', ids[1] as string, '--json'])).stdout) as {
        guestHeartbeatSeqBefore?: number;
      };

      await virsh(['destroy', name], { uri: URI });
      const offset = fs.statSync(consoleLog).size;
      const restored = await cli(['restore', ids[1] as string, '--json']);
      assert.equal(restored.code, 0, restored.stderr);
      assert.equal(await domainState(name, { uri: URI }), 'running', 'back under libvirt');
      await waitFor(
        'five heartbeats from the restored guest',
        20_000,
        () => scanConsole(consoleText(consoleLog, offset)).heartbeats.length >= 5,
      );
      const scan = scanConsole(consoleText(consoleLog, offset));
      assert.deepEqual(continuationProblems(scan, show.guestHeartbeatSeqBefore), []);
      // libvirt's own monitor still works on the restored domain.
      const again = await LibvirtMonitor.connect(name, { uri: URI, timeoutMs: 10_000 });
      assert.equal((await again.execute('query-status')).status, 'running');
      again.close();
      const status = await cli(['vm', 'status', 'lv']);
      assert.equal(status.code, 0, status.stderr);
    });
  },
);

describe('tlc with a libvirt domain on a qcow2 disk', { skip }, () => {
  const name = `tlc-lvd-${process.pid}`;
  const base = fs.mkdtempSync(path.join(os.tmpdir(), 'tlc-libvirt-disk-'));
  const stageDir = path.join(LIBVIRT_IMAGES_DIR, name);
  const consoleLog = path.join(base, 'console.log');
  const env = privateTlcEnv(base);
  let daemons: LibvirtDaemons | undefined;
  let restoredDisk = '';

  const cli = (args: string[]): Promise<CliResult> => tlc(args, 180_000, env);

  const synced = (from = 0): number[] =>
    scanConsole(consoleText(consoleLog, from))
      .heartbeats.filter((h) => h.kind === 'diskverify')
      .map((h) => h.seq);

  before(async () => {
    daemons = await startLibvirtDaemons({ uri: URI, logDir: path.join(base, 'daemons'), timeoutMs: 60_000 });
    const guest = await stageGuestFiles(await buildGuest({ cacheDir: defaultGuestCacheDir() }), stageDir);
    const image = path.join(stageDir, 'root.qcow2');
    await ext4Qcow2(image, 48);
    const xml = guestDomainXml({
      name,
      memMiB: 160,
      kernel: guest.kernel,
      initrd: guest.initrd,
      cmdline: guestAppendLine('diskverify:0+memverify:16'),
      consoleLog,
      memfd: true,
    }).replace(
      '</devices>',
      `<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='${image}'/><target dev='vda' bus='virtio'/></disk>\n</devices>`,
    );
    fs.writeFileSync(path.join(base, 'domain.xml'), xml);
    await virsh(['define', path.join(base, 'domain.xml')], { uri: URI, timeoutMs: 120_000 });
    await virsh(['start', name], { uri: URI, timeoutMs: 60_000 });
    await waitFor('six synced batches', 60_000, () => (synced().at(-1) ?? 0) >= 48);
  });

  after(async () => {
    await runVirsh(['destroy', name], { uri: URI }).catch(() => undefined);
    await runVirsh(['undefine', name], { uri: URI }).catch(() => undefined);
    await daemons?.stop();
    fs.rmSync(stageDir, { recursive: true, force: true });
    if (restoredDisk) fs.rmSync(restoredDisk, { force: true });
    fs.rmSync(`/var/log/libvirt/qemu/${name}.log`, { force: true });
    fs.rmSync(base, { recursive: true, force: true });
  });

  it('saves the disk with memory through libvirt and restores both under libvirt', async () => {
    const attach = await cli(['vm', 'attach', '--name', 'lvd', '--libvirt', name, '--connect', URI]);
    assert.equal(attach.code, 0, attach.stderr);

    // tlc killed while copying the disk (a cow checkpoint held at its disk copy): the next tlc
    // command removes the copy job, target node, bitmap and the descriptors handed to QEMU.
    const sysctl = '/proc/sys/vm/unprivileged_userfaultfd';
    const uffd = fs.readFileSync(sysctl, 'utf8').trim();
    fs.writeFileSync(sysctl, '1');
    try {
      const held = spawnTlc(['checkpoint', 'lvd', '--mode', 'cow'], { ...env, [HOLD_ENV]: 'disk-copy' });
      await held.waitFor(/holding at disk-copy/, 60_000);
      held.child.kill('SIGKILL');
      await held.exited;
    } finally {
      fs.writeFileSync(sysctl, uffd);
    }
    const settled = await cli(['vm', 'status', 'lvd']);
    assert.match(settled.stderr, /removed its unfinished disk copies/);
    const m = await LibvirtMonitor.connect(name, { uri: URI, timeoutMs: 10_000 });
    try {
      assert.deepEqual(await m.execute('query-block-jobs'), []);
      const fdsets = (await m.executeRaw('query-fdsets')) as { fds: { opaque?: string }[] }[];
      assert.ok(
        !fdsets.some((set) => set.fds.some((f) => f.opaque?.startsWith('tlc:'))),
        JSON.stringify(fdsets),
      );
      const nodes = await m.execute('query-named-block-nodes', { flat: true });
      assert.ok(!nodes.some((n) => n['node-name'].startsWith('tlc-')), 'no target node left');
      assert.deepEqual(
        nodes.flatMap((n) => n['dirty-bitmaps'] ?? []),
        [],
        'no bitmap left',
      );
    } finally {
      m.close();
    }

    const ck = await cli(['checkpoint', 'lvd', '--mode', 'live', '--json']);
    assert.equal(ck.code, 0, ck.stderr);
    const manifest = JSON.parse(ck.stdout) as { id: string; disks?: { captured: boolean; path?: string }[] };
    assert.ok(manifest.disks?.[0]?.captured, 'the domain disk is captured');
    const target = (synced().at(-1) ?? 0) + 40;
    await waitFor('the original writes on', 30_000, () => (synced().at(-1) ?? 0) >= target);
    const reached = synced().at(-1) ?? 0;
    await virsh(['destroy', name], { uri: URI });

    const offset = fs.statSync(consoleLog).size;
    const restored = await cli(['restore', manifest.id]);
    assert.equal(restored.code, 0, restored.stderr);
    restoredDisk = /restored into (\S+\.qcow2)/.exec(restored.stderr)?.[1] ?? '';
    assert.ok(restoredDisk, restored.stderr);
    assert.equal(await domainState(name, { uri: URI }), 'running');
    await waitFor('synced records after the restore', 30_000, () => synced(offset).length >= 3);
    const after = scanConsole(consoleText(consoleLog, offset));
    assert.deepEqual(continuationProblems(after, undefined), []);
    assert.ok(
      (synced(offset)[0] ?? 0) < reached,
      'the restored guest continues from the checkpoint, not from the original',
    );
    await virsh(['destroy', name], { uri: URI });

    // Cold boot on the restored disk: every record verifies.
    const cold = await cli([
      'vm',
      'start',
      '--name',
      'lvd-cold',
      '--mem',
      '128',
      '--workload',
      'diskverify:8',
      '--disk',
      restoredDisk,
    ]);
    assert.equal(cold.code, 0, cold.stderr);
    await cli(['vm', 'stop', 'lvd-cold', '--force']);
  });
});
