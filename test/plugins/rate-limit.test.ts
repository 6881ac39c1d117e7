import { randomUUID } from 'node:crypto'
import t from 'tap'
import { auth, build, type FastifyInstance } from '../helpers/build.js'

/*
 * The per-session limit, on routes that name their session three ways: the path (execute), the
 * body (chat, chat/completions) and the X-Session-Id header (chat/completions). No upstream is
 * configured and the language is unknown, so every request that passes the limiter is answered
 * at once (503 or 400): only the limiter's 429 matters here.
 */

const limited = (app: FastifyInstance, key: string | undefined, how: 'path' | 'body' | 'header', id: string) => {
  switch (how) {
    case 'path':
      return app.inject({ method: 'POST', url: `/v1/sessions/${id}/execute`, headers: auth(key), payload: { language: 'no-such-language', code: '1' } })
    case 'body':
      return app.inject({ method: 'POST', url: '/v1/chat', headers: auth(key), payload: { session_id: id, messages: [{ role: 'user', type: 'message', content: 'hi' }] } })
    case 'header':
      return app.inject({
        method: 'POST',
        url: '/v1/chat/completions',
        headers: { ...auth(key), 'x-session-id': id },
        payload: { messages: [{ role: 'user', content: 'hi' }] },
      })
  }
}

async function setup(t: Parameters<typeof build>[0], perMinute: number) {
  const app = await build(t, { SESSION_RATE_LIMIT_PER_MINUTE: String(perMinute), SANDBOX: 'none' })
  const tenant = (await app.inject({ method: 'POST', url: '/v1/keys', headers: auth(), payload: { name: 'tenant' } })).json().key as string
  const session = async (key?: string) => (await app.inject({ method: 'POST', url: '/v1/sessions', headers: auth(key) })).json().session_id as string
  return { app, tenant, session }
}

t.test('every spelling of a session id, from path, body or header, counts against one bucket', async (t) => {
  const { app, session } = await setup(t, 3)
  const id = await session()
  const mixed = id.slice(0, 8).toUpperCase() + id.slice(8)
  const statuses = [
    (await limited(app, undefined, 'path', id.toUpperCase())).statusCode,
    (await limited(app, undefined, 'body', mixed)).statusCode,
    (await limited(app, undefined, 'header', id)).statusCode,
  ]
  t.same(statuses, [400, 503, 503], 'three requests pass the limiter')
  for (const [how, spelling] of [
    ['path', id],
    ['body', id.toUpperCase()],
    ['header', mixed],
  ] as const) {
    const res = await limited(app, undefined, how, spelling)
    t.equal(res.statusCode, 429, `${how} with ${spelling === id ? 'the stored' : 'another'} spelling`)
    t.match(res.json(), { error: { type: 'rate_limit_error', code: 'rate_limit_exceeded', retry_after: Number } })
    t.ok(Number(res.headers['retry-after']) > 0)
  }
  const fresh = await session()
  t.equal((await limited(app, undefined, 'path', fresh)).statusCode, 400, 'another session has its own bucket')
})

t.test("another tenant's session id and unknown ids consume no bucket", async (t) => {
  const { app, tenant, session } = await setup(t, 2)
  const mine = await session()
  for (let i = 0; i < 4; i++) {
    for (const how of ['path', 'body', 'header'] as const) {
      const foreign = await limited(app, tenant, how, i % 2 ? mine.toUpperCase() : mine)
      t.equal(foreign.statusCode, 404, `a tenant naming the admin's session (${how}) is not found, never limited`)
      t.match(foreign.json(), { error: { code: 'session_not_found' } })
      const unknown = await limited(app, undefined, how, i % 2 ? randomUUID() : 'not-a-session')
      t.equal(unknown.statusCode, 404, `an unknown id (${how}) is not found, never limited`)
    }
  }
  t.same(
    [(await limited(app, undefined, 'path', mine)).statusCode, (await limited(app, undefined, 'body', mine)).statusCode],
    [400, 503],
    "the owner's budget is untouched by all of the above",
  )
  t.equal((await limited(app, undefined, 'header', mine)).statusCode, 429)

  const theirs = await session(tenant)
  t.same(
    [(await limited(app, tenant, 'path', theirs)).statusCode, (await limited(app, tenant, 'path', theirs)).statusCode],
    [400, 400],
    "the tenant's own session has its own budget",
  )
  t.equal((await limited(app, tenant, 'body', theirs.toUpperCase())).statusCode, 429)
})

