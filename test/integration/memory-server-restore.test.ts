import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { describe, it } from 'node:test';
import { continuationProblems, observeGuest } from '../../src/guest/observe.js';
import { readManifest } from '../../src/store/store.js';
import { type MemoryServerProcess, isolatedTlc, startMemoryServer, tlc, waitConsole } from './harness.js';

const { home, store } = isolatedTlc();
const base = path.dirname(home);

/** A real `tlc serve` on a loopback port, with its own data directory. */
function serve(name: string, secretFile: string): Promise<MemoryServerProcess> {
  return startMemoryServer(path.join(base, `ms-${name}`), secretFile);
}

describe('checkpoints on memory servers', () => {
  it('survives the VM host: push with replicas=2, lose a server and a byte, restore on another host, memory verified', async () => {
    const secretFile = path.join(base, 'ms-secret');
    fs.writeFileSync(secretFile, Buffer.from('a shared secret of more than sixteen bytes'), { mode: 0o600 });
    const servers = [
      await serve('a', secretFile),
      await serve('b', secretFile),
      await serve('c', secretFile),
    ];
    const list = servers.map((s) => s.url).join(',');

    const started = await tlc(['vm', 'start', '--name', 'src', '--mem', '256', '--workload', 'memverify:96']);
    assert.equal(started.code, 0, started.stderr);
    // Two checkpoints straight to the servers: a full one, then an incremental one on top of it.
    const ids: string[] = [];
    for (let i = 0; i < 2; i++) {
      const ck = await tlc([
        'checkpoint',
        'src',
        '--mode',
        'live',
        '--json',
        '--servers',
        list,
        '--replicas',
        '2',
        '--secret-file',
        secretFile,
      ]);
      assert.equal(ck.code, 0, ck.stderr);
      assert.match(ck.stderr, /committed to 3 memory servers/);
      ids.push((JSON.parse(ck.stdout) as { id: string }).id);
    }
    const [first, id] = ids as [string, string];
    const manifest = readManifest(path.join(store, id));
    assert.equal(manifest.parent, first, 'the second checkpoint is incremental');
    const seqBefore = manifest.guestHeartbeatSeqBefore;
    assert.equal((await tlc(['vm', 'stop', 'src', '--force'])).code, 0);

    // Any reachable server lists it.
    const ls = await tlc([
      'remote',
      'ls',
      '--servers',
      servers[0]?.url ?? '',
      '--secret-file',
      secretFile,
      '--json',
    ]);
    assert.equal(ls.code, 0, ls.stderr);
    assert.deepEqual(
      (JSON.parse(ls.stdout) as { checkpoints: { id: string }[] }).checkpoints.map((c) => c.id),
      [first, id],
    );

    // One server dies; another holds a damaged copy of one extent.
    const [a, b] = servers as [MemoryServerProcess, MemoryServerProcess, MemoryServerProcess];
    b.proc.child.kill('SIGKILL');
    await b.proc.exited;
    const extents = path.join(a.data, 'committed', first, 'extents');
    // Placement puts extent k on servers k mod 3 and k+1 mod 3: on a (0), those with k mod 3 = 2
    // have their other copy on c, which lives.
    const ramDir = path.join(extents, 'b-block-0.img');
    const k = fs.readdirSync(ramDir).find((name) => Number(name) % 3 === 2);
    assert.ok(k !== undefined, 'server a holds an extent whose other replica is on c');
    const victim = path.join(ramDir, k);
    const bytes = fs.readFileSync(victim);
    bytes.writeUInt8((bytes.readUInt8(bytes.length - 1) ^ 0x01) & 0xff, bytes.length - 1);
    fs.writeFileSync(victim, bytes);

    // "Another host": its own TLC_HOME and store; only the servers and the shared keys in common.
    const other = {
      ...process.env,
      TLC_HOME: path.join(base, 'other-home'),
      TLC_STORE: path.join(base, 'other-store'),
    };
    const restored = await tlc(
      ['restore', id, '--name', 'dst', '--verify', '--servers', list, '--secret-file', secretFile],
      120_000,
      other,
    );
    assert.equal(restored.code, 0, restored.stderr);
    assert.match(restored.stderr, new RegExp(`fetched ${first}, ${id} from the memory servers`));
    const consoleLog = path.join(other.TLC_HOME, 'vms', 'dst', 'console.log');
    await waitConsole(consoleLog, (s) => s.heartbeats.length >= 3, 'heartbeats after the restore', 20_000);
    const scan = await observeGuest(consoleLog, 1000);
    assert.deepEqual(continuationProblems(scan, seqBefore), []);
    assert.equal((await tlc(['vm', 'stop', 'dst', '--force'], 30_000, other)).code, 0);
  });

  it('refuses a wrong secret with a clear error and lists nothing partial', async () => {
    const secretFile = path.join(base, 'ms-secret2');
    fs.writeFileSync(secretFile, Buffer.from('the right secret, long enough'), { mode: 0o600 });
    const wrong = path.join(base, 'ms-wrong');
    fs.writeFileSync(wrong, Buffer.from('the wrong secret, long enough'), { mode: 0o600 });
    const s = await serve('d', secretFile);
    const r = await tlc(['remote', 'ls', '--servers', s.url, '--secret-file', wrong]);
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /secret/i);
    const ok = await tlc(['remote', 'ls', '--servers', s.url, '--secret-file', secretFile, '--json']);
    assert.equal(ok.code, 0, ok.stderr);
    assert.deepEqual((JSON.parse(ok.stdout) as { checkpoints: unknown[] }).checkpoints, []);
  });
});
