import { existsSync, readFileSync } from 'node:fs'
import { join } from 'node:path'
import { Validator } from '@seriousme/openapi-schema-validator'
import { pino } from 'pino'
import t from 'tap'
import { ADMIN_KEY, auth, build, tempDir } from './helpers/build.js'

const envelopeShape = (code: string, type: string) => ({ error: { code, type, message: String, param: null } })

t.test('GET /v1/health is public, unlimited and shaped per the spec', async (t) => {
  const app = await build(t)
  const res = await app.inject({ url: '/v1/health' })
  t.equal(res.statusCode, 200)
  const body = res.json()
  t.equal(body.status, 'healthy')
  t.equal(body.model, 'gpt-4o-mini')
  t.match(body.version, /^\d+\.\d+\.\d+/)
  t.type(body.uptime_s, 'number')
  t.ok(res.headers['x-request-id'])
  t.equal(res.headers['cache-control'], 'no-store')
  t.notOk(res.headers['x-ratelimit-limit'], 'health is not rate limited')
})

t.test('GET /v1/health/ready reports each check', async (t) => {
  const app = await build(t)
  const res = await app.inject({ url: '/v1/health/ready' })
  t.equal(res.statusCode, 200)
  t.match(res.json(), { status: 'ready', checks: { store: { ok: true } } })
  // Which kernel limits this host enforces, and why the others are not.
  const { details } = res.json().checks.sandbox
  t.match(details, { sandbox: String, seccomp: Boolean, tmpfsMb: Number, cgroups: { layout: /^(v1|v2|none)$/, enforced: Array, missing: Object } })
})

t.test('a sandbox that cannot work is reported at once, by health, languages and execute', async (t) => {
  const lines: { level: number; msg: string }[] = []
  const logger = pino({ level: 'info' }, { write: (line: string) => lines.push(JSON.parse(line)) })
  const reason = 'bwrap: setting up uid map: Permission denied'
  const app = await build(t, {}, { logger, sandboxProbe: async () => ({ ok: false, reason }) })

  const health = await app.inject({ url: '/v1/health' })
  t.equal(health.statusCode, 200, 'degraded is still alive')
  t.match(health.json(), {
    status: 'degraded',
    problems: [{ component: 'sandbox', message: `no code can run: ${reason}`, fix: /apt-get install bubblewrap.*SANDBOX=none/ }],
  })
  const logged = lines.filter((l) => /sandbox/.test(l.msg))
  t.equal(logged.length, 1, 'one log line')
  t.equal(logged[0]?.level, 50)
  t.match(logged[0]?.msg, `sandbox unusable, no code can run: ${reason}. Fix: install bubblewrap`)

  const { languages } = (await app.inject({ url: '/v1/languages', headers: auth() })).json()
  t.equal(languages.length, 3)
  for (const language of languages) t.match(language, { available: false, reason: `the sandbox does not work on this host: ${reason}` }, language.name)

  const session = (await app.inject({ method: 'POST', url: '/v1/sessions', headers: auth() })).json().session_id
  const exec = await app.inject({ method: 'POST', url: `/v1/sessions/${session}/execute`, headers: auth(), payload: { language: 'python', code: '1' } })
  t.equal(exec.statusCode, 503)
  t.match(exec.json(), envelopeShape('kernel_unavailable', 'unavailable_error'))
  t.match(exec.json().error.message, reason)

  const ready = await app.inject({ url: '/v1/health/ready' })
  t.equal(ready.statusCode, 503)
  t.match(ready.json(), { checks: { sandbox: { ok: false, error: reason } } })
  t.equal(lines.filter((l) => /sandbox unusable/.test(l.msg)).length, 1, 'asked again, not logged again')
})

t.test('protected routes: 401 envelopes with rate-limit headers', async (t) => {
  const app = await build(t)
  const missing = await app.inject({ url: '/metrics' })
  t.equal(missing.statusCode, 401)
  t.match(missing.json(), envelopeShape('missing_api_key', 'auth_error'))
  t.equal(missing.headers['x-ratelimit-limit'], '1000')
  t.ok(missing.headers['x-ratelimit-remaining'])
  t.ok(missing.headers['x-ratelimit-reset'])
  t.ok(missing.headers['x-request-id'])

  const wrong = await app.inject({ url: '/metrics', headers: auth('nope') })
  t.equal(wrong.statusCode, 401)
  t.match(wrong.json(), envelopeShape('invalid_api_key', 'auth_error'))

  const notBearer = await app.inject({ url: '/metrics', headers: { authorization: `Basic ${ADMIN_KEY}` } })
  t.equal(notBearer.statusCode, 401)

  const ok = await app.inject({ url: '/metrics', headers: auth() })
  t.equal(ok.statusCode, 200)
  t.match(ok.body, /oi_http_requests_total/)
  t.match(ok.body, /oi_process_resident_memory_bytes/)
})

