/**
 * Scale benchmark of the distributed memory servers (issue 13, "Scale, measured on one machine").
 *
 *   npm run bench:ms [-- --quick]      (root: creates network namespaces; run under flock /tmp/tlc-vm.lock)
 *
 * Four `tlc serve` processes, each in its own network namespace `tlcb-ms<i>-<pid>` reached over a
 * veth pair (10.231.<i>.0/30: host .1, server .2) shaped with `tc tbf` to 1200 mbit in both
 * directions (~143 MiB/s, standing in for 1 Gbps links). One TCG guest (1 GiB, dirty:768:random),
 * one live checkpoint into the local store (its durable time is the local-disk reference), then for
 * N = 1..4 servers (replicas 1) and N = 3 with replicas 2: `tlc push` (time to committed on all),
 * `tlc pull` into a fresh store (time to a verified local copy) and `tlc restore` of that copy (time
 * to running). Baselines through server 1's link: QEMU stop-and-save streamed into a byte sink in
 * its namespace, and QEMU `-incoming` fed that same stream back from it.
 *
 * Everything created here (namespaces, veths, qdiscs, servers, sinks, temp dirs, VMs) is removed on
 * exit, SIGINT and SIGTERM. Writes bench/out/memservers-<date>.json and .html.
 */
import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { startVm, stopVm } from '../vm/manager.js';
import { runQemuMigration, timeIncomingToRunning } from './baseline.js';
import { measureGuestWindow } from './measure.js';
import { type Summary, formatSummary as fmt, optSummary as opt, summarize } from './stats.js';
import { benchWorkspace, machineStamp, saveResult } from './workspace.js';

const quick = process.argv.includes('--quick');
const REPS = quick ? 1 : 3;
const RATE = '1200mbit';
const MEM_MIB = 1024;
const WORKLOAD = 'dirty:768:random';
const SERVER_PORT = 7070;
const SINK_PORT = 7071;
const SOURCE_PORT = 7072;
const TLC_BIN = path.resolve(import.meta.dirname, '..', '..', '..', 'bin', 'tlc.js');
const PID = process.pid;
const SERVERS = [1, 2, 3, 4];
const CONFIGS: { n: number; replicas: number }[] = [
  { n: 1, replicas: 1 },
  { n: 2, replicas: 1 },
  { n: 3, replicas: 1 },
  { n: 4, replicas: 1 },
  { n: 3, replicas: 2 },
];

const ns = (i: number): string => `tlcb-ms${i}-${PID}`;
const hostVeth = (i: number): string => `tb${i}h${PID}`.slice(0, 15);
const nsVeth = (i: number): string => `tb${i}n${PID}`.slice(0, 15);
const serverIp = (i: number): string => `10.231.${i}.2`;

