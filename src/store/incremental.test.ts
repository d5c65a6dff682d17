/**
 * Incremental checkpoints in the local store, without QEMU: the staged checkpoint (what the
 * receiver writes into) taken as a chain, then read back through the chain (assembly, the page-hash
 * check), verified, damaged, merged by removal and pruning, and received through recycled scratch
 * files.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { TlcError } from '../core/errors.js';
import { assembleBlock, ramChain } from './chain.js';
import { LocalStagedCheckpoint, type LocalStagingOptions } from './local-writer.js';
import { CONFIG_FILE, DEVICE_FILE, MANIFEST_FILE, PAGE_SIZE, sealManifest, sha256Hex } from './manifest.js';
import { type ScratchOptions, adoptScratchImage } from './scratch.js';
import { CheckpointStore, type StoredCheckpoint } from './store.js';
import { fixtureManifest } from './testing.js';
import { verifyCheckpoint } from './verify.js';
import { verifyRamChain } from './verify-chain.js';

const MiB = 1024 * 1024;
const VM = 'inc';
/** Not a whole number of MiB: the last sums chunk is short. */
const RAM = 3 * MiB + 5 * PAGE_SIZE;
const ROM = 64 * 1024;
const BLOCKS = [
  { name: 'ram0', usedLength: RAM },
  { name: '/rom@etc/acpi/tables', usedLength: ROM },
];

let base: string;
before(() => {
  base = fs.mkdtempSync(path.join(os.tmpdir(), 'tlc-incr-test-'));
});
after(() => fs.rmSync(base, { recursive: true, force: true }));

/** What a guest's RAM holds: full images of both blocks. */
type Content = Buffer[];

function pageOf(seed: number): Buffer {
  const p = Buffer.alloc(PAGE_SIZE);
  for (let i = 0; i < PAGE_SIZE; i += 4) p.writeUInt32LE((seed * 2654435761 + i) >>> 0, i);
  return p;
}

function initialContent(): Content {
  const ram = Buffer.alloc(RAM);
  for (let p = 0; p < RAM / PAGE_SIZE; p += 3) pageOf(p + 1).copy(ram, p * PAGE_SIZE);
  const rom = Buffer.alloc(ROM);
  pageOf(999).copy(rom, 0);
  return [ram, rom];
}

let serial = 0;

/**
 * Takes a checkpoint of `content` as a stream would deliver it: `send` lists the pages sent (all by
 * default, zero pages as zero records); returns the published checkpoint.
 */
async function take(
  store: CheckpointStore,
  content: Content,
  opts: LocalStagingOptions & { send?: (block: number, page: number) => boolean } = {},
): Promise<StoredCheckpoint> {
  const n = serial++;
  const id = `${VM}-2026010${Math.floor(n / 10)}-12000${n % 10}-abcd`;
  const staging = store.stage(id);
  const staged = new LocalStagedCheckpoint(staging, {
    ...(opts.parent ? { parent: opts.parent } : {}),
    ...(opts.scratch ? { scratch: { ...opts.scratch, id } } : {}),
    ...(opts.subPageDeltas !== undefined ? { subPageDeltas: opts.subPageDeltas } : {}),
  });
  const writers = staged.openBlocks(BLOCKS);
  const zero = Buffer.alloc(PAGE_SIZE);
  content.forEach((data, b) => {
    for (let p = 0; p < data.length / PAGE_SIZE; p++) {
      if (opts.send && !opts.send(b, p)) continue;
      const at = p * PAGE_SIZE;
      if (zero.compare(data, at, at + PAGE_SIZE) === 0) writers[b]?.fillPage(at, 0);
      else writers[b]?.writePage(at, data, at);
    }
  });
  const config = Buffer.from('config');
  const device = Buffer.from('device state');
  staged.putBlob(CONFIG_FILE, config);
  staged.putBlob(DEVICE_FILE, device);
  const done = await staged.finish();
  const m = {
    ...fixtureManifest({ vm: VM, id, createdAt: new Date(Date.UTC(2026, 0, 1, 12, 0, n)).toISOString() }),
    blocks: done.blocks,
    configSha256: sha256Hex(config),
    device: { file: DEVICE_FILE, bytes: device.length, sha256: sha256Hex(device), sections: 7 },
    ...(done.parent ? { parent: done.parent } : {}),
    storedBytes: done.bytesStored,
  };
  fs.writeFileSync(path.join(staging, MANIFEST_FILE), sealManifest(m));
  store.publish(staging, id);
  return store.exact(id);
}

