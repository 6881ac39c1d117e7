import { randomUUID } from 'node:crypto'
import { join } from 'node:path'
import t from 'tap'
import type { LmcMessage } from '../../schemas/lmc.js'
import { EventBus, type EventRelay } from '../../services/events.js'
import { createSqliteStore } from '../../services/store/index.js'
import type { EventRecord, Store } from '../../services/store/types.js'
import { type Tap, tempDir } from '../helpers/build.js'

async function setup(t: Tap) {
  const store = createSqliteStore(join(tempDir(t), 'events.db'))
  await store.migrate()
  t.teardown(() => store.close())
  const bus = new EventBus(store)
  const session = (await store.createSession({ tenantId: 'tenant', model: 'm' })).id
  return { store, bus, session }
}

const message = (content: string): LmcMessage => ({
  id: randomUUID(),
  role: 'user',
  type: 'message',
  content,
  created_at: new Date().toISOString(),
})

t.test('appends get per-session ids from 1, persisted before subscribers hear of them', async (t) => {
  const { store, bus, session } = await setup(t)
  const other = (await store.createSession({ tenantId: 'tenant', model: 'm' })).id
  const heard: [number, boolean][] = []
  bus.subscribe(session, (event) => {
    // the store already has it when a subscriber hears it: a replay can never miss it
    void store.listEvents(session, { startId: event.id, endId: event.id, limit: 1 }).then((page) => heard.push([event.id, page.events.length === 1]))
  })
  const first = await bus.append(session, 'run_started', { model: 'm' })
  t.match(first, { id: 1, type: 'run_started', data: { model: 'm' }, createdAt: /Z$/ })
  const second = await bus.appendMessage(session, message('hello'))
  t.match(second, { id: 2, type: 'message', data: { role: 'user', content: 'hello' } })
  t.match(await store.allMessages(session), [{ content: 'hello' }], 'appendMessage also stores the message')
  t.equal((await bus.append(other, 'x', null)).id, 1, 'ids are per session')
  await new Promise((r) => setTimeout(r, 20))
  t.same(heard, [
    [1, true],
    [2, true],
  ])
})

t.test('concurrent appends: subscribers see increasing ids with no gap, in the stored order', async (t) => {
  const { store, bus, session } = await setup(t)
  const seen: number[] = []
  bus.subscribe(session, (event) => seen.push(event.id))
  const writes = Array.from({ length: 200 }, (_, i) => (i % 3 === 0 ? bus.appendMessage(session, message(`m${i}`)) : bus.append(session, 'tick', { i })))
  const results = await Promise.all(writes)
  t.same(
    results.map((e) => e.id),
    Array.from({ length: 200 }, (_, i) => i + 1),
    'ids follow the order of the calls',
  )
  t.same(seen, results.map((e) => e.id))
  const stored = await store.listEvents(session, { limit: 500 })
  t.same(
    stored.events.map((e) => e.id),
    seen,
  )
})

t.test('subscribe and unsubscribe; many subscribers; a throwing subscriber harms no one', async (t) => {
  const { bus, session } = await setup(t)
  const a: EventRecord[] = []
  const b: EventRecord[] = []
  const offA = bus.subscribe(session, (e) => a.push(e))
  bus.subscribe(session, () => {
    throw new Error('broken subscriber')
  })
  const offB = bus.subscribe(session, (e) => b.push(e))
  t.equal(bus.subscriberCount(session), 3)
  const event = await bus.append(session, 'one', null)
  t.equal(event.id, 1, 'the writer does not see the subscriber fail')
  t.same(
    a.map((e) => e.id),
    [1],
  )
  t.same(
    b.map((e) => e.id),
    [1],
    'subscribers after the broken one still hear it',
  )
  offA()
  await bus.append(session, 'two', null)
  t.same(
    a.map((e) => e.id),
    [1],
    'an unsubscribed listener hears nothing more',
  )
  t.same(
    b.map((e) => e.id),
    [1, 2],
  )
  offB()
  offB()
  t.equal(bus.subscriberCount(session), 1)
  t.equal(bus.subscriberCount(randomUUID()), 0)
})

