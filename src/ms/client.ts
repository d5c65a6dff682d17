/**
 * Client of one memory server: connects, authenticates (auth.ts), then pipelines requests, each
 * answered by a promise. At most `maxInFlight` requests are outstanding (further calls wait for a
 * slot), which bounds the memory a fast producer can pin in socket buffers. When the connection
 * drops, every outstanding and waiting request is rejected with E_MS_CLOSED naming the server.
 *
 * Extents fetched back are checked against the checksum stored beside them; a mismatch is an
 * E_CORRUPT error, so the caller (ServerSet) can take another replica.
 */
import { createHash } from 'node:crypto';
import net from 'node:net';
import type { ZodType, ZodTypeDef } from 'zod';
import { TlcError, errorText } from '../core/errors.js';
import { type Address, parseAddress, shortAddress } from './address.js';
import { NONCE_BYTES, clientProof, newNonce, proofMatches, serverProof } from './auth.js';
import { MsError, ProtocolError, RemoteError, isRemoteCode } from './errors.js';
import {
  CheckpointIndex,
  type CommitExpectation,
  ErrorBody,
  FlushResult,
  CheckpointInfo,
  ListResult,
  RemoveResult,
} from './messages.js';
import {
  FRAME,
  FrameDecoder,
  PROTOCOL_VERSION,
  type FrameType,
  decodeBlob,
  decodeExtent,
  encodeBlobHead,
  encodeExtentHead,
  encodePagesHead,
  frameName,
  frameParts,
  jsonPayload,
  parseJson,
  type PageRun,
} from './protocol.js';

export interface ClientOptions {
  secret: Buffer;
  /** Connect and handshake within this time. Default 5 s. */
  connectTimeoutMs?: number;
  /** Each request must be answered within this time (flush and commit fsync: be generous). Default 120 s. */
  requestTimeoutMs?: number;
  /** Requests outstanding at once. Default 16 (with 4 MiB extents: 64 MiB in flight). */
  maxInFlight?: number;
  /**
   * Ping the server after this long without a request, so a connection kept open between
   * checkpoints outlives the server's idle timeout (default 30 s). Default: no pings.
   */
  keepAliveMs?: number;
  /** Tests only: speak another protocol version. */
  protocolVersion?: number;
}

export interface ExtentPut {
  ckpt: string;
  /** RAM block id as QEMU names it (`pc.ram`). */
  block: string;
  index: number;
  /** Byte offset of the extent within the block. */
  offset: number;
  data: Buffer;
  /** SHA-256 of `data`; computed when absent. */
  sha256?: Buffer;
}

export interface PagesPut {
  ckpt: string;
  block: string;
  /** The extent the pages belong to. */
  index: number;
  /** New contents, each at a byte offset within the extent (at most MAX_RUNS runs). */
  runs: PageRun[];
}

export interface Extent {
  offset: number;
  data: Buffer;
  sha256: Buffer;
}

interface Pending {
  resolve: (frame: { type: number; payload: Buffer }) => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout;
  what: string;
}

export function sha256(data: Buffer): Buffer {
  return createHash('sha256').update(data).digest();
}

export class MemoryServerClient {
  /** `host:port` (or socket path): how errors name this server. */
  readonly name: string;
  private readonly pending = new Map<number, Pending>();
  /** Requests given up on (timeout): their late answers are dropped, not taken for a protocol error. */
  private readonly abandoned = new Set<number>();
  private readonly slotWaiters: Array<() => void> = [];
  private nextId = 1;
  private closedError: MsError | undefined;
  private readonly decoder: FrameDecoder;
  private readonly requestTimeoutMs: number;
  private readonly maxInFlight: number;
  private keepAlive: NodeJS.Timeout | undefined;
  private lastRequestAt = Date.now();

