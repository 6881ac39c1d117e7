import { createHash, randomUUID } from 'node:crypto'
import type { Redis } from 'ioredis'
import { ApiError } from './errors.js'

/** A response as it went out, to be sent again for the same `Idempotency-Key`. */
export interface StoredResponse {
  status: number
  headers: Record<string, string>
  body: Buffer
}

/** Where `Idempotency-Key` claims and responses are kept: this process, or Redis for replicas. */
export interface IdempotencyStore {
  /** Throws 409 idempotency_in_progress or 422 idempotency_key_reused; see IdempotencyKeys. */
  begin(tenantId: string, key: string, fingerprint: string): IdempotencyOutcome | Promise<IdempotencyOutcome>
}

const reused = () =>
  new ApiError(
    422,
    'invalid_request_error',
    'idempotency_key_reused',
    'This Idempotency-Key was used with a different request; use a new key for a new request',
    'Idempotency-Key',
  ).final()
const inProgress = () =>
  new ApiError(409, 'conflict_error', 'idempotency_in_progress', 'The same request (this Idempotency-Key, or the attempt an SDK is retrying) is still running; retry later to get its result')

/** What `begin` decided: run the request and `finish` (or `abandon`) the claim, or replay. */
export type IdempotencyOutcome =
  | { kind: 'run'; finish: (response: StoredResponse) => void; abandon: () => void }
  | { kind: 'replay'; response: StoredResponse }

interface Entry {
  fingerprint: string
  expiresAt: number
  response?: StoredResponse
}

export interface IdempotencyOptions {
  /** How long a key is remembered; default 24 hours. */
  ttlMs?: number
  /** Keys remembered at most; the oldest are forgotten first. Default 10 000. */
  maxKeys?: number
  now?: () => number
}

/**
 * `Idempotency-Key` per tenant: the first request with a key runs; a repeat with the same request
 * gets the stored response; a repeat while the first still runs is 409 (the SDKs retry 409 with
 * backoff, and then get the stored response); a different request with the same key is 422. A
 * request that failed without side effects is forgotten, so its retry runs as new.
 *
 * Kept in this process's memory; RedisIdempotencyKeys shares them between replicas.
 */
export class IdempotencyKeys implements IdempotencyStore {
  private readonly entries = new Map<string, Entry>()
  private readonly ttlMs: number
  private readonly maxKeys: number
  private readonly now: () => number

  constructor(opts: IdempotencyOptions = {}) {
    this.ttlMs = opts.ttlMs ?? 24 * 3_600_000
    this.maxKeys = opts.maxKeys ?? 10_000
    this.now = opts.now ?? Date.now
  }

  begin(tenantId: string, key: string, fingerprint: string): IdempotencyOutcome {
    const id = `${tenantId}\n${key}`
    const now = this.now()
    const entry = this.entries.get(id)
    if (entry && entry.expiresAt > now) {
      if (entry.fingerprint !== fingerprint) throw reused()
      if (entry.response) return { kind: 'replay', response: entry.response }
      throw inProgress()
    }
    const claim: Entry = { fingerprint, expiresAt: now + this.ttlMs }
    this.entries.delete(id)
    this.entries.set(id, claim)
    this.prune(now)
    return {
      kind: 'run',
      finish: (response) => {
        if (this.entries.get(id) === claim) claim.response = response
      },
      abandon: () => {
        if (this.entries.get(id) === claim) this.entries.delete(id)
      },
    }
  }

  /**
   * Starts a run under `key` whatever was recorded before (an SDK's first attempt: the same
   * request again on purpose runs again, and its retries then find this one).
   */
  claim(tenantId: string, key: string, fingerprint: string): Extract<IdempotencyOutcome, { kind: 'run' }> {
    this.entries.delete(`${tenantId}\n${key}`)
    return this.begin(tenantId, key, fingerprint) as Extract<IdempotencyOutcome, { kind: 'run' }>
  }

  private prune(now: number): void {
    if (this.entries.size <= this.maxKeys) return
    for (const [id, entry] of this.entries) if (entry.expiresAt <= now) this.entries.delete(id)
    for (const id of this.entries.keys()) {
      if (this.entries.size <= this.maxKeys) break
      this.entries.delete(id)
    }
  }
}

// Takes the key when free; otherwise returns what it holds: {fingerprint, response or ''}.
const BEGIN = `
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'fingerprint', ARGV[1], 'claim', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {'run'}
end
return {'found', redis.call('HGET', KEYS[1], 'fingerprint') or '', redis.call('HGET', KEYS[1], 'response') or ''}
`
const FINISH = `
if redis.call('HGET', KEYS[1], 'claim') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'response', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return 0
`
const ABANDON = `
if redis.call('HGET', KEYS[1], 'claim') == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
`

export interface RedisIdempotencyOptions {
  /** How long a finished request's response is kept; default 24 hours. */
  ttlMs?: number
  /**
   * How long a claim whose request is still running is kept; default 1 hour. A replica that died
   * mid-request cannot finish or abandon its claim: retries get 409 until then.
   */
  runningTtlMs?: number
  prefix?: string
  logger?: { warn(obj: object, msg: string): void }
}

/**
 * The same semantics as IdempotencyKeys, in Redis (one hash per tenant and key), so a retry that
 * a load balancer sends to another replica is recognised. Redis unreachable: 503
 * cluster_unavailable, since running the request unguarded could run it twice.
 */
export class RedisIdempotencyKeys implements IdempotencyStore {
  readonly #redis: Redis
  readonly #ttlMs: number
  readonly #runningTtlMs: number
  readonly #prefix: string
  readonly #logger: { warn(obj: object, msg: string): void }

  constructor(redis: Redis, opts: RedisIdempotencyOptions = {}) {
    this.#redis = redis
    this.#ttlMs = opts.ttlMs ?? 24 * 3_600_000
    this.#runningTtlMs = opts.runningTtlMs ?? 3_600_000
    this.#prefix = opts.prefix ?? 'oi-server:idempotency:'
    this.#logger = opts.logger ?? { warn() {} }
  }

  async begin(tenantId: string, key: string, fingerprint: string): Promise<IdempotencyOutcome> {
    const id = this.#prefix + createHash('sha256').update(tenantId).update('\n').update(key).digest('hex')
    const claim = randomUUID()
    let found: string[]
    try {
      found = (await this.#redis.eval(BEGIN, 1, id, fingerprint, claim, this.#runningTtlMs)) as string[]
    } catch (err) {
      throw new ApiError(503, 'unavailable_error', 'cluster_unavailable', 'Idempotency-Key records (Redis) cannot be reached; retry shortly', null, {}, { cause: err })
    }
    if (found[0] === 'run') {
      const settle = (script: string, ...args: (string | number)[]) =>
        void this.#redis.eval(script, 1, id, claim, ...args).catch((err: Error) => this.#logger.warn({ err: err.message }, 'Idempotency-Key record not updated'))
      return {
        kind: 'run',
        finish: (response) => settle(FINISH, JSON.stringify({ ...response, body: response.body.toString('base64') }), this.#ttlMs),
        abandon: () => settle(ABANDON),
      }
    }
    if (found[1] !== fingerprint) throw reused()
    if (!found[2]) throw inProgress()
    const stored = JSON.parse(found[2]) as { status: number; headers: Record<string, string>; body: string }
    return { kind: 'replay', response: { ...stored, body: Buffer.from(stored.body, 'base64') } }
  }
}
