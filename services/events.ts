import type { LmcMessage } from '../schemas/lmc.js'
import type { AppendEntry, EventRecord, Store } from './store/types.js'

export type EventListener = (event: EventRecord) => void

/**
 * Wake-ups between replicas (services/cluster/event-relay.ts). `publish` says the session's log
 * reached `id`; `watch` calls `wake` when another replica says so (with no id after a reconnection,
 * when wake-ups may have been missed).
 */
export interface EventRelay {
  publish(sessionId: string, id: number): void
  watch(sessionId: string, wake: (id: number | undefined) => void): () => void
}

export interface EventBusOptions {
  /** Set with replicas: subscribers here also get events other processes append. */
  relay?: EventRelay
  /**
   * The fencing generation the session's writes carry (its lease), checked by the store; throws
   * when this process may not write for the session. Unset: writes are not fenced.
   */
  fence?: (sessionId: string) => Promise<number | undefined> | number | undefined
}

/** What a process with a relay has delivered of one session, and the queue that delivers it. */
interface Feed {
  delivered: number
  ready: Promise<void>
  queue: Promise<void>
  unwatch: () => void
}

const READ_PAGE = 100

/**
 * The session event log: every append is persisted first (per-session increasing ids from the
 * store) and then published to live subscribers. Appends of one session are chained, so
 * subscribers see ids in increasing order without gaps; that ordering is what lets a WebSocket
 * replay stored events and continue with live ones with no gap and no duplicate.
 *
 * With a relay (replicas), the database log stays the source of truth: a subscriber's events are
 * delivered in id order from one queue per session, and any id this process did not append itself
 * (or skipped past) is read from the store, so another replica's events arrive gapless and once.
 */
export class EventBus {
  private readonly listeners = new Map<string, Set<EventListener>>()
  private readonly tails = new Map<string, Promise<unknown>>()
  private readonly feeds = new Map<string, Feed>()
  private readonly relay: EventRelay | undefined
  private readonly fence: (sessionId: string) => Promise<number | undefined> | number | undefined

  constructor(
    private readonly store: Store,
    opts: EventBusOptions = {},
  ) {
    this.relay = opts.relay
    this.fence = opts.fence ?? (() => undefined)
  }

  async append(sessionId: string, type: string, data: unknown): Promise<EventRecord> {
    return (await this.chain(sessionId, async () => [await this.store.appendEvent(sessionId, type, data, await this.fence(sessionId))]))[0]!
  }

  /** Stores an LMC message together with its `message` event. */
  async appendMessage(sessionId: string, message: LmcMessage): Promise<EventRecord> {
    return (await this.chain(sessionId, async () => [await this.store.appendMessage(sessionId, message, await this.fence(sessionId))]))[0]!
  }

  /**
   * Stores messages and events in one transaction (`Store.appendEntries`): one commit for a phase
   * of a turn. Subscribers see the events once all of them are stored, in order.
   */
  appendAll(sessionId: string, entries: AppendEntry[]): Promise<EventRecord[]> {
    return this.chain(sessionId, async () => this.store.appendEntries(sessionId, entries, await this.fence(sessionId)))
  }

  /** Live events of a session from now on; returns the unsubscribe function. */
  subscribe(sessionId: string, listener: EventListener): () => void {
    const set = this.listeners.get(sessionId) ?? new Set<EventListener>()
    this.listeners.set(sessionId, set)
    set.add(listener)
    if (this.relay && !this.feeds.has(sessionId)) this.feeds.set(sessionId, this.openFeed(sessionId, this.relay))
    return () => {
      set.delete(listener)
      if (set.size === 0 && this.listeners.get(sessionId) === set) {
        this.listeners.delete(sessionId)
        this.feeds.get(sessionId)?.unwatch()
        this.feeds.delete(sessionId)
      }
    }
  }

  /**
   * Resolves once a subscription made before is sure to get every event appended after this
   * moment, wherever it is appended; a replay from the store that starts later leaves no gap.
   */
  ready(sessionId: string): Promise<void> {
    return this.feeds.get(sessionId)?.ready ?? Promise.resolve()
  }

  subscriberCount(sessionId: string): number {
    return this.listeners.get(sessionId)?.size ?? 0
  }

  private openFeed(sessionId: string, relay: EventRelay): Feed {
    const feed: Feed = { delivered: 0, ready: Promise.resolve(), queue: Promise.resolve(), unwatch: () => {} }
    // The log's end when the first subscriber came: later events are delivered from there on.
    feed.ready = this.store.listEvents(sessionId, { reverse: true, limit: 1 }).then(
      (page) => {
        feed.delivered = Math.max(feed.delivered, page.events[0]?.id ?? 0)
      },
      () => {},
    )
    feed.queue = feed.ready
    feed.unwatch = relay.watch(sessionId, (id) => this.enqueue(feed, () => (id !== undefined && id <= feed.delivered ? undefined : this.readFrom(sessionId, feed))))
    return feed
  }

  private enqueue(feed: Feed, step: () => Promise<void> | undefined): void {
    feed.queue = feed.queue.then(step).catch(() => {
      // the store could not be read: the next wake-up or append reads from the same point
    })
  }

  /** Delivers every stored event after the last one delivered, up to `endId` (inclusive) if given. */
  private async readFrom(sessionId: string, feed: Feed, endId?: number): Promise<void> {
    for (;;) {
      const page = await this.store.listEvents(sessionId, { startId: feed.delivered + 1, endId, limit: READ_PAGE })
      for (const event of page.events) this.deliver(sessionId, feed, event)
      if (!page.hasMore || page.events.length === 0) return
    }
  }

  private deliver(sessionId: string, feed: Feed | undefined, event: EventRecord): void {
    if (feed) {
      if (event.id <= feed.delivered) return
      feed.delivered = event.id
    }
    for (const listener of this.listeners.get(sessionId) ?? []) {
      try {
        listener(event)
      } catch {
        // a broken subscriber must not fail the writer; it is dropped by its own transport
      }
    }
  }

  private chain(sessionId: string, write: () => Promise<EventRecord[]>): Promise<EventRecord[]> {
    const previous = this.tails.get(sessionId) ?? Promise.resolve()
    const next = previous.catch(() => {}).then(async () => {
      const events = await write()
      if (!this.relay) {
        for (const event of events) this.deliver(sessionId, undefined, event)
        return events
      }
      const last = events.at(-1)
      if (last) this.relay.publish(sessionId, last.id)
      const feed = this.feeds.get(sessionId)
      if (feed && events.length > 0) {
        this.enqueue(feed, async () => {
          if (events[0]!.id > feed.delivered + 1) await this.readFrom(sessionId, feed, events[0]!.id - 1)
          for (const event of events) this.deliver(sessionId, feed, event)
        })
      }
      return events
    })
    this.tails.set(sessionId, next)
    void next.finally(() => {
      if (this.tails.get(sessionId) === next) this.tails.delete(sessionId)
    }).catch(() => {})
    return next
  }
}