  private constructor(
    private readonly socket: net.Socket,
    readonly address: Address,
    opts: ClientOptions,
    decoder: FrameDecoder,
  ) {
    this.name = shortAddress(address);
    this.requestTimeoutMs = opts.requestTimeoutMs ?? 120_000;
    this.maxInFlight = opts.maxInFlight ?? 16;
    this.decoder = decoder;
    const every = opts.keepAliveMs;
    if (every !== undefined) {
      this.keepAlive = setInterval(() => {
        if (this.pending.size === 0 && Date.now() - this.lastRequestAt >= every)
          void this.ping().catch(() => {});
      }, every);
      this.keepAlive.unref();
    }
  }

  /** Connects and authenticates; rejects with E_MS_CONNECT, E_MS_AUTH (refused, with the server's reason) or E_MS_TIMEOUT. */
  static async connect(url: string | Address, opts: ClientOptions): Promise<MemoryServerClient> {
    const address = typeof url === 'string' ? parseAddress(url, 'memory server') : url;
    const name = shortAddress(address);
    const timeoutMs = opts.connectTimeoutMs ?? 5000;
    const socket =
      address.kind === 'unix'
        ? net.connect(address.path)
        : net.connect({ host: address.host, port: address.port });
    socket.setNoDelay(true);

    // The handshake reads frames through a queue; after it the decoder feeds the request table.
    let deliver: (type: number, id: number, payload: Buffer, version: number) => void = () => {};
    const decoder = new FrameDecoder((type, id, payload, version) => deliver(type, id, payload, version));
    const frames: Array<{ type: number; payload: Buffer; version: number }> = [];
    let wake: (() => void) | undefined;
    let failure: Error | undefined;
    deliver = (type, _id, payload, version) => {
      frames.push({ type, payload, version });
      wake?.();
    };
    const fail = (err: Error): void => {
      failure ??= err;
      wake?.();
    };
    const onData = (chunk: Buffer): void => {
      try {
        decoder.push(chunk);
      } catch (err) {
        fail(new MsError('E_MS_PROTOCOL', `memory server ${name} sent malformed data: ${errorText(err)}`));
      }
    };
    const onError = (err: NodeJS.ErrnoException): void =>
      fail(
        new MsError('E_MS_CONNECT', `cannot connect to memory server ${name}: ${err.code ?? err.message}`, {
          cause: err,
        }),
      );
    const onClose = (): void =>
      fail(new MsError('E_MS_CLOSED', `memory server ${name} closed the connection during the handshake`));
    socket.on('data', onData);
    socket.on('error', onError);
    socket.on('close', onClose);
    const timer = setTimeout(
      () =>
        fail(
          new MsError(
            'E_MS_TIMEOUT',
            `memory server ${name} did not complete the handshake within ${timeoutMs} ms`,
          ),
        ),
      timeoutMs,
    );

    const next = async (expect: number): Promise<Buffer> => {
      while (frames.length === 0 && !failure) await new Promise<void>((r) => (wake = r));
      const f = frames.shift();
      if (!f) throw failure as Error;
      if (f.type === FRAME.ERROR) {
        const body = ErrorBody.safeParse(safeJson(f.payload));
        const code = body.success && isRemoteCode(body.data.code) ? body.data.code : 'protocol';
        const reason = body.success ? body.data.message : 'no reason given';
        throw new RemoteError(name, code, `memory server ${name} refused us: ${reason}`);
      }
      if (f.type !== expect || f.version !== (opts.protocolVersion ?? PROTOCOL_VERSION))
        throw new MsError(
          'E_MS_PROTOCOL',
          `memory server ${name} answered ${frameName(f.type)} (protocol version ${f.version}) where ${frameName(expect)} was due`,
        );
      return f.payload;
    };

    const version = opts.protocolVersion ?? PROTOCOL_VERSION;
    const write = (type: FrameType, payload: Buffer): void => {
      for (const p of frameParts(type, 0, [payload], version)) socket.write(p);
    };
    try {
      await new Promise<void>((resolve, reject) => {
        if (failure) return reject(failure);
        socket.once('connect', resolve);
        wake = () => failure && reject(failure);
      });
      const clientNonce = newNonce();
      write(FRAME.HELLO, clientNonce);
      const serverNonce = await next(FRAME.CHALLENGE);
      if (serverNonce.length !== NONCE_BYTES)
        throw new MsError(
          'E_MS_PROTOCOL',
          `memory server ${name} sent a ${serverNonce.length}-byte challenge`,
        );
      write(FRAME.AUTH, clientProof(opts.secret, clientNonce, serverNonce));
      const proof = await next(FRAME.WELCOME);
      if (!proofMatches(serverProof(opts.secret, clientNonce, serverNonce), proof))
        throw new MsError(
          'E_MS_AUTH',
          `memory server ${name} failed to prove it holds the shared secret (another secret, or not a tlc memory server)`,
        );
    } catch (err) {
      clearTimeout(timer);
      socket.destroy();
      throw err;
    }
    clearTimeout(timer);
    socket.off('error', onError);
    socket.off('close', onClose);
    socket.off('data', onData);
    const client = new MemoryServerClient(socket, address, opts, decoder);
    deliver = (type, id, payload, v) => client.onFrame(type, id, payload, v);
    for (const f of frames) client.onFrame(f.type, 0, f.payload, f.version);
    socket.on('data', (chunk: Buffer) => client.onData(chunk));
    socket.on('error', (err) =>
      client.shutdown(new MsError('E_MS_CLOSED', `memory server ${name}: ${errorText(err)}`)),
    );
    socket.on('close', () =>
      client.shutdown(new MsError('E_MS_CLOSED', `memory server ${name} closed the connection`)),
    );
    return client;
  }

