import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { Worker } from 'node:worker_threads';
import { CheckpointError, PersistError, StreamError } from '../core/errors.js';
import { PRIVATE_FILE_MODE } from '../core/paths.js';
import { CONFIG_FILE, DEVICE_FILE, type ManifestBlock, sha256Hex } from '../store/manifest.js';
import { chunkCount, hashChunk, newSums } from '../store/sums.js';
import { SUMS_CHUNK_BYTES } from '../store/manifest.js';
import {
  MigrationStreamReader,
  applyXbzrle,
  type RamBlockInfo,
  type RamSectionHeader,
  type StreamSink,
} from '../stream/reader.js';
import type { DeviceStateInfo } from '../stream/vmdesc.js';
import { PageTable } from './page-table.js';
import type { WriterCommand, WriterInit, WriterReply } from './writer-worker.js';

/** Blocks at least this large (and guest RAM `ram0` always) get a page table and a writer thread. */
const LARGE_BLOCK_BYTES = 16 * 1024 * 1024;
const TARGET_PAGE_SIZE = 4096;
/** QEMU's migration thread, a vCPU, the receiver and the writer each want a core. */
const WRITE_WHILE_RECEIVING = os.availableParallelism() >= 4;
/** Warm-up yields to the event loop every 64 MiB of pages. */
const WARM_UP_YIELD_MASK = (64 * 1024 * 1024) / 4 - 1;

export interface ReceivedCheckpoint {
  machineType: string;
  ramSection: RamSectionHeader;
  blocks: ManifestBlock[];
  configSha256: string;
  device: { file: string; bytes: number; sha256: string; sections: number; runstate?: string };
  bytesReceived: number;
  bytesStored: number;
}

export interface ReceiverEvents {
  /** At the end of each RAM section: kind and the stream bytes received so far. */
  onRamSection?(kind: 'start' | 'part' | 'end', bytesReceived: number): void;
  /** The whole stream arrived and parsed: QEMU can be resumed now; persisting continues. */
  onStreamComplete?(bytesReceived: number): void;
  /** QEMU connected; the socket is passed for guarding, never to read from. */
  onConnection?(socket: net.Socket): void;
}

interface LargeBlock {
  table: PageTable;
  worker: Worker;
  failure: Promise<never>;
}

/**
 * Takes one QEMU migration stream over a socket, keeps the newest version of each page, and
 * persists it into a staging directory. Large blocks go through a page table drained by a writer
 * thread while the stream is still arriving; small blocks (ROMs, ACPI tables) stay in memory.
 */
export class CheckpointReceiver implements StreamSink {
  private readonly reader: MigrationStreamReader;
  private server: net.Server | undefined;
  private socket: net.Socket | undefined;
  private blocks: readonly RamBlockInfo[] = [];
  private large: (LargeBlock | undefined)[] = [];
  private warm: (LargeBlock & { name: string }) | undefined;
  private small: (Buffer | undefined)[] = [];
  private machineType = '';
  private configRaw: Buffer | undefined;
  private ramSection: RamSectionHeader | undefined;
  private deviceBlob: Buffer | undefined;
  private deviceInfo: DeviceStateInfo | undefined;
  bytesReceived = 0;
  private discarding = false;
  private paused = false;
  private readonly neverCut: boolean;
  private drained: (() => void) | undefined;
  private settle!: { resolve: () => void; reject: (err: unknown) => void };
  /** Resolves when the stream arrived complete and parsed; rejects on any stream or socket error. */
  readonly streamDone: Promise<void>;

  constructor(
    private readonly staging: string,
    private readonly events: ReceiverEvents = {},
    opts: { maxRamBytes?: number; neverCut?: boolean } = {},
  ) {
    this.neverCut = Boolean(opts.neverCut);
    // requireVmdesc: pc machine types of QEMU >= 2.3 always end with the VM description, so a
    // stream cut right after EOF must not pass as complete.
    this.reader = new MigrationStreamReader(this, {
      requireVmdesc: true,
      ...(opts.maxRamBytes ? { maxRamBytes: opts.maxRamBytes } : {}),
    });
    this.streamDone = new Promise<void>((resolve, reject) => {
      this.settle = { resolve, reject };
    });
    this.streamDone.catch(() => undefined);
  }

