import { CheckpointError, StreamError } from '../core/errors.js';
import { CONFIG_FILE, DEVICE_FILE, PAGE_SIZE } from '../store/manifest.js';
import type { BlockWriter, FinishedRam, StagedCheckpoint } from '../store/staged.js';
import { applyXbzrle, type RamBlockInfo, type RamSectionHeader, type StreamSink } from '../stream/reader.js';
import type { DeviceStateInfo } from '../stream/vmdesc.js';

/** The TCG fix-up compares guest RAM with what was received this many bytes at a time. */
const RECONCILE_CHUNK_BYTES = 4 * 1024 * 1024;

export interface ReceivedStream {
  machineType: string;
  ramSection: RamSectionHeader;
  configRaw: Buffer;
  deviceBlob: Buffer;
  deviceInfo: DeviceStateInfo;
}

/**
 * The stream reader's sink over a store's staged checkpoint: every page goes to its block's
 * writer as it arrives (nothing RAM-sized is held here); configuration and device state are kept
 * until `finish`. The hot path allocates nothing per page.
 */
export class PageSink implements StreamSink {
  private blocks: readonly RamBlockInfo[] = [];
  private writers: BlockWriter[] = [];
  private machineType = '';
  private configRaw: Buffer | undefined;
  private ramSection: RamSectionHeader | undefined;
  private deviceBlob: Buffer | undefined;
  private deviceInfo: DeviceStateInfo | undefined;
  private readonly xbzrlePage = Buffer.alloc(PAGE_SIZE);

  constructor(
    private readonly staged: StagedCheckpoint,
    /** Stream offset, for errors. */
    private readonly offset: () => number,
  ) {}

  onConfiguration(machineType: string, raw: Buffer): void {
    this.machineType = machineType;
    this.configRaw = raw;
  }

  onRamStart(header: RamSectionHeader): void {
    this.ramSection = header;
  }

  onBlockList(blocks: readonly RamBlockInfo[]): void {
    if (this.blocks.length > 0) throw new StreamError('RAM block list sent twice', this.offset());
    this.blocks = blocks;
    this.writers = this.staged.openBlocks(blocks);
  }

  onPage(block: number, offset: number, page: Buffer): void {
    (this.writers[block] as BlockWriter).writePage(offset, page, 0);
  }

  onZeroPage(block: number, offset: number, fill: number): void {
    (this.writers[block] as BlockWriter).fillPage(offset, fill);
  }

  onXbzrlePage(block: number, offset: number, delta: Buffer): void {
    const writer = this.writers[block] as BlockWriter;
    writer.read(offset, this.xbzrlePage, PAGE_SIZE);
    applyXbzrle(this.xbzrlePage, delta, this.offset());
    writer.writePage(offset, this.xbzrlePage, 0);
  }

  onRamSectionEnd(): void {
    // nothing to do: pages are already with their writers
  }

  onDeviceState(blob: Buffer, info: DeviceStateInfo): void {
    this.deviceBlob = blob;
    this.deviceInfo = info;
  }

  /**
   * Makes block `name` equal to the stopped guest's own RAM (`read` fills `scratch` with `len`
   * bytes at `offset`), reading back what was received 4 MiB at a time (from the page cache for
   * the local store). Returns the number of pages that differed.
   */
  reconcile(name: string, read: (scratch: Buffer, offset: number, len: number) => void): number {
    const index = this.blocks.findIndex((b) => b.name === name);
    const writer = this.writers[index];
    if (!writer) throw new CheckpointError(`Stream has no ${name} block to reconcile`);
    const guest = Buffer.allocUnsafe(RECONCILE_CHUNK_BYTES);
    const ours = Buffer.allocUnsafe(RECONCILE_CHUNK_BYTES);
    let differing = 0;
    for (let base = 0; base < writer.length; base += RECONCILE_CHUNK_BYTES) {
      const len = Math.min(RECONCILE_CHUNK_BYTES, writer.length - base);
      read(guest, base, len);
      writer.read(base, ours, len);
      if (guest.compare(ours, 0, len, 0, len) === 0) continue;
      for (let at = 0; at < len; at += PAGE_SIZE) {
        if (guest.compare(ours, at, at + PAGE_SIZE, at, at + PAGE_SIZE) === 0) continue;
        writer.writePage(base + at, guest, at);
        differing++;
      }
    }
    return differing;
  }

  /** The parsed stream's small parts; throws when the stream lacked one. */
  received(): ReceivedStream {
    if (!this.configRaw || !this.ramSection || !this.deviceBlob || !this.deviceInfo) {
      throw new CheckpointError('Stream ended without configuration, RAM section or device state');
    }
    return {
      machineType: this.machineType,
      ramSection: this.ramSection,
      configRaw: this.configRaw,
      deviceBlob: this.deviceBlob,
      deviceInfo: this.deviceInfo,
    };
  }

  /** Stores config and device state, then finishes every block. */
  async finish(): Promise<ReceivedStream & FinishedRam> {
    const r = this.received();
    this.staged.putBlob(CONFIG_FILE, r.configRaw);
    this.staged.putBlob(DEVICE_FILE, r.deviceBlob);
    return { ...r, ...(await this.staged.finish()) };
  }
}
