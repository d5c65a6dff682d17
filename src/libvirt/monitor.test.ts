import assert from 'node:assert/strict';
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { QmpError } from '../core/errors.js';
import { LibvirtMonitor, parseCommandReply, parseEventLine, parseLifecycleLine } from './monitor.js';
import { libvirtFault } from './virsh.js';

describe('parseEventLine (virsh qemu-monitor-event output)', () => {
  it('reads an event without data, with QEMU timestamp', () => {
    assert.deepEqual(parseEventLine("event STOP at 1763923679.655123 for domain 'web': <null>", 'web'), {
      event: 'STOP',
      timestamp: { seconds: 1763923679, microseconds: 655123 },
    });
  });

  it('reads the data object', () => {
    assert.deepEqual(
      parseEventLine(`event MIGRATION at 1700000000.000042 for domain 'web': {"status":"completed"}`, 'web'),
      {
        event: 'MIGRATION',
        timestamp: { seconds: 1700000000, microseconds: 42 },
        data: { status: 'completed' },
      },
    );
  });

  it('reads the --timestamp form (virsh receive time, UTC offset)', () => {
    const ev = parseEventLine(
      `2026-11-23 18:47:59.655+0000: event MIGRATION_PASS for domain 'web': {"pass":2}`,
      'web',
    );
    assert.deepEqual(ev, {
      event: 'MIGRATION_PASS',
      timestamp: { seconds: Date.UTC(2026, 10, 23, 18, 47, 59) / 1000, microseconds: 655000 },
      data: { pass: 2 },
    });
    const shifted = parseEventLine(
      `2026-11-23 20:47:59.655+0200: event STOP for domain 'web': <null>`,
      'web',
    );
    assert.equal(shifted?.timestamp?.seconds, Date.UTC(2026, 10, 23, 18, 47, 59) / 1000);
  });

  it('strips a carriage return', () => {
    assert.equal(
      parseEventLine("event RESUME at 1.000001 for domain 'web': <null>\r", 'web')?.event,
      'RESUME',
    );
  });

  it("takes the domain name literally (quotes and ': ' inside it)", () => {
    const name = "o'dd': name";
    const ev = parseEventLine(`event STOP at 5.000000 for domain '${name}': {"a":"': x"}`, name);
    assert.deepEqual(ev?.data, { a: "': x" });
  });

  it('ignores other domains, summaries and malformed lines', () => {
    const lines = [
      "event STOP at 1.000000 for domain 'other': <null>",
      "event STOP at 1.000000 for domain 'webx': <null>",
      'events received: 4',
      'event loop interrupted',
      '',
      "event STOP at 1.000000 for domain 'web': [1,2]",
      "event STOP at 1.000000 for domain 'web': {not json",
      "event STOP at 1.000000 for domain 'web': null",
      "event STOP for domain 'web': <null>",
      "2026-11-23 18:47:59.655+0000: event STOP at 1.000000 for domain 'web': <null>",
      "event STOP at 1.000000 for domain 'web':<null>",
      "xevent STOP at 1.000000 for domain 'web': <null>",
    ];
    for (const line of lines) assert.equal(parseEventLine(line, 'web'), undefined, line);
  });
});

describe('parseLifecycleLine (virsh event --event lifecycle output)', () => {
  it('returns the event and detail for the domain only', () => {
    assert.equal(
      parseLifecycleLine("event 'lifecycle' for domain 'web': Stopped Destroyed", 'web'),
      'Stopped Destroyed',
    );
    assert.equal(
      parseLifecycleLine("event 'lifecycle' for domain 'web': Resumed Unpaused\r", 'web'),
      'Resumed Unpaused',
    );
    assert.equal(
      parseLifecycleLine("event 'lifecycle' for domain 'other': Stopped Destroyed", 'web'),
      undefined,
    );
    assert.equal(parseLifecycleLine('events received: 1', 'web'), undefined);
  });
});

describe('parseCommandReply (virsh qemu-monitor-command output)', () => {
  it('returns the return value', () => {
    assert.deepEqual(
      parseCommandReply('query-status', '{"return":{"status":"running"},"id":"libvirt-4"}\n\n'),
      {
        status: 'running',
      },
    );
  });

  it('maps a QMP error to E_QMP_EXECUTE with its class', () => {
    assert.throws(
      () =>
        parseCommandReply(
          'nonexistent',
          '{"id":"libvirt-417","error":{"class":"CommandNotFound","desc":"The command nonexistent has not been found"}}',
        ),
      (err: unknown) =>
        err instanceof QmpError &&
        err.code === 'E_QMP_EXECUTE' &&
        err.qmpClass === 'CommandNotFound' &&
        err.message === 'QMP nonexistent failed: The command nonexistent has not been found',
    );
  });

  it('refuses output that is not a QMP reply', () => {
    for (const text of ['', 'hello', '[]', '{"id":"libvirt-1"}']) {
      assert.throws(
        () => parseCommandReply('stop', text),
        (err: unknown) => err instanceof QmpError && err.code === 'E_QMP_EXECUTE',
        JSON.stringify(text),
      );
    }
  });
});

