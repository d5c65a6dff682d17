import { QmpEventSource } from './event-source.js';
import net from 'node:net';
import { QmpError, errorText } from '../core/errors.js';
import type { QmpCommandName, QmpCommands, QmpEvent } from './types.js';

/** QMP lines longer than this are refused: a peer that is not QEMU must not make us buffer forever. */
const MAX_LINE_BYTES = 16 * 1024 * 1024;
const DEFAULT_TIMEOUT_MS = 10_000;
const NEWLINE = 0x0a;

interface Pending {
  command: string;
  resolve: (value: unknown) => void;
  reject: (err: QmpError) => void;
  timer: NodeJS.Timeout;
}

interface Greeter {
  resolve: () => void;
  reject: (err: QmpError) => void;
  timer: NodeJS.Timeout;
}

export interface QmpConnectOptions {
  /** Bound for connect + greeting + capabilities negotiation. */
  timeoutMs?: number;
}

/**
 * A QMP client over a unix socket. Every call has a timeout; when the socket closes (QEMU died or
 * quit) every pending call is rejected with E_QMP_CLOSED. Events are emitted as 'event' and can be
 * iterated with `events()`.
 *
 * The peer is not trusted to be QEMU: lines are capped at MAX_LINE_BYTES, and a line that is not
 * a QMP message (not a JSON object) ends the connection: before the greeting with
 * E_QMP_GREETING, during negotiation with E_QMP_NEGOTIATE, afterwards by rejecting every pending
 * and later call with E_QMP_CLOSED whose message names the violation.
 */
export class QmpClient extends QmpEventSource {
  private readonly socket: net.Socket;
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  /** Pieces of the current, unterminated line, and their total length in bytes. */
  private partial: Buffer[] = [];
  private partialBytes = 0;
  private greeter: Greeter | undefined;
  private socketError: Error | undefined;
  /** What the peer did wrong, once it did (the connection is then closed by us). */
  private violation: string | undefined;
  private closedError: QmpError | undefined;
  readonly path: string;

  private constructor(socket: net.Socket, path: string) {
    super();
    this.socket = socket;
    this.path = path;
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    // An error is always followed by 'close', which reports it.
    socket.on('error', (err) => {
      this.socketError ??= err;
    });
    socket.on('close', () => this.onClose());
  }

  static async connect(path: string, opts: QmpConnectOptions = {}): Promise<QmpClient> {
    const timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    const deadline = performance.now() + timeoutMs;
    const socket = net.createConnection({ path });
    const client = new QmpClient(socket, path);
    try {
      await client.greeting(timeoutMs);
      const left = Math.max(1, Math.round(deadline - performance.now()));
      await client.execute('qmp_capabilities', undefined, { timeoutMs: left }).catch((err: unknown) => {
        // Timeouts and closed sockets keep their codes; a refusal by QEMU or a peer that answers
        // with something other than QMP is a negotiation error.
        if (err instanceof QmpError && err.code !== 'E_QMP_EXECUTE' && client.violation === undefined)
          throw err;
        const why = client.violation !== undefined ? `the peer sent ${client.violation}` : errorText(err);
        throw new QmpError('E_QMP_NEGOTIATE', `QMP at ${path}: capabilities negotiation failed: ${why}`, {
          cause: err,
        });
      });
      return client;
    } catch (err) {
      socket.destroy();
      throw err;
    }
  }

  /** Resolves on the peer's QMP greeting; rejects with E_QMP_CONNECT, E_QMP_GREETING. */
  private greeting(timeoutMs: number): Promise<void> {
    return new Promise((resolve, reject) => {
      if (this.closedError) return reject(this.greetingFailure());
      const timer = setTimeout(() => {
        this.greeter = undefined;
        reject(new QmpError('E_QMP_GREETING', `QMP at ${this.path} did not greet within ${timeoutMs} ms`));
      }, timeoutMs);
      this.greeter = { resolve, reject, timer };
    });
  }

  /** Why the connection ended before a greeting. */
  private greetingFailure(): QmpError {
    if (this.violation !== undefined) {
      return new QmpError('E_QMP_GREETING', `${this.path} is not a QMP socket: it sent ${this.violation}`);
    }
    const err = this.socketError;
    if (err) {
      const code = (err as NodeJS.ErrnoException).code;
      return new QmpError(
        'E_QMP_CONNECT',
        `Cannot connect to QMP socket ${this.path}: ${code ?? err.message}`,
        {
          cause: err,
        },
      );
    }
    return new QmpError('E_QMP_GREETING', `${this.path} closed the connection before a QMP greeting`);
  }