  get closed(): boolean {
    return this.closedError !== undefined;
  }

  get inFlight(): number {
    return this.pending.size;
  }

  async ping(): Promise<void> {
    await this.request(FRAME.PING, [jsonPayload({})], 'ping');
  }

  async begin(ckpt: string): Promise<void> {
    await this.request(FRAME.BEGIN, [jsonPayload({ ckpt })], `begin ${ckpt}`);
  }

  /** Sends an extent; resolves once the server has it (in memory: durable only after flush()). */
  async putExtent(e: ExtentPut): Promise<void> {
    const sum = e.sha256 ?? sha256(e.data);
    const head = encodeExtentHead({
      ckpt: e.ckpt,
      block: e.block,
      index: e.index,
      offset: e.offset,
      sha256: sum,
    });
    await this.request(FRAME.PUT_EXTENT, [head, e.data], `put ${e.block}[${e.index}] of ${e.ckpt}`);
  }

  /**
   * Sends new contents for parts of an extent sent before (pre-copy re-sends of dirty pages): the
   * server patches its copy. `runs` offsets are within the extent.
   */
  async putPages(p: PagesPut): Promise<void> {
    const hash = createHash('sha256');
    for (const run of p.runs) hash.update(run.data);
    const head = encodePagesHead({
      ckpt: p.ckpt,
      block: p.block,
      index: p.index,
      runs: p.runs,
      sha256: hash.digest(),
    });
    await this.request(
      FRAME.PUT_PAGES,
      [head, ...p.runs.map((r) => r.data)],
      `put ${p.runs.length} page run(s) of ${p.block}[${p.index}] of ${p.ckpt}`,
    );
  }

  async putBlob(ckpt: string, name: string, data: Buffer): Promise<void> {
    const head = encodeBlobHead({ ckpt, name, sha256: sha256(data) });
    await this.request(FRAME.PUT_BLOB, [head, data], `put blob ${name} of ${ckpt}`);
  }

  /** Resolves when everything this server received for `ckpt` is fsynced. */
  async flush(ckpt: string): Promise<FlushResult> {
    return this.json(FRAME.FLUSH, { ckpt }, FlushResult, `flush ${ckpt}`);
  }