describe('libvirtFault', () => {
  it("classifies libvirt's messages by their error-code text", () => {
    assert.equal(libvirtFault("failed to get domain 'x'"), 'no-domain');
    assert.equal(libvirtFault("Domain not found: no domain with matching name 'x'"), 'no-domain');
    assert.equal(libvirtFault('Requested operation is not valid: domain is not running'), 'not-running');
    assert.equal(libvirtFault('Timed out during operation: cannot acquire state change lock'), 'timeout');
    assert.equal(libvirtFault('failed to connect to the hypervisor; Failed to connect socket'), 'no-daemon');
    assert.equal(libvirtFault('internal error: something'), 'other');
  });
});

/**
 * A stand-in `virsh` on PATH: answers dominfo, qemu-monitor-command (by the command's name) and
 * qemu-monitor-event (two events after a pause, then waits to be killed).
 */
const FAKE_VIRSH = `#!/bin/sh
# args: -c URI COMMAND DOMAIN ...
shift 2
cmd="$1"; dom="$2"
log="$FAKE_VIRSH_LOG"
case "$cmd" in
dominfo)
  if [ "$dom" = gone ]; then echo "error: failed to get domain 'gone'" >&2; exit 1; fi
  if [ "$dom" = dies ]; then printf 'Id:             8\\nName:           dies\\nUUID:           00000000-0000-0000-0000-000000000003\\nState:          running\\n'; exit 0; fi
  if [ "$dom" = off ]; then printf 'Id:             -\\nName:           off\\nUUID:           00000000-0000-0000-0000-000000000002\\nState:          shut off\\n'; exit 0; fi
  printf 'Id:             7\\nName:           web\\nUUID:           00000000-0000-0000-0000-000000000001\\nState:          running\\n'
  ;;
event)
  echo "lifecycle $$" >> "$log"
  if [ "$3" = dies ]; then sleep 0.5; echo "event 'lifecycle' for domain 'dies': Stopped Destroyed"; fi
  exec sleep 1000
  ;;
qemu-monitor-event)
  echo "event $$" >> "$log"
  sleep 0.3
  echo "event STOP at 1700000000.000001 for domain 'web': <null>"
  echo "event MIGRATION at 1700000000.000002 for domain 'web': {\\"status\\":\\"setup\\"}"
  exec sleep 1000
  ;;
qemu-monitor-command)
  shift 2
  fds=""
  if [ "$1" = --pass-fds ]; then fds="$2"; shift 2; fi
  json="$1"
  echo "command $json" >> "$log"
  case "$json" in
  *query-status*) echo '{"return":{"status":"running","singlestep":false,"running":true},"id":"libvirt-1"}'; echo ;;
  *getfd*)
    if [ "$fds" = 3 ] && [ -S /dev/fd/3 ]; then echo '{"return":{},"id":"libvirt-2"}'; else echo '{"id":"libvirt-2","error":{"class":"GenericError","desc":"no fd"}}'; fi ;;
  *slow*) sleep 0.4; echo '{"return":{"slow":true},"id":"libvirt-3"}' ;;
  *hang*) exec sleep 1000 ;;
  *vanish*) echo "error: Requested operation is not valid: domain is not running" >&2; exit 1 ;;
  *lock*) echo "error: Timed out during operation: cannot acquire state change lock" >&2; exit 1 ;;
  *) echo '{"id":"libvirt-9","error":{"class":"CommandNotFound","desc":"The command has not been found"}}' ;;
  esac
  ;;
*) echo "error: unknown command $cmd" >&2; exit 1 ;;
esac
`;