t.test('a request that creates its session is not counted per session', async (t) => {
  const { app } = await setup(t, 1)
  for (let i = 0; i < 3; i++) {
    const res = await app.inject({ method: 'POST', url: '/v1/chat', headers: auth(), payload: { messages: [{ role: 'user', type: 'message', content: 'hi' }] } })
    t.equal(res.statusCode, 503)
  }
})

t.test('RATE_LIMIT_PER_MINUTE=0 means no limiter anywhere, 404 and 405 included', async (t) => {
  const app = await build(t, { RATE_LIMIT_PER_MINUTE: '0', SESSION_RATE_LIMIT_PER_MINUTE: '0' })
  for (let i = 0; i < 5; i++) {
    const missing = await app.inject({ url: '/v1/no-such-route', headers: auth() })
    t.equal(missing.statusCode, 404)
    t.notOk(missing.headers['x-ratelimit-limit'], 'no limiter headers on a 404')
    const wrongMethod = await app.inject({ method: 'DELETE', url: '/v1/models', headers: auth() })
    t.equal(wrongMethod.statusCode, 405)
    const listed = await app.inject({ url: '/v1/sessions', headers: auth() })
    t.equal(listed.statusCode, 200)
    t.notOk(listed.headers['x-ratelimit-limit'])
  }
})

t.test('the per-IP limit is a rate: Retry-After is the wait for the next request (60/limit s), with retry-after-ms', async (t) => {
  const app = await build(t, { RATE_LIMIT_PER_MINUTE: '20' })
  let limited
  for (let i = 0; i < 25 && !limited; i++) {
    const res = await app.inject({ url: i % 2 ? '/v1/sessions' : '/v1/no-such-route', headers: auth() })
    if (res.statusCode === 429) limited = res
  }
  t.ok(limited, 'the 21st request is refused')
  const seconds = Number(limited!.headers['retry-after'])
  const ms = Number(limited!.headers['retry-after-ms'])
  t.ok(seconds >= 1 && seconds <= 3, `Retry-After ${seconds} s is about 60/20, far below 60`)
  t.ok(ms > 0 && ms <= 3_000, `retry-after-ms ${ms}`)
  t.equal(Math.ceil(ms / 1000), seconds)
  t.match(limited!.json(), { error: { code: 'rate_limit_exceeded', retry_after: seconds, retry_after_ms: ms } })
})

t.test('the per-session limit is a rate too', async (t) => {
  const { app, session } = await setup(t, 6)
  const id = await session()
  for (let i = 0; i < 6; i++) t.equal((await limited(app, undefined, 'path', id)).statusCode, 400)
  const res = await limited(app, undefined, 'path', id)
  t.equal(res.statusCode, 429)
  t.ok(Number(res.headers['retry-after']) <= 10, `Retry-After ${res.headers['retry-after']} s is about 60/6`)
  t.ok(Number(res.headers['retry-after-ms']) <= 10_000)
})

t.test('a session named by metadata.session_id counts against its bucket', async (t) => {
  const { app, session } = await setup(t, 2)
  const id = await session()
  const byMetadata = () =>
    app.inject({ method: 'POST', url: '/v1/chat/completions', headers: auth(), payload: { metadata: { session_id: id }, messages: [{ role: 'user', content: 'hi' }] } })
  t.same([(await byMetadata()).statusCode, (await byMetadata()).statusCode, (await byMetadata()).statusCode], [503, 503, 429])
})