t.test('per-IP limit: the 6th request gets the 429 envelope, wrong keys count too', async (t) => {
  const app = await build(t, { RATE_LIMIT_PER_MINUTE: '5' })
  const statuses: number[] = []
  for (let i = 0; i < 5; i++) statuses.push((await app.inject({ url: '/metrics', headers: auth(i % 2 ? 'bad' : ADMIN_KEY) })).statusCode)
  t.same(statuses, [200, 401, 200, 401, 200])
  const res = await app.inject({ url: '/metrics', headers: auth() })
  t.equal(res.statusCode, 429)
  t.match(res.json(), { error: { code: 'rate_limit_exceeded', type: 'rate_limit_error', retry_after: Number } })
  t.ok(Number(res.headers['retry-after']) > 0)
  t.equal(res.headers['x-ratelimit-remaining'], '0')
  t.equal((await app.inject({ url: '/v1/health' })).statusCode, 200, 'health stays reachable')
  const notFound = await app.inject({ url: '/nope' })
  t.equal(notFound.statusCode, 429, '404s are counted and limited too')
})

t.test('limit 0 turns the per-IP limit off', async (t) => {
  const app = await build(t, { RATE_LIMIT_PER_MINUTE: '0' })
  const res = await app.inject({ url: '/metrics', headers: auth() })
  t.equal(res.statusCode, 200)
  t.notOk(res.headers['x-ratelimit-limit'])
})

t.test('unknown route 404 and wrong method 405 with Allow', async (t) => {
  const app = await build(t)
  const res = await app.inject({ url: '/v1/nothing-here' })
  t.equal(res.statusCode, 404)
  t.match(res.json(), envelopeShape('not_found', 'not_found_error'))
  t.ok(res.headers['x-ratelimit-limit'])
  const longId = await app.inject({ url: `/v1/sessions/${'x'.repeat(500)}`, headers: auth() })
  t.equal(longId.statusCode, 404, 'an overlong id is just not found')
  t.match(longId.json(), { error: { code: 'session_not_found' } })
  const wrongMethod = await app.inject({ method: 'DELETE', url: '/v1/health' })
  t.equal(wrongMethod.statusCode, 405)
  t.equal(wrongMethod.headers.allow, 'GET')
  t.match(wrongMethod.json(), envelopeShape('method_not_allowed', 'invalid_request_error'))
})

t.test('body errors: invalid JSON, schema failure, too large, wrong type, and a bug', async (t) => {
  const app = await build(t, { BODY_LIMIT: '2048' })
  const { Type } = await import('@sinclair/typebox')
  app.post(
    '/test/echo',
    { schema: { body: Type.Object({ name: Type.String({ maxLength: 5 }), n: Type.Optional(Type.Integer()) }) } },
    async (req) => req.body,
  )
  app.get('/test/boom', async () => {
    throw new Error('secret internals at /srv/db')
  })
  const json = { 'content-type': 'application/json' }

  const bad = await app.inject({ method: 'POST', url: '/test/echo', headers: json, payload: '{"name": ' })
  t.equal(bad.statusCode, 400)
  t.match(bad.json(), envelopeShape('invalid_json', 'validation_error'))

  const schema = await app.inject({ method: 'POST', url: '/test/echo', headers: json, payload: { name: 'toolongname' } })
  t.equal(schema.statusCode, 400)
  t.match(schema.json(), { error: { type: 'validation_error', param: 'name' } })
  const missing = await app.inject({ method: 'POST', url: '/test/echo', headers: json, payload: { n: 1 } })
  t.match(missing.json(), { error: { type: 'validation_error', param: 'name' } })

  const big = await app.inject({ method: 'POST', url: '/test/echo', headers: json, payload: JSON.stringify({ name: 'x'.repeat(5000) }) })
  t.equal(big.statusCode, 413)
  t.match(big.json(), envelopeShape('payload_too_large', 'validation_error'))

  const xml = await app.inject({ method: 'POST', url: '/test/echo', headers: { 'content-type': 'application/xml' }, payload: '<a/>' })
  t.equal(xml.statusCode, 415)
  t.match(xml.json(), envelopeShape('unsupported_media_type', 'validation_error'))

  const boom = await app.inject({ url: '/test/boom' })
  t.equal(boom.statusCode, 500)
  t.same(boom.json(), { error: { message: 'Internal server error', type: 'server_error', code: 'internal_error', param: null } })
  t.notMatch(boom.body, /internals|srv|stack/)
})