describe('LibvirtMonitor against a stand-in virsh', () => {
  let dir = '';
  let savedPath: string | undefined;
  before(() => {
    dir = mkdtempSync(join(tmpdir(), 'tlc-fake-virsh-'));
    writeFileSync(join(dir, 'virsh'), FAKE_VIRSH);
    chmodSync(join(dir, 'virsh'), 0o755);
    savedPath = process.env.PATH;
    process.env.PATH = `${dir}:${savedPath ?? ''}`;
    process.env.FAKE_VIRSH_LOG = join(dir, 'log');
  });
  after(() => {
    process.env.PATH = savedPath;
    rmSync(dir, { recursive: true, force: true });
  });

  const rejectsWith = async (p: Promise<unknown>, code: string): Promise<QmpError> => {
    try {
      await p;
    } catch (err) {
      assert.ok(err instanceof QmpError, String(err));
      assert.equal(err.code, code, err.message);
      return err;
    }
    assert.fail(`expected ${code}`);
  };

  it('connects, runs commands in call order, and delivers events', async () => {
    const m = await LibvirtMonitor.connect('web', { timeoutMs: 5000 });
    assert.equal(m.domain, 'web');
    assert.equal(m.domainId, 7);
    assert.equal(m.watcherPids.length, 2, 'QEMU events and lifecycle events');
    const stop = m.waitEvent('STOP', 5000);
    const migration = m.waitEvent('MIGRATION', 5000, (ev) => ev.data?.status === 'setup');
    const order: string[] = [];
    const slow = m.executeRaw('slow').then(() => order.push('slow'));
    const fast = m.execute('query-status').then((s) => order.push(`status ${s.status}`));
    await Promise.all([slow, fast]);
    assert.deepEqual(order, ['slow', 'status running'], 'a later command waits for an earlier one');
    assert.deepEqual(await stop, { event: 'STOP', timestamp: { seconds: 1700000000, microseconds: 1 } });
    assert.equal((await migration).event, 'MIGRATION');
    assert.ok(m.latency.count >= 3);
    m.close();
    assert.equal(m.closed, true);
    await rejectsWith(m.execute('query-status'), 'E_QMP_CLOSED');
    await rejectsWith(m.waitEvent('RESUME', 1000), 'E_QMP_CLOSED');
  });

  it('maps QMP errors, libvirt timeouts, our timeouts and a vanished domain', async () => {
    const m = await LibvirtMonitor.connect('web', { timeoutMs: 5000 });
    const notFound = await rejectsWith(m.executeRaw('nosuch'), 'E_QMP_EXECUTE');
    assert.equal(notFound.qmpClass, 'CommandNotFound');
    await rejectsWith(m.executeRaw('lock'), 'E_QMP_TIMEOUT');
    const t0 = performance.now();
    await rejectsWith(m.executeRaw('hang', undefined, { timeoutMs: 300 }), 'E_QMP_TIMEOUT');
    assert.ok(performance.now() - t0 < 3000);
    assert.equal(m.closed, false, 'a timeout leaves the monitor usable');
    assert.equal((await m.execute('query-status')).running, true);
    const closed = new Promise<void>((resolve) => m.once('close', resolve));
    await rejectsWith(m.executeRaw('vanish'), 'E_QMP_CLOSED');
    await closed;
    assert.equal(m.closed, true);
    await rejectsWith(m.execute('query-status'), 'E_QMP_CLOSED');
  });

  it('passes a socket as fd 3 with --pass-fds', async () => {
    const m = await LibvirtMonitor.connect('web', { timeoutMs: 5000 });
    const sock = join(dir, 's.sock');
    const server = net.createServer((c) => c.destroy()).listen(sock);
    await new Promise((r) => server.once('listening', r));
    const client = net.createConnection({ path: sock });
    await new Promise((r) => client.once('connect', r));
    assert.deepEqual(await m.executeRaw('getfd', { fdname: 'x' }, { fds: [client] }), {});
    await rejectsWith(m.executeRaw('getfd', { fdname: 'x' }), 'E_QMP_EXECUTE');
    client.destroy();
    server.close();
    m.close();
  });

  it('close() kills a running command and the event child', async () => {
    const m = await LibvirtMonitor.connect('web', { timeoutMs: 5000 });
    const pids = m.watcherPids;
    assert.equal(pids.length, 2);
    const pending = m.executeRaw('hang', undefined, { timeoutMs: 30_000 });
    await new Promise((r) => setTimeout(r, 200));
    m.close();
    await rejectsWith(pending, 'E_QMP_CLOSED');
    await new Promise((r) => setTimeout(r, 200));
    for (const pid of pids) assert.throws(() => process.kill(pid, 0), 'the event children are gone');
  });

  it('closes when libvirt reports the domain stopped', async () => {
    const m = await LibvirtMonitor.connect('dies', { timeoutMs: 5000 });
    const waiting = m.waitEvent('RESUME', 10_000);
    const closed = await rejectsWith(waiting, 'E_QMP_CLOSED');
    assert.match(closed.message, /closed while waiting for RESUME/);
    assert.equal(m.closed, true);
    const err = await rejectsWith(m.execute('query-status'), 'E_QMP_CLOSED');
    assert.match(err.message, /libvirt reports the domain Stopped Destroyed/);
    for (let i = 0; i < 50 && m.watcherPids.length > 0; i++) await new Promise((r) => setTimeout(r, 20));
    assert.deepEqual(m.watcherPids, [], 'the event children were ended');
  });

  it('refuses a missing or stopped domain with E_QMP_CONNECT', async () => {
    await rejectsWith(LibvirtMonitor.connect('gone', { timeoutMs: 5000 }), 'E_QMP_CONNECT');
    const off = await rejectsWith(LibvirtMonitor.connect('off', { timeoutMs: 5000 }), 'E_QMP_CONNECT');
    assert.match(off.message, /not running \(shut off\)/);
  });
});
