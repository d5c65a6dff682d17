/**
 * Control messages (JSON payloads) of the memory-server protocol, with their schemas. Requests are
 * validated by the server and answers by the client: neither trusts the other's JSON.
 */
import { z } from 'zod';

const name = z.string().min(1).max(255);

export const CkptRequest = z.object({ ckpt: name }).strict();

export const CommitExpectation = z
  .object({
    /** Extent indices per block that this server must hold, or the commit is refused. */
    extents: z.record(z.string().max(1024), z.array(z.number().int().nonnegative())).optional(),
    /** Blob names this server must hold. */
    blobs: z.array(name).optional(),
  })
  .strict();
export type CommitExpectation = z.infer<typeof CommitExpectation>;

export const CommitRequest = z.object({ ckpt: name, expect: CommitExpectation.optional() }).strict();

export const GetExtentRequest = z
  .object({ ckpt: name, block: z.string().min(1).max(1024), index: z.number().int().nonnegative() })
  .strict();

export const GetBlobRequest = z.object({ ckpt: name, name }).strict();

export const ErrorBody = z.object({ code: z.string(), message: z.string() });

export const FlushResult = z.object({ extents: z.number(), blobs: z.number(), bytes: z.number() });
export type FlushResult = z.infer<typeof FlushResult>;

export const CheckpointInfo = z.object({
  id: z.string(),
  committedAt: z.string(),
  /** Extents this server holds per block. */
  blocks: z.record(z.string(), z.number()),
  blobs: z.array(z.string()),
  bytes: z.number(),
  /** `local`: in the data directory; `flushed`: only in the --flush-to copy. */
  where: z.enum(['local', 'flushed']),
});
export type CheckpointInfo = z.infer<typeof CheckpointInfo>;

export const ListResult = z.object({ checkpoints: z.array(CheckpointInfo) });

export const CheckpointIndex = z.object({
  blocks: z.record(z.string(), z.array(z.number())),
  blobs: z.array(z.string()),
});
export type CheckpointIndex = z.infer<typeof CheckpointIndex>;

export const RemoveResult = z.object({ removed: z.boolean() });