function sh(cmd: string, args: string[]): string {
  return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

function fail(message: string): never {
  process.stderr.write(`bench:ms: ${message}\n`);
  process.exit(2);
}

/** iproute2 present, running as root, names free, and a throw-away namespace can be made. */
function preflight(): void {
  for (const tool of ['ip', 'tc']) {
    try {
      sh(tool, ['-V']);
    } catch {
      fail(`'${tool}' (iproute2) is not available`);
    }
  }
  if (process.getuid?.() !== 0) fail('network namespaces need root (run as root)');
  const existing = sh('ip', ['netns', 'list']);
  for (const i of SERVERS) {
    if (existing.split('\n').some((l) => l.split(' ')[0] === ns(i)))
      fail(`namespace ${ns(i)} already exists`);
    for (const dev of [hostVeth(i), nsVeth(i)]) {
      let exists = true;
      try {
        sh('ip', ['link', 'show', 'dev', dev]);
      } catch {
        exists = false;
      }
      if (exists) fail(`interface ${dev} already exists`);
    }
  }
}

// ---- cleanup: every resource is registered the moment it exists ----
const children: ChildProcess[] = [];
const namespaces: number[] = [];
let cleaned = false;

function cleanupNetwork(): void {
  if (cleaned) return;
  cleaned = true;
  for (const c of children) {
    if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  }
  for (const i of namespaces) {
    try {
      sh('ip', ['link', 'del', 'dev', hostVeth(i)]);
    } catch {
      // gone with the namespace
    }
    try {
      sh('ip', ['netns', 'del', ns(i)]);
    } catch (err) {
      process.stderr.write(`bench:ms: could not remove ${ns(i)}: ${String(err)}\n`);
    }
  }
}

function makeNamespace(i: number): void {
  sh('ip', ['netns', 'add', ns(i)]);
  namespaces.push(i);
  sh('ip', ['link', 'add', hostVeth(i), 'type', 'veth', 'peer', 'name', nsVeth(i)]);
  sh('ip', ['link', 'set', nsVeth(i), 'netns', ns(i)]);
  sh('ip', ['addr', 'add', `10.231.${i}.1/30`, 'dev', hostVeth(i)]);
  sh('ip', ['link', 'set', hostVeth(i), 'up']);
  const inNs = (args: string[]): string => sh('ip', ['netns', 'exec', ns(i), ...args]);
  inNs(['ip', 'addr', 'add', `${serverIp(i)}/30`, 'dev', nsVeth(i)]);
  inNs(['ip', 'link', 'set', nsVeth(i), 'up']);
  inNs(['ip', 'link', 'set', 'lo', 'up']);
  const tbf = ['root', 'tbf', 'rate', RATE, 'burst', '1mb', 'latency', '50ms'];
  sh('tc', ['qdisc', 'add', 'dev', hostVeth(i), ...tbf]);
  inNs(['tc', 'qdisc', 'add', 'dev', nsVeth(i), ...tbf]);
}

/** Spawns a process inside namespace i; resolves with it and its first stdout line. */
async function spawnInNs(
  i: number,
  args: string[],
  logFile: string,
): Promise<{ child: ChildProcess; line: string }> {
  const child = spawn('ip', ['netns', 'exec', ns(i), ...args], {
    stdio: ['ignore', 'pipe', fs.openSync(logFile, 'a')],
  });
  children.push(child);
  const line = await new Promise<string>((resolve, reject) => {
    let buf = '';
    const timer = setTimeout(() => reject(new Error(`${args.join(' ')} in ${ns(i)}: no ready line`)), 20_000);
    child.stdout?.on('data', (c: Buffer) => {
      buf += c.toString();
      const nl = buf.indexOf('\n');
      if (nl >= 0) {
        clearTimeout(timer);
        resolve(buf.slice(0, nl));
      }
    });
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`${args.join(' ')} in ${ns(i)} exited with ${code} (see ${logFile})`));
    });
  });
  return { child, line };
}

/**
 * The baselines' plumbing, one script: `sink PORT FILE` (in the namespace: writes what the first
 * connection sends to FILE, prints the byte count per connection), `source PORT FILE` (in the
 * namespace: sends FILE to every connection), `send HOST PORT` / `recv HOST PORT` (QEMU's exec:
 * side: stdin to the socket / the socket to stdout).
 */
const PIPE_SCRIPT = `
import net from 'node:net';
import fs from 'node:fs';
const [mode, a, b] = process.argv.slice(2);
if (mode === 'sink' || mode === 'source') {
  const server = net.createServer((sock) => {
    if (mode === 'sink') {
      let n = 0;
      const out = fs.createWriteStream(b);
      sock.on('data', (c) => (n += c.length));
      sock.pipe(out);
      out.on('finish', () => process.stdout.write(JSON.stringify({ bytes: n }) + '\\n'));
    } else fs.createReadStream(b).pipe(sock);
  });
  server.listen(Number(a), () => process.stdout.write('ready\\n'));
} else {
  const sock = net.connect(Number(b), a);
  if (mode === 'send') process.stdin.pipe(sock);
  else sock.pipe(process.stdout);
}
`;

/** SIGKILL by pid, and wait until it is gone (its listening port free again). */
async function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const gone = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  child.kill('SIGKILL');
  await gone;
}

interface TlcRun {
  code: number | null;
  out: Record<string, unknown>;
  wallMs: number;
  stderr: string;
}

async function tlc(args: string[], env: NodeJS.ProcessEnv = {}): Promise<TlcRun> {
  const t0 = performance.now();
  const child = spawn(process.execPath, [TLC_BIN, ...args], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, ...env },
  });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (c: Buffer) => (stdout += c.toString()));
  child.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
  const code = await new Promise<number | null>((resolve) => child.once('exit', resolve));
  const wallMs = performance.now() - t0;
  let out: Record<string, unknown> = {};
  try {
    out = JSON.parse(stdout) as Record<string, unknown>;
  } catch {
    // not JSON: the caller checks code
  }
  if (code !== 0) throw new Error(`tlc ${args.join(' ')} exited with ${code}: ${stderr.slice(-800)}`);
  return { code, out, wallMs, stderr };
}

