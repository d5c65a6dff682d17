/**
 * Memory servers as real `tlc serve` processes on loopback (no VM is booted): upload, replicas,
 * corruption, refusals, bad peers, crashes and restarts. Each server gets its own data directory
 * and a port the kernel picks (--listen tcp://127.0.0.1:0; the ready line says which).
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { MemoryServerClient } from '../../src/ms/client.js';
import { RemoteError } from '../../src/ms/errors.js';
import { blockDir } from '../../src/ms/layout.js';
import { FRAME, FrameDecoder } from '../../src/ms/protocol.js';
import { ServerSet } from '../../src/ms/serverset.js';
import { type MemoryServerProcess, isolatedTlc, startMemoryServer, tlc } from './harness.js';

const { home } = isolatedTlc();
const base = path.dirname(home);
const secretFile = path.join(base, 'secret');
fs.writeFileSync(secretFile, randomBytes(32).toString('base64') + '\n', { mode: 0o600 });
const secret = fs.readFileSync(secretFile).subarray(0, -1);

type Served = MemoryServerProcess;

function serve(name: string, extra: string[] = []): Promise<Served> {
  return startMemoryServer(path.join(base, name), secretFile, extra);
}

async function sigkill(s: Served): Promise<void> {
  s.proc.child.kill('SIGKILL');
  await s.proc.exited;
}

const MiB = 1024 * 1024;
const EXTENT = MiB;

/** A fake checkpoint: two RAM blocks of random extents and three blobs. */
function fakeCheckpoint(extents: number): {
  blocks: Record<string, Buffer[]>;
  blobs: Record<string, Buffer>;
} {
  return {
    blocks: {
      'pc.ram': Array.from({ length: extents }, () => randomBytes(EXTENT)),
      '/rom@etc/acpi/tables': [randomBytes(128 * 1024)],
    },
    blobs: {
      'manifest.json': Buffer.from(JSON.stringify({ fake: true })),
      'device-state': randomBytes(300 * 1024),
      'config.json': Buffer.from('{}'),
    },
  };
}

async function upload(set: ServerSet, ckpt: string, c: ReturnType<typeof fakeCheckpoint>): Promise<void> {
  await set.begin(ckpt);
  const puts: Array<Promise<unknown>> = [];
  for (const [block, extents] of Object.entries(c.blocks))
    extents.forEach((data, index) =>
      puts.push(set.putExtent({ ckpt, block, index, offset: index * EXTENT, data })),
    );
  for (const [name, data] of Object.entries(c.blobs)) puts.push(set.putBlob(ckpt, name, data));
  await Promise.all(puts);
  const counts = Object.fromEntries(Object.entries(c.blocks).map(([b, l]) => [b, l.length]));
  await set.commit(ckpt, counts, Object.keys(c.blobs));
}

async function fetchAll(
  set: ServerSet,
  ckpt: string,
  c: ReturnType<typeof fakeCheckpoint>,
): Promise<Set<string>> {
  const sources = new Set<string>();
  for (const [block, extents] of Object.entries(c.blocks)) {
    const got = await Promise.all(extents.map((_, index) => set.getExtent(ckpt, block, index)));
    got.forEach((g, index) => {
      assert.ok(g.data.equals(extents[index] as Buffer), `${block}[${index}] differs`);
      assert.equal(g.offset, index * EXTENT);
      sources.add(g.from);
    });
  }
  for (const [name, data] of Object.entries(c.blobs)) assert.ok((await set.getBlob(ckpt, name)).equals(data));
  return sources;
}

/** A raw TCP peer that records the frames it gets back, for misbehaving on purpose. */
async function rawPeer(
  url: string,
): Promise<{ socket: net.Socket; frames: string[]; closed: Promise<void> }> {
  const port = Number(/:(\d+)$/.exec(url)?.[1]);
  const socket = net.connect({ host: '127.0.0.1', port });
  await new Promise((r) => socket.once('connect', r));
  const frames: string[] = [];
  const decoder = new FrameDecoder((type, _id, payload) => frames.push(`${type}:${payload.toString()}`));
  socket.on('data', (chunk: Buffer) => decoder.push(chunk));
  socket.on('error', () => {});
  return { socket, frames, closed: new Promise((r) => socket.once('close', () => r())) };
}