function assembled(store: CheckpointStore, c: StoredCheckpoint, block: number): Buffer {
  const out = path.join(base, `assembled-${serial++}.img`);
  assembleBlock(
    ramChain(c, (id) => store.exact(id)),
    block,
    out,
  );
  return fs.readFileSync(out);
}

function assertHolds(store: CheckpointStore, c: StoredCheckpoint, content: Content): void {
  content.forEach((data, b) => {
    const got = assembled(store, c, b);
    assert.ok(got.equals(data), `${c.id} block ${b} assembles to the content it was taken of`);
  });
  assert.deepEqual(verifyCheckpoint(c, true).problems, []);
}

/** Changes a few pages: some rewritten, one turned zero, one zero turned data. */
function mutate(content: Content, seed: number): Content {
  const [ram, rom] = content.map((b) => Buffer.from(b)) as [Buffer, Buffer];
  for (const p of [0, 3 + seed, 300, RAM / PAGE_SIZE - 1])
    pageOf(p * 7 + seed * 1000).copy(ram, p * PAGE_SIZE);
  ram.fill(0, 6 * PAGE_SIZE, 7 * PAGE_SIZE);
  pageOf(seed + 5).copy(rom, 2 * PAGE_SIZE);
  return [ram, rom];
}

/** A few bytes changed in many pages (a counter per page): sub-page deltas' case. */
function touchBytes(content: Content, seed: number): Content {
  const [ram, rom] = content.map((b) => Buffer.from(b)) as [Buffer, Buffer];
  for (let p = 0; p < RAM / PAGE_SIZE; p += 3)
    ram[p * PAGE_SIZE + 64 + (seed % 8)] = (ram[p * PAGE_SIZE + 64] as number) + seed;
  pageOf(seed * 31).copy(ram, 9 * PAGE_SIZE); // and one page rewritten whole
  return [ram, rom];
}