  /** Flushes `ckpt` and checks it holds everything in `expect`, without publishing it (refused: `incomplete`). */
  async prepare(ckpt: string, expect?: CommitExpectation): Promise<FlushResult> {
    return this.json(FRAME.PREPARE, expect ? { ckpt, expect } : { ckpt }, FlushResult, `prepare ${ckpt}`);
  }

  /** Atomically publishes `ckpt` on this server; refused (`incomplete`) if it lacks anything in `expect`. */
  async commit(ckpt: string, expect?: CommitExpectation): Promise<CheckpointInfo> {
    return this.json(FRAME.COMMIT, expect ? { ckpt, expect } : { ckpt }, CheckpointInfo, `commit ${ckpt}`);
  }

  async list(): Promise<CheckpointInfo[]> {
    return (await this.json(FRAME.LIST, {}, ListResult, 'list')).checkpoints;
  }

  /** Which extents and blobs of a committed checkpoint this server holds. */
  async index(ckpt: string): Promise<CheckpointIndex> {
    return this.json(FRAME.INDEX, { ckpt }, CheckpointIndex, `index ${ckpt}`);
  }

  /** Fetches an extent; rejects with E_CORRUPT when its data does not match its stored checksum. */
  async getExtent(ckpt: string, block: string, index: number): Promise<Extent> {
    const what = `extent ${block}[${index}] of ${ckpt}`;
    const f = await this.request(FRAME.GET_EXTENT, [jsonPayload({ ckpt, block, index })], `get ${what}`);
    if (f.type !== FRAME.EXTENT) throw this.unexpected(f.type, `get ${what}`);
    const r = decodeExtent(f.payload);
    if (r.ckpt !== ckpt || r.block !== block || r.index !== index)
      throw new MsError(
        'E_MS_PROTOCOL',
        `memory server ${this.name} answered ${what} with ${r.block}[${r.index}] of ${r.ckpt}`,
      );
    if (!sha256(r.data).equals(r.sha256))
      throw new TlcError(
        'E_CORRUPT',
        `memory server ${this.name} holds a corrupt copy of ${what} (checksum mismatch)`,
      );
    return { offset: r.offset, data: r.data, sha256: r.sha256 };
  }

  async getBlob(ckpt: string, name: string): Promise<Buffer> {
    const what = `blob ${name} of ${ckpt}`;
    const f = await this.request(FRAME.GET_BLOB, [jsonPayload({ ckpt, name })], `get ${what}`);
    if (f.type !== FRAME.BLOB) throw this.unexpected(f.type, `get ${what}`);
    const r = decodeBlob(f.payload);
    if (r.ckpt !== ckpt || r.name !== name)
      throw new MsError(
        'E_MS_PROTOCOL',
        `memory server ${this.name} answered ${what} with blob ${r.name} of ${r.ckpt}`,
      );
    if (!sha256(r.data).equals(r.sha256))
      throw new TlcError(
        'E_CORRUPT',
        `memory server ${this.name} holds a corrupt copy of ${what} (checksum mismatch)`,
      );
    return r.data;
  }

  /** Removes every copy of `ckpt` on this server; resolves false if it had none. */
  async remove(ckpt: string): Promise<boolean> {
    return (await this.json(FRAME.REMOVE, { ckpt }, RemoveResult, `remove ${ckpt}`)).removed;
  }

  close(): void {
    this.shutdown(new MsError('E_MS_CLOSED', `connection to memory server ${this.name} closed by us`));
    this.socket.destroy();
  }

  private async json<T>(
    type: FrameType,
    body: unknown,
    schema: ZodType<T, ZodTypeDef, unknown>,
    what: string,
  ): Promise<T> {
    const f = await this.request(type, [jsonPayload(body)], what);
    if (f.type !== FRAME.OK) throw this.unexpected(f.type, what);
    const r = schema.safeParse(parseJson(f.payload));
    if (!r.success)
      throw new MsError(
        'E_MS_PROTOCOL',
        `memory server ${this.name} answered ${what} with a malformed result`,
      );
    return r.data;
  }

