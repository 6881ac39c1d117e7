import { createHash, randomBytes, randomUUID, timingSafeEqual } from 'node:crypto'
import type { ApiKeyRecord, Store } from './store/types.js'

/** Who is calling. Each managed key is its own tenant; the admin keys share one. */
export interface Principal {
  tenantId: string
  admin: boolean
  keyId: string | null
  /** When a managed key stops working; null for never (and for admin keys). */
  expiresAt: string | null
}

/** Tells the other processes sharing the store that a key was revoked (plugins/auth.ts). */
export interface RevocationChannel {
  publish(keyId: string): Promise<void>
}

export interface KeyResolverOptions {
  flushEveryMs?: number
  channel?: RevocationChannel
  /**
   * How long a managed key found in the store is trusted without asking the store again (ms);
   * default 5000, 0 asks every time. A revocation here or through the channel drops it at once;
   * this bounds only a revocation on a replica that cannot tell this one (no Redis).
   */
  cacheMs?: number
}

/** Managed keys remembered at most; the longest unused go first. */
const MAX_CACHED_KEYS = 10_000

/** The longest delay setTimeout holds (about 24.8 days); a later expiry re-arms the timer. */
const MAX_TIMER_MS = 2 ** 31 - 1

interface KeyWatch {
  listeners: Set<() => void>
  timer?: NodeJS.Timeout
}

export const ADMIN_TENANT = 'admin'
const MANAGED_PREFIX = 'oik_'

const sha256 = (value: string) => createHash('sha256').update(value).digest()

/** A new managed key: the plaintext (shown once) and the record that is stored (hash only). */
export function newApiKey(name: string, expiresAt: string | null): { key: string; record: ApiKeyRecord } {
  const key = `${MANAGED_PREFIX}${randomBytes(32).toString('base64url')}`
  return {
    key,
    record: {
      id: randomUUID(),
      name,
      prefix: key.slice(0, 12),
      hash: sha256(key).toString('hex'),
      createdAt: new Date().toISOString(),
      expiresAt,
      lastUsedAt: null,
    },
  }
}

/**
 * Resolves a bearer key to a principal. Admin keys are compared in constant time (digests of
 * equal length, every key checked); managed keys are looked up by their SHA-256, so the
 * plaintext is never stored and the lookup reveals nothing about it. `last_used_at` writes are
 * batched so authentication does not write on every request.
 *
 * Connections that outlive a request (WebSockets) `watch` their key: a revocation here or on
 * another replica (through the channel), or the key's expiry, ends every watch of that key at
 * once. One timer per watched key with an expiry, none per connection, no polling.
 *
 * Managed keys found in the store are remembered by digest for `cacheMs`, so a client that sends
 * the same key on every request costs no query; a key that ends (revoked, expired) is forgotten
 * the moment it ends, and its expiry is checked on every use.
 */
export class KeyResolver {
  private readonly adminDigests: Buffer[]
  private readonly used = new Map<string, string>()
  private flushTimer: NodeJS.Timeout | undefined
  private readonly flushEveryMs: number
  private readonly channel: RevocationChannel | undefined
  private readonly watches = new Map<string, KeyWatch>()
  /** Counts ended keys, so a watch can tell whether one ended while it was being set up. */
  private endings = 0
  private readonly cacheMs: number
  /** Digest (hex) → the key's record and when it was read; insertion order is use order. */
  private readonly cache = new Map<string, { record: ApiKeyRecord; readAt: number }>()

  constructor(
    adminKeys: string[],
    private readonly store: Store,
    opts: KeyResolverOptions = {},
  ) {
    this.adminDigests = adminKeys.map(sha256)
    this.flushEveryMs = opts.flushEveryMs ?? 30_000
    this.channel = opts.channel
    this.cacheMs = opts.cacheMs ?? 5000
  }

  async resolve(key: string): Promise<Principal | undefined> {
    const digest = sha256(key)
    let admin = false
    for (const candidate of this.adminDigests) admin = timingSafeEqual(candidate, digest) || admin
    if (admin) return { tenantId: ADMIN_TENANT, admin: true, keyId: null, expiresAt: null }
    if (!key.startsWith(MANAGED_PREFIX)) return undefined
    const record = await this.lookup(digest.toString('hex'))
    if (!record) return undefined
    const now = new Date().toISOString()
    if (record.expiresAt && record.expiresAt <= now) return undefined
    this.markUsed(record.id, now)
    return { tenantId: `key:${record.id}`, admin: false, keyId: record.id, expiresAt: record.expiresAt }
  }

