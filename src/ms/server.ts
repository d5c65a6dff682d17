/**
 * The memory server: accepts connections, authenticates them (auth.ts), decodes frames
 * (protocol.ts) and hands requests to the shard store (shard.ts). One Connection per socket;
 * nothing a peer sends can crash the process: every handler's error becomes an ERROR frame, a
 * malformed stream ends that connection only, and each event is one log line naming the peer.
 *
 * Back-pressure: bytes received but not yet on disk are charged to the connection's budget, and
 * requests in progress are counted; over either limit (or when the peer does not read our answers)
 * the connection stops reading its socket until the writer catches up, so TCP slows the sender
 * down instead of the server buffering without limit.
 */
import fs from 'node:fs';
import net from 'node:net';
import type { ZodType, ZodTypeDef } from 'zod';
import { errorText } from '../core/errors.js';
import { type Address, formatAddress } from './address.js';
import { NONCE_BYTES, PROOF_BYTES, clientProof, newNonce, proofMatches, serverProof } from './auth.js';
import { ProtocolError, Refusal, type RemoteCode } from './errors.js';
import {
  CkptRequest,
  CommitRequest,
  GetBlobRequest,
  GetExtentRequest,
  type CheckpointIndex,
} from './messages.js';
import {
  FRAME,
  FrameDecoder,
  MAX_HELLO_BYTES,
  PROTOCOL_VERSION,
  type FrameType,
  decodeBlob,
  decodeExtent,
  decodePages,
  encodeBlobHead,
  encodeExtentHead,
  frameName,
  frameParts,
  jsonPayload,
  parseJson,
} from './protocol.js';
import { ShardStore } from './shard.js';
import { Budget } from './writer.js';

export interface MemoryServerOptions {
  listen: Address;
  dataDir: string;
  secret: Buffer;
  flushTo?: string;
  /** A peer silent this long (while we wait for it) is disconnected. Default 30 s. */
  idleTimeoutMs?: number;
  /** Received bytes a connection may have waiting for the disk before we stop reading it. Default 64 MiB. */
  connectionBudget?: number;
  log?: (line: string) => void;
}

const MAX_REQUESTS_IN_PROGRESS = 64;
const MAX_CONNECTIONS = 1024;
/** How long a refused peer gets to read our ERROR frame before the socket is destroyed. */
const REFUSAL_GRACE_MS = 1000;

type Reply = { type: FrameType; parts: Buffer[] };
const ok = (value: unknown = {}): Reply => ({ type: FRAME.OK, parts: [jsonPayload(value)] });

export class MemoryServer {
  private readonly connections = new Set<Connection>();
  private closing = false;
  /** Times a connection stopped reading because it was over budget (for tests and stats). */
  pauses = 0;

  private constructor(
    private readonly server: net.Server,
    readonly store: ShardStore,
    readonly address: Address,
    readonly options: Required<Omit<MemoryServerOptions, 'flushTo'>>,
  ) {}

  static async start(opts: MemoryServerOptions): Promise<MemoryServer> {
    const log = opts.log ?? (() => {});
    const store = ShardStore.open({
      dataDir: opts.dataDir,
      ...(opts.flushTo ? { flushTo: opts.flushTo } : {}),
      log,
    });
    const server = net.createServer({ noDelay: true });
    // Each connection costs a socket and little else before it authenticates (frames are capped
    // at 1 KiB, the idle timeout drops it); this bounds how many a stranger can hold open.
    server.maxConnections = MAX_CONNECTIONS;
    if (opts.listen.kind === 'unix') removeStaleSocket(opts.listen.path);
    try {
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject);
        const done = (): void => {
          server.off('error', reject);
          resolve();
        };
        if (opts.listen.kind === 'unix') server.listen(opts.listen.path, done);
        else server.listen(opts.listen.port, opts.listen.host, done);
      });
    } catch (err) {
      await store.close(); // releases the data directory
      throw err;
    }
    const bound = server.address();
    const address: Address =
      opts.listen.kind === 'tcp' && bound && typeof bound === 'object'
        ? { kind: 'tcp', host: opts.listen.host, port: bound.port }
        : opts.listen;
    const ms = new MemoryServer(server, store, address, {
      listen: address,
      dataDir: opts.dataDir,
      secret: opts.secret,
      idleTimeoutMs: opts.idleTimeoutMs ?? 30_000,
      connectionBudget: opts.connectionBudget ?? 64 * 1024 * 1024,
      log,
    });
    server.on('connection', (socket) => ms.accept(socket));
    server.on('error', (err) => log(`listener error: ${errorText(err)}`));
    return ms;
  }

  get url(): string {
    return formatAddress(this.address);
  }

  /** Stops accepting, lets requests in progress and queued disk writes finish, then closes every socket. */
  async close(): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    const stopped = new Promise<void>((resolve) => this.server.close(() => resolve()));
    for (const c of this.connections) c.quiesce();
    await Promise.all([...this.connections].map((c) => c.settled()));
    await this.store.close();
    for (const c of this.connections) c.stop();
    await stopped;
    if (this.options.listen.kind === 'unix') fs.rmSync(this.options.listen.path, { force: true });
  }

  private accept(socket: net.Socket): void {
    if (this.closing) {
      socket.destroy();
      return;
    }
    const conn = new Connection(this, socket);
    this.connections.add(conn);
    socket.once('close', () => this.connections.delete(conn));
  }
}

