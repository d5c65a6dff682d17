/**
 * QMP through libvirt: the surface of QmpClient (src/qmp/client.ts) for a libvirt domain, whose
 * QMP monitor libvirt owns.
 *
 * - Commands go through libvirt's monitor passthrough, one `virsh qemu-monitor-command DOM '{json}'`
 *   per command (file descriptors with `--pass-fds`). They run one at a time, in call order, as
 *   they would on a QMP socket. Each costs a virsh process: about 20-30 ms.
 * - Events come from a long-running `virsh qemu-monitor-event DOM --loop` child whose lines are
 *   parsed by `parseEventLine`. Without `--timestamp` virsh prints QEMU's own event time, which
 *   becomes the event's `timestamp` as on a QMP socket.
 * - The monitor belongs to one run of the domain's QEMU (libvirt's domain id at connect time): once
 *   libvirt reports the domain stopped (a second child, `virsh event --event lifecycle --loop`), a
 *   command finds it not running, or an event child ends, the monitor is closed: waiters and later
 *   calls fail with E_QMP_CLOSED, as with QmpClient when QEMU exits.
 *
 * libvirt marks the domain as tainted ("custom monitor control commands issued"); it keeps its own
 * monitor and follows STOP/RESUME, so `virsh domstate` stays right.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { QmpEventSource } from '../qmp/event-source.js';
import type net from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { QmpError, errorText } from '../core/errors.js';
import type { QmpCommandName, QmpCommands, QmpEvent } from '../qmp/types.js';
import { DEFAULT_URI, LibvirtError, VIRSH, domainInfo, libvirtFault, runVirsh } from './virsh.js';

const DEFAULT_TIMEOUT_MS = 10_000;
/** Longest event line accepted from virsh; QEMU's events are a few hundred bytes. */
const MAX_EVENT_LINE_BYTES = 1024 * 1024;
/** How long connect() gives the event child to register with libvirt (see waitEventsReady). */
const EVENT_SETTLE_MS = 50;

export interface LibvirtConnectOptions {
  /** libvirt connection URI; default `qemu:///system`. */
  uri?: string;
  /** Bound for looking the domain up, the first command and starting the event child. */
  timeoutMs?: number;
}

export interface LibvirtExecuteOptions {
  timeoutMs?: number;
  /** Descriptors passed along with the command (`--pass-fds 3,4,...`), e.g. for `getfd`. */
  fds?: ReadonlyArray<number | net.Socket>;
}

/** Wall time of the virsh calls made so far (spawn to exit), for reports. */
export interface CommandLatency {
  count: number;
  totalMs: number;
  minMs: number;
  maxMs: number;
}

// ---------------------------------------------------------------------------------------------
// virsh qemu-monitor-event output

/**
 * Parses one line of `virsh qemu-monitor-event DOM` output for domain `domain` (its name, as
 * libvirt prints it). virsh 9.0 prints, for every event, one of
 *
 *   event NAME at SECONDS.MICROS for domain 'DOM': DETAILS              (QEMU's timestamp)
 *   YYYY-MM-DD HH:MM:SS.mmm+0000: event NAME for domain 'DOM': DETAILS  (--timestamp: virsh's clock)
 *
 * where DETAILS is the event's `data` as compact JSON or `<null>`. Returns undefined for any other
 * line (virsh's "events received: N" summary), for another domain's events, and for lines whose
 * DETAILS is not a JSON object.
 */
export function parseEventLine(line: string, domain: string): QmpEvent | undefined {
  let rest = line.endsWith('\r') ? line.slice(0, -1) : line;
  let timestamp: QmpEvent['timestamp'];
  const clock = /^(\d{4}-\d\d-\d\d) (\d\d:\d\d:\d\d)(\.\d{1,6})?([+-]\d\d)(\d\d): /.exec(rest);
  if (clock) {
    const [, date, time, frac = '', tzh, tzm] = clock;
    const ms = Date.parse(`${date}T${time}${tzh}:${tzm}`);
    if (!Number.isFinite(ms)) return undefined;
    const micros = frac ? Number(frac.slice(1).padEnd(6, '0')) : 0;
    timestamp = { seconds: Math.floor(ms / 1000), microseconds: micros };
    rest = rest.slice(clock[0].length);
  }
  const head = /^event ([A-Za-z0-9_-]+)(?: at (\d+)\.(\d{1,6}))? for domain '/.exec(rest);
  if (!head) return undefined;
  const [, event, seconds, micros] = head;
  if (event === undefined) return undefined;
  if (seconds !== undefined && micros !== undefined) {
    if (clock) return undefined;
    timestamp = { seconds: Number(seconds), microseconds: Number(micros.padEnd(6, '0')) };
  } else if (!clock) {
    return undefined;
  }
  const domainPart = `${domain}': `;
  rest = rest.slice(head[0].length);
  if (!rest.startsWith(domainPart)) return undefined;
  const details = rest.slice(domainPart.length);
  const ev: QmpEvent = { event };
  if (timestamp) ev.timestamp = timestamp;
  if (details === '<null>') return ev;
  let data: unknown;
  try {
    data = JSON.parse(details);
  } catch {
    return undefined;
  }
  if (typeof data !== 'object' || data === null || Array.isArray(data)) return undefined;
  ev.data = data as Record<string, unknown>;
  return ev;
}

