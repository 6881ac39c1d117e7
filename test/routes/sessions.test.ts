import t from 'tap'
import { ADMIN_KEY, auth, build } from '../helpers/build.js'

t.test('POST /v1/sessions with an empty body and no content type → 201', async (t) => {
  const app = await build(t)
  const res = await app.inject({ method: 'POST', url: '/v1/sessions', headers: auth() })
  t.equal(res.statusCode, 201)
  const body = res.json()
  t.match(body, { session_id: /^[0-9a-f-]{36}$/, created_at: /Z$/, model: 'gpt-4o-mini', title: null, metadata: {} })
  const withBody = await app.inject({ method: 'POST', url: '/v1/sessions', headers: auth(), payload: { title: 'Plots', metadata: { team: 'a' } } })
  t.equal(withBody.statusCode, 201)
  t.match(withBody.json(), { title: 'Plots', metadata: { team: 'a' } })
})

t.test('get, patch, list, delete', async (t) => {
  const app = await build(t)
  const { session_id: id } = (await app.inject({ method: 'POST', url: '/v1/sessions', headers: auth(), payload: { title: 'one' } })).json()
  const got = await app.inject({ url: `/v1/sessions/${id}`, headers: auth() })
  t.equal(got.statusCode, 200)
  t.match(got.json(), { session_id: id, title: 'one', message_count: 0, updated_at: /Z$/ })
  const patched = await app.inject({ method: 'PATCH', url: `/v1/sessions/${id}`, headers: auth(), payload: { title: 'two', metadata: { k: 1 } } })
  t.equal(patched.statusCode, 200)
  t.match(patched.json(), { title: 'two', metadata: { k: 1 } })
  const list = await app.inject({ url: '/v1/sessions', headers: auth() })
  t.match(list.json(), { sessions: [{ session_id: id, title: 'two', message_count: 0 }], next_cursor: null })
  const del = await app.inject({ method: 'DELETE', url: `/v1/sessions/${id}`, headers: auth() })
  t.equal(del.statusCode, 204)
  t.equal(del.body, '')
  const gone = await app.inject({ url: `/v1/sessions/${id}`, headers: auth() })
  t.equal(gone.statusCode, 404)
  t.match(gone.json(), { error: { code: 'session_not_found', type: 'session_error' } })
})

t.test('list pagination: newest first, cursor neither skips nor repeats while creating', async (t) => {
  const app = await build(t)
  const created: string[] = []
  for (let i = 0; i < 12; i++)
    created.push((await app.inject({ method: 'POST', url: '/v1/sessions', headers: auth() })).json().session_id)
  const seen: string[] = []
  let cursor: string | null = null
  do {
    const res: { statusCode: number; json(): { sessions: { session_id: string }[]; next_cursor: string | null } } = await app.inject({ url: `/v1/sessions?limit=5${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ''}`, headers: auth() })
    t.equal(res.statusCode, 200)
    const page = res.json()
    seen.push(...page.sessions.map((s) => s.session_id))
    cursor = page.next_cursor
    await app.inject({ method: 'POST', url: '/v1/sessions', headers: auth() })
  } while (cursor)
  t.same(seen.filter((id) => created.includes(id)), [...created].reverse())
  t.equal(new Set(seen).size, seen.length, 'no repeats')
})

