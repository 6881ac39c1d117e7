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
