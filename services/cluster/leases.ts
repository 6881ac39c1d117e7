import { performance } from 'node:perf_hooks'
import type { Redis } from 'ioredis'
import { ApiError } from '../errors.js'

/**
 * Where a session is served: here (this replica holds its lease, with the fencing `generation`
 * that every write of the session carries), or by another replica reached at `url`. `down` says
 * that replica did not answer and its lease has `retryAfterMs` left before another may take it.
 */
export type Placement =
  | { kind: 'local'; generation: number }
  | { kind: 'remote'; replicaId: string; url: string; down: boolean; retryAfterMs: number }

/** The part of a pino logger the table uses. */
export interface LeaseLogger {
  info(obj: object, msg: string): void
  warn(obj: object, msg: string): void
}

export interface LeaseTableOptions {
  redis: Redis
  /** Unique per process start: a restarted replica is a new owner. */
  replicaId: string
  /** How the other replicas reach this one (REPLICA_URL). */
  url: string
  /** Lease lifetime in ms (LEASE_TTL_MS); renewed every third of it. */
  ttlMs: number
  /** A held lease with nothing running and no request for this long is given up. */
  idleMs: number
  /** Whether the session keeps this replica busy (a run, a request, live kernels). */
  busy: (sessionId: string) => boolean
  /** Runs when this replica takes a session: fences off the previous owner's writes. */
  onAcquired: (sessionId: string, generation: number) => Promise<void>
  /** Runs when a held lease is lost (expired unrenewed, or taken): stop what runs for the session. */
  onLost: (sessionId: string) => void
  /** Runs when this replica takes a session whose previous owner had kernels: their state is gone. */
  onStateLost: (sessionId: string) => void
  logger: LeaseLogger
  /** Monotonic milliseconds; injected by tests. */
  now?: () => number
  /** Key prefix; default `oi-server:`. */
  prefix?: string
}

interface Held {
  /** The lease's value in Redis: `<generation> <replica id> <url>`. */
  value: string
  generation: number
  /** Local monotonic time before which the lease is surely still ours. */
  expiresAt: number
  lastUsed: number
  /** Requests for the session being served here now. */
  active: number
  /** Whether the kernels flag was set for this lease. */
  marked: boolean
}

interface Foreign {
  replicaId: string
  url: string
  expiresAt: number
  down: boolean
}

/** A peer's kernels flag outlives any idle session (sessions idle longer are usually swept). */
const KERNELS_FLAG_TTL_S = 7 * 24 * 3600

// Takes a free lease (ARGV[4] = '1') or only reads it; a lease already ours is extended.
// Returns {value, pttl, taken, previous owner had kernels}; value '' when free and not taken.
const ACQUIRE = `
local cur = redis.call('GET', KEYS[1])
if cur then
  if string.match(cur, '^%d+ (%S+) ') == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
    return {cur, tonumber(ARGV[3]), 0, 0}
  end
  return {cur, redis.call('PTTL', KEYS[1]), 0, 0}
end
if ARGV[4] ~= '1' then return {'', 0, 0, 0} end
local gen = redis.call('INCR', KEYS[2])
local value = gen .. ' ' .. ARGV[1] .. ' ' .. ARGV[2]
redis.call('SET', KEYS[1], value, 'PX', ARGV[3])
local had = redis.call('EXISTS', KEYS[3])
redis.call('DEL', KEYS[3])
return {value, tonumber(ARGV[3]), 1, had}
`
const RENEW = `
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
`
// ARGV[2] = '1' keeps the kernels flag: the kernels die with the release, the next owner says so.
const RELEASE = `
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  if ARGV[2] ~= '1' then redis.call('DEL', KEYS[2]) end
  return 1
end
return 0
`
const MARK_KERNELS = `
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[2], '1', 'EX', ARGV[2])
  return 1
end
return 0
`
// The replica registry: a sorted set of "<id> <url>" scored by expiry on Redis's clock.
const HEARTBEAT = `
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if ARGV[3] == '1' then redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1]) else redis.call('ZREM', KEYS[1], ARGV[1]) end
return redis.call('ZRANGE', KEYS[1], 0, -1)
`

export const clusterUnavailable = (cause?: unknown) =>
  new ApiError(503, 'unavailable_error', 'cluster_unavailable', 'The session directory (Redis) cannot be reached; retry shortly', null, {}, { cause })