t.test('a failed write rejects its callers; the next append continues the sequence', async (t) => {
  const { store, session } = await setup(t)
  let fail = false
  const flaky = Object.create(store) as Store
  flaky.appendEvent = (...args) => (fail ? Promise.reject(new Error('disk full')) : store.appendEvent(...args))
  const bus = new EventBus(flaky)
  const seen: number[] = []
  bus.subscribe(session, (e) => seen.push(e.id))
  await bus.append(session, 'ok', null)
  fail = true
  const failing = bus.append(session, 'lost', null)
  const queued = bus.append(session, 'also lost', null)
  await t.rejects(failing, /disk full/)
  await t.rejects(queued, /disk full/)
  fail = false
  t.equal((await bus.append(session, 'ok again', null)).id, 2, 'no id was used by the failed writes')
  t.same(seen, [1, 2])
  await t.rejects(bus.append(randomUUID(), 'x', null), { code: 'session_not_found' }, 'an unknown session is refused')
})

/** Two processes' buses over one store, with wake-ups passed by hand (a relay that can lose them). */
function relayed() {
  const watchers = new Map<string, Set<(id: number | undefined) => void>>()
  const published: number[] = []
  let dropping = false
  const relay: EventRelay & { wakeAll(): void } = {
    publish(sessionId, id) {
      published.push(id)
      if (!dropping) for (const wake of watchers.get(sessionId) ?? []) wake(id)
    },
    watch(sessionId, wake) {
      const set = watchers.get(sessionId) ?? new Set()
      watchers.set(sessionId, set)
      set.add(wake)
      return () => set.delete(wake)
    },
    wakeAll() {
      for (const set of watchers.values()) for (const wake of set) wake(undefined)
    },
  }
  return { relay, published, drop: (on: boolean) => (dropping = on) }
}

t.test('with a relay, a subscriber gets the events another process appends, in order, once; a lost wake-up loses nothing', async (t) => {
  const { store, session } = await setup(t)
  const { relay, drop } = relayed()
  const writer = new EventBus(store, { relay })
  const reader = new EventBus(store, { relay })
  await writer.append(session, 'before', {})
  const heard: number[] = []
  const unsubscribe = reader.subscribe(session, (e) => heard.push(e.id))
  await reader.ready(session)
  await writer.append(session, 'a', {})
  drop(true)
  await writer.append(session, 'b', {})
  await writer.appendMessage(session, message('c'))
  drop(false)
  // a reconnection wakes every watched session: it catches up from the log
  relay.wakeAll()
  while (heard.at(-1) !== 4) await new Promise((r) => setTimeout(r, 5))
  t.same(heard, [2, 3, 4], 'the two whose wake-ups were lost, after the reconnection')
  drop(true)
  await writer.append(session, 'd', {})
  drop(false)
  await writer.append(session, 'e', {})
  // the reader delivers from its own queue: wait for the last id
  while (heard.at(-1) !== 6) await new Promise((r) => setTimeout(r, 5))
  t.same(heard, [2, 3, 4, 5, 6], 'a lost wake-up is made good by the next one')

  // the reader's process appends too: its own event and the writer's interleave in id order
  drop(true)
  await writer.append(session, 'f', {})
  drop(false)
  await reader.append(session, 'g', {})
  while (heard.at(-1) !== 8) await new Promise((r) => setTimeout(r, 5))
  t.same(heard, [2, 3, 4, 5, 6, 7, 8], 'a gap before its own append is read from the log first')
  unsubscribe()
})

t.test('with a relay and a fence, a write with an older generation than the newest is refused', async (t) => {
  const { store, session } = await setup(t)
  const { relay } = relayed()
  let generation = 3
  const bus = new EventBus(store, { relay, fence: () => generation })
  await bus.append(session, 'owner 3', {})
  await store.fenceSession(session, 4)
  await t.rejects(bus.append(session, 'stale', {}), { statusCode: 503, code: 'session_moved' })
  generation = 4
  t.equal((await bus.append(session, 'owner 4', {})).id, 2)
})
