/**
 * A checkpoint's set of memory servers, as the checkpoint and restore paths see it: puts fan out
 * to each extent's replicas (placement.ts), blobs go to every server, commits tell each server
 * exactly which extents it must hold, and gets take an extent from its first replica whose copy
 * checks out, falling back to the others. Server order matters: it is part of the placement, so
 * the restoring side must list the servers in the order the checkpoint used.
 *
 * A server that fails (down, connection lost) is marked down and skipped from then on; whether a
 * checkpoint may commit with an extent on fewer than `replicas` servers is the caller's policy
 * (`commit(..., { minReplicas })`), never decided silently here.
 */
import { TlcError, errorText } from '../core/errors.js';
import {
  type ClientOptions,
  type Extent,
  type ExtentPut,
  MemoryServerClient,
  type PagesPut,
  sha256,
} from './client.js';
import { MsError, RemoteError } from './errors.js';
import type { CheckpointInfo, CommitExpectation } from './messages.js';
import { placeExtent } from './placement.js';

export interface ServerSetOptions extends ClientOptions {
  /** Distinct servers holding each extent. Default 1. */
  replicas?: number;
  /** getExtent(): also ask the next replica when one has not answered within this time. Default: never. */
  hedgeAfterMs?: number;
}

interface Member {
  url: string;
  client: MemoryServerClient | undefined;
  /** Why the server is considered down, if it is. */
  down: string | undefined;
}

export interface PutResult {
  /** URLs of the servers that acknowledged the extent. */
  holders: string[];
  /** Placed servers that did not, with the reason. */
  failed: Array<{ url: string; error: string }>;
}

export interface FetchedExtent extends Extent {
  /** URL of the server it came from. */
  from: string;
}

/** A checkpoint as the set sees it; `blocks` and `bytes` are the share of the first server that answered. */
export interface ListedCheckpoint extends CheckpointInfo {
  /** URLs of the servers that list it (committed there), in set order. */
  servers: string[];
}

export class ServerSet {
  readonly replicas: number;
  private readonly members: Member[];
  private readonly hedgeAfterMs: number | undefined;

  private constructor(members: Member[], replicas: number, hedgeAfterMs: number | undefined) {
    this.members = members;
    this.replicas = replicas;
    this.hedgeAfterMs = hedgeAfterMs;
  }

  /**
   * Connects to every server in parallel. A server that cannot be reached is recorded as down (the
   * restore path works with replicas); it throws only when none can be reached, or on a refusal
   * (wrong secret or version): a misconfiguration to report, not a failure to route around.
   */
  static async connect(urls: string[], opts: ServerSetOptions): Promise<ServerSet> {
    const replicas = opts.replicas ?? 1;
    if (urls.length === 0) throw new TlcError('E_USAGE', 'no memory servers given');
    placeExtent(0, urls.length, replicas); // validates replicas against the server count
    const members = await Promise.all(
      urls.map(async (url): Promise<Member> => {
        try {
          return { url, client: await MemoryServerClient.connect(url, opts), down: undefined };
        } catch (err) {
          if (err instanceof TlcError && err.code === 'E_MS_AUTH') throw err;
          return { url, client: undefined, down: errorText(err) };
        }
      }),
    );
    if (members.every((m) => !m.client)) {
      for (const m of members) m.client?.close();
      throw new MsError(
        'E_MS_CONNECT',
        `no memory server reachable: ${members.map((m) => m.down).join('; ')}`,
      );
    }
    return new ServerSet(members, replicas, opts.hedgeAfterMs);
  }

  get urls(): string[] {
    return this.members.map((m) => m.url);
  }

  /** URLs of servers currently considered down, with the reason. */
  get down(): Array<{ url: string; error: string }> {
    return this.members.flatMap((m) => (m.down ? [{ url: m.url, error: m.down }] : []));
  }

  /** The servers (URLs) that extent `index` is placed on. */
  placement(index: number): string[] {
    return placeExtent(index, this.members.length, this.replicas).map((i) => this.urls[i] as string);
  }

