import t from 'tap'
import { newApiKey } from '../../services/auth.js'
import { startFakeUpstream, text } from '../fakes/upstream.js'
import { auth, build, type FastifyInstance, type Tap } from '../helpers/build.js'

const ENV = { LITELLM_MODEL: 'env-model', TEMPERATURE: '0.3', MAX_TOKENS: '1234', MAX_ITERATIONS: '7' }
const DEFAULTS = {
  model: 'env-model',
  temperature: 0.3,
  max_tokens: 1234,
  auto_run: true,
  system_message: '',
  custom_instructions: '',
  max_iterations: 7,
}

async function setup(t: Tap) {
  const upstream = await startFakeUpstream()
  t.teardown(() => upstream.close())
  const app = await build(t, { LLM_BASE_URL: upstream.url, LLM_API_KEY: 'sk-upstream-key', SANDBOX: 'none', ...ENV })
  return { app, upstream }
}

async function tenantKey(app: FastifyInstance): Promise<string> {
  const { key, record } = newApiKey('tenant', null)
  await app.store.createApiKey(record)
  return key
}

const patch = (app: FastifyInstance, payload: unknown, key?: string) =>
  app.inject({ method: 'PATCH', url: '/v1/settings', headers: auth(key), payload: payload as Record<string, unknown> })

t.test('GET /v1/settings: the server defaults from the environment', async (t) => {
  const { app } = await setup(t)
  const res = await app.inject({ url: '/v1/settings', headers: auth() })
  t.equal(res.statusCode, 200)
  t.equal(res.headers['cache-control'], 'no-store')
  t.ok(res.headers['x-ratelimit-remaining'])
  t.same(res.json(), DEFAULTS)
})

t.test('PATCH changes, validates, strips server-level fields, and null resets', async (t) => {
  const { app } = await setup(t)
  const changed = await patch(app, { model: 'tenant-model', temperature: 1.5, max_tokens: 99, custom_instructions: 'Be brief.' })
  t.equal(changed.statusCode, 200)
  t.same(changed.json(), { ...DEFAULTS, model: 'tenant-model', temperature: 1.5, max_tokens: 99, custom_instructions: 'Be brief.' })
  t.same((await app.inject({ url: '/v1/settings', headers: auth() })).json(), changed.json(), 'GET shows what PATCH returned')

  for (const [payload, param] of [
    [{ temperature: 3 }, 'temperature'],
    [{ temperature: -0.1 }, 'temperature'],
    [{ max_tokens: 0 }, 'max_tokens'],
    [{ max_tokens: 1.5 }, 'max_tokens'],
    [{ model: '' }, 'model'],
    [{ max_iterations: 1001 }, 'max_iterations'],
    [{ auto_run: 'sometimes' }, 'auto_run'],
    [{ system_message: 'x'.repeat(50_001) }, 'system_message'],
  ] as const) {
    const res = await patch(app, payload)
    t.equal(res.statusCode, 400, JSON.stringify(payload).slice(0, 60))
    t.match(res.json(), { error: { type: 'validation_error', code: 'invalid_request', param } })
  }
  t.equal((await app.inject({ url: '/v1/settings', headers: auth() })).json().temperature, 1.5, 'a rejected PATCH changes nothing')
  t.equal((await app.inject({ url: '/v1/settings', headers: auth() })).json().max_tokens, 99, 'max_tokens: 0 did not pass as a reset')

  // falsy values are values, not resets
  const falsy = await patch(app, { temperature: 0, auto_run: false, system_message: '' })
  t.equal(falsy.statusCode, 200)
  t.match(falsy.json(), { temperature: 0, auto_run: false, system_message: '' })
  t.match(await app.store.getSettings('admin'), { temperature: 0, auto_run: false, system_message: '' })
  await patch(app, { temperature: 1.5, auto_run: null, system_message: null })

  // server-level safety settings are not settings: dropped, never stored, never shown
  const smuggled = await patch(app, {
    sandbox: 'none',
    SANDBOX: 'none',
    network: true,
    LLM_BASE_URL: 'http://evil.example/v1',
    llm_base_url: 'http://evil.example/v1',
    LLM_API_KEY: 'sk-evil',
    api_key: 'sk-evil',
    temperature: 0.9,
  })
  t.equal(smuggled.statusCode, 200)
  t.same(Object.keys(smuggled.json()).sort(), Object.keys(DEFAULTS).sort())
  t.equal(smuggled.json().temperature, 0.9, 'the valid field in the same PATCH applies')
  const raw = JSON.stringify(await app.store.getSettings('admin'))
  t.notMatch(raw, /evil|sandbox|SANDBOX|network|LLM_|api_key/i)
  t.notMatch((await app.inject({ url: '/v1/settings', headers: auth() })).body, /evil|sandbox|sk-upstream-key|127\.0\.0\.1/)

  const reset = await patch(app, { model: null, temperature: null, custom_instructions: null })
  t.equal(reset.statusCode, 200)
  t.same(reset.json(), { ...DEFAULTS, max_tokens: 99 }, 'null returns a field to the server default; the others stay')
  t.same(await app.store.getSettings('admin'), { max_tokens: 99 }, 'reset fields are not stored')
  t.same((await patch(app, {})).json(), { ...DEFAULTS, max_tokens: 99 }, 'an empty PATCH changes nothing')
})

