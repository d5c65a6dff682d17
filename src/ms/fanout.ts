/**
 * Page fan-out: turns the pages a migration stream delivers (block, offset, page) into what the
 * memory servers store. While a block is first streamed, pages fill extent buffers that go out
 * whole once every page of the extent has arrived; a page re-sent (pre-copy) after its extent went
 * out is kept as a patch and sent by sync() (end of a pass) or when the patches pass their budget.
 * An extent whose pages were all zero is not sent at all: absent extents are zero on restore, which
 * keeps a mostly empty guest cheap. The host holds the extents being filled plus the patches,
 * never a copy of guest RAM.
 *
 * This is the sink side of the seam: the checkpoint path feeds it from the stream reader's
 * onPage/onZeroPage (XBZRLE must be off: a delta needs the page's current contents, which this
 * host does not keep) and commits with the index lists finish() returns.
 */
import type { ExtentPut, PagesPut } from './client.js';
import { MAX_EXTENT_BYTES, MAX_RUNS } from './protocol.js';

/** What the fan-out sends to: a ServerSet, or a single MemoryServerClient. */
export interface ExtentTarget {
  putExtent(e: ExtentPut): Promise<unknown>;
  putPages(p: PagesPut): Promise<unknown>;
}

export interface FanoutOptions {
  ckpt: string;
  blocks: ReadonlyArray<{ name: string; length: number }>;
  /** Bytes of guest RAM per extent. Default 2 MiB (aligned with the per-MiB checksums). */
  extentBytes?: number;
  /** Default 4096. */
  pageBytes?: number;
  /** Patch bytes buffered before they are sent without waiting for sync(). Default 16 MiB. */
  maxPatchBytes?: number;
}

/** Extent states (0: nothing received yet). */
const FILLING = 1;
const SENT = 2;
const ZERO = 3;

interface Filling {
  buf: Buffer;
  have: Uint8Array;
  count: number;
  pages: number;
  nonZero: boolean;
}

interface BlockState {
  name: string;
  length: number;
  state: Uint8Array;
  filling: Map<number, Filling>;
  /** Per sent extent: page offset within the extent → newest contents. */
  patches: Map<number, Map<number, Buffer>>;
}

export class ExtentFanout {
  readonly extentBytes: number;
  readonly pageBytes: number;
  private readonly blocks = new Map<string, BlockState>();
  private readonly maxPatchBytes: number;
  private patchBytes = 0;
  private readonly inflight = new Set<Promise<unknown>>();
  private failure: unknown;

  constructor(
    private readonly target: ExtentTarget,
    private readonly opts: FanoutOptions,
  ) {
    this.extentBytes = opts.extentBytes ?? 2 * 1024 * 1024;
    this.pageBytes = opts.pageBytes ?? 4096;
    this.maxPatchBytes = opts.maxPatchBytes ?? 16 * 1024 * 1024;
    if (this.extentBytes > MAX_EXTENT_BYTES || this.extentBytes % this.pageBytes !== 0)
      throw new RangeError(`extentBytes must be a multiple of ${this.pageBytes} up to ${MAX_EXTENT_BYTES}`);
    if (this.extentBytes / this.pageBytes > MAX_RUNS)
      throw new RangeError('pages too small for one pages record');
    for (const b of opts.blocks) {
      const extents = Math.ceil(b.length / this.extentBytes);
      this.blocks.set(b.name, {
        name: b.name,
        length: b.length,
        state: new Uint8Array(extents),
        filling: new Map(),
        patches: new Map(),
      });
    }
  }

  /** Bytes this host holds: extents being filled plus patches not yet sent. */
  get bufferedBytes(): number {
    let n = this.patchBytes;
    for (const b of this.blocks.values()) for (const f of b.filling.values()) n += f.buf.length;
    return n;
  }

  /** A page's contents; `data` may be a view valid only during the call (it is copied). */
  page(block: string, offset: number, data: Buffer): void {
    this.put(block, offset, data, false);
  }

  /** A page QEMU reports as zero. */
  zeroPage(block: string, offset: number): void {
    this.put(block, offset, undefined, true);
  }