describe('incremental checkpoints in the local store', () => {
  it('sub-page deltas: a few bytes per page cost a few bytes; chains of deltas assemble and merge', async () => {
    const store = new CheckpointStore(path.join(base, 'deltas'));
    const contents = [initialContent()];
    for (let i = 1; i < 4; i++) contents.push(touchBytes(contents[i - 1] as Content, i));
    const ks: StoredCheckpoint[] = [];
    for (const c of contents) ks.push(await take(store, c, ks.length > 0 ? { parent: ks.at(-1) } : {}));
    const k1 = ks[1] as StoredCheckpoint;
    const ram = k1.manifest.blocks[0];
    assert.ok(ram?.deltaPages !== undefined && ram.deltaPages > 200, `delta pages: ${ram?.deltaPages}`);
    assert.ok((ram.deltaBytes ?? 0) < ram.deltaPages * 16, `${ram.deltaBytes} bytes of deltas`);
    assert.equal(ram.storedPages, ram.deltaPages + 1, 'the page rewritten whole is a full page');
    for (const k of ks.slice(2))
      // (a changed byte that happens to equal the old one leaves its page unchanged: 1/256 each)
      assert.ok(
        (k.manifest.blocks[0]?.deltaPages ?? 0) >= ram.deltaPages - 5,
        'deltas against a parent with deltas',
      );
    ks.forEach((k, i) => assertHolds(store, k, contents[i] as Content));
    // Without deltas, the same change stores full pages.
    const plain = await take(store, touchBytes(contents[3] as Content, 4), {
      parent: ks[3],
      subPageDeltas: false,
    });
    assert.equal(plain.manifest.blocks[0]?.deltaPages, undefined);
    // A merge replaces deltas against a removed parent with full pages.
    store.removeIds([ks[1]?.id as string, ks[2]?.id as string]);
    const k3 = store.exact(ks[3]?.id as string);
    assert.equal(k3.manifest.parent, ks[0]?.id);
    assert.equal(k3.manifest.blocks[0]?.deltaFile, undefined);
    assertHolds(store, k3, contents[3] as Content);
    assertHolds(store, store.exact(plain.id), touchBytes(contents[3] as Content, 4));
  });

  it('a chain stores only changed pages and assembles to each checkpoint content', async () => {
    const store = new CheckpointStore(path.join(base, 'chain'));
    const c0 = initialContent();
    const c1 = mutate(c0, 1);
    const c2 = mutate(c1, 2);
    const k0 = await take(store, c0);
    const k1 = await take(store, c1, { parent: k0 });
    const k2 = await take(store, c2, { parent: k1 });
    assert.equal(k0.manifest.parent, undefined);
    assert.equal(k1.manifest.parent, k0.id);
    assert.equal(k2.manifest.parent, k1.id);
    const dataPages0 = k0.manifest.blocks[0]?.dataPages ?? 0;
    assert.equal(k0.manifest.blocks[0]?.storedPages, dataPages0);
    // Five changed RAM pages (one turned zero: recorded by its hash, not stored).
    assert.ok(
      (k1.manifest.blocks[0]?.storedPages ?? 99) <= 4,
      `stored ${k1.manifest.blocks[0]?.storedPages}`,
    );
    assert.equal(k1.manifest.blocks[1]?.storedPages, 1);
    assert.ok((k1.manifest.storedBytes ?? 0) < (k0.manifest.storedBytes ?? 0) / 4);
    assertHolds(store, k0, c0);
    assertHolds(store, k1, c1);
    assertHolds(store, k2, c2);
    // A parent taken --full is not a parent: the next is full.
    const full = await take(store, c2);
    assert.equal(full.manifest.blocks[0]?.storedPages, full.manifest.blocks[0]?.dataPages);
  });

  it('a damaged parent: verify names it and what it breaks; assembly refuses it', async () => {
    const store = new CheckpointStore(path.join(base, 'damage'));
    const c0 = initialContent();
    const c1 = mutate(c0, 1);
    const k0 = await take(store, c0);
    const k1 = await take(store, c1, { parent: k0 });
    const image = path.join(k0.dir, 'block-0.img');
    const fd = fs.openSync(image, 'r+');
    fs.writeSync(fd, Buffer.from([0x42]), 0, 1, 9 * PAGE_SIZE + 5); // page 9: kept by k1 from k0
    fs.closeSync(fd);
    const report = verifyRamChain(store, k1, (c) => verifyCheckpoint(c, true));
    assert.equal(report.ok, false);
    assert.deepEqual(report.chain, [k1.id, k0.id]);
    assert.deepEqual(report.damaged, [{ id: k0.id, affects: [k0.id, k1.id] }]);
    assert.match(report.problems.join('\n'), new RegExp(`parent ${k0.id}: block-0.img .* do not match`));
    assert.throws(
      () => assembled(store, k1, 0),
      (err: unknown) =>
        err instanceof TlcError && err.code === 'E_CORRUPT' && /page at 0x9000/.test(err.message),
    );
  });

  it('removal merges what the kept checkpoints need; pruning to one makes it full', async () => {
    const store = new CheckpointStore(path.join(base, 'prune'));
    const contents = [initialContent()];
    for (let i = 1; i < 5; i++) contents.push(mutate(contents[i - 1] as Content, i));
    const ks: StoredCheckpoint[] = [];
    for (const c of contents) ks.push(await take(store, c, ks.length > 0 ? { parent: ks.at(-1) } : {}));
    store.removeIds([ks[1]?.id as string, ks[2]?.id as string]);
    const k3 = store.exact(ks[3]?.id as string);
    assert.equal(k3.manifest.parent, ks[0]?.id, 'rebased onto the nearest kept ancestor');
    assertHolds(store, k3, contents[3] as Content);
    assertHolds(store, store.exact(ks[4]?.id as string), contents[4] as Content);
    store.prune(VM, 1);
    const k4 = store.exact(ks[4]?.id as string);
    assert.equal(k4.manifest.parent, undefined);
    assert.deepEqual(
      store.list().map((c) => c.id),
      [k4.id],
    );
    assertHolds(store, k4, contents[4] as Content);
    assert.deepEqual(
      fs.readdirSync(store.dir).filter((e) => e.startsWith('.')),
      [],
      'no staging or rebase leftovers',
    );
  });

  it('scratch files: kept for the newest checkpoint (zero records applied), cleared otherwise', async () => {
    const store = new CheckpointStore(path.join(base, 'scratch'));
    const scratch: Omit<ScratchOptions, 'id'> = { dir: path.join(base, 'vm-scratch') };
    const c0 = initialContent();
    const c1 = mutate(c0, 1);
    // Even the first, full checkpoint is received into the scratch files, which then hold it.
    const first = await take(store, c0, { scratch: { ...scratch, id: '' } });
    assert.equal(fs.existsSync(path.join(scratch.dir, 'holds.json')), true);
    const k0 = await take(store, c0, { parent: first, scratch: { ...scratch, id: '', newest: first } });
    assert.equal(k0.manifest.blocks[0]?.storedPages, 0, 'nothing changed');
    // Only what changed is sent (QEMU sends everything; the content must not depend on it).
    const changed = (b: number, p: number): boolean =>
      (c0[b] as Buffer).compare(
        c1[b] as Buffer,
        p * PAGE_SIZE,
        (p + 1) * PAGE_SIZE,
        p * PAGE_SIZE,
        (p + 1) * PAGE_SIZE,
      ) !== 0;
    const k1 = await take(store, c1, {
      parent: k0,
      scratch: { ...scratch, id: '', newest: k0 },
      send: changed,
    });
    assertHolds(store, k1, c1);
    // Restore's shortcut: the files hold k1 exactly, so its RAM file can become the image (once).
    const dest = path.join(base, 'adopted.img');
    assert.equal(adoptScratchImage(scratch.dir, k0, 0, dest), false, 'not for another checkpoint');
    const ramFile = path.join(scratch.dir, 'block-0.img');
    const keep = fs.readFileSync(ramFile);
    const flipped = Buffer.from(keep);
    flipped[5] = (flipped[5] as number) ^ 1;
    fs.writeFileSync(ramFile, flipped);
    assert.equal(adoptScratchImage(scratch.dir, k1, 0, dest), false, 'not when a page differs from its hash');
    fs.writeFileSync(ramFile, keep);
    assert.equal(adoptScratchImage(scratch.dir, k1, 0, dest), true);
    assert.ok(fs.readFileSync(dest).equals(c1[0] as Buffer));
    assert.equal(adoptScratchImage(scratch.dir, k1, 0, dest + '2'), false, 'only once');
    // Not the newest checkpoint the files hold: cleared, so unsent pages read as zeros.
    const k2 = await take(store, c1, { scratch: { ...scratch, id: '', newest: k0 }, send: changed });
    const ram = assembled(store, k2, 0);
    assert.ok(ram.subarray(PAGE_SIZE, 2 * PAGE_SIZE).equals(Buffer.alloc(PAGE_SIZE)));
  });
});