t.test('request ids: a sane incoming id is kept, others replaced', async (t) => {
  const app = await build(t)
  const kept = await app.inject({ url: '/v1/health', headers: { 'x-request-id': 'lb-1234.abc' } })
  t.equal(kept.headers['x-request-id'], 'lb-1234.abc')
  const replaced = await app.inject({ url: '/v1/health', headers: { 'x-request-id': 'bad id\twith spaces' } })
  t.match(replaced.headers['x-request-id'], /^[0-9a-f-]{36}$/)
})

t.test('CORS: preflight without auth for localhost, headers the OpenAI SDKs send', async (t) => {
  const app = await build(t)
  const res = await app.inject({
    method: 'OPTIONS',
    url: '/v1/chat/completions',
    headers: {
      origin: 'http://localhost:3000',
      'access-control-request-method': 'POST',
      'access-control-request-headers': 'authorization,content-type,x-stainless-os,x-stainless-lang,idempotency-key,x-session-id',
    },
  })
  t.equal(res.statusCode, 204)
  t.equal(res.headers['access-control-allow-origin'], 'http://localhost:3000')
  t.match(res.headers['access-control-allow-headers'], /x-stainless-os/)
  t.match(res.headers['access-control-allow-headers'], /x-session-id/)
  const actual = await app.inject({ url: '/v1/health', headers: { origin: 'http://127.0.0.1:8080' } })
  t.equal(actual.headers['access-control-allow-origin'], 'http://127.0.0.1:8080')
  t.match(actual.headers['access-control-expose-headers'], /X-RateLimit-Remaining/)
  t.match(actual.headers['access-control-expose-headers'], /X-Session-Id/)
  const foreign = await app.inject({ url: '/v1/health', headers: { origin: 'https://evil.example' } })
  t.notOk(foreign.headers['access-control-allow-origin'])

  const listed = await build(t, { CORS_ORIGINS: 'https://app.example' })
  const ok = await listed.inject({ url: '/v1/health', headers: { origin: 'https://app.example' } })
  t.equal(ok.headers['access-control-allow-origin'], 'https://app.example')
  const local = await listed.inject({ url: '/v1/health', headers: { origin: 'http://localhost:3000' } })
  t.notOk(local.headers['access-control-allow-origin'])
})

t.test('OpenAPI 3.1 document is valid, with bearer security, tags and summaries', async (t) => {
  const app = await build(t)
  const res = await app.inject({ url: '/openapi.json' })
  t.equal(res.statusCode, 200)
  const doc = res.json()
  t.equal(doc.openapi, '3.1.0')
  t.match(doc.components.securitySchemes.bearerAuth, { type: 'http', scheme: 'bearer', description: /admin\.key[\s\S]*POST \/v1\/keys/ }, 'Authorize says which key to paste')
  t.match(doc.servers, [{ url: '/' }])
  const validator = new Validator()
  const result = await validator.validate(doc)
  t.same(result.errors, undefined, 'validator reports no errors')
  t.ok(result.valid, 'document is valid OpenAPI 3.1')
  type Op = { tags?: string[]; summary?: string; operationId?: string; responses: Record<string, { description: string }> }
  const operationIds = new Set<string>()
  for (const [path, ops] of Object.entries<Record<string, Op>>(doc.paths)) {
    for (const [method, op] of Object.entries(ops)) {
      t.ok(op.tags?.length, `${method} ${path} has tags`)
      t.ok(op.summary, `${method} ${path} has a summary`)
      t.match(op.operationId, /^[a-z][A-Za-z]+$/, `${method} ${path} has an operationId`)
      t.notOk(operationIds.has(op.operationId!), `${op.operationId} is unique`)
      operationIds.add(op.operationId!)
      for (const [status, response] of Object.entries(op.responses))
        t.not(response.description, 'Default Response', `${method} ${path} ${status} is named`)
    }
  }
  const docs = await app.inject({ url: '/docs/' })
  t.equal(docs.statusCode, 200)
  t.match(docs.body, /swagger/i)
})

t.test('LOG_DIR writes server_out.log and server_err.log', async (t) => {
  const { createLogger, flushLogs } = await import('../services/logger.js')
  const dir = tempDir(t)
  const logger = createLogger({ level: 'info', logDir: dir, pretty: false })
  logger.info({ req: { headers: { authorization: 'Bearer abc' } } }, 'hello')
  logger.error('bad thing')
  await flushLogs(logger)
  t.ok(existsSync(join(dir, 'server_out.log')))
  const out = readFileSync(join(dir, 'server_out.log'), 'utf8')
  const err = readFileSync(join(dir, 'server_err.log'), 'utf8')
  t.match(out, /hello/)
  t.notMatch(out, /Bearer abc/, 'authorization redacted')
  t.match(err, /bad thing/)
  t.notMatch(err, /hello/)
})
