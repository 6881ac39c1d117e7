import type { LmcMessage } from '../schemas/lmc.js'
import type { AppendEntry, EventRecord, Store } from './store/types.js'

export type EventListener = (event: EventRecord) => void

/**
 * The session event log: every append is persisted first (per-session increasing ids from the
 * store) and then published to live subscribers. Appends of one session are chained, so
 * subscribers see ids in increasing order without gaps; that ordering is what lets a WebSocket
 * replay stored events and continue with live ones with no gap and no duplicate.
 */
export class EventBus {
  private readonly listeners = new Map<string, Set<EventListener>>()
  private readonly tails = new Map<string, Promise<unknown>>()

  constructor(private readonly store: Store) {}

  async append(sessionId: string, type: string, data: unknown): Promise<EventRecord> {
    return (await this.chain(sessionId, async () => [await this.store.appendEvent(sessionId, type, data)]))[0]!
  }

  /** Stores an LMC message together with its `message` event. */
  async appendMessage(sessionId: string, message: LmcMessage): Promise<EventRecord> {
    return (await this.chain(sessionId, async () => [await this.store.appendMessage(sessionId, message)]))[0]!
  }

  /**
   * Stores messages and events in one transaction (`Store.appendEntries`): one commit for a phase
   * of a turn. Subscribers see the events once all of them are stored, in order.
   */
  appendAll(sessionId: string, entries: AppendEntry[]): Promise<EventRecord[]> {
    return this.chain(sessionId, () => this.store.appendEntries(sessionId, entries))
  }

  /** Live events of a session from now on; returns the unsubscribe function. */
  subscribe(sessionId: string, listener: EventListener): () => void {
    const set = this.listeners.get(sessionId) ?? new Set<EventListener>()
    this.listeners.set(sessionId, set)
    set.add(listener)
    return () => {
      set.delete(listener)
      if (set.size === 0 && this.listeners.get(sessionId) === set) this.listeners.delete(sessionId)
    }
  }

  subscriberCount(sessionId: string): number {
    return this.listeners.get(sessionId)?.size ?? 0
  }

  private chain(sessionId: string, write: () => Promise<EventRecord[]>): Promise<EventRecord[]> {
    const previous = this.tails.get(sessionId) ?? Promise.resolve()
    const next = previous.catch(() => {}).then(async () => {
      const events = await write()
      for (const event of events) {
        for (const listener of this.listeners.get(sessionId) ?? []) {
          try {
            listener(event)
          } catch {
            // a broken subscriber must not fail the writer; it is dropped by its own transport
          }
        }
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
