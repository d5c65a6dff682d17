/**
 * Which servers hold extent `index`: `replicas` distinct servers, round-robin from `index mod N`
 * (k, k+1, ... mod N). Neighbouring extents start on neighbouring servers, so a block streamed in
 * order spreads its load evenly over all servers, and each server's share is 1/N of the extents
 * per replica. A pure function of its arguments: writer and restorer compute the same answer.
 */
export function placeExtent(index: number, servers: number, replicas: number): number[] {
  if (!Number.isInteger(servers) || servers < 1)
    throw new RangeError(`need at least one server (got ${servers})`);
  if (!Number.isInteger(replicas) || replicas < 1 || replicas > servers)
    throw new RangeError(`replicas must be 1..${servers} (got ${replicas})`);
  if (!Number.isInteger(index) || index < 0) throw new RangeError(`extent index must be >= 0 (got ${index})`);
  const out = new Array<number>(replicas);
  for (let r = 0; r < replicas; r++) out[r] = (index + r) % servers;
  return out;
}

/** The indices (of 0..extents-1) that server `server` holds under placeExtent. */
export function extentsOnServer(
  server: number,
  extents: number,
  servers: number,
  replicas: number,
): number[] {
  const out: number[] = [];
  for (let k = 0; k < extents; k++) if (placeExtent(k, servers, replicas).includes(server)) out.push(k);
  return out;
}