class Connection {
  private readonly decoder: FrameDecoder;
  private readonly budget: Budget;
  private readonly peer: string;
  private readonly log: (line: string) => void;
  private state: 'hello' | 'auth' | 'ready' | 'closing' = 'hello';
  private clientNonce: Buffer = Buffer.alloc(0);
  private serverNonce: Buffer = Buffer.alloc(0);
  private readonly inProgress = new Set<Promise<void>>();
  private paused = false;
  private quiescing = false;
  private requests = 0;

  constructor(
    private readonly server: MemoryServer,
    private readonly socket: net.Socket,
  ) {
    this.peer =
      socket.remoteAddress !== undefined ? `${socket.remoteAddress}:${socket.remotePort}` : 'unix-peer';
    this.log = (line) => server.options.log(`${this.peer}: ${line}`);
    this.budget = new Budget(server.options.connectionBudget, () => this.flow());
    this.decoder = new FrameDecoder((type, id, payload, version) => this.onFrame(type, id, payload, version));
    // Until the peer has proven the secret it may only send handshake frames (1 KiB at most).
    this.decoder.payloadCap = MAX_HELLO_BYTES;
    this.log('connected');
    socket.setTimeout(server.options.idleTimeoutMs);
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('timeout', () => this.onIdle());
    socket.on('drain', () => this.flow());
    socket.on('error', (err) => this.log(`socket error: ${errorText(err)}`));
    socket.on('close', () => {
      const mib = (this.decoder.bytesRead / (1024 * 1024)).toFixed(1);
      if (this.state !== 'closing')
        this.log(`disconnected after ${this.requests} requests, ${mib} MiB received`);
    });
  }

  /** Shutdown: read nothing more; what is in progress finishes. */
  quiesce(): void {
    this.quiescing = true;
    this.socket.pause();
  }

  async settled(): Promise<void> {
    while (this.inProgress.size > 0) await Promise.allSettled([...this.inProgress]);
  }

  /** Shutdown, once nothing is in progress: tells the peer why, then closes. */
  stop(): void {
    this.refuse('shutting-down', 'the memory server is stopping', 'closing: the server is stopping');
  }

  private onData(chunk: Buffer): void {
    if (this.state === 'closing') return;
    try {
      this.decoder.push(chunk);
    } catch (err) {
      if (err instanceof ProtocolError) this.refuse('protocol', `malformed input: ${err.message}`);
      else this.refuse('internal', `internal error: ${errorText(err)}`);
      return;
    }
    this.flow();
  }

  private onIdle(): void {
    if (this.state === 'closing') return;
    // Silence is the peer's fault only when we are waiting for it. The timer does not re-arm by
    // itself without traffic, so arm it again for when we are.
    if (this.paused || this.inProgress.size > 0) {
      this.socket.setTimeout(this.server.options.idleTimeoutMs);
      return;
    }
    const what = this.state === 'ready' ? 'idle' : 'stalled in the handshake';
    this.refuse('timeout', `${what} for ${this.server.options.idleTimeoutMs} ms: disconnecting`);
  }