interface Rep {
  n: number;
  replicas: number;
  rep: number;
  pushMs: number;
  pushWallMs: number;
  bytesSent: number;
  committedOn: number;
  pullMs: number;
  pullWallMs: number;
  bytesPulled: number;
  extentsFrom: Record<string, number>;
  restoreMs: number;
  restoreWallMs: number;
}

interface Baselines {
  local: {
    id: string;
    durableMs: number;
    totalMs: number;
    downtimeMs: number;
    bytesStored: number;
    guestRateRatio: number | null;
    guestMaxStallMs: number;
  };
  stopAndSave: { wallMs: number[]; bytes: number[] };
  incoming: { ms: number[] };
}

const workspace = benchWorkspace('ms');
const base = workspace.base;

async function main(): Promise<void> {
  preflight();
  const secretFile = path.join(base, 'secret');
  fs.writeFileSync(secretFile, randomBytes(32).toString('hex'), { mode: 0o600 });
  const pipeScript = path.join(base, 'pipe.mjs');
  fs.writeFileSync(pipeScript, PIPE_SCRIPT);
  const logs = path.join(base, 'logs');
  fs.mkdirSync(logs);

  for (const i of SERVERS) {
    makeNamespace(i);
    const data = path.join(base, `ms${i}`);
    const { line } = await spawnInNs(
      i,
      [
        process.execPath,
        TLC_BIN,
        'serve',
        '--listen',
        `tcp://${serverIp(i)}:${SERVER_PORT}`,
        '--data',
        data,
        '--secret-file',
        secretFile,
        '--json',
      ],
      path.join(logs, `serve${i}.log`),
    );
    process.stderr.write(`server ${i}: ${line}\n`);
  }
  const serverList = (n: number): string =>
    SERVERS.slice(0, n)
      .map((i) => `${serverIp(i)}:${SERVER_PORT}`)
      .join(',');

  const vm = 'ms-src';
  process.stderr.write(`booting ${vm} (${MEM_MIB} MiB, ${WORKLOAD}, TCG)\n`);
  const started = await startVm({
    name: vm,
    memMiB: MEM_MIB,
    workload: WORKLOAD,
    accel: 'tcg',
    bootTimeoutMs: 180_000,
  });
  await sleep(5000); // let the writer dirty its working set

  // Local-disk reference: the live checkpoint every push starts from.
  const w = await measureGuestWindow(started.record.paths.consoleLog, () =>
    tlc(['checkpoint', vm, '--mode', 'live', '--json']),
  );
  const manifest = w.result.out as {
    id: string;
    metrics: { durableMs: number; totalMs: number; bytesStored: number; stage3: { downtimeMs: number } };
  };
  const id = manifest.id;
  const baselines: Baselines = {
    local: {
      id,
      durableMs: manifest.metrics.durableMs,
      totalMs: manifest.metrics.totalMs,
      downtimeMs: manifest.metrics.stage3.downtimeMs,
      bytesStored: manifest.metrics.bytesStored,
      guestRateRatio: w.guest.rateRatio,
      guestMaxStallMs: w.guest.maxStallMs,
    },
    stopAndSave: { wallMs: [], bytes: [] },
    incoming: { ms: [] },
  };
  process.stderr.write(`local checkpoint ${id}: ${JSON.stringify(baselines.local)}\n`);

  // Baseline: QEMU stop-and-save streamed to server 1 through its shaped link.
  const streamFile = path.join(base, 'ms1-stream.qevm');
  // One sink for every rep: it writes each connection to the file and prints its byte count.
  const sink = await spawnInNs(
    1,
    [process.execPath, pipeScript, 'sink', String(SINK_PORT), streamFile],
    path.join(logs, 'sink.log'),
  );
  for (let rep = 1; rep <= REPS; rep++) {
    let onData: ((c: Buffer) => void) | undefined;
    const counted = new Promise<number>((resolve) => {
      onData = (c: Buffer): void => {
        const m = /"bytes":(\d+)/.exec(c.toString());
        if (m?.[1]) resolve(Number(m[1]));
      };
      sink.child.stdout?.on('data', onData);
    });
    const r = await runQemuMigration(vm, {
      uri: `exec:${process.execPath} ${pipeScript} send ${serverIp(1)} ${SINK_PORT}`,
      maxBandwidthBps: 1024 ** 4,
      stopFirst: true,
      timeoutMs: 300_000,
    });
    const bytes = await Promise.race([counted, sleep(10_000).then(() => NaN)]);
    if (onData) sink.child.stdout?.off('data', onData);
    if (!r.finished) throw new Error(`stop-and-save to server 1 failed: ${r.error}`);
    baselines.stopAndSave.wallMs.push(r.wallMs);
    baselines.stopAndSave.bytes.push(bytes);
    process.stderr.write(`stop-and-save → server 1: ${r.wallMs.toFixed(0)} ms, ${bytes} bytes\n`);
  }
  await stopChild(sink.child);
  await stopVm(vm, { force: true }); // the source guest would only compete for the 2 CPUs from here

  const reps: Rep[] = [];
  for (const { n, replicas } of CONFIGS) {
    for (let rep = 1; rep <= REPS; rep++) {
      const servers = serverList(n);
      const common = ['--servers', servers, '--secret-file', secretFile, '--json'];
      const push = await tlc(['push', id, ...common, '--replicas', String(replicas)]);
      const fresh = path.join(base, `pulled-${n}-${replicas}-${rep}`);
      const pull = await tlc(['pull', id, ...common], { TLC_STORE: fresh });
      const name = `ms-r${n}x${replicas}-${rep}`;
      const restore = await tlc(['restore', id, '--name', name, '--json'], { TLC_STORE: fresh });
      await stopVm(name, { force: true });
      await tlc(['remote', 'rm', id, '--servers', servers, '--secret-file', secretFile, '--json']);
      fs.rmSync(fresh, { recursive: true, force: true });
      const r: Rep = {
        n,
        replicas,
        rep,
        pushMs: push.out.ms as number,
        pushWallMs: push.wallMs,
        bytesSent: push.out.bytesSent as number,
        committedOn: (push.out.committedOn as string[]).length,
        pullMs: pull.out.ms as number,
        pullWallMs: pull.wallMs,
        bytesPulled: pull.out.bytes as number,
        extentsFrom: pull.out.extentsFrom as Record<string, number>,
        restoreMs: restore.out.timeToRunningMs as number,
        restoreWallMs: restore.wallMs,
      };
      reps.push(r);
      process.stderr.write(`${JSON.stringify(r)}\n`);
    }
  }

  // Baseline: QEMU -incoming of the stop-and-save stream, sent by server 1's namespace.
  const source = await spawnInNs(
    1,
    [process.execPath, pipeScript, 'source', String(SOURCE_PORT), streamFile],
    path.join(logs, 'source.log'),
  );
  for (let rep = 1; rep <= REPS; rep++) {
    const ms = await timeIncomingToRunning(
      vm,
      `ms-incoming-${rep}`,
      // QEMU `-incoming exec:` from server 1's namespace (the stop-and-save stream).
      `exec:${process.execPath} ${pipeScript} recv ${serverIp(1)} ${SOURCE_PORT}`,
    );
    baselines.incoming.ms.push(ms);
    process.stderr.write(`-incoming from server 1: ${ms.toFixed(0)} ms\n`);
  }
  await stopChild(source.child);

  const stamp = {
    ...machineStamp(),
    accel: 'tcg',
    reps: REPS,
    guest: { memMiB: MEM_MIB, workload: WORKLOAD },
    link: { rate: RATE, tbf: 'burst 1mb latency 50ms, both directions' },
  };
  const table = rows(reps, baselines);
  const json = saveResult(
    'memservers',
    stamp.date,
    'json',
    `${JSON.stringify({ stamp, baselines, summary: table, reps }, null, 2)}\n`,
  );
  const html = saveResult('memservers', stamp.date, 'html', renderHtml(stamp, table));
  process.stdout.write(`${textTable(table)}\nsaved ${json} and ${html}\n`);
}

