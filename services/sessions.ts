import { sessionNotFound } from './errors.js'
import type { Page, SessionRecord, Store } from './store/types.js'

/** Releases what a session held outside the store (kernels, workspace). */
export type SessionCleanupHook = (sessionId: string) => Promise<void> | void

/** The part of a pino logger this service uses. */
export interface SessionLogger {
  info(obj: object, msg: string): void
  error(obj: object, msg: string): void
}

export interface SessionServiceOptions {
  store: Store
  logger: SessionLogger
  /** Model recorded on sessions created without one. */
  defaultModel: string
  /** Sessions not updated for this long are deleted; 0 keeps them forever. */
  ttlHours: number
  /** Default 10 minutes. */
  sweepIntervalMs?: number
  /** Sessions deleted per store round trip while sweeping; default 100. */
  sweepBatchSize?: number
  /** Injected so tests can move time instead of waiting for it. */
  now?: () => number
}

export class SessionService {
  readonly #store: Store
  readonly #logger: SessionLogger
  readonly #defaultModel: string
  readonly #ttlMs: number
  readonly #sweepIntervalMs: number
  readonly #sweepBatchSize: number
  readonly #now: () => number
  readonly #hooks: SessionCleanupHook[] = []
  #timer: NodeJS.Timeout | undefined
  #sweeping: Promise<number> | undefined

  constructor(opts: SessionServiceOptions) {
    this.#store = opts.store
    this.#logger = opts.logger
    this.#defaultModel = opts.defaultModel
    this.#ttlMs = opts.ttlHours * 3_600_000
    this.#sweepIntervalMs = opts.sweepIntervalMs ?? 600_000
    this.#sweepBatchSize = opts.sweepBatchSize ?? 100
    this.#now = opts.now ?? Date.now
  }

  create(
    tenantId: string,
    input: { title?: string | null; metadata?: Record<string, unknown>; model?: string } = {},
  ): Promise<SessionRecord> {
    return this.#store.createSession({
      tenantId,
      title: input.title ?? null,
      metadata: input.metadata ?? {},
      model: input.model ?? this.#defaultModel,
    })
  }

  /** Missing, malformed and other tenants' ids all look the same: not found. */
  async get(tenantId: string, id: string): Promise<SessionRecord> {
    const session = await this.#store.getSession(tenantId, id)
    if (!session) throw sessionNotFound()
    return session
  }

  list(tenantId: string, opts: { limit: number; cursor?: string }): Promise<Page<SessionRecord>> {
    return this.#store.listSessions(tenantId, opts)
  }

  async update(
    tenantId: string,
    id: string,
    patch: { title?: string | null; metadata?: Record<string, unknown> },
  ): Promise<SessionRecord> {
    const session = await this.#store.updateSession(tenantId, id, patch)
    if (!session) throw sessionNotFound()
    return session
  }

  async delete(tenantId: string, id: string): Promise<void> {
    if (!(await this.#store.deleteSession(tenantId, id))) throw sessionNotFound()
    await this.#cleanUp(id, 'deleted')
  }

  /** Hooks run in registration order, on explicit delete and on expiry. */
  onDelete(hook: SessionCleanupHook): void {
    this.#hooks.push(hook)
  }

  /** Deletes every session idle longer than the TTL and returns how many went. */
  sweepIdle(): Promise<number> {
    if (this.#ttlMs <= 0) return Promise.resolve(0)
    // The timer and a manual call must not race each other over the same rows.
    this.#sweeping ??= this.#sweep().finally(() => {
      this.#sweeping = undefined
    })
    return this.#sweeping
  }

  /** Sweeps once now, then every `sweepIntervalMs`; failures are logged, never thrown. */
  async start(): Promise<void> {
    if (this.#ttlMs <= 0 || this.#timer) return
    this.#timer = setInterval(() => void this.#sweepLogged(), this.#sweepIntervalMs)
    // A pending sweep must not keep the process alive on its own.
    this.#timer.unref()
    await this.#sweepLogged()
  }

  /** Stops the timer and waits for a sweep in progress, so the store can be closed after it. */
  async stop(): Promise<void> {
    clearInterval(this.#timer)
    this.#timer = undefined
    await this.#sweeping?.catch(() => {})
  }

  async #sweepLogged(): Promise<void> {
    try {
      await this.sweepIdle()
    } catch (err) {
      this.#logger.error({ err }, 'Idle session sweep failed')
    }
  }

  async #sweep(): Promise<number> {
    const before = new Date(this.#now() - this.#ttlMs).toISOString()
    let deleted = 0
    for (;;) {
      const idle = await this.#store.listIdleSessions(before, this.#sweepBatchSize)
      for (const session of idle) {
        // False means someone else deleted it meanwhile, and ran the hooks.
        if (!(await this.#store.deleteSession(session.tenantId, session.id))) continue
        deleted++
        this.#logger.info({ sessionId: session.id, tenantId: session.tenantId }, 'Idle session expired')
        await this.#cleanUp(session.id, 'expired')
      }
      if (idle.length < this.#sweepBatchSize) return deleted
    }
  }

  async #cleanUp(sessionId: string, reason: 'deleted' | 'expired'): Promise<void> {
    for (const hook of this.#hooks) {
      try {
        await hook(sessionId)
      } catch (err) {
        this.#logger.error({ err, sessionId, reason }, 'Session cleanup hook failed')
      }
    }
  }
}
