import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import type { ExtentPut, PagesPut } from './client.js';
import { ExtentFanout, type ExtentTarget } from './fanout.js';
import { MemoryServer } from './server.js';
import { ServerSet } from './serverset.js';

const PAGE = 4096;
const EXTENT = 64 * 1024;

/** Guest RAM with some all-zero extents and some zero pages, as a stream would deliver it. */
function guestRam(bytes: number): Buffer {
  const ram = randomBytes(bytes);
  ram.fill(0, EXTENT, 3 * EXTENT); // extents 1 and 2 all zero
  ram.fill(0, 5 * EXTENT + PAGE, 5 * EXTENT + 3 * PAGE); // two zero pages inside extent 5
  return ram;
}

function streamPages(f: ExtentFanout, block: string, ram: Buffer, pages: Iterable<number>): void {
  for (const p of pages) {
    const page = ram.subarray(p * PAGE, (p + 1) * PAGE);
    if (page.every((b) => b === 0)) f.zeroPage(block, p * PAGE);
    else f.page(block, p * PAGE, page);
  }
}

/** Dirties `n` random pages (some made zero, some in the zero extents) and returns them. */
function dirty(ram: Buffer, n: number): number[] {
  const pages = ram.length / PAGE;
  const out = new Set<number>([EXTENT / PAGE + 3]); // one page in a zero extent
  while (out.size < n) {
    const p = Math.floor(Math.random() * pages);
    if (Math.floor((p * PAGE) / EXTENT) !== 2) out.add(p); // extent 2 stays zero throughout
  }
  for (const p of out) {
    if (p % 7 === 0) ram.fill(0, p * PAGE, (p + 1) * PAGE);
    else randomBytes(PAGE).copy(ram, p * PAGE);
  }
  return [...out];
}

/** A target that keeps what it is sent, applying patches the way a server does. */
class ModelTarget implements ExtentTarget {
  readonly extents = new Map<string, Buffer>();
  wholePuts = 0;
  patchPuts = 0;
  async putExtent(e: ExtentPut): Promise<void> {
    this.wholePuts++;
    this.extents.set(`${e.block}/${e.index}`, Buffer.from(e.data));
  }
  async putPages(p: PagesPut): Promise<void> {
    this.patchPuts++;
    const ext = this.extents.get(`${p.block}/${p.index}`);
    assert.ok(ext, `pages for extent ${p.index}, never sent whole`);
    for (const r of p.runs) r.data.copy(ext, r.at);
  }
  image(block: string, bytes: number): Buffer {
    const out = Buffer.alloc(bytes);
    for (let k = 0; k * EXTENT < bytes; k++) this.extents.get(`${block}/${k}`)?.copy(out, k * EXTENT);
    return out;
  }
}

describe('page fan-out', () => {
  it('sends whole extents on the first pass, patches for re-sent pages, nothing for zero extents', async () => {
    const bytes = 16 * EXTENT;
    const ram = guestRam(bytes);
    const target = new ModelTarget();
    const f = new ExtentFanout(target, {
      ckpt: 'c',
      blocks: [{ name: 'pc.ram', length: bytes }],
      extentBytes: EXTENT,
    });
    // First pass: in order, interleaved with re-sends of pages already streamed (as live pre-copy does).
    const pages = bytes / PAGE;
    streamPages(
      f,
      'pc.ram',
      ram,
      Array.from({ length: pages / 2 }, (_, p) => p),
    );
    assert.equal(target.wholePuts, 6, 'extents 0-7 but the two zero ones went out whole');
    streamPages(f, 'pc.ram', ram, dirty(ram.subarray(0, bytes / 2), 10));
    streamPages(
      f,
      'pc.ram',
      ram,
      Array.from({ length: pages / 2 }, (_, p) => p + pages / 2),
    );
    await f.sync();
    // Later passes: dirty pages only.
    for (let pass = 0; pass < 3; pass++) {
      streamPages(f, 'pc.ram', ram, dirty(ram, 20));
      await f.sync();
    }
    const sent = await f.finish();
    assert.ok(target.image('pc.ram', bytes).equals(ram), 'what the servers hold is the guest RAM');
    assert.ok(target.patchPuts > 0);
    assert.equal(f.bufferedBytes, 0);
    assert.ok(!sent['pc.ram']?.includes(2), 'extent 2 stayed zero and was never sent');
    assert.ok(sent['pc.ram']?.includes(1), 'extent 1 got a non-zero page later and was sent');
  });

  it('sends patches without waiting for sync once they pass their budget', async () => {
    const bytes = 4 * EXTENT;
    const ram = randomBytes(bytes);
    const target = new ModelTarget();
    const f = new ExtentFanout(target, {
      ckpt: 'c',
      blocks: [{ name: 'b', length: bytes }],
      extentBytes: EXTENT,
      maxPatchBytes: 4 * PAGE,
    });
    streamPages(
      f,
      'b',
      ram,
      Array.from({ length: bytes / PAGE }, (_, p) => p),
    );
    streamPages(f, 'b', ram, dirty(ram, 12));
    assert.ok(target.patchPuts > 0 && f.bufferedBytes < 4 * PAGE);
    await f.finish();
    assert.ok(target.image('b', bytes).equals(ram));
  });

  it('refuses pages outside their block', () => {
    const f = new ExtentFanout(new ModelTarget(), {
      ckpt: 'c',
      blocks: [{ name: 'b', length: EXTENT }],
      extentBytes: EXTENT,
    });
    assert.throws(() => f.page('b', EXTENT, Buffer.alloc(PAGE)), /not a page of the block/);
    assert.throws(() => f.page('b', 100, Buffer.alloc(PAGE)), /not a page of the block/);
    assert.throws(() => f.page('x', 0, Buffer.alloc(PAGE)), /unknown RAM block x/);
  });
});

describe('page fan-out to real servers', () => {
  const base = fs.mkdtempSync(path.join(os.tmpdir(), 'tlc-ms-fanout-'));
  const servers: MemoryServer[] = [];
  after(async () => {
    for (const s of servers) await s.close();
    fs.rmSync(base, { recursive: true, force: true });
  });

  it('three servers, replicas=2: pre-copy passes, commit with the sent extents, RAM read back', async () => {
    const secret = randomBytes(32);
    for (let i = 0; i < 3; i++)
      servers.push(
        await MemoryServer.start({
          listen: { kind: 'tcp', host: '127.0.0.1', port: 0 },
          dataDir: path.join(base, `s${i}`),
          secret,
        }),
      );
    const set = await ServerSet.connect(
      servers.map((s) => s.url),
      { secret, replicas: 2 },
    );
    const bytes = 32 * EXTENT;
    const ram = guestRam(bytes);
    await set.begin('fan-1');
    const f = new ExtentFanout(set, {
      ckpt: 'fan-1',
      blocks: [{ name: 'pc.ram', length: bytes }],
      extentBytes: EXTENT,
    });
    streamPages(
      f,
      'pc.ram',
      ram,
      Array.from({ length: bytes / PAGE }, (_, p) => p),
    );
    await f.sync();
    streamPages(f, 'pc.ram', ram, dirty(ram, 40));
    const sent = await f.finish();
    await set.putBlob('fan-1', 'manifest', Buffer.from(JSON.stringify({ extents: sent })));
    await set.commit('fan-1', sent, ['manifest']);
    const back = Buffer.alloc(bytes);
    for (const k of sent['pc.ram'] ?? [])
      (await set.getExtent('fan-1', 'pc.ram', k)).data.copy(back, k * EXTENT);
    assert.ok(back.equals(ram));
    set.close();
  });
});
