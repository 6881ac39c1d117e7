import { createHash, randomUUID } from 'node:crypto'
import t from 'tap'
import { newApiKey } from '../../services/auth.js'
import { auth, build, type FastifyInstance } from '../helpers/build.js'

async function createKey(app: FastifyInstance, payload: Record<string, unknown> = { name: 'ci' }) {
  return app.inject({ method: 'POST', url: '/v1/keys', headers: auth(), payload })
}

t.test('admin creates a key: oik_… shown once, stored hashed, listed by prefix only', async (t) => {
  const app = await build(t)
  const expires = new Date(Date.now() + 86_400_000).toISOString()
  const res = await createKey(app, { name: 'deploy bot', expires_at: expires })
  t.equal(res.statusCode, 201)
  t.equal(res.headers['cache-control'], 'no-store')
  t.ok(res.headers['x-request-id'])
  const created = res.json()
  t.match(created, {
    id: /^[0-9a-f-]{36}$/,
    name: 'deploy bot',
    key: /^oik_[A-Za-z0-9_-]{43}$/,
    created_at: /Z$/,
    expires_at: expires,
    last_used_at: null,
  })
  t.equal(created.prefix, created.key.slice(0, 12))
  t.same(Object.keys(created).sort(), ['created_at', 'expires_at', 'id', 'key', 'last_used_at', 'name', 'prefix'])

  const list = await app.inject({ url: '/v1/keys', headers: auth() })
  t.equal(list.statusCode, 200)
  t.same(list.json(), {
    keys: [{ id: created.id, name: 'deploy bot', prefix: created.prefix, created_at: created.created_at, expires_at: expires, last_used_at: null }],
  })
  t.notMatch(list.body, created.key, 'the key is never shown again')
  t.notMatch(list.body, /"hash"/)

  // the store holds its SHA-256, not the key
  const record = await app.store.findApiKeyByHash(createHash('sha256').update(created.key).digest('hex'))
  t.equal(record?.id, created.id)
  t.notMatch(JSON.stringify(await app.store.listApiKeys()), created.key)

  // two keys never collide
  const second = (await createKey(app)).json()
  t.not(second.key, created.key)
  t.not(second.id, created.id)
})

t.test('a managed key is its own tenant: sessions are invisible across tenants', async (t) => {
  const app = await build(t)
  const { key } = (await createKey(app, { name: 'tenant' })).json()
  const { key: otherKey } = (await createKey(app, { name: 'other tenant' })).json()

  const mine = await app.inject({ method: 'POST', url: '/v1/sessions', headers: auth(key), payload: { title: 'tenant session' } })
  t.equal(mine.statusCode, 201)
  const tenantSession = mine.json().session_id
  const adminSession = (await app.inject({ method: 'POST', url: '/v1/sessions', headers: auth(), payload: { title: 'admin session' } })).json().session_id

  t.equal((await app.inject({ url: `/v1/sessions/${tenantSession}`, headers: auth(key) })).statusCode, 200)
  for (const [who, headers, id] of [
    ['admin → tenant', auth(), tenantSession],
    ['tenant → admin', auth(key), adminSession],
    ['tenant → other tenant', auth(otherKey), tenantSession],
  ] as const) {
    for (const url of [`/v1/sessions/${id}`, `/v1/sessions/${id}/messages`, `/v1/sessions/${id}/events`, `/v1/sessions/${id}/files`]) {
      const res = await app.inject({ url, headers })
      t.equal(res.statusCode, 404, `${who}: GET ${url}`)
      t.match(res.json(), { error: { code: 'session_not_found' } })
    }
    const del = await app.inject({ method: 'DELETE', url: `/v1/sessions/${id}`, headers })
    t.equal(del.statusCode, 404, `${who}: DELETE`)
    const put = await app.inject({ method: 'PUT', url: `/v1/sessions/${id}/files/content?path=x.txt`, headers, payload: 'x' })
    t.equal(put.statusCode, 404, `${who}: PUT file`)
  }
  const adminList = (await app.inject({ url: '/v1/sessions', headers: auth() })).json().sessions.map((s: { session_id: string }) => s.session_id)
  const tenantList = (await app.inject({ url: '/v1/sessions', headers: auth(key) })).json().sessions.map((s: { session_id: string }) => s.session_id)
  t.same(adminList, [adminSession])
  t.same(tenantList, [tenantSession])
  t.same((await app.inject({ url: '/v1/sessions', headers: auth(otherKey) })).json().sessions, [])
  t.equal((await app.inject({ url: `/v1/sessions/${tenantSession}`, headers: auth(key) })).json().title, 'tenant session', 'still there')
})

t.test('a tenant calling /v1/keys → 403 permission_error', async (t) => {
  const app = await build(t)
  const { key, id } = (await createKey(app)).json()
  for (const [method, url, payload] of [
    ['GET', '/v1/keys', undefined],
    ['POST', '/v1/keys', { name: 'escalate' }],
    ['DELETE', `/v1/keys/${id}`, undefined],
  ] as const) {
    const res = await app.inject({ method, url, headers: auth(key), payload })
    t.equal(res.statusCode, 403, `${method} ${url}`)
    t.same(res.json(), { error: { message: 'This route needs an admin key', type: 'permission_error', code: 'forbidden', param: null } })
  }
  t.equal((await app.inject({ url: '/v1/keys', headers: auth() })).json().keys.length, 1, 'nothing was created or deleted')
})