// ---------------------------------------------------------------------------------------------
// QMP replies printed by virsh qemu-monitor-command

/**
 * The `return` of a QMP reply printed by virsh, or a QmpError: E_QMP_EXECUTE with QEMU's class for
 * an `error` reply or for output that is not a QMP reply.
 */
export function parseCommandReply(command: string, stdout: string): unknown {
  const text = stdout.trim();
  let msg: unknown;
  try {
    msg = JSON.parse(text);
  } catch {
    msg = undefined;
  }
  if (typeof msg !== 'object' || msg === null || Array.isArray(msg)) {
    throw new QmpError(
      'E_QMP_EXECUTE',
      `QMP ${command} through libvirt: virsh printed ${JSON.stringify(text.slice(0, 60))}, not a QMP reply`,
    );
  }
  const reply = msg as Record<string, unknown>;
  if ('error' in reply) {
    const e = (typeof reply.error === 'object' && reply.error !== null ? reply.error : {}) as {
      class?: unknown;
      desc?: unknown;
    };
    const desc = typeof e.desc === 'string' ? e.desc : 'unknown error';
    throw new QmpError('E_QMP_EXECUTE', `QMP ${command} failed: ${desc}`, {
      qmpClass: typeof e.class === 'string' ? e.class : undefined,
    });
  }
  if (!('return' in reply)) {
    throw new QmpError('E_QMP_EXECUTE', `QMP ${command} through libvirt: the reply has no return`);
  }
  return reply.return;
}

// ---------------------------------------------------------------------------------------------

export class LibvirtMonitor extends QmpEventSource {
  /** The domain's name. */
  readonly domain: string;
  readonly uuid: string;
  /** libvirt's id of the QEMU run this monitor belongs to. */
  readonly domainId: number;
  readonly uri: string;
  /** A label for messages, in place of QmpClient's socket path. */
  readonly path: string;
  /** The long-running virsh children (QEMU events, lifecycle events). */
  private readonly watchers: ChildProcess[] = [];
  private closedError: QmpError | undefined;
  /** Aborted on close(): kills every virsh still running for us. */
  private readonly abort = new AbortController();
  /** The tail of the command queue: commands run one after another, in call order. */
  private queue: Promise<unknown> = Promise.resolve();
  private readonly stats: CommandLatency = { count: 0, totalMs: 0, minMs: Infinity, maxMs: 0 };

  private constructor(info: { name: string; uuid: string; id: number }, uri: string) {
    super();
    this.domain = info.name;
    this.uuid = info.uuid;
    this.domainId = info.id;
    this.uri = uri;
    this.path = `libvirt ${uri} domain ${info.name}`;
  }

  /**
   * Looks the running domain up (by name, id or UUID), starts the event child and checks that QEMU
   * answers `query-status`. Rejects with E_QMP_CONNECT when the domain does not exist, is not
   * running, or libvirt cannot be reached; E_QMP_TIMEOUT when that takes longer than `timeoutMs`.
   */
  static async connect(domain: string, opts: LibvirtConnectOptions = {}): Promise<LibvirtMonitor> {
    const uri = opts.uri ?? DEFAULT_URI;
    const timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    const deadline = performance.now() + timeoutMs;
    const left = (): number => Math.max(1, Math.round(deadline - performance.now()));
    let info;
    try {
      info = await domainInfo(domain, { uri, timeoutMs: left() });
    } catch (err) {
      throw connectError(domain, uri, err, timeoutMs);
    }
    if (info.id === undefined) {
      throw new QmpError('E_QMP_CONNECT', `libvirt domain ${info.name} is not running (${info.state})`);
    }
    const monitor = new LibvirtMonitor({ name: info.name, uuid: info.uuid, id: info.id }, uri);
    try {
      monitor.startEvents();
      await monitor.execute('query-status', undefined, { timeoutMs: left() });
      await monitor.waitEventsReady(left());
      return monitor;
    } catch (err) {
      monitor.close();
      if (err instanceof QmpError && err.code !== 'E_QMP_CLOSED') throw err;
      throw new QmpError('E_QMP_CONNECT', `Cannot reach QMP of ${monitor.path}: ${errorText(err)}`, {
        cause: err,
      });
    }
  }

