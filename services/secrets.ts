import type { SecretBox } from './crypto.js'
import { invalidRequest } from './errors.js'
import { reservedEnvReason } from './kernels/environment.js'
import type { Store } from './store/types.js'

/** Values shorter than this are stored and injected but not masked: masking "a" would mask every "a". */
export const MIN_MASKED_LENGTH = 4

/** A value a kernel may have in its environment after the secret changed: still masked. */
const MAX_RETIRED = 100

export interface TenantSecrets {
  /** Environment variables for the tenant's kernels. */
  env: Record<string, string>
  /** Replaces every occurrence of a secret value with `[secret:NAME]`. */
  redact: (text: string) => string
  /** A masker for one output stream, whose reads may cut a value in two. */
  stream: () => StreamRedactor
}

export interface StreamRedactor {
  /** What can be shown now; a tail that may be the start of a value waits for the next read. */
  push(text: string): string
  /** What is still held, once the stream ends. */
  flush(): string
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

/** The length of the longest end of `text` that is the start, not the whole, of a value. */
function partialTail(text: string, values: string[]): number {
  let longest = 0
  for (const value of values) {
    for (let i = Math.max(0, text.length - value.length + 1); i < text.length - longest; i++) {
      if (text.charCodeAt(i) === value.charCodeAt(0) && value.startsWith(text.slice(i))) {
        longest = text.length - i
        break
      }
    }
  }
  return longest
}

function streamRedactor(redact: (text: string) => string, values: [string, string][]): () => StreamRedactor {
  const masked = values.map(([, v]) => v).filter((v) => v.length >= MIN_MASKED_LENGTH)
  if (masked.length === 0) return () => ({ push: identity, flush: () => '' })
  return () => {
    let held = ''
    return {
      push(text) {
        // Masked first, so a whole value at the end is replaced rather than held in pieces.
        const out = redact(held + text)
        const keep = partialTail(out, masked)
        held = out.slice(out.length - keep)
        return out.slice(0, out.length - keep)
      },
      flush() {
        const out = held
        held = ''
        return out
      },
    }
  }
}

/**
 * Per-tenant secrets, encrypted at rest. Decrypted values are cached per tenant (invalidated on
 * every change) because each run and execution needs them; `redactAll` masks every value this
 * process knows, for logs, where the tenant is not known. A kernel keeps the environment it
 * started with, so values replaced or deleted while it lives stay masked ("retired").
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

  /**
   * Stores a secret; it becomes the environment variable `name` of the tenant's kernels.
   * @throws ApiError 400 `invalid_request` (`param` "name" or "value") for a name the loader, libc,
   *   an interpreter or the server itself reads (see kernels/environment.ts), or a value with NUL.
   */
  async put(tenantId: string, name: string, value: string): Promise<void> {
    const reason = reservedEnvReason(name)
    if (reason) throw invalidRequest(`The secret name ${name} ${reason}`, 'name')
    if (value.includes('\0')) throw invalidRequest('A secret value cannot contain a NUL character: it becomes an environment variable', 'value')
    await this.store.putSecret(tenantId, name, this.box.seal(value, `${tenantId}/${name}`))
    await this.invalidate(tenantId)
  }

  async delete(tenantId: string, name: string): Promise<boolean> {
    const removed = await this.store.deleteSecret(tenantId, name)
    await this.invalidate(tenantId)
    return removed
  }

  /**
   * Only values that were loaded can be in a kernel's environment, and every load is cached
   * until the next change, so retiring the cached values covers them all.
   */
  private async invalidate(tenantId: string): Promise<void> {
    const entry = this.cache.get(tenantId)
    this.cache.delete(tenantId)
    const previous = await entry?.catch(() => undefined)
    if (!previous) return
    const retired = this.retired.get(tenantId) ?? []
    for (const pair of previous.values) if (!retired.some(([, v]) => v === pair[1])) retired.push(pair)
    this.retired.set(tenantId, retired.slice(-MAX_RETIRED))
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
  private readonly retired = new Map<string, [string, string][]>()

  private async load(tenantId: string) {
    const rows = await this.store.listSecrets(tenantId)
    const values = rows.map((r) => [r.name, this.box.open(r.ciphertext, `${tenantId}/${r.name}`)] as [string, string])
    // a retired value that is current again is named after its current secret
    const masked = [...values, ...(this.retired.get(tenantId) ?? []).filter(([, v]) => !values.some(([, c]) => c === v))]
    const redact = redactor(masked)
    // Log lines are JSON: there a value with quotes, backslashes or control characters is escaped.
    const escaped = masked.map(([name, v]) => [name, JSON.stringify(v).slice(1, -1)] as [string, string]).filter(([, e], i) => e !== masked[i]![1])
    this.loaded.set(tenantId, escaped.length > 0 ? redactor([...masked, ...escaped]) : redact)
    return { env: Object.fromEntries(values), redact, stream: streamRedactor(redact, masked), values }
  }
}