interface Row {
  what: string;
  push?: Summary;
  pull?: Summary;
  restore?: Summary;
  pullPlusRestore?: Summary;
  pushSpeedup?: number;
  pullSpeedup?: number;
  mibPerSec?: number;
}

function rows(reps: Rep[], b: Baselines): Row[] {
  const out: Row[] = [];
  const med = (s: Summary | undefined): number => s?.median ?? NaN;
  let one: Row | undefined;
  for (const { n, replicas } of CONFIGS) {
    const rs = reps.filter((r) => r.n === n && r.replicas === replicas);
    if (rs.length === 0) continue;
    const push = summarize(rs.map((r) => r.pushMs));
    const pull = summarize(rs.map((r) => r.pullMs));
    const row: Row = {
      what: `${n} server${n > 1 ? 's' : ''}, replicas ${replicas}`,
      ...(push ? { push } : {}),
      ...(pull ? { pull } : {}),
      ...opt('restore', summarize(rs.map((r) => r.restoreMs))),
      ...opt('pullPlusRestore', summarize(rs.map((r) => r.pullMs + r.restoreMs))),
      mibPerSec: (summarize(rs.map((r) => r.bytesSent))?.median ?? NaN) / 2 ** 20 / (med(push) / 1000),
    };
    if (n === 1 && replicas === 1) one = row;
    if (one) {
      row.pushSpeedup = med(one.push) / med(push);
      row.pullSpeedup = med(one.pull) / med(pull);
    }
    out.push(row);
  }
  out.push({
    what: 'local-disk live checkpoint (durable)',
    push: { median: b.local.durableMs, min: b.local.durableMs, max: b.local.durableMs, n: 1 },
  });
  const sas = summarize(b.stopAndSave.wallMs);
  const inc = summarize(b.incoming.ms);
  out.push({
    what: 'QEMU stop-and-save → 1 server / -incoming ← 1 server',
    ...opt('push', sas),
    ...opt('restore', inc),
    mibPerSec: (summarize(b.stopAndSave.bytes)?.median ?? NaN) / 2 ** 20 / (med(sas) / 1000),
  });
  return out;
}