  get closed(): boolean {
    return this.closedError !== undefined;
  }

  /** Wall time of the `qemu-monitor-command` calls so far. */
  get latency(): CommandLatency {
    return { ...this.stats };
  }

  /** Pids of the running virsh children that watch events, for tests and for killing by pid. */
  get watcherPids(): number[] {
    return this.watchers
      .filter((c) => c.exitCode === null && c.signalCode === null)
      .flatMap((c) => c.pid ?? []);
  }

  execute<C extends QmpCommandName>(
    command: C,
    args?: QmpCommands[C][0],
    opts: LibvirtExecuteOptions = {},
  ): Promise<QmpCommands[C][1]> {
    return this.executeRaw(command, args ?? undefined, opts) as Promise<QmpCommands[C][1]>;
  }

  /**
   * Any QMP command, untyped (for those QmpCommands does not list yet, such as `getfd` and
   * `closefd`). Commands run one at a time in call order; `timeoutMs` counts the wait for earlier ones.
   */
  executeRaw(command: string, args?: object, opts: LibvirtExecuteOptions = {}): Promise<unknown> {
    if (this.closedError) return Promise.reject(this.closedError);
    const timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    const deadline = performance.now() + timeoutMs;
    const run = async (): Promise<unknown> => {
      if (this.closedError) throw this.closedError;
      const left = Math.round(deadline - performance.now());
      if (left <= 0)
        throw new QmpError('E_QMP_TIMEOUT', `QMP ${command} got no reply within ${timeoutMs} ms`);
      const msg = args === undefined ? { execute: command } : { execute: command, arguments: args };
      const argv = ['qemu-monitor-command', this.domain];
      const fds = opts.fds ?? [];
      if (fds.length > 0) argv.push('--pass-fds', fds.map((_, i) => String(i + 3)).join(','));
      argv.push(JSON.stringify(msg));
      let r;
      try {
        r = await runVirsh(argv, { uri: this.uri, timeoutMs: left, fds, signal: this.abort.signal });
      } catch (err) {
        if (this.closedError) throw this.closedError;
        if (err instanceof LibvirtError && err.fault === 'killed') {
          throw new QmpError('E_QMP_TIMEOUT', `QMP ${command} got no reply within ${timeoutMs} ms`, {
            cause: err,
          });
        }
        throw new QmpError('E_QMP_EXECUTE', `QMP ${command} through libvirt: ${errorText(err)}`, {
          cause: err,
        });
      }
      this.record(r.ms);
      if (r.exitCode !== 0) throw this.virshFailure(command, r.error);
      return parseCommandReply(command, r.stdout);
    };
    const result = this.queue.then(run, run);
    this.queue = result.catch(() => undefined);
    return result;
  }

  /** Kills the event child and every virsh still running for this monitor (by pid). */
  close(): void {
    this.markClosed('the monitor was closed');
  }

  // -------------------------------------------------------------------------------------------

  private record(ms: number): void {
    this.stats.count++;
    this.stats.totalMs += ms;
    this.stats.minMs = Math.min(this.stats.minMs, ms);
    this.stats.maxMs = Math.max(this.stats.maxMs, ms);
  }

  /** A failed virsh run: the domain went away (closes the monitor), a libvirt timeout, or else. */
  private virshFailure(command: string, message: string): QmpError {
    const fault = libvirtFault(message);
    if (fault === 'no-domain' || fault === 'not-running') {
      this.markClosed(`libvirt says: ${message}`);
      return new QmpError('E_QMP_CLOSED', `QMP ${command}: ${this.path} is gone (${message})`);
    }
    if (fault === 'timeout')
      return new QmpError('E_QMP_TIMEOUT', `QMP ${command} through libvirt: ${message}`);
    return new QmpError(
      'E_QMP_EXECUTE',
      `QMP ${command} through libvirt failed: ${message || 'virsh failed'}`,
    );
  }

