import { ApiError } from './errors.js'

/** A response as it went out, to be sent again for the same `Idempotency-Key`. */
export interface StoredResponse {
  status: number
  headers: Record<string, string>
  body: Buffer
}

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
 * Kept in this process's memory: with several replicas, a retry that reaches another replica is
 * not recognised.
 */
export class IdempotencyKeys {
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
      if (entry.fingerprint !== fingerprint) {
        throw new ApiError(
          422,
          'invalid_request_error',
          'idempotency_key_reused',
          'This Idempotency-Key was used with a different request; use a new key for a new request',
          'Idempotency-Key',
        ).final()
      }
      if (entry.response) return { kind: 'replay', response: entry.response }
      throw new ApiError(409, 'conflict_error', 'idempotency_in_progress', 'The same request (this Idempotency-Key, or the attempt an SDK is retrying) is still running; retry later to get its result')
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