  private onFrame(type: number, id: number, payload: Buffer, version: number): void {
    if (this.state === 'closing') return;
    if (this.state === 'hello') return this.onHello(type, payload, version);
    if (this.state === 'auth') return this.onAuth(type, payload);
    if (version !== PROTOCOL_VERSION)
      return this.refuse(
        'version',
        `frame of protocol version ${version} on a version ${PROTOCOL_VERSION} connection`,
      );
    this.dispatch(type, id, payload);
  }

  private onHello(type: number, payload: Buffer, version: number): void {
    if (type !== FRAME.HELLO)
      return this.refuse('protocol', `expected HELLO, got ${frameName(type)}: not authenticated`);
    if (version !== PROTOCOL_VERSION)
      return this.refuse(
        'version',
        `unsupported protocol version ${version} (this server speaks version ${PROTOCOL_VERSION})`,
      );
    if (payload.length !== NONCE_BYTES)
      return this.refuse('protocol', `HELLO nonce of ${payload.length} bytes`);
    this.clientNonce = Buffer.from(payload);
    this.serverNonce = newNonce();
    this.send(FRAME.CHALLENGE, 0, [this.serverNonce]);
    this.state = 'auth';
  }

  private onAuth(type: number, payload: Buffer): void {
    if (type !== FRAME.AUTH) return this.refuse('protocol', `expected AUTH, got ${frameName(type)}`);
    const expected = clientProof(this.server.options.secret, this.clientNonce, this.serverNonce);
    if (payload.length !== PROOF_BYTES || !proofMatches(expected, payload))
      return this.refuse('auth', 'wrong secret');
    this.send(FRAME.WELCOME, 0, [
      serverProof(this.server.options.secret, this.clientNonce, this.serverNonce),
    ]);
    this.state = 'ready';
    this.decoder.payloadCap = Number.POSITIVE_INFINITY;
    this.log('authenticated');
  }

  private dispatch(type: number, id: number, payload: Buffer): void {
    this.requests++;
    let result: Reply | Promise<Reply>;
    try {
      result = this.handle(type, payload);
    } catch (err) {
      this.replyError(id, type, err);
      return;
    }
    if (!(result instanceof Promise)) {
      this.send(result.type, id, result.parts);
      return;
    }
    const p = result.then(
      (r) => this.send(r.type, id, r.parts),
      (err: unknown) => this.replyError(id, type, err),
    );
    this.inProgress.add(p);
    void p.finally(() => {
      this.inProgress.delete(p);
      this.flow();
    });
  }

  /** Synchronous where the order of requests matters (begin, puts), async for disk-bound work. */
  private handle(type: number, payload: Buffer): Reply | Promise<Reply> {
    const store = this.server.store;
    switch (type) {
      case FRAME.BEGIN: {
        const { ckpt } = parse(CkptRequest, payload);
        store.begin(ckpt);
        this.log(`begin ${ckpt}`);
        return ok();
      }
      case FRAME.PUT_EXTENT:
        store.putExtent(decodeExtent(payload), this.budget);
        return ok();
      case FRAME.PUT_BLOB:
        store.putBlob(decodeBlob(payload), this.budget);
        return ok();
      case FRAME.PUT_PAGES:
        store.putPages(decodePages(payload), this.budget);
        return ok();
      case FRAME.FLUSH:
        return (async () => {
          const { ckpt } = parse(CkptRequest, payload);
          const started = Date.now();
          const r = await store.flush(ckpt);
          this.log(
            `flush ${ckpt}: ${r.extents} extents, ${r.blobs} blobs, ${r.bytes} bytes durable in ${Date.now() - started} ms`,
          );
          return ok(r);
        })();
      case FRAME.COMMIT:
        return (async () => {
          const { ckpt, expect } = parse(CommitRequest, payload);
          const info = await store.commit(ckpt, expect);
          const extents = Object.values(info.blocks).reduce((a, b) => a + b, 0);
          this.log(`commit ${ckpt}: ${extents} extents, ${info.blobs.length} blobs`);
          return ok(info);
        })();
      case FRAME.PREPARE:
        return (async () => {
          const { ckpt, expect } = parse(CommitRequest, payload);
          return ok(await store.prepare(ckpt, expect));
        })();
      case FRAME.PING:
        return ok();
      case FRAME.LIST:
        return store.list().then((checkpoints) => ok({ checkpoints }));
      case FRAME.INDEX:
        return (async (): Promise<Reply> => {
          const index: CheckpointIndex = await store.index(parse(CkptRequest, payload).ckpt);
          return ok(index);
        })();
      case FRAME.GET_EXTENT:
        return (async (): Promise<Reply> => {
          const { ckpt, block, index } = parse(GetExtentRequest, payload);
          const obj = await store.getExtent(ckpt, block, index);
          const head = encodeExtentHead({ ckpt, block, index, offset: obj.offset, sha256: obj.sha256 });
          return { type: FRAME.EXTENT, parts: [head, obj.data] };
        })();
      case FRAME.GET_BLOB:
        return (async (): Promise<Reply> => {
          const { ckpt, name } = parse(GetBlobRequest, payload);
          const obj = await store.getBlob(ckpt, name);
          return { type: FRAME.BLOB, parts: [encodeBlobHead({ ckpt, name, sha256: obj.sha256 }), obj.data] };
        })();
      case FRAME.REMOVE:
        return (async () => {
          const { ckpt } = parse(CkptRequest, payload);
          const removed = await store.remove(ckpt);
          this.log(`remove ${ckpt}: ${removed ? 'removed' : 'not here'}`);
          return ok({ removed });
        })();
      default:
        throw new Refusal('protocol', `${frameName(type)} is not a request`);
    }
  }

