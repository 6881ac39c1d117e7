import type { Redis } from 'ioredis'

/**
 * Rate limits as a rate, not a fixed window: GCRA (the generic cell rate algorithm, a token
 * bucket kept as one timestamp per key). `limit` requests per `windowMs` means one request every
 * `windowMs / limit`, with bursts of up to `limit`; a refused client waits only until the next
 * request is allowed (about `windowMs / limit`), not until some window ends.
 */
export interface RateDecision {
  allowed: boolean
  /** Requests that could be made right now after this one. */
  remaining: number
  /** Milliseconds until the bucket is full again. */
  resetMs: number
  /** Milliseconds until the next request is allowed; 0 when this one was. */
  retryMs: number
}

export interface RateStore {
  take(key: string, limit: number, windowMs: number): Promise<RateDecision>
}

/** Float arithmetic must not refuse the request that exactly fills the bucket. */
const SLACK_MS = 0.5

/** The decision for a key whose theoretical arrival time is `stored` (undefined: never seen). */
export function decide(stored: number | undefined, now: number, limit: number, windowMs: number): { decision: RateDecision; tat?: number } {
  const interval = windowMs / limit
  const tat = Math.max(stored ?? now, now)
  const allowAt = tat - (windowMs - interval)
  if (now + SLACK_MS < allowAt) {
    return { decision: { allowed: false, remaining: 0, resetMs: Math.ceil(tat - now), retryMs: Math.ceil(allowAt - now) } }
  }
  const next = tat + interval
  return {
    decision: { allowed: true, remaining: Math.max(0, Math.floor((now + windowMs - next + SLACK_MS) / interval)), resetMs: Math.ceil(next - now), retryMs: 0 },
    tat: next,
  }
}

/** One process's buckets. Keys whose bucket is full again are forgotten, so memory stays bounded by the active clients. */
export class MemoryRateStore implements RateStore {
  private readonly tats = new Map<string, number>()

  constructor(
    private readonly opts: { maxKeys?: number; now?: () => number } = {},
  ) {}

  async take(key: string, limit: number, windowMs: number): Promise<RateDecision> {
    const now = (this.opts.now ?? Date.now)()
    const { decision, tat } = decide(this.tats.get(key), now, limit, windowMs)
    if (tat !== undefined) {
      this.tats.delete(key)
      this.tats.set(key, tat)
      if (this.tats.size > (this.opts.maxKeys ?? 10_000)) this.prune(now)
    }
    return decision
  }

  /** Drops full buckets, then the least recently used ones if there are still too many. */
  private prune(now: number): void {
    for (const [key, tat] of this.tats) if (tat <= now) this.tats.delete(key)
    const excess = this.tats.size - (this.opts.maxKeys ?? 10_000)
    if (excess <= 0) return
    let dropped = 0
    for (const key of this.tats.keys()) {
      if (dropped++ >= excess) break
      this.tats.delete(key)
    }
  }
}

/**
 * The same decision made atomically in Redis, on Redis's clock so replicas with skewed clocks
 * still share one rate. Returns {allowed, remaining, reset ms, retry ms}.
 */
const GCRA = `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local interval = window / limit
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local allow_at = tat - (window - interval)
if now + 0.5 < allow_at then
  return {0, 0, math.ceil(tat - now), math.ceil(allow_at - now)}
end
local nxt = tat + interval
redis.call('SET', KEYS[1], string.format('%.3f', nxt), 'PX', math.ceil(nxt - now))
return {1, math.max(0, math.floor((now + window - nxt + 0.5) / interval)), math.ceil(nxt - now), 0}
`

export class RedisRateStore implements RateStore {
  constructor(
    private readonly redis: Redis,
    private readonly prefix: string,
  ) {}

  async take(key: string, limit: number, windowMs: number): Promise<RateDecision> {
    const [allowed, remaining, resetMs, retryMs] = (await this.redis.eval(GCRA, 1, this.prefix + key, limit, windowMs)) as number[]
    return { allowed: allowed === 1, remaining: remaining ?? 0, resetMs: resetMs ?? 0, retryMs: retryMs ?? 0 }
  }
}