describe('tlc serve: memory servers on loopback', () => {
  it('three servers, replicas=2: upload, commit, list anywhere, fetch back; one SIGKILLed; one byte flipped', async () => {
    const servers = await Promise.all([serve('s0'), serve('s1'), serve('s2')]);
    const urls = servers.map((s) => s.url);
    const ckpt = 'vm1-20261123-220000-ab12';
    const c = fakeCheckpoint(24);
    const set = await ServerSet.connect(urls, { secret, replicas: 2 });
    await upload(set, ckpt, c);

    // Every server lists the checkpoint (each holds 2/3 of the extents, and every blob).
    for (const url of urls) {
      const one = await MemoryServerClient.connect(url, { secret });
      const listed = await one.list();
      assert.deepEqual(
        listed.map((l) => l.id),
        [ckpt],
      );
      assert.equal(listed[0]?.blocks['pc.ram'], 16);
      assert.deepEqual(listed[0]?.blobs, ['config.json', 'device-state', 'manifest.json']);
      one.close();
    }
    assert.deepEqual(
      (await set.list()).map((l) => [l.id, l.servers.length]),
      [[ckpt, 3]],
    );
    assert.equal((await fetchAll(set, ckpt, c)).size, 3, 'the restore reads from all three servers');

    // A byte flipped on server 0's disk: its copy fails the client's check, the replica is used.
    const file = path.join(servers[0]?.data as string, 'committed', ckpt, 'extents', blockDir('pc.ram'), '3');
    const original = fs.readFileSync(file);
    const bytes = Buffer.from(original);
    bytes[bytes.length - 100] = (bytes[bytes.length - 100] as number) ^ 0x01;
    fs.writeFileSync(file, bytes);
    const fetched = await set.getExtent(ckpt, 'pc.ram', 3);
    assert.ok(fetched.data.equals(c.blocks['pc.ram']?.[3] as Buffer));
    assert.equal(fetched.from, servers[1]?.url, 'extent 3 is placed on servers 0 and 1');
    const direct = await MemoryServerClient.connect(servers[0]?.url as string, { secret });
    await assert.rejects(direct.getExtent(ckpt, 'pc.ram', 3), (err: unknown) => {
      assert.equal((err as { code?: string }).code, 'E_CORRUPT');
      assert.match(String(err), /holds a corrupt copy of extent pc\.ram\[3\] .*checksum mismatch/);
      return true;
    });
    direct.close();
    fs.writeFileSync(file, original); // repaired: extent 3 lives on servers 0 and 1 only, and 1 dies next
    set.close();

    // One server dies: every extent still has a replica.
    await sigkill(servers[1] as Served);
    const survivors = await ServerSet.connect(urls, { secret, replicas: 2 });
    assert.deepEqual(
      survivors.down.map((d) => d.url),
      [servers[1]?.url],
    );
    const sources = await fetchAll(survivors, ckpt, c);
    assert.ok(!sources.has(servers[1]?.url as string));

    survivors.close();
  });

  it('a server SIGKILLed mid-checkpoint: the commit is refused and nothing is listed, unless one replica is enough', async () => {
    const servers = await Promise.all([serve('m0'), serve('m1'), serve('m2')]);
    const urls = servers.map((s) => s.url);
    const set = await ServerSet.connect(urls, { secret, replicas: 2 });
    const ckpt = 'midway-1';
    const c = fakeCheckpoint(12);
    const ram = c.blocks['pc.ram'] as Buffer[];
    await set.begin(ckpt);
    for (let index = 0; index < 6; index++)
      await set.putExtent({
        ckpt,
        block: 'pc.ram',
        index,
        offset: index * EXTENT,
        data: ram[index] as Buffer,
      });
    await sigkill(servers[2] as Served);
    const results = [];
    for (let index = 6; index < 12; index++)
      results.push(
        await set.putExtent({
          ckpt,
          block: 'pc.ram',
          index,
          offset: index * EXTENT,
          data: ram[index] as Buffer,
        }),
      );
    // Extents placed on server 2 (k mod 3 = 1 or 2) now have one holder; the put says which.
    assert.deepEqual(results[1]?.holders, [servers[1]?.url]);
    assert.equal(results[1]?.failed[0]?.url, servers[2]?.url);
    await set.putExtent({
      ckpt,
      block: '/rom@etc/acpi/tables',
      index: 0,
      offset: 0,
      data: c.blocks['/rom@etc/acpi/tables']?.[0] as Buffer,
    });
    for (const [name, data] of Object.entries(c.blobs)) await set.putBlob(ckpt, name, data);
    const counts = { 'pc.ram': 12, '/rom@etc/acpi/tables': 1 };
    await assert.rejects(
      set.commit(ckpt, counts, Object.keys(c.blobs)),
      /is durable on 1 of 2 servers, need 2/,
    );
    assert.deepEqual(await set.list(), [], 'a refused commit is listed nowhere');
    // The caller's policy may accept one replica: then it commits on the two survivors.
    const done = await set.commit(ckpt, counts, Object.keys(c.blobs), { minReplicas: 1 });
    assert.deepEqual(done.committed.sort(), [servers[0]?.url, servers[1]?.url].sort());
    assert.deepEqual(
      (await set.list()).map((l) => [l.id, l.servers.length]),
      [[ckpt, 2]],
    );
    await fetchAll(set, ckpt, c);
    set.close();
  });

  it('a stalled server (SIGSTOP): a hedged fetch takes the other replica without waiting for the timeout', async () => {
    const servers = await Promise.all([serve('h0'), serve('h1')]);
    const set = await ServerSet.connect(
      servers.map((s) => s.url),
      { secret, replicas: 2, hedgeAfterMs: 200, requestTimeoutMs: 10_000 },
    );
    const c = fakeCheckpoint(2);
    await upload(set, 'hedge-1', c);
    servers[0]?.proc.child.kill('SIGSTOP');
    try {
      const t0 = Date.now();
      const got = await set.getExtent('hedge-1', 'pc.ram', 0);
      assert.equal(got.from, servers[1]?.url);
      assert.ok(got.data.equals(c.blocks['pc.ram']?.[0] as Buffer));
      assert.ok(Date.now() - t0 < 2000, `took ${Date.now() - t0} ms`);
    } finally {
      servers[0]?.proc.child.kill('SIGCONT');
    }
    set.close();
  });

  it('refuses a wrong secret and a wrong protocol version with clear errors on both sides', async () => {
    const s = await serve('auth');
    await assert.rejects(MemoryServerClient.connect(s.url, { secret: randomBytes(32) }), (err: unknown) => {
      assert.equal((err as { code?: string }).code, 'E_MS_AUTH');
      assert.equal((err as Error).message, `memory server ${s.url.slice(6)} refused us: wrong secret`);
      return true;
    });
    await assert.rejects(
      MemoryServerClient.connect(s.url, { secret, protocolVersion: 7 }),
      /memory server 127\.0\.0\.1:\d+ refused us: unsupported protocol version 7 \(this server speaks version 1\)/,
    );
    await s.proc.waitFor(/127\.0\.0\.1:\d+: refused: wrong secret/, 5000);
    await s.proc.waitFor(/refused: unsupported protocol version 7/, 5000);
    // And a server with another secret is not trusted by the client either way.
    await assert.rejects(ServerSet.connect([s.url], { secret: randomBytes(32) }), /refused us: wrong secret/);
  });

  it('survives a peer sending garbage and a peer that stalls, and keeps serving others', async () => {
    const s = await serve('peers', ['--idle-timeout-ms', '500']);
    const good = await MemoryServerClient.connect(s.url, { secret });
    const garbage = await rawPeer(s.url);
    garbage.socket.write(randomBytes(4096));
    await garbage.closed;
    assert.match(
      garbage.frames[0] ?? '',
      new RegExp(`^${FRAME.ERROR}:.*"code":"protocol".*not a tlc memory-server frame`),
    );
    const stalled = await rawPeer(s.url);
    const t0 = Date.now();
    // Meanwhile the good client is served (and, being busy, is not idle).
    let served = 0;
    const busy = setInterval(() => void good.list().then(() => served++), 100);
    await stalled.closed;
    clearInterval(busy);
    assert.ok(served >= 1, `served ${served} lists while the stalled peer waited`);
    assert.ok(Date.now() - t0 < 3000, 'the stalled peer is dropped after the idle timeout');
    assert.match(stalled.frames[0] ?? '', /"code":"timeout".*stalled in the handshake for 500 ms/);
    assert.deepEqual(await good.list(), []);
    await s.proc.waitFor(/refused: malformed input: not a tlc memory-server frame/, 5000);
    await s.proc.waitFor(/refused: stalled in the handshake for 500 ms: disconnecting/, 5000);
    assert.equal(s.proc.child.exitCode, null, 'server still running');
    // The good client stayed idle longer than the timeout meanwhile: it was dropped with a reason.
    await sleep(700);
    await assert.rejects(good.list(), /dropped the connection: idle for 500 ms|closed/);
    const again = await MemoryServerClient.connect(s.url, { secret });
    assert.deepEqual(await again.list(), []);
    again.close();
  });

  it('after SIGKILL mid-upload, a restarted server discards the uncommitted checkpoint and serves the committed one', async () => {
    const first = await serve('restart');
    const set = await ServerSet.connect([first.url], { secret });
    const done = fakeCheckpoint(4);
    await upload(set, 'done-1', done);
    await set.begin('half-1');
    for (let index = 0; index < 6; index++)
      await set.putExtent({
        ckpt: 'half-1',
        block: 'pc.ram',
        index,
        offset: index * EXTENT,
        data: randomBytes(EXTENT),
      });
    await sigkill(first);
    set.close();
    assert.ok(fs.existsSync(path.join(first.data, 'pending', 'half-1')), 'the crash left the upload behind');

    const second = await serve('restart');
    await second.proc.waitFor(/discarded uncommitted checkpoint half-1/, 5000);
    assert.ok(!fs.existsSync(path.join(first.data, 'pending', 'half-1')));
    const again = await ServerSet.connect([second.url], { secret });
    assert.deepEqual(
      (await again.list()).map((l) => l.id),
      ['done-1'],
    );
    await fetchAll(again, 'done-1', done);
    again.close();
  });

  it('never writes outside its data directory, whatever names a client sends', async () => {
    const s = await serve('names');
    const c = await MemoryServerClient.connect(s.url, { secret });
    await assert.rejects(c.begin('../../etc'), (err: unknown) => {
      assert.ok(err instanceof RemoteError);
      assert.equal(err.remote, 'bad-request');
      assert.match(err.message, /refused begin \.\.\/\.\.\/etc: invalid checkpoint id/);
      return true;
    });
    await c.begin('ok-1');
    await assert.rejects(c.putBlob('ok-1', '../../escape', Buffer.from('x')), /invalid blob name/);
    // Block names carry slashes (QEMU ids do); they are encoded into one path component.
    await c.putExtent({
      ckpt: 'ok-1',
      block: '../../../escape',
      index: 0,
      offset: 0,
      data: Buffer.from('x'),
    });
    await c.flush('ok-1');
    const outside = fs.readdirSync(base).filter((f) => f.includes('escape'));
    assert.deepEqual(outside, []);
    assert.ok(
      fs.existsSync(path.join(s.data, 'pending', 'ok-1', 'extents', blockDir('../../../escape'), '0')),
    );
    await c.remove('ok-1');
    c.close();
  });

  it('--flush-to copies committed checkpoints and serves them when the local copy is gone', async () => {
    const flushDir = path.join(base, 'pfs');
    const s = await serve('flushing', ['--flush-to', flushDir]);
    const set = await ServerSet.connect([s.url], { secret });
    const c = fakeCheckpoint(3);
    await upload(set, 'pfs-1', c);
    await s.proc.waitFor(/flushed checkpoint pfs-1 to /, 10_000);
    const serverId = fs.readFileSync(path.join(s.data, 'server-id'), 'utf8').trim();
    assert.ok(fs.existsSync(path.join(flushDir, serverId, 'pfs-1', 'commit.json')));
    fs.rmSync(path.join(s.data, 'committed', 'pfs-1'), { recursive: true });
    assert.deepEqual(
      (await set.list()).map((l) => [l.id, l.where]),
      [['pfs-1', 'flushed']],
    );
    await fetchAll(set, 'pfs-1', c);
    set.close();
  });

  it('stops cleanly on SIGTERM, and refuses a secret file others can read', async () => {
    const s = await serve('stop');
    s.proc.child.kill('SIGTERM');
    assert.equal(await s.proc.exited, 0);
    assert.match(s.proc.stderr(), /SIGTERM: finishing writes in progress, then stopping\n.*stopped\n$/);

    const open = path.join(base, 'open-secret');
    fs.writeFileSync(open, 'x'.repeat(32));
    fs.chmodSync(open, 0o644);
    const r = await tlc(
      ['serve', '--listen', 'tcp://127.0.0.1:0', '--data', path.join(base, 'never'), '--secret-file', open],
      10_000,
    );
    assert.equal(r.code, 2);
    assert.match(r.stderr, /secret file .* is readable by group or others \(mode 0644\): chmod 600/);
    const bad = await tlc(
      ['serve', '--listen', '0.0.0.0', '--data', path.join(base, 'never'), '--secret-file', secretFile],
      10_000,
    );
    assert.equal(bad.code, 2);
    assert.match(bad.stderr, /--listen must be tcp:\/\/HOST:PORT or unix:\/PATH \(got "0\.0\.0\.0"\)/);
  });
});