  private unexpected(type: number, what: string): MsError {
    return new MsError(
      'E_MS_PROTOCOL',
      `memory server ${this.name} answered ${what} with ${frameName(type)}`,
    );
  }

  private async request(
    type: FrameType,
    parts: Buffer[],
    what: string,
  ): Promise<{ type: number; payload: Buffer }> {
    while (this.pending.size >= this.maxInFlight && !this.closedError)
      await new Promise<void>((r) => this.slotWaiters.push(r));
    if (this.closedError) throw new MsError('E_MS_CLOSED', `${this.closedError.message} (${what} not sent)`);
    this.lastRequestAt = Date.now();
    const id = this.nextId;
    this.nextId = this.nextId >= 0xffffffff ? 1 : this.nextId + 1;
    const frame = frameParts(type, id, parts);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        this.abandoned.add(id);
        this.releaseSlot();
        reject(
          new MsError(
            'E_MS_TIMEOUT',
            `memory server ${this.name} did not answer ${what} within ${this.requestTimeoutMs} ms`,
          ),
        );
      }, this.requestTimeoutMs);
      this.pending.set(id, { resolve, reject, timer, what });
      this.socket.cork();
      for (const p of frame) this.socket.write(p);
      this.socket.uncork();
    });
  }

  private releaseSlot(): void {
    this.slotWaiters.shift()?.();
  }

  private onData(chunk: Buffer): void {
    try {
      this.decoder.push(chunk);
    } catch (err) {
      const detail = err instanceof ProtocolError ? err.message : errorText(err);
      this.shutdown(
        new MsError('E_MS_PROTOCOL', `memory server ${this.name} sent malformed data: ${detail}`),
      );
      this.socket.destroy();
    }
  }

  private onFrame(type: number, id: number, payload: Buffer, version: number): void {
    if (version !== PROTOCOL_VERSION) {
      this.shutdown(
        new MsError('E_MS_PROTOCOL', `memory server ${this.name} switched to protocol version ${version}`),
      );
      this.socket.destroy();
      return;
    }
    if (type === FRAME.ERROR) {
      const body = ErrorBody.safeParse(safeJson(payload));
      const code = body.success && isRemoteCode(body.data.code) ? body.data.code : 'internal';
      const reason = body.success ? body.data.message : 'no reason given';
      if (id === 0) {
        // About the connection as a whole (timeout, malformed input, shutdown): it ends here.
        this.shutdown(
          new RemoteError(this.name, code, `memory server ${this.name} dropped the connection: ${reason}`),
        );
        this.socket.destroy();
        return;
      }
      if (this.abandoned.delete(id)) return;
      const p = this.take(id);
      p?.reject(new RemoteError(this.name, code, `memory server ${this.name} refused ${p.what}: ${reason}`));
      return;
    }
    if (this.abandoned.delete(id)) return;
    const p = this.take(id);
    if (!p) {
      this.shutdown(
        new MsError(
          'E_MS_PROTOCOL',
          `memory server ${this.name} answered request ${id}, which is not outstanding`,
        ),
      );
      this.socket.destroy();
      return;
    }
    p.resolve({ type, payload });
  }

  private take(id: number): Pending | undefined {
    const p = this.pending.get(id);
    if (!p) return undefined;
    this.pending.delete(id);
    clearTimeout(p.timer);
    this.releaseSlot();
    return p;
  }

  private shutdown(err: MsError): void {
    if (this.closedError) return;
    this.closedError = err;
    clearInterval(this.keepAlive);
    for (const [id, p] of this.pending) {
      this.pending.delete(id);
      clearTimeout(p.timer);
      p.reject(err instanceof RemoteError ? err : new MsError(err.code, `${err.message} (${p.what} lost)`));
    }
    for (const w of this.slotWaiters.splice(0)) w();
  }
}

function safeJson(payload: Buffer): unknown {
  try {
    return parseJson(payload);
  } catch {
    return undefined;
  }
}