t.test('expiry: a past expires_at → 400; an expired key → 401', async (t) => {
  const app = await build(t)
  const past = await createKey(app, { name: 'late', expires_at: new Date(Date.now() - 1000).toISOString() })
  t.equal(past.statusCode, 400)
  t.match(past.json(), { error: { type: 'validation_error', param: 'expires_at', message: /future/ } })

  const { key, record } = newApiKey('expired', new Date(Date.now() - 60_000).toISOString())
  await app.store.createApiKey(record)
  const res = await app.inject({ url: '/v1/sessions', headers: auth(key) })
  t.equal(res.statusCode, 401)
  t.same(res.json(), { error: { message: 'Invalid API key', type: 'auth_error', code: 'invalid_api_key', param: null } })

  // a key that expires while in use stops working at its expiry
  const soon = (await createKey(app, { name: 'soon', expires_at: new Date(Date.now() + 1500).toISOString() })).json()
  t.equal((await app.inject({ url: '/v1/sessions', headers: auth(soon.key) })).statusCode, 200)
  await new Promise((r) => setTimeout(r, 1600))
  t.equal((await app.inject({ url: '/v1/sessions', headers: auth(soon.key) })).statusCode, 401)

  const nullExpiry = await createKey(app, { name: 'forever', expires_at: null })
  t.equal(nullExpiry.statusCode, 201)
  t.equal(nullExpiry.json().expires_at, null)
})

t.test('DELETE revokes: the next request with the key is 401', async (t) => {
  const app = await build(t)
  const { key, id } = (await createKey(app)).json()
  t.equal((await app.inject({ url: '/v1/sessions', headers: auth(key) })).statusCode, 200)
  const del = await app.inject({ method: 'DELETE', url: `/v1/keys/${id}`, headers: auth() })
  t.equal(del.statusCode, 204)
  t.equal(del.body, '')
  const after = await app.inject({ url: '/v1/sessions', headers: auth(key) })
  t.equal(after.statusCode, 401)
  t.match(after.json(), { error: { code: 'invalid_api_key' } })
  t.same((await app.inject({ url: '/v1/keys', headers: auth() })).json(), { keys: [] })
  const again = await app.inject({ method: 'DELETE', url: `/v1/keys/${id}`, headers: auth() })
  t.equal(again.statusCode, 404)
})

t.test('last_used_at is set after use (GET /v1/keys flushes the debounced writes)', async (t) => {
  const app = await build(t)
  const { key, id } = (await createKey(app)).json()
  const before = Date.now()
  t.equal((await app.inject({ url: '/v1/sessions', headers: auth(key) })).statusCode, 200)
  const [listed] = (await app.inject({ url: '/v1/keys', headers: auth() })).json().keys
  t.equal(listed.id, id)
  t.match(listed.last_used_at, /Z$/)
  t.ok(Date.parse(listed.last_used_at) >= before - 5, 'a recent time')
  // unused keys stay null
  const unused = (await createKey(app, { name: 'idle' })).json()
  const keys = (await app.inject({ url: '/v1/keys', headers: auth() })).json().keys
  t.equal(keys.find((k: { id: string }) => k.id === unused.id).last_used_at, null)
})

t.test('keys: 401, 404 and bad input', async (t) => {
  const app = await build(t)
  for (const [method, url] of [
    ['GET', '/v1/keys'],
    ['POST', '/v1/keys'],
    ['DELETE', `/v1/keys/${randomUUID()}`],
  ] as const) {
    const res = await app.inject({ method, url, payload: method === 'POST' ? { name: 'x' } : undefined })
    t.equal(res.statusCode, 401, `${method} ${url}`)
    t.match(res.json(), { error: { type: 'auth_error', code: 'missing_api_key' } })
    t.ok(res.headers['x-ratelimit-limit'], 'rate-limit headers on 401')
  }
  const missing = await app.inject({ method: 'DELETE', url: `/v1/keys/${randomUUID()}`, headers: auth() })
  t.equal(missing.statusCode, 404)
  t.match(missing.json(), { error: { type: 'not_found_error', code: 'not_found' } })
  t.equal((await app.inject({ method: 'DELETE', url: '/v1/keys/not-a-uuid', headers: auth() })).statusCode, 404)

  for (const [payload, param] of [
    [{}, 'name'],
    [{ name: '' }, 'name'],
    [{ name: 'x'.repeat(101) }, 'name'],
    [{ name: 'ok', expires_at: 'tomorrow' }, 'expires_at'],
    [{ name: 'ok', expires_at: 12 }, 'expires_at'],
    [{ name: 'ok', expires_at: '' }, 'expires_at'],
  ] as const) {
    const res = await createKey(app, payload as Record<string, unknown>)
    t.equal(res.statusCode, 400, JSON.stringify(payload))
    t.match(res.json(), { error: { type: 'validation_error', param } }, JSON.stringify(payload))
  }
  const badJson = await app.inject({ method: 'POST', url: '/v1/keys', headers: { ...auth(), 'content-type': 'application/json' }, payload: '{' })
  t.equal(badJson.statusCode, 400)
  t.match(badJson.json(), { error: { code: 'invalid_json' } })
  // unknown fields cannot smuggle anything into the record
  const extra = await createKey(app, { name: 'plain', admin: true, hash: 'abc', prefix: 'oik_chosen' })
  t.equal(extra.statusCode, 201)
  t.not(extra.json().prefix, 'oik_chosen')
  t.equal((await app.inject({ url: '/v1/keys', headers: auth(extra.json().key) })).statusCode, 403, 'still not an admin')
  t.equal((await app.store.listApiKeys()).length, 1)
})