  /** Begins `ckpt` on every server that is up; rejects if none accepts. */
  async begin(ckpt: string): Promise<void> {
    const r = await this.everywhere((c) => c.begin(ckpt));
    if (r.ok.length === 0) throw this.noneError(`begin ${ckpt}`, r.failed);
  }

  /**
   * Sends an extent to its replicas (the checksum computed once); resolves with who holds it.
   * Rejects only if no replica took it.
   */
  async putExtent(e: ExtentPut): Promise<PutResult> {
    const put = { ...e, sha256: e.sha256 ?? sha256(e.data) };
    const placed = placeExtent(e.index, this.members.length, this.replicas).map(
      (i) => this.members[i] as Member,
    );
    const result: PutResult = { holders: [], failed: [] };
    await Promise.all(
      placed.map(async (m) => {
        try {
          await this.call(m, (c) => c.putExtent(put));
          result.holders.push(m.url);
        } catch (err) {
          result.failed.push({ url: m.url, error: errorText(err) });
        }
      }),
    );
    if (result.holders.length === 0)
      throw new MsError(
        'E_MS_CONNECT',
        `no replica took extent ${e.block}[${e.index}]: ${result.failed.map((f) => f.error).join('; ')}`,
      );
    return result;
  }

  /** Sends page runs of an extent already sent to its replicas (pre-copy re-sends); resolves with who took them. */
  async putPages(p: PagesPut): Promise<PutResult> {
    const placed = placeExtent(p.index, this.members.length, this.replicas).map(
      (i) => this.members[i] as Member,
    );
    const result: PutResult = { holders: [], failed: [] };
    await Promise.all(
      placed.map(async (m) => {
        try {
          await this.call(m, (c) => c.putPages(p));
          result.holders.push(m.url);
        } catch (err) {
          result.failed.push({ url: m.url, error: errorText(err) });
        }
      }),
    );
    if (result.holders.length === 0)
      throw new MsError(
        'E_MS_CONNECT',
        `no replica took pages of extent ${p.block}[${p.index}]: ${result.failed.map((f) => f.error).join('; ')}`,
      );
    return result;
  }

  /** Sends a blob (manifest, device state, config) to every server that is up; resolves with who holds it. */
  async putBlob(ckpt: string, name: string, data: Buffer): Promise<string[]> {
    const r = await this.everywhere((c) => c.putBlob(ckpt, name, data));
    if (r.ok.length === 0) throw this.noneError(`put blob ${name}`, r.failed);
    return r.ok;
  }

  /**
   * Commits `ckpt` in two phases, so that a checkpoint is listed only if it is complete:
   * 1. every server that is up flushes and checks it holds the extents placement put on it
   *    (`extents` per block: a count n for indices 0..n-1, or the list of indices sent, as
   *    ExtentFanout.finish() returns it) and every blob (PREPARE);
   * 2. if every extent is then durable on at least `minReplicas` servers (default: all `replicas`),
   *    the prepared servers publish it (COMMIT). Should a server fail between the phases and the
   *    coverage drop below `minReplicas`, the checkpoint is removed again from the others.
   * Rejects with the reason per server; the pending uploads stay until abort()/remove().
   */
  async commit(
    ckpt: string,
    extents: Record<string, number | number[]>,
    blobs: string[],
    opts: { minReplicas?: number } = {},
  ): Promise<{ committed: string[]; failed: Array<{ url: string; error: string }> }> {
    const minReplicas = opts.minReplicas ?? this.replicas;
    const expectations = this.members.map((): CommitExpectation => ({ extents: {}, blobs }));
    for (const [block, indices] of Object.entries(extentLists(extents)))
      for (const k of indices)
        for (const i of placeExtent(k, this.members.length, this.replicas)) {
          const exp = (expectations[i] as CommitExpectation).extents as Record<string, number[]>;
          (exp[block] ??= []).push(k);
        }
    const failed: Array<{ url: string; error: string }> = [];
    const prepared = await this.phase(failed, (c, i) => c.prepare(ckpt, expectations[i]));
    this.checkCoverage(ckpt, extents, prepared, minReplicas, failed, 'durable');
    const committed = await this.phase(failed, (c, i) => c.commit(ckpt, expectations[i]), prepared);
    try {
      this.checkCoverage(ckpt, extents, committed, minReplicas, failed, 'committed');
    } catch (err) {
      await this.phase([], (c) => c.remove(ckpt), committed);
      throw err;
    }
    return { committed: [...committed].map((i) => this.urls[i] as string), failed };
  }