const x = (v: number | undefined): string =>
  v === undefined || !Number.isFinite(v) ? '–' : `${v.toFixed(2)}×`;
const HEAD = [
  'configuration',
  'push/save ms',
  'checkpoint MiB/s',
  'push speed-up',
  'pull ms',
  'pull speed-up',
  'restore ms',
  'pull+restore ms',
];
function cells(r: Row): string[] {
  return [
    r.what,
    fmt(r.push),
    r.mibPerSec !== undefined && Number.isFinite(r.mibPerSec) ? r.mibPerSec.toFixed(0) : '–',
    x(r.pushSpeedup),
    fmt(r.pull),
    x(r.pullSpeedup),
    fmt(r.restore),
    fmt(r.pullPlusRestore),
  ];
}

function textTable(table: Row[]): string {
  return [HEAD.join(' | '), ...table.map((r) => cells(r).join(' | '))].join('\n');
}

function esc(text: string): string {
  return text.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
}

function renderHtml(stamp: Record<string, unknown>, table: Row[]): string {
  const body = table
    .map(
      (r) =>
        `<tr>${cells(r)
          .map((c) => `<td>${esc(c)}</td>`)
          .join('')}</tr>`,
    )
    .join('\n');
  return `<!doctype html><meta charset="utf-8"><title>tlc memory servers: scale</title>
<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child,th{text-align:left}</style>
<h1>tlc memory servers: 1–4 servers on one machine</h1>
<p>Median (min–max) over ${REPS} repetitions. Each server runs in its own network namespace behind a veth
link shaped with tc tbf to ${RATE} in both directions. Push: a stored live checkpoint striped to the servers
until committed on all. Pull: fetched from all servers in parallel into a fresh store, verified. Restore: tlc
restore of the pulled copy, time to running. Speed-up: 1-server median / N-server median (goal ≥ 0.8·N).
Baselines through server 1's link: QEMU stop-and-save streamed into a sink, and QEMU -incoming of that stream.</p>
<pre>${esc(JSON.stringify(stamp, null, 1))}</pre>
<table><tr>${HEAD.map((h) => `<th>${esc(h)}</th>`).join('')}</tr>
${body}
</table>`;
}

for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.once(signal, () => {
    process.stderr.write(`bench:ms: ${signal}, cleaning up\n`);
    cleanupNetwork();
    void workspace.run(() => Promise.resolve()).finally(() => process.exit(130));
  });
}
process.once('exit', cleanupNetwork);
try {
  await workspace.run(main);
} finally {
  cleanupNetwork();
}