  private async lookup(hash: string): Promise<ApiKeyRecord | undefined> {
    const cached = this.cache.get(hash)
    if (cached) {
      this.cache.delete(hash)
      if (Date.now() - cached.readAt < this.cacheMs) {
        this.cache.set(hash, cached)
        return cached.record
      }
    }
    const before = this.endings
    const record = await this.store.findApiKeyByHash(hash)
    // A key that ended while it was being read may be this one: it is not remembered.
    if (record && this.cacheMs > 0 && this.endings === before) {
      this.cache.set(hash, { record, readAt: Date.now() })
      if (this.cache.size > MAX_CACHED_KEYS) this.cache.delete(this.cache.keys().next().value!)
    }
    return record
  }

  /** Deletes a managed key and ends its watches, here and (through the channel) elsewhere. */
  async revoke(id: string): Promise<boolean> {
    const deleted = await this.store.deleteApiKey(id)
    if (!deleted) return false
    this.ended(id)
    await this.channel?.publish(id)
    return true
  }

  /** A key stopped working (revoked here or on another replica, or expired): its watches end. */
  ended(keyId: string): void {
    this.endings++
    for (const [hash, { record }] of this.cache) if (record.id === keyId) this.cache.delete(hash)
    const watch = this.watches.get(keyId)
    if (!watch) return
    this.watches.delete(keyId)
    clearTimeout(watch.timer)
    for (const listener of watch.listeners) {
      try {
        listener()
      } catch {
        // one failing listener must not keep the other connections of the key open
      }
    }
  }

  /**
   * Resolves a key for a long-lived connection and calls `onEnd` once if the key is later
   * revoked or expires. `stop` removes the watch (call it when the connection closes). Admin keys
   * come from the configuration and never end.
   */
  async watch(key: string, onEnd: () => void): Promise<{ principal: Principal; stop: () => void } | undefined> {
    const before = this.endings
    const principal = await this.resolve(key)
    if (!principal?.keyId) return principal && { principal, stop: () => {} }
    const stop = this.listen(principal.keyId, principal.expiresAt, onEnd)
    // A key revoked between the lookup above and the listener would never be reported.
    if (this.endings !== before && !(await this.resolve(key))) {
      stop()
      return undefined
    }
    return { principal, stop }
  }

  private listen(keyId: string, expiresAt: string | null, onEnd: () => void): () => void {
    let watch = this.watches.get(keyId)
    if (!watch) {
      watch = { listeners: new Set() }
      this.watches.set(keyId, watch)
      if (expiresAt) this.armExpiry(keyId, watch, Date.parse(expiresAt))
    }
    const listeners = watch.listeners
    listeners.add(onEnd)
    return () => {
      listeners.delete(onEnd)
      if (listeners.size > 0 || this.watches.get(keyId) !== watch) return
      clearTimeout(watch.timer)
      this.watches.delete(keyId)
    }
  }

  private armExpiry(keyId: string, watch: KeyWatch, at: number): void {
    const delay = at - Date.now()
    if (delay <= 0) return void queueMicrotask(() => this.watches.get(keyId) === watch && this.ended(keyId))
    watch.timer = setTimeout(() => {
      if (Date.now() >= at) this.ended(keyId)
      else this.armExpiry(keyId, watch, at)
    }, Math.min(delay, MAX_TIMER_MS)).unref()
  }

  private markUsed(id: string, at: string) {
    this.used.set(id, at)
    this.flushTimer ??= setTimeout(() => void this.flush(), this.flushEveryMs).unref()
  }

  async flush(): Promise<void> {
    clearTimeout(this.flushTimer)
    this.flushTimer = undefined
    if (this.used.size === 0) return
    const batch = [...this.used].map(([id, at]) => ({ id, at }))
    this.used.clear()
    await this.store.markApiKeysUsed(batch)
  }
}
