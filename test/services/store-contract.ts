import { randomBytes, randomUUID } from 'node:crypto'
import { setTimeout as sleep } from 'node:timers/promises'
import type { Test } from 'tap'
import type { LmcMessage } from '../../schemas/lmc.js'
import type { Store } from '../../services/store/types.js'

/**
 * The behaviour every Store must show, run against each engine. `makeStore` may hand out stores
 * over one shared database, so each case works in its own tenant and never assumes it is alone.
 */
export function storeContract(t: Test, makeStore: () => Promise<Store>): void {
  async function open(t: Test): Promise<Store> {
    const store = await makeStore()
    t.teardown(() => store.close())
    await store.migrate()
    return store
  }

  const tenant = () => `tenant-${randomUUID()}`
  const iso = () => new Date().toISOString()
  const responseId = () => `resp_${randomBytes(24).toString('hex')}`
  const message = (fields: Partial<LmcMessage> = {}): LmcMessage => ({
    id: randomUUID(),
    role: 'user',
    type: 'message',
    content: 'hello',
    created_at: iso(),
    ...fields,
  })

  t.test('migrate is idempotent and ping answers', async (t) => {
    const store = await open(t)
    await store.migrate()
    await store.ping()
    t.ok(['sqlite', 'postgres'].includes(store.engine))
  })

  t.test('create, get and update a session', async (t) => {
    const store = await open(t)
    const owner = tenant()
    const created = await store.createSession({ tenantId: owner, title: 'First', metadata: { a: 1 }, model: 'm-1' })
    t.match(created.id, /^[0-9a-f-]{36}$/)
    t.match(created, { tenantId: owner, title: 'First', metadata: { a: 1 }, model: 'm-1', messageCount: 0 })
    t.match(created.createdAt, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/)
    t.equal(created.updatedAt, created.createdAt)
    t.same(await store.getSession(owner, created.id), created)
    t.same(await store.getSession(owner, created.id.toUpperCase()), created, 'UUIDs compare case-insensitively')

    const bare = await store.createSession({ tenantId: owner, model: 'm-2' })
    t.equal(bare.title, null)
    t.same(bare.metadata, {})

    await sleep(5)
    const updated = await store.updateSession(owner, created.id, { title: 'Renamed', metadata: { b: [1, 2] } })
    t.match(updated, { id: created.id, title: 'Renamed', metadata: { b: [1, 2] }, createdAt: created.createdAt })
    t.ok(updated && updated.updatedAt > created.updatedAt, 'update moves updated_at')
    const titleOnly = await store.updateSession(owner, created.id, { title: null })
    t.match(titleOnly, { title: null, metadata: { b: [1, 2] } }, 'an absent field is left alone')
    t.same(await store.getSession(owner, created.id), titleOnly)

    for (const id of ['nope', '../etc', 'a\u0000b', '', `${created.id}x`, randomUUID()]) {
      t.equal(await store.getSession(owner, id), undefined, `get ${JSON.stringify(id)}`)
      t.equal(await store.updateSession(owner, id, { title: 'x' }), undefined, `update ${JSON.stringify(id)}`)
      t.equal(await store.deleteSession(owner, id), false, `delete ${JSON.stringify(id)}`)
    }
  })

  t.test('another tenant cannot see, change, list or delete a session', async (t) => {
    const store = await open(t)
    const owner = tenant()
    const intruder = tenant()
    const session = await store.createSession({ tenantId: owner, title: 'mine', model: 'm' })
    t.equal(await store.getSession(intruder, session.id), undefined)
    t.equal(await store.updateSession(intruder, session.id, { title: 'stolen' }), undefined)
    t.equal(await store.deleteSession(intruder, session.id), false)
    t.same(await store.listSessions(intruder, { limit: 10 }), { items: [], nextCursor: null })
    t.same(await store.getSession(owner, session.id), session, 'the owner still sees it unchanged')
  })

  t.test('listSessions pages newest first without skips or repeats', async (t) => {
    const store = await open(t)
    const owner = tenant()
    const original = new Set<string>()
    for (let i = 0; i < 25; i++) original.add((await store.createSession({ tenantId: owner, model: 'm' })).id)

    const seen: { id: string; createdAt: string }[] = []
    let cursor: string | undefined
    const pageSizes: number[] = []
    do {
      const page = await store.listSessions(owner, { limit: 10, ...(cursor && { cursor }) })
      pageSizes.push(page.items.length)
      seen.push(...page.items)
      cursor = page.nextCursor ?? undefined
    } while (cursor)
    t.same(pageSizes, [10, 10, 5])
    t.same(new Set(seen.map((s) => s.id)), original)
    const keys = seen.map((s) => `${s.createdAt}|${s.id}`)
    t.same(keys, [...keys].sort().reverse(), 'ordered by (created_at, id) descending')

    const firstPage = await store.listSessions(owner, { limit: 10 })
    const originalsSeen: string[] = firstPage.items.map((s) => s.id)
    cursor = firstPage.nextCursor ?? undefined
    let createdMeanwhile = 0
    while (cursor) {
      for (let i = 0; i < 3; i++, createdMeanwhile++) await store.createSession({ tenantId: owner, model: 'm' })
      const page = await store.listSessions(owner, { limit: 10, cursor })
      originalsSeen.push(...page.items.map((s) => s.id).filter((id) => original.has(id)))
      cursor = page.nextCursor ?? undefined
    }
    t.equal(originalsSeen.length, 25, 'every original session once while new ones are created')
    t.same(new Set(originalsSeen), original)

    const all = await store.listSessions(owner, { limit: 100 })
    t.equal(all.items.length, 25 + createdMeanwhile)
    t.equal(all.nextCursor, null)
    t.same(await store.listSessions(tenant(), { limit: 10 }), { items: [], nextCursor: null })
  })

  t.test('a malformed cursor is a 400 on the cursor parameter', async (t) => {
    const store = await open(t)
    const owner = tenant()
    const b64 = (value: unknown) => Buffer.from(JSON.stringify(value)).toString('base64url')
    for (const cursor of ['garbage!!', '', b64({}), b64(['x', 'y']), b64([iso(), 'not-a-uuid']), b64([iso()])]) {
      await t.rejects(
        store.listSessions(owner, { limit: 10, cursor }),
        { statusCode: 400, code: 'invalid_request', param: 'cursor', message: 'Invalid cursor' },
        `cursor ${JSON.stringify(cursor)}`,
      )
    }
  })

  t.test('messages append, list, page and clear', async (t) => {
    const store = await open(t)
    const owner = tenant()
    const session = await store.createSession({ tenantId: owner, model: 'm' })
    const sent: LmcMessage[] = [
      message({ content: 'plot a sine wave' }),
      message({ role: 'assistant', type: 'code', format: 'python', content: 'import math' }),
      message({ role: 'computer', type: 'console', format: 'output', stream: 'stderr', content: 'warn\n' }),
      message({
        role: 'computer',
        type: 'confirmation',
        format: 'execution',
        content: { type: 'code', format: 'python', content: 'print(1)' },
      }),
      message({ role: 'computer', type: 'console', format: 'output', stream: 'stdout', content: 'a\u0000b' }),
      message({ role: 'assistant', content: 'done', recipient: 'user' }),
    ]
    await sleep(5)
    const events = []
    for (const m of sent) events.push(await store.appendMessage(session.id, m))
    t.same(
      events.map((e) => [e.id, e.type]),
      sent.map((_, i) => [i + 1, 'message']),
    )
    t.same(events[3]?.data, sent[3], 'the event carries the message')

    const stored = await store.allMessages(session.id)
    t.strictSame(stored, sent, 'object content, NUL bytes and optional fields round-trip exactly')
    t.notOk('format' in (stored[0] as object), 'absent optional fields stay absent')

    const after = await store.getSession(owner, session.id)
    t.equal(after?.messageCount, 6)
    t.ok(after && after.updatedAt > session.updatedAt, 'appending moves updated_at')

    const first = await store.listMessages(session.id, { limit: 2 })
    t.strictSame(first, { messages: sent.slice(0, 2), hasMore: true })
    const next = await store.listMessages(session.id, { limit: 2, after: sent[1]?.id })
    t.strictSame(next, { messages: sent.slice(2, 4), hasMore: true })
    const rest = await store.listMessages(session.id, { limit: 2, after: sent[3]?.id })
    t.strictSame(rest, { messages: sent.slice(4), hasMore: false }, 'exactly limit left: no more')
    t.strictSame(await store.listMessages(session.id, { limit: 10, after: sent[5]?.id }), { messages: [], hasMore: false })
    for (const bad of [randomUUID(), 'not-an-id']) {
      await t.rejects(store.listMessages(session.id, { limit: 10, after: bad }), {
        statusCode: 400,
        code: 'invalid_request',
        param: 'after',
        message: /after/,
      })
    }
    const otherSession = await store.createSession({ tenantId: owner, model: 'm' })
    await t.rejects(
      store.listMessages(otherSession.id, { limit: 10, after: sent[0]?.id }),
      { param: 'after', message: /after/ },
      'after must name a message of this session',
    )

    await store.clearMessages(session.id)
    t.same(await store.allMessages(session.id), [])
    t.equal((await store.getSession(owner, session.id))?.messageCount, 0)
    const again = await store.appendMessage(session.id, message())
    t.equal(again.id, 7, 'event ids continue after a clear')
    t.equal((await store.allMessages(session.id)).length, 1)
    t.equal((await store.listEvents(session.id, { limit: 100 })).events.length, 7, 'the event log is kept')
  })

  t.test('fencing: a write with an older lease generation than the newest is refused and stores nothing', async (t) => {
    const store = await open(t)
    const owner = tenant()
    const session = await store.createSession({ tenantId: owner, model: 'm' })
    t.equal((await store.appendEvent(session.id, 'status', { by: 'unfenced' })).id, 1, 'no fence: as before')
    t.equal((await store.appendEvent(session.id, 'status', { by: 'gen 5' }, 5)).id, 2)
    // a new owner took the session over: generation 9 is recorded before it writes anything
    await store.fenceSession(session.id, 9)
    await t.rejects(store.appendEvent(session.id, 'status', { by: 'gen 5, late' }, 5), { statusCode: 503, code: 'session_moved' })
    await t.rejects(store.appendMessage(session.id, message({ content: 'late' }), 5), { statusCode: 503, code: 'session_moved' })
    t.equal((await store.appendMessage(session.id, message({ content: 'new owner' }), 9)).id, 3, 'the new owner writes on, no id lost')
    await store.fenceSession(session.id, 7)
    t.equal((await store.appendEvent(session.id, 'status', {}, 9)).id, 4, 'a smaller fence never lowers the recorded one')
    t.same((await store.allMessages(session.id)).map((m) => m.content), ['new owner'])
    t.equal((await store.getSession(owner, session.id))?.messageCount, 1)
    await t.rejects(store.appendEvent(randomUUID(), 'status', {}, 1), { statusCode: 404, code: 'session_not_found' }, 'a missing session is still 404')
  })

  t.test('appendEntries stores a batch in order, in one transaction', async (t) => {
    const store = await open(t)
    const owner = tenant()
    const session = await store.createSession({ tenantId: owner, model: 'm' })
    const first = await store.appendEvent(session.id, 'status', { phase: 'before' })
    const sent = [message({ content: 'one' }), message({ content: 'two' })]
    const events = await store.appendEntries(session.id, [
      { message: sent[0]! },
      { type: 'run_started', data: { model: 'm' } },
      { message: sent[1]! },
    ])
    t.same(
      events.map((e) => [e.id, e.type]),
      [
        [2, 'message'],
        [3, 'run_started'],
        [4, 'message'],
      ],
      'ids continue the one sequence, in the order given',
    )
    t.same(events[1]?.data, { model: 'm' })
    t.strictSame(await store.allMessages(session.id), sent)
    t.equal((await store.getSession(owner, session.id))?.messageCount, 2)
    t.same((await store.listEvents(session.id, { limit: 10 })).events, [first, ...events])
    t.same(await store.appendEntries(session.id, []), [], 'an empty batch stores nothing')

    // the event after the message cannot be serialized: the message written before it must go too
    const broken = store.appendEntries(session.id, [{ message: message({ content: 'lost' }) }, { type: 'bad', data: { n: 1n } }])
    await t.rejects(broken, TypeError)
    t.equal((await store.allMessages(session.id)).length, 2, 'a failed batch leaves no message behind')
    t.equal((await store.getSession(owner, session.id))?.messageCount, 2, 'nor a count')
    t.equal((await store.appendEvent(session.id, 'after', null)).id, 5, 'nor a gap in the event ids')

    await t.rejects(store.appendEntries(randomUUID(), [{ message: message() }]), { statusCode: 404, code: 'session_not_found' })
  })

  t.test('appending to a missing session throws and stores nothing', async (t) => {
    const store = await open(t)
    const missing = randomUUID()
    await t.rejects(store.appendMessage(missing, message()), { statusCode: 404, code: 'session_not_found' })
    await t.rejects(store.appendEvent(missing, 'status', {}), { statusCode: 404, code: 'session_not_found' })
    await t.rejects(store.appendMessage('not-a-uuid', message()), { code: 'session_not_found' })
    t.same(await store.allMessages(missing), [])
    t.same(await store.listEvents(missing, { limit: 10 }), { events: [], hasMore: false })
    t.same(await store.listMessages('not-a-uuid', { limit: 10 }), { messages: [], hasMore: false })
    await store.clearMessages(missing)
  })

  t.test('event ids are 1..n without gaps under concurrency', async (t) => {
    const store = await open(t)
    const session = await store.createSession({ tenantId: tenant(), model: 'm' })
    const appended = await Promise.all(
      Array.from({ length: 50 }, (_, i) => store.appendEvent(session.id, 'tick', { i })),
    )
    t.same(
      appended.map((e) => e.id).sort((a, b) => a - b),
      Array.from({ length: 50 }, (_, i) => i + 1),
    )
    const { events, hasMore } = await store.listEvents(session.id, { limit: 100 })
    t.equal(hasMore, false)
    t.same(
      events.map((e) => e.id),
      Array.from({ length: 50 }, (_, i) => i + 1),
    )
    for (const e of events) t.same(e, appended.find((a) => a.id === e.id))

    const mixed = await store.createSession({ tenantId: tenant(), model: 'm' })
    await Promise.all(
      Array.from({ length: 40 }, (_, i) =>
        i % 2 ? store.appendEvent(mixed.id, 'tick', null) : store.appendMessage(mixed.id, message()),
      ),
    )
    const log = await store.listEvents(mixed.id, { limit: 100 })
    t.same(
      log.events.map((e) => e.id),
      Array.from({ length: 40 }, (_, i) => i + 1),
      'messages and events share one gapless sequence',
    )
    t.equal((await store.allMessages(mixed.id)).length, 20)
  })

  t.test('listEvents honours start, end, reverse and limit', async (t) => {
    const store = await open(t)
    const session = await store.createSession({ tenantId: tenant(), model: 'm' })
    const payloads: unknown[] = [{ nested: { a: [1, 'two', null] } }, 'text', 42, null, true]
    for (let i = 0; i < 20; i++) await store.appendEvent(session.id, i % 2 ? 'odd' : 'even', payloads[i % 5])
    const ids = async (opts: Parameters<Store['listEvents']>[1]) => {
      const { events, hasMore } = await store.listEvents(session.id, opts)
      return { ids: events.map((e) => e.id), hasMore }
    }
    const range = (from: number, to: number) =>
      Array.from({ length: Math.abs(to - from) + 1 }, (_, i) => (from <= to ? from + i : from - i))

    t.same(await ids({ limit: 5 }), { ids: range(1, 5), hasMore: true })
    t.same(await ids({ limit: 20 }), { ids: range(1, 20), hasMore: false })
    t.same(await ids({ startId: 6, limit: 5 }), { ids: range(6, 10), hasMore: true })
    t.same(await ids({ startId: 16, limit: 5 }), { ids: range(16, 20), hasMore: false })
    t.same(await ids({ endId: 3, limit: 10 }), { ids: range(1, 3), hasMore: false })
    t.same(await ids({ startId: 4, endId: 8, limit: 10 }), { ids: range(4, 8), hasMore: false })
    t.same(await ids({ startId: 4, endId: 8, limit: 3 }), { ids: range(4, 6), hasMore: true })
    t.same(await ids({ reverse: true, limit: 5 }), { ids: range(20, 16), hasMore: true })
    t.same(await ids({ reverse: true, startId: 10, limit: 3 }), { ids: range(10, 8), hasMore: true })
    t.same(await ids({ reverse: true, startId: 10, endId: 8, limit: 10 }), { ids: range(10, 8), hasMore: false })
    t.same(await ids({ reverse: true, endId: 18, limit: 10 }), { ids: range(20, 18), hasMore: false })
    t.same(await ids({ startId: 21, limit: 10 }), { ids: [], hasMore: false })

    const { events } = await store.listEvents(session.id, { limit: 5 })
    t.same(
      events.map((e) => [e.type, e.data]),
      payloads.map((p, i) => [i % 2 ? 'odd' : 'even', p]),
      'types and JSON data round-trip',
    )
    t.match(events[0]?.createdAt, /Z$/)
    const undefinedData = await store.appendEvent(session.id, 'empty', undefined)
    t.equal(undefinedData.data, null)

    const other = await store.createSession({ tenantId: tenant(), model: 'm' })
    t.equal((await store.appendEvent(other.id, 'first', {})).id, 1, 'each session counts from 1')
  })

  t.test('deleteSession removes messages and events with it', async (t) => {
    const store = await open(t)
    const owner = tenant()
    const session = await store.createSession({ tenantId: owner, model: 'm' })
    const keep = await store.createSession({ tenantId: owner, model: 'm' })
    for (const s of [session, keep]) {
      await store.appendMessage(s.id, message())
      await store.appendEvent(s.id, 'status', { ok: true })
    }
    t.equal(await store.deleteSession(tenant(), session.id), false)
    t.equal((await store.allMessages(session.id)).length, 1, 'a refused delete touches nothing')

    t.equal(await store.deleteSession(owner, session.id), true)
    t.equal(await store.getSession(owner, session.id), undefined)
    t.same(await store.allMessages(session.id), [])
    t.same(await store.listEvents(session.id, { limit: 10 }), { events: [], hasMore: false })
    t.equal(await store.deleteSession(owner, session.id), false, 'a second delete finds nothing')
    await t.rejects(store.appendMessage(session.id, message()), { code: 'session_not_found' })

    t.equal((await store.allMessages(keep.id)).length, 1, 'other sessions keep their data')
    t.equal((await store.listEvents(keep.id, { limit: 10 })).events.length, 2)
  })

  t.test('listIdleSessions finds sessions not updated since a point in time', async (t) => {
    const store = await open(t)
    const owner = tenant()
    const old = await store.createSession({ tenantId: owner, model: 'm' })
    const touched = await store.createSession({ tenantId: owner, model: 'm' })
    await sleep(5)
    const cutoff = iso()
    await sleep(5)
    const fresh = await store.createSession({ tenantId: owner, model: 'm' })
    await sleep(5)
    await store.appendMessage(touched.id, message())

    const ours = new Set([old.id, touched.id, fresh.id])
    const idle = (await store.listIdleSessions(cutoff, 100_000)).filter((s) => ours.has(s.id))
    t.same(idle, [{ id: old.id, tenantId: owner }])
    t.same((await store.listIdleSessions('2000-01-01T00:00:00.000Z', 100_000)).filter((s) => ours.has(s.id)), [])
    const later = (await store.listIdleSessions('9999-01-01T00:00:00.000Z', 100_000)).filter((s) => ours.has(s.id))
    t.same(
      later.map((s) => s.id),
      [old.id, fresh.id, touched.id],
      'oldest update first',
    )
    t.equal((await store.listIdleSessions('9999-01-01T00:00:00.000Z', 2)).length, 2, 'limit applies')
  })

  t.test('suspended turns: one per session, replaced, claimed once, gone with the session', async (t) => {
    const store = await open(t)
    const owner = tenant()
    const session = await store.createSession({ tenantId: owner, model: 'm' })
    t.equal(await store.getSuspendedTurn(session.id), undefined)
    const state = { toolCalls: [{ id: 'call_1', name: 'get_weather', arguments: '{"city":"Paris \u0000"}' }], iterations: 2 }
    const first = await store.putSuspendedTurn({ id: randomUUID(), sessionId: session.id, reason: 'tool_calls', state })
    t.match(first.createdAt, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/)
    t.same(await store.getSuspendedTurn(session.id), first)
    t.same((await store.getSuspendedTurn(session.id.toUpperCase()))?.state, state, 'the state comes back as it went in')

    const second = await store.putSuspendedTurn({ id: randomUUID(), sessionId: session.id, reason: 'confirmation', state: { n: 1 } })
    t.same(await store.getSuspendedTurn(session.id), second, 'a new suspension replaces the old one')
    t.equal(await store.claimSuspendedTurn(session.id, first.id), false, 'a stale id claims nothing')
    const claims = await Promise.all([store.claimSuspendedTurn(session.id, second.id), store.claimSuspendedTurn(session.id, second.id)])
    t.same(claims.sort(), [false, true], 'two claims of one suspension: exactly one wins')
    t.equal(await store.getSuspendedTurn(session.id), undefined)

    await store.putSuspendedTurn({ id: randomUUID(), sessionId: session.id, reason: 'confirmation', state: {} })
    t.ok(await store.deleteSession(owner, session.id))
    t.equal(await store.getSuspendedTurn(session.id), undefined, 'deleting the session deletes its suspended turn')
    await t.rejects(store.putSuspendedTurn({ id: randomUUID(), sessionId: session.id, reason: 'confirmation', state: {} }), { code: 'session_not_found' })
    await t.rejects(store.putSuspendedTurn({ id: randomUUID(), sessionId: 'not-a-uuid', reason: 'confirmation', state: {} }), { code: 'session_not_found' })
    t.equal(await store.getSuspendedTurn('a\u0000b'), undefined)
    t.equal(await store.claimSuspendedTurn('a\u0000b', 'x'), false)
  })

  t.test('API keys', async (t) => {
    const store = await open(t)
    const key = (name: string, createdAt: string) => ({
      id: randomUUID(),
      name,
      prefix: `oik_${name}`,
      hash: randomUUID().replaceAll('-', '').repeat(2),
      createdAt,
      expiresAt: null,
      lastUsedAt: null,
    })
    const a = key('a', '2030-01-01T00:00:00.000Z')
    const b = { ...key('b', '2030-01-02T00:00:00.000Z'), expiresAt: '2031-01-01T00:00:00.000Z' }
    await store.createApiKey(b)
    await store.createApiKey(a)
    t.same(await store.findApiKeyByHash(a.hash), a)
    t.same(await store.findApiKeyByHash(b.hash), b)
    t.equal(await store.findApiKeyByHash('0'.repeat(64)), undefined)
    const ours = (await store.listApiKeys()).filter((k) => k.id === a.id || k.id === b.id)
    t.same(ours, [a, b], 'oldest first')
    await t.rejects(store.createApiKey({ ...key('dup', iso()), hash: a.hash }), 'hashes are unique')

    await store.markApiKeysUsed([])
    await store.markApiKeysUsed([
      { id: a.id, at: '2030-02-01T00:00:00.000Z' },
      { id: a.id, at: '2030-03-01T00:00:00.000Z' },
      { id: a.id, at: '2030-02-15T00:00:00.000Z' },
      { id: b.id, at: '2030-04-01T00:00:00.000Z' },
      { id: randomUUID(), at: '2030-04-01T00:00:00.000Z' },
    ])
    t.equal((await store.findApiKeyByHash(a.hash))?.lastUsedAt, '2030-03-01T00:00:00.000Z', 'the latest use wins')
    t.equal((await store.findApiKeyByHash(b.hash))?.lastUsedAt, '2030-04-01T00:00:00.000Z')
    await store.markApiKeysUsed([{ id: a.id, at: '2030-01-15T00:00:00.000Z' }])
    t.equal((await store.findApiKeyByHash(a.hash))?.lastUsedAt, '2030-03-01T00:00:00.000Z', 'never moves back')

    t.equal(await store.deleteApiKey(a.id), true)
    t.equal(await store.deleteApiKey(a.id), false)
    t.equal(await store.findApiKeyByHash(a.hash), undefined)
    t.ok(await store.findApiKeyByHash(b.hash))
  })

  t.test('settings per tenant', async (t) => {
    const store = await open(t)
    const one = tenant()
    const two = tenant()
    t.same(await store.getSettings(one), {})
    await store.putSettings(one, { model: 'gpt', temperature: 0.2, auto_run: false })
    t.same(await store.getSettings(one), { model: 'gpt', temperature: 0.2, auto_run: false })
    await store.putSettings(one, { max_iterations: 5 })
    t.same(await store.getSettings(one), { max_iterations: 5 }, 'put replaces')
    t.same(await store.getSettings(two), {})
  })

  t.test('secrets per tenant', async (t) => {
    const store = await open(t)
    const one = tenant()
    const two = tenant()
    t.same(await store.listSecrets(one), [])
    await store.putSecret(one, 'ZED', 'c-zed')
    await store.putSecret(one, 'ALPHA', 'c-alpha-1')
    const before = await store.listSecrets(one)
    t.same(
      before.map((s) => [s.name, s.ciphertext]),
      [
        ['ALPHA', 'c-alpha-1'],
        ['ZED', 'c-zed'],
      ],
    )
    await sleep(5)
    await store.putSecret(one, 'ALPHA', 'c-alpha-2')
    const alpha = (await store.listSecrets(one)).find((s) => s.name === 'ALPHA')
    t.equal(alpha?.ciphertext, 'c-alpha-2')
    t.equal(alpha?.createdAt, before[0]?.createdAt, 'overwrite keeps created_at')
    t.ok(alpha && alpha.updatedAt > alpha.createdAt, 'and moves updated_at')

    t.same(await store.listSecrets(two), [])
    t.equal(await store.deleteSecret(two, 'ALPHA'), false, 'another tenant cannot delete it')
    t.equal(await store.deleteSecret(one, 'ALPHA'), true)
    t.equal(await store.deleteSecret(one, 'ALPHA'), false)
    t.same(
      (await store.listSecrets(one)).map((s) => s.name),
      ['ZED'],
    )
  })

  t.test('responses: create, get, update, delete, per tenant', async (t) => {
    const store = await open(t)
    const owner = tenant()
    const intruder = tenant()
    const session = await store.createSession({ tenantId: owner, model: 'm' })
    const id = responseId()
    const user = message({ content: 'hi' })
    const record = {
      id,
      tenantId: owner,
      sessionId: session.id,
      previousResponseId: null,
      status: 'in_progress',
      createdAt: iso(),
      response: { id, object: 'response', status: 'in_progress', output: [] },
      input: [{ id: 'msg_1', type: 'message', role: 'user', content: [{ type: 'input_text', text: 'hi' }] }],
      messages: [user],
    }
    await store.createResponse(record)
    t.same(await store.getResponse(owner, id), record)
    t.equal(await store.getResponse(intruder, id), undefined, 'another tenant cannot see it')
    t.equal(await store.updateResponse(intruder, id, { status: 'completed', response: {}, messages: [] }), false)
    t.equal(await store.deleteResponse(intruder, id), false)

    const answer = message({ role: 'assistant', content: 'hello' })
    t.equal(await store.updateResponse(owner, id, { status: 'completed', response: { id, status: 'completed' }, messages: [user, answer] }), true)
    t.match(await store.getResponse(owner, id), { status: 'completed', response: { status: 'completed' }, messages: [user, answer], input: record.input })

    const output = [
      { id: `msg_${'a'.repeat(32)}`, type: 'message', role: 'assistant', content: [{ type: 'output_text', text: 'hello' }] },
      { id: `fc_${'b'.repeat(32)}`, type: 'function_call', call_id: 'call_1', name: 'f', arguments: '{}' },
    ]
    t.equal(await store.updateResponse(owner, id, { status: 'completed', response: { id, status: 'completed', output }, messages: [user, answer] }), true)
    const items = await store.getResponseItems(owner, [output[0]!.id, output[1]!.id, `msg_${'c'.repeat(32)}`, 'msg_\u0000', 'x'])
    t.same([...items.keys()].sort(), [output[1]!.id, output[0]!.id].sort(), 'output items are found by id; unknown ids are left out')
    t.same(items.get(output[0]!.id), output[0])
    t.equal((await store.getResponseItems(intruder, [output[0]!.id])).size, 0, 'not by another tenant')

    for (const bad of ['nope', `${id}0`, id.toUpperCase(), 'resp_\u0000', '']) {
      t.equal(await store.getResponse(owner, bad), undefined, `get ${JSON.stringify(bad)}`)
      t.equal(await store.deleteResponse(owner, bad), false, `delete ${JSON.stringify(bad)}`)
      t.equal(await store.responseContext(owner, bad), undefined, `context ${JSON.stringify(bad)}`)
    }
    t.equal(await store.deleteResponse(owner, id), true)
    t.equal(await store.getResponse(owner, id), undefined)
    t.equal((await store.getResponseItems(owner, [output[0]!.id])).size, 0, 'its items go with it')
    t.equal(await store.deleteResponse(owner, id), false)
  })

  t.test('responseContext walks previous_response_id oldest first, within the tenant', async (t) => {
    const store = await open(t)
    const owner = tenant()
    const session = await store.createSession({ tenantId: owner, model: 'm' })
    const make = async (previous: string | null, text: string) => {
      const id = responseId()
      const messages = [message({ content: text }), message({ role: 'assistant', content: `re: ${text}` })]
      await store.createResponse({ id, tenantId: owner, sessionId: session.id, previousResponseId: previous, status: 'completed', createdAt: iso(), response: {}, input: [], messages })
      return { id, messages }
    }
    const first = await make(null, 'one')
    const second = await make(first.id, 'two')
    const branch = await make(first.id, 'branch')
    const third = await make(second.id, 'three')
    t.same(await store.responseContext(owner, third.id), [...first.messages, ...second.messages, ...third.messages])
    t.same(await store.responseContext(owner, branch.id), [...first.messages, ...branch.messages], 'a branch sees only its own ancestors')
    t.equal(await store.responseContext(tenant(), third.id), undefined, 'another tenant has no such response')
    await store.deleteResponse(owner, second.id)
    t.same(await store.responseContext(owner, third.id), third.messages, 'the walk stops at a deleted link')
  })

  t.test('deleteSession removes its responses', async (t) => {
    const store = await open(t)
    const owner = tenant()
    const session = await store.createSession({ tenantId: owner, model: 'm' })
    const id = responseId()
    await store.createResponse({ id, tenantId: owner, sessionId: session.id, previousResponseId: null, status: 'in_progress', createdAt: iso(), response: {}, input: [], messages: [] })
    const item = { id: `ci_${'d'.repeat(32)}`, type: 'code_interpreter_call' }
    await store.updateResponse(owner, id, { status: 'completed', response: { output: [item] }, messages: [] })
    t.equal(await store.deleteSession(owner, session.id), true)
    t.equal(await store.getResponse(owner, id), undefined)
    t.equal((await store.getResponseItems(owner, [item.id])).size, 0)
  })
}