  private replyError(id: number, type: number, err: unknown): void {
    if (err instanceof Refusal) {
      if (err.remote !== 'not-found') this.log(`${frameName(type)} refused (${err.remote}): ${err.message}`);
      this.send(FRAME.ERROR, id, [jsonPayload({ code: err.remote, message: err.message })]);
    } else if (err instanceof ProtocolError) {
      this.log(`${frameName(type)} refused (protocol): ${err.message}`);
      this.send(FRAME.ERROR, id, [jsonPayload({ code: 'protocol', message: err.message })]);
    } else {
      this.log(`${frameName(type)} failed: ${errorText(err)}`);
      this.send(FRAME.ERROR, id, [jsonPayload({ code: 'internal', message: errorText(err) })]);
    }
  }

  /** Tells the peer why in an ERROR frame, logs it, and closes the connection. */
  private refuse(code: RemoteCode, message: string, logLine = `refused: ${message}`): void {
    if (this.state === 'closing') return;
    this.log(logLine);
    this.send(FRAME.ERROR, 0, [jsonPayload({ code, message })]);
    this.state = 'closing';
    this.socket.end();
    setTimeout(() => this.socket.destroy(), REFUSAL_GRACE_MS).unref();
  }

  private send(type: FrameType, id: number, parts: Buffer[]): void {
    if (this.socket.destroyed || this.socket.writableEnded) return;
    const frame = frameParts(type, id, parts);
    this.socket.cork();
    for (const p of frame) this.socket.write(p);
    this.socket.uncork();
  }

  /** Reads the socket only while the disk keeps up, few requests run, and the peer reads our answers. */
  private flow(): void {
    if (this.state === 'closing' || this.quiescing) return;
    const limit = this.server.options.connectionBudget;
    const stop =
      this.budget.over ||
      this.inProgress.size >= MAX_REQUESTS_IN_PROGRESS ||
      this.socket.writableLength > limit;
    if (stop && !this.paused) {
      this.paused = true;
      this.server.pauses++;
      this.socket.pause();
    } else if (
      !stop &&
      this.paused &&
      this.budget.used <= limit / 2 &&
      this.inProgress.size < MAX_REQUESTS_IN_PROGRESS / 2
    ) {
      this.paused = false;
      this.socket.resume();
    }
  }
}

function parse<T>(schema: ZodType<T, ZodTypeDef, unknown>, payload: Buffer): T {
  const r = schema.safeParse(parseJson(payload));
  if (!r.success) {
    const issue = r.error.issues[0];
    throw new Refusal(
      'bad-request',
      `malformed request: ${issue ? `${issue.path.join('.') || 'body'}: ${issue.message}` : 'invalid'}`,
    );
  }
  return r.data;
}

/** A unix socket file left by a server that died is removed; any other file there is an error. */
function removeStaleSocket(p: string): void {
  try {
    if (fs.statSync(p).isSocket()) fs.rmSync(p);
  } catch {
    // absent: fine
  }
}