  /** Sends every buffered patch and waits for everything sent so far to be acknowledged. */
  async sync(): Promise<void> {
    this.sendPatches();
    await this.drain();
  }

  /** Waits for the puts in flight (flow control for the caller); rethrows the first failure. */
  async drain(): Promise<void> {
    while (this.inflight.size > 0) await Promise.allSettled([...this.inflight]);
    if (this.failure) throw this.failure;
  }

  /**
   * Ends the checkpoint's RAM: sends extents still being filled (their missing pages are zero) and
   * the patches, waits for all, and returns the extent indices sent per block, for commit().
   */
  async finish(): Promise<Record<string, number[]>> {
    for (const b of this.blocks.values())
      for (const [k, f] of b.filling) {
        b.filling.delete(k);
        this.complete(b, k, f);
      }
    await this.sync();
    const out: Record<string, number[]> = {};
    for (const b of this.blocks.values()) {
      const sent: number[] = [];
      b.state.forEach((s, k) => s === SENT && sent.push(k));
      out[b.name] = sent;
    }
    return out;
  }

  private put(blockName: string, offset: number, data: Buffer | undefined, zero: boolean): void {
    if (this.failure) throw this.failure;
    const b = this.blocks.get(blockName);
    if (!b) throw new RangeError(`unknown RAM block ${blockName}`);
    const len = data?.length ?? this.pageBytes;
    if (offset % this.pageBytes !== 0 || offset + len > b.length || len !== this.pageBytes)
      throw new RangeError(`page ${blockName}+${offset} (${len} bytes) is not a page of the block`);
    const k = Math.floor(offset / this.extentBytes);
    const at = offset - k * this.extentBytes;
    const state = b.state[k];
    if (state === SENT) {
      let runs = b.patches.get(k);
      if (!runs) b.patches.set(k, (runs = new Map()));
      const old = runs.get(at);
      const copy = zero ? Buffer.alloc(len) : Buffer.from(data as Buffer);
      runs.set(at, copy);
      this.patchBytes += len - (old?.length ?? 0);
      if (this.patchBytes >= this.maxPatchBytes) this.sendPatches();
      return;
    }
    let f = b.filling.get(k);
    if (!f) {
      const size = Math.min(this.extentBytes, b.length - k * this.extentBytes);
      const pages = Math.ceil(size / this.pageBytes);
      f = { buf: Buffer.alloc(size), have: new Uint8Array(pages), count: 0, pages, nonZero: false };
      if (state === ZERO) {
        // Known to be all zero: every page is present already.
        f.have.fill(1);
        f.count = pages;
      }
      b.filling.set(k, f);
      b.state[k] = FILLING;
    }
    if (zero) f.buf.fill(0, at, at + len);
    else {
      (data as Buffer).copy(f.buf, at);
      f.nonZero = true;
    }
    const page = at / this.pageBytes;
    if (!f.have[page]) {
      f.have[page] = 1;
      f.count++;
    }
    if (f.count === f.pages) {
      b.filling.delete(k);
      this.complete(b, k, f);
    }
  }

  private complete(b: BlockState, k: number, f: Filling): void {
    if (!f.nonZero) {
      b.state[k] = ZERO;
      return;
    }
    b.state[k] = SENT;
    this.track(
      this.target.putExtent({
        ckpt: this.opts.ckpt,
        block: b.name,
        index: k,
        offset: k * this.extentBytes,
        data: f.buf,
      }),
    );
  }

  private sendPatches(): void {
    for (const b of this.blocks.values()) {
      for (const [k, runs] of b.patches) {
        const list = [...runs].sort((x, y) => x[0] - y[0]).map(([at, data]) => ({ at, data }));
        this.track(this.target.putPages({ ckpt: this.opts.ckpt, block: b.name, index: k, runs: list }));
      }
      b.patches.clear();
    }
    this.patchBytes = 0;
  }

  private track(p: Promise<unknown>): void {
    const tracked = p.then(
      () => undefined,
      (err: unknown) => {
        this.failure ??= err;
      },
    );
    this.inflight.add(tracked);
    void tracked.finally(() => this.inflight.delete(tracked));
  }
}
