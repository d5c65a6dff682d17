import fs from 'node:fs';
import net from 'node:net';
import { CheckpointError } from '../core/errors.js';
import { PRIVATE_FILE_MODE } from '../core/paths.js';

/** Where the bytes of one migration stream go; throwing from `push` or `end` fails the stream. */
export interface StreamConsumer {
  push(chunk: Buffer): void;
  end(): void;
}

export interface TransportEvents {
  /** QEMU connected; the socket is passed for guarding, never to read from. */
  onConnection?(socket: net.Socket): void;
  /** The stream ended and `end()` accepted it. */
  onComplete?(bytesReceived: number): void;
}

/**
 * Carries one migration stream from QEMU into a consumer: listens (or takes a connected socket),
 * accepts exactly one connection, counts bytes, and turns socket trouble into one settled promise.
 * It knows nothing of pages or files. `unix:` is what tlc uses locally; `tcp:` is where a
 * remote receiver (a memory server taking the stream itself) plugs in.
 */
export class StreamTransport {
  private server: net.Server | undefined;
  private socket: net.Socket | undefined;
  bytesReceived = 0;
  private discarding = false;
  private paused = false;
  private drained: (() => void) | undefined;
  private settle!: { resolve: () => void; reject: (err: unknown) => void };
  /** Resolves when the stream arrived complete and was consumed; rejects on any stream or socket error. */
  readonly done: Promise<void>;

  constructor(
    private readonly consumer: StreamConsumer,
    private readonly events: TransportEvents = {},
    /** A migration that must not be cut off is drained, not dropped, after a consumer error. */
    private readonly neverCut = false,
  ) {
    this.done = new Promise<void>((resolve, reject) => {
      this.settle = { resolve, reject };
    });
    this.done.catch(() => undefined);
  }

  /** `unix:<path>` or a bare path: a private unix socket taking exactly one connection. */
  listen(url: string): Promise<void> {
    if (url.startsWith('tcp:')) {
      return Promise.reject(new CheckpointError(`tcp transport is not implemented yet (${url})`));
    }
    const socketPath = url.startsWith('unix:') ? url.slice(5) : url;
    return new Promise((resolve, reject) => {
      const server = net.createServer({ pauseOnConnect: false }, (socket) => this.accept(socket));
      this.server = server;
      server.once('error', reject);
      server.listen(socketPath, () => {
        fs.chmodSync(socketPath, PRIVATE_FILE_MODE);
        resolve();
      });
    });
  }

  /** Takes the stream from a connection made elsewhere (a descriptor handed to QEMU). */
  consume(socket: net.Socket): void {
    this.accept(socket);
  }

  private accept(socket: net.Socket): void {
    this.server?.close();
    if (this.socket) {
      socket.destroy();
      return;
    }
    this.socket = socket;
    // Debug aid: TLC_STREAM_TEE=<file> keeps a copy of the raw stream for offline analysis.
    const tee = process.env.TLC_STREAM_TEE
      ? fs.openSync(process.env.TLC_STREAM_TEE, 'w', PRIVATE_FILE_MODE)
      : -1;
    if (tee >= 0) socket.once('close', () => fs.closeSync(tee));
    this.events.onConnection?.(socket);
    if (this.paused) socket.pause();
    socket.on('data', (chunk: Buffer) => {
      this.bytesReceived += chunk.length;
      if (this.discarding) return;
      if (tee >= 0) fs.writeSync(tee, chunk);
      try {
        this.consumer.push(chunk);
      } catch (err) {
        // A migration that must not be cut off is drained instead (see drain()).
        if (this.neverCut) this.discarding = true;
        else socket.destroy();
        this.settle.reject(err);
      }
    });
    socket.on('close', () => this.drained?.());
    socket.on('end', () => {
      if (this.discarding) return;
      try {
        this.consumer.end();
        this.events.onComplete?.(this.bytesReceived);
        this.settle.resolve();
      } catch (err) {
        this.settle.reject(err);
      }
    });
    socket.on('error', (err) =>
      this.settle.reject(new CheckpointError(`Migration connection failed: ${err.message}`, { cause: err })),
    );
  }

  /** Stops reading (QEMU blocks on a full socket); for crash tests that hold mid-stream. */
  pause(): void {
    this.paused = true;
    this.socket?.pause();
  }

  /**
   * Reads and discards the rest of the stream until QEMU ends it. Resolves true when QEMU closed
   * the stream, false after `timeoutMs`.
   */
  drain(timeoutMs: number): Promise<boolean> {
    this.discarding = true;
    this.server?.close();
    if (!this.socket || this.socket.destroyed) return Promise.resolve(true);
    this.socket.resume();
    return new Promise((resolve) => {
      const timer = setTimeout(() => resolve(false), timeoutMs);
      this.drained = () => {
        clearTimeout(timer);
        resolve(true);
      };
    });
  }

  /** Stops listening and drops the connection. */
  abort(reason: Error): void {
    this.server?.close();
    this.socket?.destroy();
    this.settle.reject(reason);
  }
}