/**
 * Owner leases of sessions in Redis, one key per session (`SET` with a TTL, as OpenHands' clustered
 * mode keeps its conversation owners), with a fencing generation from one global counter: every
 * new owner gets a larger number, which the store checks on each write of the session, so a
 * replica that stalled past its lease cannot write after its successor (Kleppmann's fencing
 * token). The request path stays local: held leases are known here and renewed in the background
 * every third of their lifetime; another replica's lease is cached until the expiry Redis reported.
 * A replica whose renewals fail gives its sessions up locally (onLost) before its lease can expire
 * in Redis, since its local expiry is counted from before it sent the renewal.
 */
export class LeaseTable {
  readonly #o: Required<Omit<LeaseTableOptions, 'now' | 'prefix'>>
  readonly #now: () => number
  readonly #keys: { lease: (id: string) => string; kernels: (id: string) => string; generation: string; replicas: string }
  readonly #held = new Map<string, Held>()
  readonly #foreign = new Map<string, Foreign>()
  readonly #lookups = new Map<string, Promise<Placement>>()
  // Leases being handed over by drain(): placements wait for the hand-over, then ask Redis.
  readonly #releasing = new Map<string, Promise<void>>()
  #peers: { replicaId: string; url: string }[] = []
  #timer: NodeJS.Timeout | undefined
  #ticking: Promise<void> | undefined
  #draining = false
  #stopped = false

