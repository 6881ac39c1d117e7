import type { SecretBox } from './crypto.js'
import type { Store } from './store/types.js'

/** Values shorter than this are stored and injected but not masked: masking "a" would mask every "a". */
export const MIN_MASKED_LENGTH = 4

export interface TenantSecrets {
  /** Environment variables for the tenant's kernels. */
  env: Record<string, string>
  /** Replaces every occurrence of a secret value with `[secret:NAME]`. */
  redact: (text: string) => string
}

const identity = (text: string) => text

function redactor(values: [string, string][]): (text: string) => string {
  const masked = values.filter(([, v]) => v.length >= MIN_MASKED_LENGTH).sort((a, b) => b[1].length - a[1].length)
  if (masked.length === 0) return identity
  return (text) => {
    let out = text
    for (const [name, value] of masked) if (out.includes(value)) out = out.replaceAll(value, `[secret:${name}]`)
    return out
  }
}

/**
 * Per-tenant secrets, encrypted at rest. Decrypted values are cached per tenant (invalidated on
 * every change) because each run and execution needs them; `redactAll` masks every value this
 * process knows, for logs, where the tenant is not known.
 */
export class SecretsService {
  private readonly cache = new Map<string, Promise<TenantSecrets & { values: [string, string][] }>>()

  constructor(
    private readonly store: Store,
    private readonly box: SecretBox,
  ) {}

  async list(tenantId: string) {
    return (await this.store.listSecrets(tenantId)).map((s) => ({ name: s.name, created_at: s.createdAt, updated_at: s.updatedAt }))
  }

  async put(tenantId: string, name: string, value: string): Promise<void> {
    await this.store.putSecret(tenantId, name, this.box.seal(value, `${tenantId}/${name}`))
    this.cache.delete(tenantId)
  }

  async delete(tenantId: string, name: string): Promise<boolean> {
    const removed = await this.store.deleteSecret(tenantId, name)
    this.cache.delete(tenantId)
    return removed
  }

  async forTenant(tenantId: string): Promise<TenantSecrets> {
    let entry = this.cache.get(tenantId)
    if (!entry) {
      entry = this.load(tenantId)
      this.cache.set(tenantId, entry)
      entry.catch(() => this.cache.delete(tenantId))
    }
    return entry
  }

  /** Masks the values of every tenant loaded so far (used on log lines). */
  redactAll = (text: string): string => {
    let out = text
    for (const redact of this.loaded.values()) out = redact(out)
    return out
  }

  private readonly loaded = new Map<string, (text: string) => string>()

  private async load(tenantId: string) {
    const rows = await this.store.listSecrets(tenantId)
    const values = rows.map((r) => [r.name, this.box.open(r.ciphertext, `${tenantId}/${r.name}`)] as [string, string])
    const redact = redactor(values)
    this.loaded.set(tenantId, redact)
    return { env: Object.fromEntries(values), redact, values }
  }
}