  /** Splits the byte stream into lines; copies only a line that spans chunks. */
  private onData(chunk: Buffer): void {
    let start = 0;
    for (let nl = chunk.indexOf(NEWLINE); nl >= 0; nl = chunk.indexOf(NEWLINE, start)) {
      if (this.partialBytes + nl - start > MAX_LINE_BYTES) return this.overlong();
      let line = chunk.subarray(start, nl);
      if (this.partialBytes > 0) {
        line = Buffer.concat([...this.partial, line]);
        this.partial = [];
        this.partialBytes = 0;
      }
      start = nl + 1;
      this.onLine(line.toString('utf8').trim());
      if (this.violation !== undefined || this.socket.destroyed) return;
    }
    if (start < chunk.length) {
      this.partialBytes += chunk.length - start;
      if (this.partialBytes > MAX_LINE_BYTES) return this.overlong();
      this.partial.push(start === 0 ? chunk : chunk.subarray(start));
    }
  }

  private overlong(): void {
    this.partial = [];
    this.partialBytes = 0;
    this.drop(`a line longer than ${MAX_LINE_BYTES} bytes`);
  }

  private onLine(line: string): void {
    if (!line) return;
    let parsed: unknown;
    try {
      parsed = JSON.parse(line);
    } catch {
      parsed = undefined;
    }
    if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) {
      return this.drop(`a line that is not a QMP message: ${JSON.stringify(line.slice(0, 60))}`);
    }
    const msg = parsed as Record<string, unknown>;
    const greeter = this.greeter;
    if (greeter) {
      if (!('QMP' in msg)) return this.drop(`${JSON.stringify(line.slice(0, 60))} instead of a QMP greeting`);
      clearTimeout(greeter.timer);
      this.greeter = undefined;
      greeter.resolve();
      return;
    }
    if (typeof msg.event === 'string') {
      this.emit('event', msg as unknown as QmpEvent);
      return;
    }
    const id = typeof msg.id === 'number' ? msg.id : undefined;
    const pending = id === undefined ? undefined : this.pending.get(id);
    if (!pending || id === undefined) return;
    this.pending.delete(id);
    clearTimeout(pending.timer);
    if ('error' in msg) {
      const e = (typeof msg.error === 'object' && msg.error !== null ? msg.error : {}) as {
        class?: unknown;
        desc?: unknown;
      };
      const desc = typeof e.desc === 'string' ? e.desc : 'unknown error';
      pending.reject(
        new QmpError('E_QMP_EXECUTE', `QMP ${pending.command} failed: ${desc}`, {
          qmpClass: typeof e.class === 'string' ? e.class : undefined,
        }),
      );
    } else {
      pending.resolve(msg.return);
    }
  }

  /** The peer broke the protocol: hang up; onClose reports `why` to every waiter. */
  private drop(why: string): void {
    this.violation ??= why;
    this.socket.destroy();
  }

  private onClose(): void {
    if (this.closedError) return;
    const why =
      this.violation !== undefined
        ? `connection dropped: the peer sent ${this.violation}`
        : 'connection closed before a reply (QEMU exited?)';
    this.closedError = new QmpError('E_QMP_CLOSED', `QMP connection to ${this.path}: ${why}`);
    const greeter = this.greeter;
    if (greeter) {
      clearTimeout(greeter.timer);
      this.greeter = undefined;
      greeter.reject(this.greetingFailure());
    }
    for (const [id, p] of this.pending) {
      clearTimeout(p.timer);
      p.reject(new QmpError('E_QMP_CLOSED', `QMP ${p.command}: ${why}`));
      this.pending.delete(id);
    }
    this.emit('close');
  }

  get closed(): boolean {
    return this.closedError !== undefined;
  }

  execute<C extends QmpCommandName>(
    command: C,
    args?: QmpCommands[C][0],
    opts: { timeoutMs?: number } = {},
  ): Promise<QmpCommands[C][1]> {
    if (this.closedError) return Promise.reject(this.closedError);
    const id = this.nextId++;
    const timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new QmpError('E_QMP_TIMEOUT', `QMP ${command} got no reply within ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(id, { command, resolve: resolve as (v: unknown) => void, reject, timer });
      const msg = args === undefined ? { execute: command, id } : { execute: command, arguments: args, id };
      this.socket.write(JSON.stringify(msg) + '\n');
    });
  }

  close(): void {
    this.socket.end();
    this.socket.destroy();
  }
}