  constructor(opts: LeaseTableOptions) {
    const { now, prefix = 'oi-server:', ...rest } = opts
    this.#o = rest
    this.#now = now ?? (() => performance.now())
    this.#keys = {
      lease: (id) => `${prefix}lease:${id}`,
      kernels: (id) => `${prefix}lease-kernels:${id}`,
      generation: `${prefix}lease-generation`,
      replicas: `${prefix}replicas`,
    }
  }

  get replicaId(): string {
    return this.#o.replicaId
  }

  get draining(): boolean {
    return this.#draining
  }

  /** Registers this replica and starts the renewals (every third of the lease). */
  async start(): Promise<void> {
    await this.#heartbeat().catch((err: Error) => this.#o.logger.warn({ err: err.message }, 'replica registry not reachable at start'))
    this.#timer = setInterval(() => void this.tick(), Math.max(100, Math.floor(this.#o.ttlMs / 3)))
    this.#timer.unref()
  }

  /**
   * Where the session is served. Cheap when known: a held lease or a cached foreign one costs no
   * round trip. Otherwise one Lua call takes the lease if it is free (unless this replica drains
   * and `claim` is not set: then a live peer is named to take it) or reads who holds it.
   * Throws 503 cluster_unavailable when Redis cannot be reached.
   */
  place(sessionId: string, opts: { claim?: boolean } = {}): Promise<Placement> {
    const releasing = this.#releasing.get(sessionId)
    if (releasing) return releasing.then(() => this.place(sessionId, opts))
    const now = this.#now()
    const held = this.#held.get(sessionId)
    if (held) {
      if (held.expiresAt > now) {
        held.lastUsed = now
        return Promise.resolve({ kind: 'local', generation: held.generation })
      }
      this.#lose(sessionId, 'not renewed in time')
    }
    const foreign = this.#foreign.get(sessionId)
    if (foreign && foreign.expiresAt > now) return Promise.resolve(this.#remote(foreign, now))
    let lookup = this.#lookups.get(sessionId)
    if (!lookup) {
      lookup = this.#lookup(sessionId, opts.claim ?? false).finally(() => this.#lookups.delete(sessionId))
      this.#lookups.set(sessionId, lookup)
    }
    return lookup
  }

  /** The fencing generation of a lease held here and not expired, else undefined. */
  generation(sessionId: string): number | undefined {
    const held = this.#held.get(sessionId)
    return held && held.expiresAt > this.#now() ? held.generation : undefined
  }

  /** Counts a request served here for the session; the returned function ends it. */
  enter(sessionId: string): () => void {
    const held = this.#held.get(sessionId)
    if (!held) return () => {}
    held.active++
    let done = false
    return () => {
      if (done) return
      done = true
      held.active--
      held.lastUsed = this.#now()
    }
  }

  /** Whether requests for the session are being served here now. */
  active(sessionId: string): boolean {
    return (this.#held.get(sessionId)?.active ?? 0) > 0
  }

  /** The owner at `url` did not answer: serve nothing through it until its lease runs out. */
  unreachable(sessionId: string): void {
    const foreign = this.#foreign.get(sessionId)
    if (foreign) foreign.down = true
  }

  /** Forgets the cached owner of the session: the next placement asks Redis. */
  invalidate(sessionId: string): void {
    this.#foreign.delete(sessionId)
  }

  /** Records in Redis that this owner runs kernels for the session (once per lease). */
  async markKernels(sessionId: string): Promise<void> {
    const held = this.#held.get(sessionId)
    if (!held || held.marked) return
    try {
      await this.#o.redis.eval(MARK_KERNELS, 2, this.#keys.lease(sessionId), this.#keys.kernels(sessionId), held.value, KERNELS_FLAG_TTL_S)
      held.marked = true
    } catch (err) {
      throw clusterUnavailable(err)
    }
  }

  /**
   * Gives the lease up; `keepKernelsFlag` when the session's kernels die with it, so the next
   * owner reports their state lost. Failures are logged: the lease then expires on its own.
   */
  async release(sessionId: string, keepKernelsFlag: boolean): Promise<void> {
    const held = this.#held.get(sessionId)
    if (!held) return
    this.#held.delete(sessionId)
    await this.#o.redis
      .eval(RELEASE, 2, this.#keys.lease(sessionId), this.#keys.kernels(sessionId), held.value, keepKernelsFlag ? '1' : '0')
      .catch((err: Error) => this.#o.logger.warn({ err: err.message, sessionId }, 'lease not released; it expires on its own'))
  }

  /** The session was deleted: its lease and flag go wherever they are held. */
  async forget(sessionId: string): Promise<void> {
    this.#foreign.delete(sessionId)
    await this.release(sessionId, false)
  }

  /** Sessions whose lease this replica holds. */
  heldSessions(): string[] {
    return [...this.#held.keys()]
  }

  /**
   * Stops taking sessions, leaves the registry, then gives each held lease up as soon as the
   * session is not busy (`busy`), all of them by `deadline` (monotonic ms). `release` runs
   * before each lease goes (stop the session's kernels) and says whether kernels were stopped.
   */
  async drain(deadline: number, busy: (sessionId: string) => boolean, release: (sessionId: string) => Promise<boolean>): Promise<void> {
    this.#draining = true
    await this.#heartbeat().catch(() => {})
    for (;;) {
      const late = this.#now() >= deadline
      const handing = [...this.#held.keys()]
        .filter((id) => late || !busy(id))
        .map((id) => {
          // Marked at once, in the tick that found the session idle: a request that comes while
          // its kernels stop is placed after the hand-over, never served here on a lease going away.
          const handover = (async () => this.release(id, await release(id).catch(() => true)))().finally(() => this.#releasing.delete(id))
          this.#releasing.set(id, handover)
          return handover
        })
      await Promise.all(handing)
      if (this.#held.size === 0) return
      await new Promise((resolve) => setTimeout(resolve, 50))
    }
  }

  /** Renews held leases, refreshes the registry, gives idle leases up. Also run by the timer. */
  tick(): Promise<void> {
    this.#ticking ??= this.#tick().finally(() => {
      this.#ticking = undefined
    })
    return this.#ticking
  }

  /** Stops the renewals and gives every lease up (kernels flag kept: close kills the kernels). */
  async stop(): Promise<void> {
    this.#stopped = true
    clearInterval(this.#timer)
    await this.#ticking
    this.#draining = true
    await this.#heartbeat().catch(() => {})
    await Promise.all([...this.#held.keys()].map((id) => this.release(id, true)))
  }

  async #tick(): Promise<void> {
    if (this.#stopped) return
    const sent = this.#now()
    for (const [id, held] of this.#held) if (held.expiresAt <= sent) this.#lose(id, 'not renewed in time')
    const entries = [...this.#held]
    const idle = entries.filter(([id, held]) => !this.#draining && sent - held.lastUsed >= this.#o.idleMs && held.active === 0 && !this.#o.busy(id))
    for (const [id] of idle) await this.release(id, false)
    const renew = entries.filter(([id]) => this.#held.has(id))
    try {
      await this.#heartbeat()
      if (renew.length === 0) return
      const pipeline = this.#o.redis.pipeline()
      for (const [id, held] of renew) pipeline.eval(RENEW, 1, this.#keys.lease(id), held.value, this.#o.ttlMs)
      const results = (await pipeline.exec()) ?? []
      renew.forEach(([id, held], i) => {
        const [err, renewed] = results[i] ?? [new Error('no reply'), 0]
        if (err || this.#held.get(id) !== held) return
        if (renewed === 1) held.expiresAt = sent + this.#o.ttlMs
        else this.#lose(id, 'taken by another replica')
      })
    } catch (err) {
      // Leases not renewed now are given up at their local expiry, above, at a later tick.
      this.#o.logger.warn({ err: (err as Error).message }, 'leases not renewed: Redis unreachable')
    }
  }

  async #heartbeat(): Promise<void> {
    const members = (await this.#o.redis.eval(
      HEARTBEAT,
      1,
      this.#keys.replicas,
      `${this.#o.replicaId} ${this.#o.url}`,
      this.#o.ttlMs,
      this.#draining ? '0' : '1',
    )) as string[]
    this.#peers = members
      .map((member) => {
        const [replicaId = '', url = ''] = member.split(' ')
        return { replicaId, url }
      })
      .filter((peer) => peer.replicaId !== this.#o.replicaId && peer.url)
  }

  #remote(foreign: Foreign, now: number): Placement {
    return { kind: 'remote', replicaId: foreign.replicaId, url: foreign.url, down: foreign.down, retryAfterMs: Math.max(0, foreign.expiresAt - now) }
  }

  async #lookup(sessionId: string, claim: boolean): Promise<Placement> {
    let placement = await this.#acquire(sessionId, claim || !this.#draining)
    if (placement) return placement
    // Draining and nobody holds it: hand the request to a live replica, which takes the session.
    const peers = this.#peers
    const peer = peers[Math.floor(Math.random() * peers.length)]
    if (peer) return { kind: 'remote', replicaId: peer.replicaId, url: peer.url, down: false, retryAfterMs: 0 }
    placement = await this.#acquire(sessionId, true)
    return placement!
  }

  async #acquire(sessionId: string, take: boolean): Promise<Placement | undefined> {
    const sent = this.#now()
    let reply: [string, number, number, number]
    try {
      reply = (await this.#o.redis.eval(
        ACQUIRE,
        3,
        this.#keys.lease(sessionId),
        this.#keys.generation,
        this.#keys.kernels(sessionId),
        this.#o.replicaId,
        this.#o.url,
        this.#o.ttlMs,
        take ? '1' : '0',
      )) as [string, number, number, number]
    } catch (err) {
      throw clusterUnavailable(err)
    }
    const [value, pttl, taken, hadKernels] = reply
    if (!value) return undefined
    const [generation = '0', owner = '', url = ''] = value.split(' ')
    if (owner !== this.#o.replicaId) {
      const foreign: Foreign = { replicaId: owner, url, expiresAt: sent + Math.max(0, pttl), down: false }
      this.#foreign.set(sessionId, foreign)
      return this.#remote(foreign, this.#now())
    }
    this.#foreign.delete(sessionId)
    const previous = this.#held.get(sessionId)
    const held: Held = { value, generation: Number(generation), expiresAt: sent + this.#o.ttlMs, lastUsed: this.#now(), active: previous?.active ?? 0, marked: taken === 1 ? false : (previous?.marked ?? false) }
    if (taken === 1) {
      // Fenced before anything runs here: the previous owner's late writes are refused from now.
      try {
        await this.#o.onAcquired(sessionId, held.generation)
      } catch (err) {
        await this.#o.redis.eval(RELEASE, 2, this.#keys.lease(sessionId), this.#keys.kernels(sessionId), value, hadKernels === 1 ? '1' : '0').catch(() => {})
        throw err
      }
      if (hadKernels === 1) this.#o.onStateLost(sessionId)
      this.#o.logger.info({ sessionId, generation: held.generation }, 'session lease taken')
    }
    this.#held.set(sessionId, held)
    return { kind: 'local', generation: held.generation }
  }

  #lose(sessionId: string, why: string): void {
    if (!this.#held.delete(sessionId)) return
    this.#o.logger.warn({ sessionId, why }, 'session lease lost: its kernels and run here are stopped')
    this.#o.onLost(sessionId)
  }
}
