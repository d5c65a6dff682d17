import { EventEmitter, on } from 'node:events';
import net from 'node:net';
import { QmpError, errorText } from '../core/errors.js';
import type { QmpCommandName, QmpCommands, QmpEvent } from './types.js';

/** QMP lines longer than this are refused: a peer that is not QEMU must not make us buffer forever. */
const MAX_LINE_BYTES = 16 * 1024 * 1024;
const DEFAULT_TIMEOUT_MS = 10_000;

interface Pending {
  command: string;
  resolve: (value: unknown) => void;
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
 */
export class QmpClient extends EventEmitter {
  private readonly socket: net.Socket;
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  private lineBuf = '';
  private closedError: QmpError | undefined;
  readonly path: string;

  private constructor(socket: net.Socket, path: string) {
    super();
    this.socket = socket;
    this.path = path;
  }

  static async connect(path: string, opts: QmpConnectOptions = {}): Promise<QmpClient> {
    const timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    const socket = net.createConnection({ path });
    socket.setEncoding('utf8');
    const client = new QmpClient(socket, path);
    try {
      await client.greeting(timeoutMs);
      await client.execute('qmp_capabilities', undefined, { timeoutMs }).catch((err: unknown) => {
        // Timeouts and closed sockets keep their codes; a refusal by QEMU is a negotiation error.
        if (err instanceof QmpError && err.code !== 'E_QMP_EXECUTE') throw err;
        throw new QmpError(
          'E_QMP_NEGOTIATE',
          `QMP at ${path}: capabilities negotiation failed: ${errorText(err)}`,
          {
            cause: err,
          },
        );
      });
      return client;
    } catch (err) {
      socket.destroy();
      throw err;
    }
  }

  private greeting(timeoutMs: number): Promise<void> {
    return new Promise((resolve, reject) => {
      let seen = '';
      const fail = (err: QmpError): void => {
        cleanup();
        reject(err);
      };
      const onData = (chunk: string): void => {
        seen += chunk;
        const nl = seen.indexOf('\n');
        if (nl < 0) {
          if (seen.length > MAX_LINE_BYTES)
            fail(new QmpError('E_QMP_GREETING', `${this.path} is not a QMP socket`));
          return;
        }
        const line = seen.slice(0, nl);
        let parsed: unknown;
        try {
          parsed = JSON.parse(line);
        } catch {
          parsed = undefined;
        }
        if (typeof parsed !== 'object' || parsed === null || !('QMP' in parsed)) {
          fail(new QmpError('E_QMP_GREETING', `${this.path} is not a QMP socket (unexpected greeting)`));
          return;
        }
        cleanup();
        this.lineBuf = seen.slice(nl + 1);
        this.socket.on('data', (c: string) => this.onData(c));
        this.socket.on('close', () => this.onClose());
        resolve();
      };
      const onError = (err: Error): void => {
        const code = (err as NodeJS.ErrnoException).code;
        if (err instanceof QmpError) fail(err);
        else
          fail(
            new QmpError(
              'E_QMP_CONNECT',
              `Cannot connect to QMP socket ${this.path}: ${code ?? err.message}`,
              {
                cause: err,
              },
            ),
          );
      };
      const onEnd = (): void =>
        fail(new QmpError('E_QMP_GREETING', `${this.path} closed the connection before a QMP greeting`));
      const timer = setTimeout(
        () => fail(new QmpError('E_QMP_TIMEOUT', `QMP at ${this.path} did not greet within ${timeoutMs} ms`)),
        timeoutMs,
      );
      const cleanup = (): void => {
        clearTimeout(timer);
        this.socket.off('data', onData);
        this.socket.off('error', onError);
        this.socket.off('end', onEnd);
        this.socket.on('error', () => {
          /* reported through 'close' */
        });
      };
      this.socket.on('data', onData);
      this.socket.on('error', onError);
      this.socket.on('end', onEnd);
    });
  }

  private onData(chunk: string): void {
    this.lineBuf += chunk;
    let nl: number;
    while ((nl = this.lineBuf.indexOf('\n')) >= 0) {
      const line = this.lineBuf.slice(0, nl).trim();
      this.lineBuf = this.lineBuf.slice(nl + 1);
      if (line) this.onLine(line);
    }
    if (this.lineBuf.length > MAX_LINE_BYTES) {
      this.socket.destroy(
        new QmpError('E_QMP_EXECUTE', `QMP line from ${this.path} exceeds ${MAX_LINE_BYTES} bytes`),
      );
    }
  }

  private onLine(line: string): void {
    let msg: Record<string, unknown>;
    try {
      msg = JSON.parse(line) as Record<string, unknown>;
    } catch {
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
      const e = msg.error as { class?: string; desc?: string };
      pending.reject(
        new QmpError('E_QMP_EXECUTE', `QMP ${pending.command} failed: ${e.desc ?? 'unknown error'}`, {
          qmpClass: e.class,
        }),
      );
    } else {
      pending.resolve(msg.return);
    }
  }

  private onClose(): void {
    this.closedError = new QmpError('E_QMP_CLOSED', `QMP connection to ${this.path} closed (QEMU exited?)`);
    for (const [id, p] of this.pending) {
      clearTimeout(p.timer);
      p.reject(
        new QmpError('E_QMP_CLOSED', `QMP ${p.command}: connection closed before a reply (QEMU exited?)`),
      );
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

  /** Events as an async iterator; ends when the connection closes. */
  async *events(signal?: AbortSignal): AsyncGenerator<QmpEvent> {
    // A generator body starts at the first next(): the connection may have closed by then.
    if (this.closed) return;
    const ac = new AbortController();
    const onClose = (): void => ac.abort();
    this.once('close', onClose);
    signal?.addEventListener('abort', onClose, { once: true });
    try {
      for await (const [event] of on(this, 'event', { signal: ac.signal })) yield event as QmpEvent;
    } catch (err) {
      if (!ac.signal.aborted) throw err;
    } finally {
      this.off('close', onClose);
      signal?.removeEventListener('abort', onClose);
    }
  }

  /** Resolves with the first event named `name` (optionally matching `match`), or rejects on timeout/close. */
  waitEvent(name: string, timeoutMs: number, match?: (ev: QmpEvent) => boolean): Promise<QmpEvent> {
    return new Promise((resolve, reject) => {
      const onEvent = (ev: QmpEvent): void => {
        if (ev.event !== name || (match && !match(ev))) return;
        cleanup();
        resolve(ev);
      };
      const onClose = (): void => {
        cleanup();
        reject(new QmpError('E_QMP_CLOSED', `QMP connection closed while waiting for ${name}`));
      };
      const timer = setTimeout(() => {
        cleanup();
        reject(new QmpError('E_QMP_TIMEOUT', `No ${name} event within ${timeoutMs} ms`));
      }, timeoutMs);
      const cleanup = (): void => {
        clearTimeout(timer);
        this.off('event', onEvent);
        this.off('close', onClose);
      };
      if (this.closed) return onClose();
      this.on('event', onEvent);
      this.on('close', onClose);
    });
  }

  close(): void {
    this.socket.end();
    this.socket.destroy();
  }
}