  /**
   * The two long-running virsh children: QEMU's events, and libvirt's lifecycle events for the
   * domain (a `Stopped` one means this QEMU is gone, however it ended: the monitor closes then,
   * as a QMP socket would).
   */
  private startEvents(): void {
    this.watchers.push(
      this.watch('qemu-monitor-event', ['qemu-monitor-event', this.domain, '--loop'], (line) => {
        const ev = parseEventLine(line, this.domain);
        if (ev) this.emit('event', ev);
      }),
      this.watch('event', ['event', '--domain', this.domain, '--event', 'lifecycle', '--loop'], (line) => {
        const what = parseLifecycleLine(line, this.domain);
        if (what?.startsWith('Stopped')) this.markClosed(`libvirt reports the domain ${what}`);
      }),
    );
  }

  /** Runs `virsh ARGS` until the monitor closes, handing each line of its output to `onLine`. */
  private watch(what: string, args: string[], onLine: (line: string) => void): ChildProcess {
    const child = spawn(VIRSH, ['-c', this.uri, ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, LC_ALL: 'C', LANG: 'C' },
    });
    let partial = '';
    let stderr = '';
    child.stdout?.setEncoding('utf8');
    child.stdout?.on('data', (chunk: string) => {
      let text = partial + chunk;
      for (let nl = text.indexOf('\n'); nl >= 0; nl = text.indexOf('\n')) {
        onLine(text.slice(0, nl));
        text = text.slice(nl + 1);
      }
      // A line this long is not virsh's: drop it rather than buffer without bound.
      partial = text.length > MAX_EVENT_LINE_BYTES ? '' : text;
    });
    child.stderr?.setEncoding('utf8');
    child.stderr?.on('data', (chunk: string) => {
      if (stderr.length < 4096) stderr += chunk;
    });
    child.once('error', (err) => this.markClosed(`cannot run ${VIRSH} ${what}: ${err.message}`));
    child.once('exit', (code, sig) => {
      const why = stderr
        .trim()
        .replace(/^error: /gm, '')
        .split('\n')
        .join('; ');
      this.markClosed(`virsh ${what} ended (${sig ?? `exit status ${code}`})${why ? `: ${why}` : ''}`);
    });
    return child;
  }

  /**
   * virsh gives no sign once its event callback is registered. connect() starts the event children
   * before its first command and returns only after that command, the children's start and a short
   * settle time: a virsh spawn plus two libvirt calls, the same work as a command.
   */
  private async waitEventsReady(timeoutMs: number): Promise<void> {
    for (const child of this.watchers) {
      if (child.pid !== undefined) continue;
      await new Promise<void>((resolve) => {
        child.once('spawn', resolve);
        child.once('error', () => resolve());
      });
    }
    await sleep(Math.min(EVENT_SETTLE_MS, timeoutMs));
    if (this.closedError) throw this.closedError;
  }

  private markClosed(why: string): void {
    if (this.closedError) return;
    this.closedError = new QmpError('E_QMP_CLOSED', `QMP connection to ${this.path}: ${why}`);
    this.abort.abort();
    for (const child of this.watchers) {
      if (child.pid !== undefined && child.exitCode === null && child.signalCode === null) {
        try {
          process.kill(child.pid, 'SIGTERM');
        } catch {
          // already gone
        }
      }
      child.stdout?.destroy();
      child.stderr?.destroy();
    }
    this.emit('close');
  }
}

/**
 * The event of a `virsh event --event lifecycle` line for `domain` (`Stopped Destroyed`,
 * `Resumed Unpaused`, ...): virsh prints `event 'lifecycle' for domain 'DOM': EVENT DETAIL`.
 */
export function parseLifecycleLine(line: string, domain: string): string | undefined {
  const prefix = `event 'lifecycle' for domain '${domain}': `;
  const text = line.endsWith('\r') ? line.slice(0, -1) : line;
  return text.startsWith(prefix) ? text.slice(prefix.length).trim() : undefined;
}

function connectError(domain: string, uri: string, err: unknown, timeoutMs: number): QmpError {
  if (err instanceof LibvirtError && err.fault === 'killed') {
    return new QmpError(
      'E_QMP_TIMEOUT',
      `libvirt did not answer about domain ${domain} within ${timeoutMs} ms`,
      {
        cause: err,
      },
    );
  }
  return new QmpError('E_QMP_CONNECT', `Cannot reach libvirt domain ${domain} at ${uri}: ${errorText(err)}`, {
    cause: err,
  });
}