  /** Drops an unfinished (or unwanted) checkpoint from every server that is up. */
  async abort(ckpt: string): Promise<void> {
    await this.remove(ckpt);
  }

  /**
   * Fetches extent `index`: from its replicas in placement order, then from the other servers; a
   * copy that is missing, corrupt (checksum) or on a server that fails is skipped. The first
   * replica differs between neighbouring extents, so a restore reads from all servers at once and
   * each extent crosses the network once. With `hedgeAfterMs`, a replica that has not answered by
   * then gets company: the next one is asked too and whichever valid copy arrives first wins (a
   * stalled server then costs that delay instead of the request timeout).
   */
  getExtent(ckpt: string, block: string, index: number): Promise<FetchedExtent> {
    const placed = placeExtent(index, this.members.length, this.replicas);
    const order = [...placed, ...this.members.map((_, i) => i).filter((i) => !placed.includes(i))];
    const errors: string[] = [];
    return new Promise((resolve, reject) => {
      let next = 0;
      let running = 0;
      let settled = false;
      let timer: NodeJS.Timeout | undefined;
      const launch = (): void => {
        clearTimeout(timer);
        if (settled) return;
        let m: Member | undefined;
        let i = -1;
        while (next < order.length) {
          i = order[next++] as number;
          const candidate = this.members[i] as Member;
          if (candidate.client && !candidate.down) {
            m = candidate;
            break;
          }
          if (placed.includes(i))
            errors.push(`${candidate.url}: down (${candidate.down ?? 'not connected'})`);
        }
        if (!m) {
          if (running === 0) {
            settled = true;
            reject(
              new TlcError(
                'E_NOT_FOUND',
                `no valid copy of extent ${block}[${index}] of ${ckpt}: ${errors.join('; ')}`,
              ),
            );
          }
          return;
        }
        const member = m;
        const wasPlaced = placed.includes(i);
        running++;
        this.call(member, (c) => c.getExtent(ckpt, block, index)).then(
          (extent) => {
            running--;
            if (settled) return;
            settled = true;
            clearTimeout(timer);
            resolve({ ...extent, from: member.url });
          },
          (err: unknown) => {
            running--;
            if (wasPlaced || !(err instanceof RemoteError && err.remote === 'not-found'))
              errors.push(errorText(err));
            launch();
          },
        );
        if (this.hedgeAfterMs !== undefined && next < order.length)
          timer = setTimeout(launch, this.hedgeAfterMs);
      };
      launch();
    });
  }

  /** Fetches a blob from the first server whose copy checks out. */
  async getBlob(ckpt: string, name: string): Promise<Buffer> {
    const errors: string[] = [];
    for (const m of this.members) {
      if (!m.client || m.down) continue;
      try {
        return await this.call(m, (c) => c.getBlob(ckpt, name));
      } catch (err) {
        errors.push(errorText(err));
      }
    }
    throw new TlcError(
      'E_NOT_FOUND',
      `no valid copy of blob ${name} of ${ckpt}: ${errors.join('; ') || 'no server up'}`,
    );
  }

  /** Checkpoints committed on any reachable server, each with the servers that list it. */
  async list(): Promise<ListedCheckpoint[]> {
    const byId = new Map<string, ListedCheckpoint>();
    await this.everywhere(async (c, m) => {
      for (const info of await c.list()) {
        const seen = byId.get(info.id);
        if (seen) seen.servers.push(m.url);
        else byId.set(info.id, { ...info, servers: [m.url] });
      }
    });
    for (const l of byId.values()) l.servers.sort((a, b) => this.urls.indexOf(a) - this.urls.indexOf(b));
    return [...byId.values()].sort((a, b) => a.committedAt.localeCompare(b.committedAt));
  }

