import type net from 'node:net';
import { DEVICE_FILE, type ManifestBlock, sha256Hex } from '../store/manifest.js';
import { LocalStagedCheckpoint } from '../store/local-writer.js';
import type { ScratchOptions } from '../store/scratch.js';
import type { StagedCheckpoint } from '../store/staged.js';
import type { StoredCheckpoint } from '../store/store.js';
import { MigrationStreamReader, type RamSectionHeader } from '../stream/reader.js';
import { PageSink } from './page-sink.js';
import { StreamTransport } from './transport.js';

export interface ReceivedCheckpoint {
  machineType: string;
  ramSection: RamSectionHeader;
  blocks: ManifestBlock[];
  configSha256: string;
  device: { file: string; bytes: number; sha256: string; sections: number; runstate?: string };
  bytesReceived: number;
  bytesStored: number;
  /** The checkpoint this one's RAM builds on (incremental), if any. */
  parent?: string;
}

export interface ReceiverEvents {
  /** The whole stream arrived and parsed: QEMU can be resumed now; persisting continues. */
  onStreamComplete?(bytesReceived: number): void;
  /** QEMU connected; the socket is passed for guarding, never to read from. */
  onConnection?(socket: net.Socket): void;
}

export interface ReceiverOptions {
  maxRamBytes?: number;
  /** Drain rather than cut a failing stream (QEMU 7.2 freezes a guest whose background snapshot fails). */
  neverCut?: boolean;
  /** Store only what differs from this checkpoint (when its blocks match); default: a full checkpoint. */
  parent?: StoredCheckpoint;
  /** Receive into the VM's recycled receive files (store/scratch.ts). */
  scratch?: ScratchOptions;
  /** Sub-page deltas against the parent (default on). */
  subPageDeltas?: boolean;
  /** Where pages go; default the local store's staged checkpoint in `staging`. */
  staged?: StagedCheckpoint;
}

/**
 * One checkpoint's receiving end, in three parts: a transport (QEMU's connection), the stream
 * reader with a page sink, and the store's staged checkpoint the sink writes into.
 */
export class CheckpointReceiver {
  private readonly reader: MigrationStreamReader;
  private readonly sink: PageSink;
  private readonly transport: StreamTransport;
  private readonly staged: StagedCheckpoint;
  /** Resolves when the stream arrived complete and parsed; rejects on any stream or socket error. */
  readonly streamDone: Promise<void>;

  constructor(staging: string, events: ReceiverEvents = {}, opts: ReceiverOptions = {}) {
    this.staged =
      opts.staged ??
      new LocalStagedCheckpoint(staging, {
        ...(opts.parent ? { parent: opts.parent } : {}),
        ...(opts.scratch ? { scratch: opts.scratch } : {}),
        ...(opts.subPageDeltas !== undefined ? { subPageDeltas: opts.subPageDeltas } : {}),
      });
    this.sink = new PageSink(this.staged, () => this.reader.offset);
    // requireVmdesc: pc machine types of QEMU >= 2.3 always end with the VM description, so a
    // stream cut right after EOF must not pass as complete.
    this.reader = new MigrationStreamReader(this.sink, {
      requireVmdesc: true,
      ...(opts.maxRamBytes ? { maxRamBytes: opts.maxRamBytes } : {}),
    });
    this.transport = new StreamTransport(
      this.reader,
      {
        ...(events.onConnection ? { onConnection: events.onConnection } : {}),
        ...(events.onStreamComplete ? { onComplete: events.onStreamComplete } : {}),
      },
      Boolean(opts.neverCut),
    );
    this.streamDone = this.transport.done;
  }

  get bytesReceived(): number {
    return this.transport.bytesReceived;
  }

  /** Listens on a unix socket for exactly one connection from QEMU. */
  listen(socketPath: string): Promise<void> {
    return this.transport.listen(`unix:${socketPath}`);
  }

  consume(socket: net.Socket): void {
    this.transport.consume(socket);
  }

  pauseReading(): void {
    this.transport.pause();
  }

  drain(timeoutMs: number): Promise<boolean> {
    return this.transport.drain(timeoutMs);
  }

  abort(reason: Error): void {
    this.transport.abort(reason);
    this.staged.abandon();
  }

  /** The live-mode TCG fix-up: see `PageSink.reconcile`. */
  reconcileRam(block: string, read: (scratch: Buffer, offset: number, len: number) => void): number {
    return this.sink.reconcile(block, read);
  }

  /** Finishes every block (sums, page hashes, incremental), config and device state. Call after streamDone. */
  async persist(): Promise<ReceivedCheckpoint> {
    const done = await this.sink.finish();
    return {
      machineType: done.machineType,
      ramSection: done.ramSection,
      blocks: done.blocks,
      configSha256: sha256Hex(done.configRaw),
      device: {
        file: DEVICE_FILE,
        bytes: done.deviceBlob.length,
        sha256: sha256Hex(done.deviceBlob),
        sections: done.deviceInfo.sections,
        ...(done.deviceInfo.runstate ? { runstate: done.deviceInfo.runstate } : {}),
      },
      bytesReceived: this.transport.bytesReceived,
      bytesStored: done.bytesStored,
      ...(done.parent ? { parent: done.parent } : {}),
    };
  }
}