t.test('bad input', async (t) => {
  const app = await build(t)
  for (const limit of ['0', '101', 'abc']) {
    const res = await app.inject({ url: `/v1/sessions?limit=${limit}`, headers: auth() })
    t.equal(res.statusCode, 400, `limit=${limit}`)
    t.match(res.json(), { error: { type: 'validation_error', param: 'limit' } })
  }
  const cursor = await app.inject({ url: '/v1/sessions?cursor=%%%garbage', headers: auth() })
  t.equal(cursor.statusCode, 400)
  t.match(cursor.json(), { error: { param: 'cursor' } })
  const longTitle = await app.inject({ method: 'POST', url: '/v1/sessions', headers: auth(), payload: { title: 'x'.repeat(201) } })
  t.equal(longTitle.statusCode, 400)
  t.match(longTitle.json(), { error: { param: 'title' } })
  const bigMeta = await app.inject({ method: 'POST', url: '/v1/sessions', headers: auth(), payload: { metadata: { a: 'x'.repeat(20_000) } } })
  t.equal(bigMeta.statusCode, 400)
  t.match(bigMeta.json(), { error: { param: 'metadata' } })
  const unknownField = await app.inject({ method: 'POST', url: '/v1/sessions', headers: auth(), payload: { title: 't', bogus: 1 } })
  t.equal(unknownField.statusCode, 201, 'unknown body fields are ignored')
  t.notOk('bogus' in unknownField.json())
  for (const id of ['not-a-uuid', "1' or '1'='1", '00000000-0000-0000-0000-000000000000']) {
    const res = await app.inject({ url: `/v1/sessions/${encodeURIComponent(id)}`, headers: auth() })
    t.equal(res.statusCode, 404, id)
    t.match(res.json(), { error: { code: 'session_not_found' } })
  }
  const notObject = await app.inject({ method: 'PATCH', url: '/v1/sessions/x', headers: { ...auth(), 'content-type': 'application/json' }, payload: '[1,2]' })
  t.equal(notObject.statusCode, 400)
})

t.test('messages: empty list, after/limit, clear; 401 and 404', async (t) => {
  const app = await build(t)
  const { session_id: id } = (await app.inject({ method: 'POST', url: '/v1/sessions', headers: auth() })).json()
  const ids: string[] = []
  for (let i = 0; i < 5; i++) {
    const msg = { id: crypto.randomUUID(), role: 'user' as const, type: 'message' as const, content: `m${i}`, created_at: new Date().toISOString() }
    ids.push(msg.id)
    await app.store.appendMessage(id, msg)
  }
  const page = await app.inject({ url: `/v1/sessions/${id}/messages?limit=2`, headers: auth() })
  t.match(page.json(), { messages: [{ content: 'm0', role: 'user', type: 'message' }, { content: 'm1' }], has_more: true })
  const after = await app.inject({ url: `/v1/sessions/${id}/messages?after=${ids[3]}`, headers: auth() })
  t.match(after.json(), { messages: [{ content: 'm4' }], has_more: false })
  t.equal((await app.inject({ url: `/v1/sessions/${id}`, headers: auth() })).json().message_count, 5)
  t.equal((await app.inject({ method: 'DELETE', url: `/v1/sessions/${id}/messages`, headers: auth() })).statusCode, 204)
  t.same((await app.inject({ url: `/v1/sessions/${id}/messages`, headers: auth() })).json(), { messages: [], has_more: false })
  t.equal((await app.inject({ url: `/v1/sessions/${id}/messages` })).statusCode, 401)
  t.equal((await app.inject({ url: '/v1/sessions/nope/messages', headers: auth() })).statusCode, 404)
})

t.test("another tenant's session answers 404, never 403", async (t) => {
  const app = await build(t)
  const { session_id: id } = (await app.inject({ method: 'POST', url: '/v1/sessions', headers: auth() })).json()
  // a second tenant: a managed key record straight in the store
  const { newApiKey } = await import('../../services/auth.js')
  const { key, record } = newApiKey('other', null)
  await app.store.createApiKey(record)
  const other = auth(key)
  for (const [method, url] of [
    ['GET', `/v1/sessions/${id}`],
    ['PATCH', `/v1/sessions/${id}`],
    ['DELETE', `/v1/sessions/${id}`],
    ['GET', `/v1/sessions/${id}/messages`],
    ['DELETE', `/v1/sessions/${id}/messages`],
  ] as const) {
    const res = await app.inject({ method, url, headers: other, ...(method === 'PATCH' ? { payload: { title: 'x' } } : {}) })
    t.equal(res.statusCode, 404, `${method} ${url}`)
    t.match(res.json(), { error: { code: 'session_not_found' } })
  }
  t.same((await app.inject({ url: '/v1/sessions', headers: other })).json().sessions, [])
  t.equal((await app.inject({ url: `/v1/sessions/${id}`, headers: auth(ADMIN_KEY) })).statusCode, 200, 'still there for its owner')
})
