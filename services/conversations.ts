import { createHash } from 'node:crypto'
import type { Redis } from 'ioredis'

/** Which session produced an assistant answer (see ConversationIndex); in memory or in Redis. */
export interface Conversations {
  remember(tenantId: string, answer: string, sessionId: string): void
  find(tenantId: string, answer: string): Promise<string | undefined> | string | undefined
}

export interface ConversationIndexOptions {
  /** How long an answer keeps pointing at its session; default 24 hours. */
  ttlMs?: number
  /** Answers remembered at most; the oldest are forgotten first. Default 10 000. */
  maxEntries?: number
  now?: () => number
}

/**
 * Which session produced an assistant answer, so a stateless client that resends the whole
 * conversation without a session id continues that session (and its kernel). Answers are known
 * by a hash of the tenant and the exact content returned. Kept in this process's memory.
 */
export class ConversationIndex implements Conversations {
  private readonly entries = new Map<string, { sessionId: string; expiresAt: number }>()
  private readonly ttlMs: number
  private readonly maxEntries: number
  private readonly now: () => number

  constructor(opts: ConversationIndexOptions = {}) {
    this.ttlMs = opts.ttlMs ?? 24 * 3_600_000
    this.maxEntries = opts.maxEntries ?? 10_000
    this.now = opts.now ?? Date.now
  }

  remember(tenantId: string, answer: string, sessionId: string): void {
    if (!answer) return
    const key = keyOf(tenantId, answer)
    this.entries.delete(key)
    this.entries.set(key, { sessionId, expiresAt: this.now() + this.ttlMs })
    for (const oldest of this.entries.keys()) {
      if (this.entries.size <= this.maxEntries) break
      this.entries.delete(oldest)
    }
  }

  find(tenantId: string, answer: string): string | undefined {
    const key = keyOf(tenantId, answer)
    const entry = this.entries.get(key)
    if (!entry) return undefined
    if (entry.expiresAt <= this.now()) {
      this.entries.delete(key)
      return undefined
    }
    return entry.sessionId
  }
}

const keyOf = (tenantId: string, answer: string) => createHash('sha256').update(tenantId).update('\n').update(answer).digest('hex')

/**
 * The same index in Redis (one key per answer, expiring with it), so a stateless client whose
 * next request reaches another replica still continues its session. A failed write is logged and
 * costs only that continuation (the next request opens a new session); a failed read finds nothing.
 */
export class RedisConversationIndex implements Conversations {
  constructor(
    private readonly redis: Redis,
    private readonly logger: { warn(obj: object, msg: string): void },
    private readonly ttlMs = 24 * 3_600_000,
    private readonly prefix = 'oi-server:conversation:',
  ) {}

  remember(tenantId: string, answer: string, sessionId: string): void {
    if (!answer) return
    this.redis
      .set(this.prefix + keyOf(tenantId, answer), sessionId, 'PX', this.ttlMs)
      .catch((err: Error) => this.logger.warn({ err: err.message }, 'answer not indexed: a stateless continuation of it opens a new session'))
  }

  async find(tenantId: string, answer: string): Promise<string | undefined> {
    return (await this.redis.get(this.prefix + keyOf(tenantId, answer)).catch(() => null)) ?? undefined
  }
}