t.test('precedence for a run: request config > tenant settings > environment', async (t) => {
  const { app, upstream } = await setup(t)
  const chat = async (config?: Record<string, unknown>) => {
    upstream.reset()
    upstream.script(text('ok'))
    const res = await app.inject({
      method: 'POST',
      url: '/v1/chat',
      headers: auth(),
      payload: { messages: [{ role: 'user', content: 'hi' }], ...(config ? { config } : {}) },
    })
    t.equal(res.statusCode, 200)
    t.equal(upstream.requests.length, 1)
    return upstream.requests[0]!.body
  }

  const fromEnv = await chat()
  t.match(fromEnv, { model: 'env-model', temperature: 0.3, max_tokens: 1234 })
  t.notMatch(fromEnv.messages[0].content, /Tenant rule/)

  await patch(app, { model: 'tenant-model', temperature: 1.1, max_tokens: 222, custom_instructions: 'Tenant rule: answer in French.' })
  const fromTenant = await chat()
  t.match(fromTenant, { model: 'tenant-model', temperature: 1.1, max_tokens: 222 })
  t.match(fromTenant.messages[0], { role: 'system', content: /Tenant rule: answer in French\./ })

  const fromRequest = await chat({ llm: { model: 'request-model', temperature: 0 }, system_message: 'Request system prompt.' })
  t.match(fromRequest, { model: 'request-model', temperature: 0, max_tokens: 222 }, 'unset request fields fall back to the tenant')
  t.match(fromRequest.messages[0].content, /^Request system prompt\./)
  t.match(fromRequest.messages[0].content, /Tenant rule/, 'custom instructions still come from the tenant')

  const all = await chat({ llm: { model: 'm2', temperature: 2, max_tokens: 5 } })
  t.match(all, { model: 'm2', temperature: 2, max_tokens: 5 })

  const invalid = await app.inject({
    method: 'POST',
    url: '/v1/chat',
    headers: auth(),
    payload: { messages: [{ role: 'user', content: 'hi' }], config: { llm: { temperature: 3 } } },
  })
  t.equal(invalid.statusCode, 400)
  t.match(invalid.json(), { error: { type: 'validation_error', param: 'config.llm.temperature' } })

  // the session shows the model of its runs, the env default when it was made
  t.equal((await app.inject({ url: '/v1/settings', headers: auth() })).json().model, 'tenant-model', 'request config does not stick')
})

t.test('settings are per tenant', async (t) => {
  const { app, upstream } = await setup(t)
  const other = await tenantKey(app)
  await patch(app, { model: 'admin-model', auto_run: false, system_message: 'admin only' })
  t.same((await app.inject({ url: '/v1/settings', headers: auth(other) })).json(), DEFAULTS, "another tenant sees its own (default) settings")
  const theirs = await patch(app, { temperature: 0.1 }, other)
  t.same(theirs.json(), { ...DEFAULTS, temperature: 0.1 })
  t.same((await app.inject({ url: '/v1/settings', headers: auth() })).json(), {
    ...DEFAULTS,
    model: 'admin-model',
    auto_run: false,
    system_message: 'admin only',
  })
  upstream.script(text('ok'))
  const res = await app.inject({ method: 'POST', url: '/v1/chat', headers: auth(other), payload: { messages: [{ role: 'user', content: 'hi' }] } })
  t.equal(res.statusCode, 200)
  t.match(upstream.requests[0]!.body, { model: 'env-model', temperature: 0.1 })
  t.notMatch(upstream.requests[0]!.body.messages[0].content, /admin only/)
})

t.test('settings: 401, unknown routes and bad bodies', async (t) => {
  const { app } = await setup(t)
  for (const method of ['GET', 'PATCH'] as const) {
    const res = await app.inject({ method, url: '/v1/settings', payload: method === 'PATCH' ? { temperature: 1 } : undefined })
    t.equal(res.statusCode, 401, method)
    t.match(res.json(), { error: { type: 'auth_error', code: 'missing_api_key' } })
    const wrong = await app.inject({ method, url: '/v1/settings', headers: auth('wrong'), payload: method === 'PATCH' ? { temperature: 1 } : undefined })
    t.equal(wrong.statusCode, 401)
    t.match(wrong.json(), { error: { code: 'invalid_api_key' } })
  }
  t.same(await app.store.getSettings('admin'), {}, 'an unauthenticated PATCH stored nothing')
  const unknown = await app.inject({ url: '/v1/settings/model', headers: auth() })
  t.equal(unknown.statusCode, 404)
  t.match(unknown.json(), { error: { type: 'not_found_error', code: 'not_found' } })
  const put = await app.inject({ method: 'PUT', url: '/v1/settings', headers: auth(), payload: {} })
  t.equal(put.statusCode, 405)
  t.match(put.headers.allow, /GET/)
  t.match(put.headers.allow, /PATCH/)
  const badJson = await app.inject({ method: 'PATCH', url: '/v1/settings', headers: { ...auth(), 'content-type': 'application/json' }, payload: '{"temperature":' })
  t.equal(badJson.statusCode, 400)
  t.match(badJson.json(), { error: { code: 'invalid_json' } })
  const array = await app.inject({ method: 'PATCH', url: '/v1/settings', headers: auth(), payload: [1, 2] as unknown as Record<string, unknown> })
  t.equal(array.statusCode, 400)
  t.match(array.json(), { error: { type: 'validation_error' } })
})