  /** Removes `ckpt` from every server that is up. */
  async remove(ckpt: string): Promise<{ removed: string[]; failed: Array<{ url: string; error: string }> }> {
    const removed: string[] = [];
    const r = await this.everywhere(async (c, m) => {
      if (await c.remove(ckpt)) removed.push(m.url);
    });
    return { removed, failed: r.failed };
  }

  close(): void {
    for (const m of this.members) m.client?.close();
  }

  /** Runs `fn` on a member; a lost connection marks it down (a refusal does not: the server is fine). */
  private async call<T>(m: Member, fn: (c: MemoryServerClient) => Promise<T>): Promise<T> {
    if (!m.client || m.down)
      throw new MsError('E_MS_CLOSED', `memory server ${m.url} is down: ${m.down ?? 'not connected'}`);
    try {
      return await fn(m.client);
    } catch (err) {
      if (m.client.closed) m.down ??= errorText(err);
      throw err;
    }
  }

  private async everywhere(
    fn: (c: MemoryServerClient, m: Member) => Promise<void>,
  ): Promise<{ ok: string[]; failed: Array<{ url: string; error: string }> }> {
    const ok: string[] = [];
    const failed: Array<{ url: string; error: string }> = [];
    await Promise.all(
      this.members.map(async (m) => {
        try {
          await this.call(m, (c) => fn(c, m));
          ok.push(m.url);
        } catch (err) {
          failed.push({ url: m.url, error: errorText(err) });
        }
      }),
    );
    return { ok, failed };
  }

  /** Runs `fn` on the members in `only` (default: all), returning the indices where it succeeded. */
  private async phase(
    failed: Array<{ url: string; error: string }>,
    fn: (c: MemoryServerClient, i: number) => Promise<unknown>,
    only?: Set<number>,
  ): Promise<Set<number>> {
    const ok = new Set<number>();
    await Promise.all(
      this.members.map(async (m, i) => {
        if (only && !only.has(i)) return;
        try {
          await this.call(m, (c) => fn(c, i));
          ok.add(i);
        } catch (err) {
          failed.push({ url: m.url, error: errorText(err) });
        }
      }),
    );
    return ok;
  }

  /** Throws unless every extent is on `minReplicas` servers of `holders`, and the blobs on as many. */
  private checkCoverage(
    ckpt: string,
    extents: Record<string, number | number[]>,
    holders: Set<number>,
    minReplicas: number,
    failed: Array<{ url: string; error: string }>,
    what: string,
  ): void {
    const why = (): string => failed.map((f) => f.error).join('; ') || 'no error reported';
    if (holders.size < minReplicas)
      throw new MsError(
        'E_MS_REMOTE',
        `checkpoint ${ckpt} is ${what} on ${holders.size} server(s), need ${minReplicas}: ${why()}`,
      );
    for (const [block, indices] of Object.entries(extentLists(extents)))
      for (const k of indices) {
        const n = placeExtent(k, this.members.length, this.replicas).filter((i) => holders.has(i)).length;
        if (n < minReplicas)
          throw new MsError(
            'E_MS_REMOTE',
            `checkpoint ${ckpt}: extent ${block}[${k}] is ${what} on ${n} of ${this.replicas} servers, need ${minReplicas}: ${why()}`,
          );
      }
  }

  private noneError(what: string, failed: Array<{ url: string; error: string }>): MsError {
    return new MsError(
      'E_MS_CONNECT',
      `${what}: no memory server accepted it: ${failed.map((f) => f.error).join('; ')}`,
    );
  }
}

function extentLists(extents: Record<string, number | number[]>): Record<string, number[]> {
  const out: Record<string, number[]> = {};
  for (const [block, v] of Object.entries(extents))
    out[block] = typeof v === 'number' ? Array.from({ length: v }, (_, k) => k) : v;
  return out;
}