  /** Listens on a unix socket for exactly one connection from QEMU. */
  listen(socketPath: string): Promise<void> {
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
        this.reader.push(chunk);
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
        this.reader.end();
        this.events.onStreamComplete?.(this.bytesReceived);
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
  pauseReading(): void {
    this.paused = true;
    this.socket?.pause();
  }

  /**
   * Reads and discards the rest of the stream until QEMU ends it, for a migration that must not
   * be cut off (QEMU 7.2 freezes the guest when a background snapshot fails or is cancelled).
   * Resolves true when QEMU closed the stream, false after `timeoutMs`.
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

  /** Stops listening and drops the connection (a failed or cancelled checkpoint). */
  abort(reason: Error): void {
    this.server?.close();
    this.socket?.destroy();
    this.settle.reject(reason);
    for (const block of this.large) void block?.worker.terminate();
    void this.warm?.worker.terminate();
  }

  // ---- StreamSink: the hot path. No allocation per page. ----

  onConfiguration(machineType: string, raw: Buffer): void {
    this.machineType = machineType;
    this.configRaw = raw;
  }

  onRamStart(header: RamSectionHeader): void {
    this.ramSection = header;
  }

  onBlockList(blocks: readonly RamBlockInfo[]): void {
    if (this.blocks.length > 0) throw new StreamError('RAM block list sent twice', this.reader.offset);
    this.blocks = blocks;
    this.large = blocks.map((b, i) => (isLarge(b) ? this.startWriter(b, i) : undefined));
    this.small = blocks.map((b) => (isLarge(b) ? undefined : Buffer.alloc(b.usedLength)));
  }

  /**
   * Allocates and faults in the page table for guest RAM before QEMU starts sending. A first
   * touch costs a page fault per page (1-4 s per 2 GiB under nested virtualization); taken here,
   * before `migrate`, it neither slows the stream nor the guest. Returns the ms it took.
   */
  async warmUp(ramBlockName: string, bytes: number): Promise<number> {
    const started = performance.now();
    const table = new PageTable(bytes, TARGET_PAGE_SIZE);
    const wordsPerPage = TARGET_PAGE_SIZE / 4;
    for (const seg of table.segments) {
      const words = new Int32Array(seg.buffer, seg.byteOffset, seg.length >>> 2);
      for (let i = 0; i < words.length; i += wordsPerPage) {
        words[i] = 0;
        // Yield now and then so QMP events and the socket stay serviced.
        if ((i & WARM_UP_YIELD_MASK) === 0) await new Promise((r) => setImmediate(r));
      }
    }
    this.warm = { name: ramBlockName, ...this.spawnWriter(table) };
    return performance.now() - started;
  }

  /** A writer thread over `table`, idle until told which file to write. */
  private spawnWriter(table: PageTable): LargeBlock {
    const worker = new Worker(new URL('./writer-worker.js', import.meta.url), {
      workerData: { table: table.shared, writeWhileReceiving: WRITE_WHILE_RECEIVING } satisfies WriterInit,
    });
    const failure = new Promise<never>((_, reject) => {
      worker.on('message', (msg: WriterReply) => {
        if (msg.type === 'error') reject(new PersistError(msg.call, msg.path, new Error(msg.message)));
      });
      worker.on('error', (err) => reject(new PersistError('write', 'RAM image', err)));
    });
    failure.catch((err: unknown) => this.abort(err instanceof Error ? err : new Error(String(err))));
    return { table, worker, failure };
  }

  private startWriter(block: RamBlockInfo, index: number): LargeBlock {
    const warm = this.warm;
    this.warm = undefined;
    let writer: LargeBlock;
    if (warm && warm.name === block.name && warm.table.length === block.usedLength) {
      writer = warm;
    } else {
      if (warm) void warm.worker.terminate();
      writer = this.spawnWriter(new PageTable(block.usedLength, TARGET_PAGE_SIZE));
    }
    writer.worker.postMessage({
      type: 'open',
      imageFile: path.join(this.staging, imageName(index)),
    } satisfies WriterCommand);
    return writer;
  }

  onPage(block: number, offset: number, page: Buffer): void {
    const large = this.large[block];
    if (large) large.table.writePage(offset, page);
    else page.copy(this.small[block] as Buffer, offset);
  }

  onZeroPage(block: number, offset: number, fill: number): void {
    const large = this.large[block];
    if (large) large.table.fillPage(offset, fill);
    else (this.small[block] as Buffer).fill(fill, offset, offset + TARGET_PAGE_SIZE);
  }

  onXbzrlePage(block: number, offset: number, delta: Buffer): void {
    const large = this.large[block];
    if (large) {
      applyXbzrle(large.table.pageView(offset), delta, this.reader.offset);
      large.table.touched(offset);
    } else {
      const small = this.small[block] as Buffer;
      applyXbzrle(small.subarray(offset, offset + TARGET_PAGE_SIZE), delta, this.reader.offset);
    }
  }

  onRamSectionEnd(kind: 'start' | 'part' | 'end'): void {
    this.events.onRamSection?.(kind, this.bytesReceived);
  }

  onDeviceState(blob: Buffer, info: DeviceStateInfo): void {
    this.deviceBlob = blob;
    this.deviceInfo = info;
  }

  /**
   * Compares the received guest RAM with the stopped guest's own RAM and takes the guest's
   * version of every page that differs. Returns the number of pages fixed.
   */
  reconcileRam(block: string, read: (scratch: Buffer, offset: number, len: number) => void): number {
    const index = this.blocks.findIndex((b) => b.name === block);
    const large = this.large[index];
    if (!large) throw new CheckpointError(`Stream has no ${block} block to reconcile`);
    return large.table.reconcile(read);
  }

  // ---- after the stream: persist ----

  /** Finishes the writers, writes small blocks, config and device state. Call after streamDone. */
  async persist(): Promise<ReceivedCheckpoint> {
    if (!this.configRaw || !this.ramSection || !this.deviceBlob || !this.deviceInfo) {
      throw new CheckpointError('Stream ended without configuration, RAM section or device state');
    }
    const manifestBlocks: ManifestBlock[] = [];
    const finishing = this.large.map((large) => (large ? finishWriter(large) : undefined));
    let bytesStored = 0;
    for (let i = 0; i < this.blocks.length; i++) {
      const block = this.blocks[i] as RamBlockInfo;
      const file = imageName(i);
      const sumsFile = `${file}.sums`;
      let sums: Buffer;
      let dataPages: number;
      const pending = finishing[i];
      if (pending) {
        const done = await pending;
        sums = Buffer.from(done.sums);
        dataPages = done.dataPages;
      } else {
        const data = this.small[i] as Buffer;
        writeDurable(path.join(this.staging, file), data);
        sums = newSums(data.length);
        for (let c = 0; c < chunkCount(data.length); c++) {
          hashChunk(data.subarray(c * SUMS_CHUNK_BYTES, (c + 1) * SUMS_CHUNK_BYTES), sums, c);
        }
        dataPages = countDataPages(data);
      }
      writeDurable(path.join(this.staging, sumsFile), sums);
      bytesStored += allocatedBytes(path.join(this.staging, file)) + sums.length;
      manifestBlocks.push({
        name: block.name,
        usedLength: block.usedLength,
        file,
        sumsFile,
        sumsSha256: sha256Hex(sums),
        dataPages,
      });
    }
    writeDurable(path.join(this.staging, CONFIG_FILE), this.configRaw);
    writeDurable(path.join(this.staging, DEVICE_FILE), this.deviceBlob);
    bytesStored += this.configRaw.length + this.deviceBlob.length;
    return {
      machineType: this.machineType,
      ramSection: this.ramSection,
      blocks: manifestBlocks,
      configSha256: sha256Hex(this.configRaw),
      device: {
        file: DEVICE_FILE,
        bytes: this.deviceBlob.length,
        sha256: sha256Hex(this.deviceBlob),
        sections: this.deviceInfo.sections,
        ...(this.deviceInfo.runstate ? { runstate: this.deviceInfo.runstate } : {}),
      },
      bytesReceived: this.bytesReceived,
      bytesStored,
    };
  }
}

function isLarge(block: RamBlockInfo): boolean {
  return block.name === 'ram0' || block.usedLength >= LARGE_BLOCK_BYTES;
}

export function imageName(index: number): string {
  return `block-${index}.img`;
}

async function finishWriter(large: LargeBlock): Promise<{ sums: Uint8Array; dataPages: number }> {
  const done = new Promise<{ sums: Uint8Array; dataPages: number }>((resolve) => {
    large.worker.on('message', (msg: WriterReply) => {
      if (msg.type === 'done') resolve(msg);
    });
  });
  large.worker.postMessage({ type: 'finish' });
  try {
    return await Promise.race([done, large.failure]);
  } finally {
    await large.worker.terminate();
  }
}

function writeDurable(file: string, data: Uint8Array): void {
  let fd: number;
  try {
    fd = fs.openSync(file, 'wx', PRIVATE_FILE_MODE);
  } catch (err) {
    throw new PersistError('create', file, err);
  }
  try {
    fs.writeFileSync(fd, data);
    fs.fdatasyncSync(fd);
  } catch (err) {
    throw new PersistError('write', file, err);
  } finally {
    fs.closeSync(fd);
  }
}

function allocatedBytes(file: string): number {
  return fs.statSync(file).blocks * 512;
}

function countDataPages(data: Buffer): number {
  const zero = Buffer.alloc(TARGET_PAGE_SIZE);
  let n = 0;
  for (let at = 0; at < data.length; at += TARGET_PAGE_SIZE) {
    if (zero.compare(data, at, Math.min(at + TARGET_PAGE_SIZE, data.length)) !== 0) n++;
  }
  return n;
}
