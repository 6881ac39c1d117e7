import { createHash, randomBytes, randomUUID, timingSafeEqual } from 'node:crypto'
import type { ApiKeyRecord, Store } from './store/types.js'

/** Who is calling. Each managed key is its own tenant; the admin keys share one. */
export interface Principal {
  tenantId: string
  admin: boolean
  keyId: string | null
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
 */
export class KeyResolver {
  private readonly adminDigests: Buffer[]
  private readonly used = new Map<string, string>()
  private flushTimer: NodeJS.Timeout | undefined

  constructor(
    adminKeys: string[],
    private readonly store: Store,
    private readonly flushEveryMs = 30_000,
  ) {
    this.adminDigests = adminKeys.map(sha256)
  }

  async resolve(key: string): Promise<Principal | undefined> {
    const digest = sha256(key)
    let admin = false
    for (const candidate of this.adminDigests) admin = timingSafeEqual(candidate, digest) || admin
    if (admin) return { tenantId: ADMIN_TENANT, admin: true, keyId: null }
    if (!key.startsWith(MANAGED_PREFIX)) return undefined
    const record = await this.store.findApiKeyByHash(digest.toString('hex'))
    if (!record) return undefined
    const now = new Date().toISOString()
    if (record.expiresAt && record.expiresAt <= now) return undefined
    this.markUsed(record.id, now)
    return { tenantId: `key:${record.id}`, admin: false, keyId: record.id }
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
