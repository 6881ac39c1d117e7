import type { Redis } from 'ioredis'
import type { EventRelay } from '../events.js'

/** The part of a pino logger the relay uses. */
export interface RelayLogger {
  warn(obj: object, msg: string): void
}

/**
 * Wake-ups between replicas over Redis pub/sub, one channel per session: a replica that appends
 * an event publishes its id; replicas with subscribers to that session read what they have not
 * delivered from the database log. A message is only a hint: a lost one delays delivery until
 * the next event (or the reconnection, which wakes every watched session) but loses nothing.
 */
export class RedisEventRelay implements EventRelay {
  readonly #redis: Redis
  readonly #subscriber: Redis
  readonly #prefix: string
  readonly #logger: RelayLogger
  readonly #watchers = new Map<string, Set<(id: number | undefined) => void>>()
  #warned = false

  constructor(redis: Redis, logger: RelayLogger, prefix = 'oi-server:events:') {
    this.#redis = redis
    this.#logger = logger
    this.#prefix = prefix
    // Subscribed connections cannot send other commands: a connection of its own, which queues
    // its (re)subscriptions while Redis is away.
    this.#subscriber = redis.duplicate({ lazyConnect: false, enableOfflineQueue: true })
    this.#subscriber.on('error', () => {})
    this.#subscriber.on('message', (channel: string, message: string) => {
      const set = this.#watchers.get(channel.slice(this.#prefix.length))
      const id = Number(message)
      for (const wake of set ?? []) wake(Number.isSafeInteger(id) ? id : undefined)
    })
    // Wake-ups sent while the connection was down are gone: every watched session catches up.
    let connectedOnce = false
    this.#subscriber.on('ready', () => {
      if (connectedOnce) for (const set of this.#watchers.values()) for (const wake of set) wake(undefined)
      connectedOnce = true
    })
  }

  publish(sessionId: string, id: number): void {
    this.#redis.publish(this.#prefix + sessionId, String(id)).then(
      () => {
        this.#warned = false
      },
      (err: Error) => {
        if (!this.#warned) this.#logger.warn({ err: err.message }, 'event wake-ups not sent to other replicas; their subscribers catch up at the next one')
        this.#warned = true
      },
    )
  }

  watch(sessionId: string, wake: (id: number | undefined) => void): () => void {
    let set = this.#watchers.get(sessionId)
    if (!set) {
      set = new Set()
      this.#watchers.set(sessionId, set)
      this.#subscriber.subscribe(this.#prefix + sessionId).catch(() => {})
    }
    set.add(wake)
    return () => {
      set.delete(wake)
      if (set.size > 0 || this.#watchers.get(sessionId) !== set) return
      this.#watchers.delete(sessionId)
      this.#subscriber.unsubscribe(this.#prefix + sessionId).catch(() => {})
    }
  }

  close(): void {
    this.#subscriber.disconnect()
  }
}
