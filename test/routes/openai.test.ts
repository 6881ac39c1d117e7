import OpenAI from 'openai'
import t from 'tap'
import { httpError, text, toolCall } from '../fakes/upstream.js'
import { ADMIN_KEY, build } from '../helpers/build.js'
import { listeningServer } from '../helpers/openai-server.js'
import type { Tap } from '../helpers/build.js'

/** The server on loopback and the real OpenAI SDK pointed at it, unmodified. */
async function setup(t: Tap, env: Record<string, string> = {}) {
  const server = await listeningServer(t, { MODELS: 'gpt-4o-mini,bedrock/anthropic.claude-3-sonnet-20240229-v1:0', ...env })
  return { ...server, client: new OpenAI({ baseURL: server.baseURL, apiKey: server.apiKey, maxRetries: 0 }) }
}

t.test('create, non-stream: chat.completion shape with code rendered as fences', async (t) => {
  const { client, upstream } = await setup(t)
  upstream.script(toolCall({ language: 'python', code: 'print(2 ** 10)' }), text('It is 1024.', { usage: { prompt_tokens: 5, completion_tokens: 4, total_tokens: 9 } }))
  const { data, response } = await client.chat.completions
    .create({ model: 'gpt-4o-mini', messages: [{ role: 'system', content: 'Be brief.' }, { role: 'user', content: 'What is 2^10?' }] })
    .withResponse()
  t.equal(data.object, 'chat.completion')
  t.match(data.id, /^chatcmpl-/)
  t.equal(data.model, 'gpt-4o-mini')
  t.equal(data.choices[0]!.finish_reason, 'stop')
  t.equal(data.choices[0]!.logprobs, null)
  t.equal(data.choices[0]!.message.refusal, null)
  const content = data.choices[0]!.message.content!
  t.match(content, /```python\nprint\(2 \*\* 10\)\n```/)
  t.match(content, /```output\n1024\n```/)
  t.match(content, /It is 1024\./)
  t.ok(data.usage!.total_tokens >= 9)
  t.match(response.headers.get('x-session-id'), /^[0-9a-f-]{36}$/)
  t.equal(upstream.requests[0]!.body.messages[0].content, 'Be brief.', 'system message passed as the system prompt')
})

t.test('create, stream: same id and created on every chunk, role first, finish_reason, usage chunk, [DONE]', async (t) => {
  const { client, upstream } = await setup(t)
  upstream.script(text('Streaming works fine here.'))
  const stream = await client.chat.completions.create({
    model: 'gpt-4o-mini',
    messages: [{ role: 'user', content: [{ type: 'text', text: 'hello' }] }],
    stream: true,
    stream_options: { include_usage: true },
  })
  const chunks = []
  for await (const chunk of stream) chunks.push(chunk)
  t.ok(chunks.length >= 3)
  t.equal(new Set(chunks.map((c) => c.id)).size, 1)
  t.equal(new Set(chunks.map((c) => c.created)).size, 1)
  t.equal(chunks[0]!.choices[0]!.delta.role, 'assistant')
  const finish = chunks.find((c) => c.choices[0]?.finish_reason)
  t.equal(finish?.choices[0]!.finish_reason, 'stop')
  const usage = chunks.at(-1)!
  t.same(usage.choices, [])
  t.ok(usage.usage!.total_tokens > 0)
  t.equal(chunks.map((c) => c.choices[0]?.delta.content ?? '').join(''), 'Streaming works fine here.')
})

t.test('raw stream has no event: lines and ends with [DONE]', async (t) => {
  const { baseURL, upstream } = await setup(t)
  upstream.script(text('raw'))
  const res = await fetch(`${baseURL}/chat/completions`, {
    method: 'POST',
    headers: { authorization: `Bearer ${ADMIN_KEY}`, 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'm', messages: [{ role: 'user', content: 'x' }], stream: true, some_unknown_field: 1 }),
  })
  const body = await res.text()
  t.notMatch(body, /^event:/m)
  t.match(body, /data: \[DONE\]\n\n$/)
  t.ok(res.headers.get('x-session-id'))
})

t.test('chat.completions.stream() helper and finalChatCompletion()', async (t) => {
  const { client, upstream } = await setup(t)
  upstream.script(text('Final answer from helper.'))
  const runner = client.chat.completions.stream({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'hi' }] })
  const deltas: string[] = []
  runner.on('content', (delta) => deltas.push(delta))
  const final = await runner.finalChatCompletion()
  t.equal(final.choices[0]!.message.content, 'Final answer from helper.')
  t.equal(deltas.join(''), 'Final answer from helper.')
})

t.test('session binding with X-Session-Id keeps the conversation (and the kernel)', async (t) => {
  const { client, upstream, app } = await setup(t)
  upstream.script(toolCall({ language: 'python', code: 'secret_number = 7' }), text('Stored.'))
  const first = await client.chat.completions.create({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'remember 7' }] }).withResponse()
  const sessionId = first.response.headers.get('x-session-id')!
  upstream.script(toolCall({ language: 'python', code: 'print(secret_number)' }), text('It was 7.'))
  const second = await client.chat.completions.create(
    {
      model: 'gpt-4o-mini',
      messages: [
        { role: 'user', content: 'remember 7' },
        { role: 'assistant', content: first.data.choices[0]!.message.content },
        { role: 'user', content: 'what was it?' },
      ],
    },
    { headers: { 'X-Session-Id': sessionId } },
  )
  t.match(second.choices[0]!.message.content, /```output\n7\n```/)
  const stored = (await app.inject({ url: `/v1/sessions/${sessionId}/messages?limit=100`, headers: { authorization: `Bearer ${ADMIN_KEY}` } })).json()
  t.equal(stored.messages.filter((m: { role: string; content: string }) => m.role === 'user').length, 2, 'resent history is not stored twice')
})

t.test('models.list() and models.retrieve() with slashes in the id', async (t) => {
  const { client } = await setup(t)
  const ids = []
  for await (const model of client.models.list()) ids.push(model.id)
  t.same(ids, ['gpt-4o-mini', 'bedrock/anthropic.claude-3-sonnet-20240229-v1:0'])
  const model = await client.models.retrieve('bedrock/anthropic.claude-3-sonnet-20240229-v1:0')
  t.equal(model.object, 'model')
})

/** The error a promise rejects with (tap's rejects() compares fields, not classes). */
const failure = (p: Promise<unknown>) => p.then(() => undefined, (err: unknown) => err)

t.test("the SDK's error classes for 400, 401, 404 and 429", async (t) => {
  const { client, baseURL } = await setup(t, { RATE_LIMIT_PER_MINUTE: '30' })
  t.type(await failure(client.chat.completions.create({ model: 'm', messages: [] })), OpenAI.BadRequestError)
  const bad = new OpenAI({ baseURL, apiKey: 'wrong', maxRetries: 0 })
  t.type(await failure(bad.models.list()), OpenAI.AuthenticationError)
  t.type(await failure(client.models.retrieve('no-such-model')), OpenAI.NotFoundError)
  t.type(
    await failure(client.chat.completions.create({ model: 'm', messages: [{ role: 'user', content: 'x' }] }, { headers: { 'X-Session-Id': 'nope' } })),
    OpenAI.NotFoundError,
  )
  let limited: unknown
  for (let i = 0; i < 40 && !limited; i++) await client.models.list().catch((err) => (limited = err))
  t.type(limited, OpenAI.RateLimitError)
  t.match((limited as InstanceType<typeof OpenAI.RateLimitError>).error, { code: 'rate_limit_exceeded', type: 'rate_limit_error' })
})

const chatCalls = (upstream: { requests: { path: string }[] }) => upstream.requests.filter((r) => r.path.startsWith('/v1/chat/completions')).length

t.test('upstream errors keep their meaning: 400 with code and param, unknown model 404, auth 502 not retryable, 503', async (t) => {
  const { client, upstream, baseURL } = await setup(t)
  const ask = (c = client) => failure(c.chat.completions.create({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'hi' }] }).withResponse())

  upstream.script(httpError(400, 'This model maximum context length is 8 tokens', { type: 'invalid_request_error', code: 'context_length_exceeded', param: 'messages' }))
  const tooLong = (await ask()) as InstanceType<typeof OpenAI.BadRequestError>
  t.type(tooLong, OpenAI.BadRequestError)
  t.match(tooLong.error, { code: 'context_length_exceeded', param: 'messages', message: /maximum context length/ })

  upstream.script(httpError(404, 'The model `nope` does not exist', { type: 'invalid_request_error', code: 'model_not_found' }))
  const unknown = (await ask()) as InstanceType<typeof OpenAI.NotFoundError>
  t.type(unknown, OpenAI.NotFoundError)
  t.match(unknown.error, { code: 'model_not_found', param: 'model' })

  // The SDK would retry a plain 502 twice; x-should-retry: false stops it after one call.
  const retrying = new OpenAI({ baseURL, apiKey: ADMIN_KEY, maxRetries: 2 })
  upstream.reset()
  upstream.script(httpError(401, 'Incorrect API key provided: sk-upstream-1234567', { code: 'invalid_api_key' }))
  const auth = (await ask(retrying)) as InstanceType<typeof OpenAI.APIError>
  t.equal(auth.status, 502)
  t.match(auth.error, { code: 'llm_auth_failed', type: 'upstream_error' })
  t.equal(auth.headers?.get('x-should-retry'), 'false')
  t.notMatch(auth.message, /sk-upstream-1234567/)
  t.equal(chatCalls(upstream), 1, 'an upstream auth failure is not retried by the SDK')

  upstream.script(httpError(503, 'overloaded'), httpError(503, 'overloaded'))
  const unavailable = (await ask()) as InstanceType<typeof OpenAI.APIError>
  t.equal(unavailable.status, 503)
  t.match(unavailable.error, { code: 'llm_unavailable' })
})

t.test("an upstream 429 keeps its Retry-After, and the SDK's retry honours it", async (t) => {
  const { upstream, baseURL } = await setup(t)
  const client = new OpenAI({ baseURL, apiKey: ADMIN_KEY, maxRetries: 2 })
  upstream.script(httpError(429, 'Rate limit reached for requests', { type: 'requests', code: 'rate_limit_exceeded', headers: { 'retry-after': '1' } }), text('After the wait.'))
  const { data, response } = await client.chat.completions.create({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'hi' }] }).withResponse()
  t.equal(data.choices[0]!.message.content, 'After the wait.')
  t.equal(chatCalls(upstream), 2, 'one upstream call per SDK attempt: the server does not retry the 429 itself')
  t.ok(response.headers.get('x-session-id'))

  const once = new OpenAI({ baseURL, apiKey: ADMIN_KEY, maxRetries: 0 })
  upstream.script(httpError(429, 'slow down', { code: 'rate_limit_exceeded', headers: { 'retry-after': '7' } }))
  const limited = (await failure(once.chat.completions.create({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'hi' }] }))) as InstanceType<typeof OpenAI.RateLimitError>
  t.type(limited, OpenAI.RateLimitError)
  t.equal(limited.headers?.get('retry-after'), '7')
  t.equal(limited.headers?.get('retry-after-ms'), '7000')
  t.match(limited.error, { code: 'rate_limit_exceeded', retry_after: 7 })
})

t.test('finish_reason comes from the last upstream call: length and content_filter, streamed or not', async (t) => {
  const { client, upstream } = await setup(t)
  const messages = [{ role: 'user' as const, content: 'hi' }]
  upstream.script(toolCall({ language: 'python', code: 'print(1)' }), text('This answer was cut', { finishReason: 'length' }))
  const cut = await client.chat.completions.create({ model: 'gpt-4o-mini', messages })
  t.equal(cut.choices[0]!.finish_reason, 'length')

  upstream.script(text('Filtered', { finishReason: 'content_filter' }))
  const chunks = []
  for await (const chunk of await client.chat.completions.create({ model: 'gpt-4o-mini', messages, stream: true })) chunks.push(chunk)
  t.same(chunks.map((c) => c.choices[0]?.finish_reason).filter(Boolean), ['content_filter'])
})

t.test('usage is the last report of each upstream call, summed over calls, even when every chunk repeats it', async (t) => {
  const { client, upstream } = await setup(t)
  upstream.script(
    toolCall({ language: 'python', code: 'print(1)' }, { usage: { prompt_tokens: 100, completion_tokens: 10, total_tokens: 110 }, usageEveryChunk: true }),
    text('Done, the answer is one.', { usage: { prompt_tokens: 200, completion_tokens: 20, total_tokens: 220 }, usageEveryChunk: true }),
  )
  const res = await client.chat.completions.create({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'hi' }] })
  t.same(res.usage, { prompt_tokens: 300, completion_tokens: 30, total_tokens: 330 })

  upstream.script(text('Streamed answer here.', { usage: { prompt_tokens: 50, completion_tokens: 5, total_tokens: 55 }, usageEveryChunk: true }))
  const chunks = []
  const stream = await client.chat.completions.create({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'hi' }], stream: true, stream_options: { include_usage: true } })
  for await (const chunk of stream) chunks.push(chunk)
  t.same(chunks.at(-1)!.usage, { prompt_tokens: 50, completion_tokens: 5, total_tokens: 55 })
})

t.test('an upstream stream ended by [DONE] or a clean close without finish_reason is a complete answer', async (t) => {
  const { client, upstream } = await setup(t)
  upstream.script(text('Answer without a finish reason.', { finishReason: null }))
  const done = await client.chat.completions.create({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'hi' }] })
  t.equal(done.choices[0]!.message.content, 'Answer without a finish reason.')
  t.equal(done.choices[0]!.finish_reason, 'stop')

  upstream.script(text('Closed without DONE.', { finishReason: null, noDone: true }))
  const closed = await client.chat.completions.create({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'hi' }] })
  t.equal(closed.choices[0]!.message.content, 'Closed without DONE.')
})

t.test('sampling parameters reach every upstream call; n > 1 is a 400 naming n', async (t) => {
  const { client, upstream, app } = await setup(t)
  const sampling = {
    stop: ['\nObservation:'],
    seed: 42,
    top_p: 0.5,
    presence_penalty: 0.25,
    frequency_penalty: -0.5,
    logit_bias: { '50256': -100 },
    user: 'user-7',
    logprobs: true,
    top_logprobs: 2,
  }
  upstream.script(toolCall({ language: 'python', code: 'print(1)' }), text('one'))
  await client.chat.completions.create({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'hi' }], ...sampling })
  t.equal(upstream.requests.length, 2)
  for (const request of upstream.requests) t.match(request.body, sampling)

  const before = (await app.inject({ url: '/v1/sessions', headers: { authorization: `Bearer ${ADMIN_KEY}` } })).json().sessions.length
  const two = (await failure(client.chat.completions.create({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'hi' }], n: 2 }))) as InstanceType<typeof OpenAI.BadRequestError>
  t.type(two, OpenAI.BadRequestError)
  t.match(two.error, { param: 'n', code: 'unsupported_parameter' })
  t.equal(upstream.requests.length, 2, 'nothing was asked upstream')
  t.equal((await app.inject({ url: '/v1/sessions', headers: { authorization: `Bearer ${ADMIN_KEY}` } })).json().sessions.length, before, 'no session was made')
})

const sessionCount = async (app: Awaited<ReturnType<typeof setup>>['app']) =>
  (await app.inject({ url: '/v1/sessions?limit=100', headers: { authorization: `Bearer ${ADMIN_KEY}` } })).json().sessions.length as number

t.test('a stream that fails before any output is a real HTTP error with the envelope, and leaves no session', async (t) => {
  const { client, upstream, app, baseURL } = await setup(t)
  upstream.script(httpError(400, 'maximum context length exceeded', { type: 'invalid_request_error', code: 'context_length_exceeded', param: 'messages' }))
  const err = (await failure(client.chat.completions.create({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'hi' }], stream: true }))) as InstanceType<typeof OpenAI.BadRequestError>
  t.type(err, OpenAI.BadRequestError)
  t.equal(err.status, 400)
  t.match(err.error, { code: 'context_length_exceeded', param: 'messages' })
  t.equal(await sessionCount(app), 0, 'the session made for the refused turn is gone')

  upstream.script(httpError(429, 'slow down', { headers: { 'retry-after': '3' } }))
  const raw = await fetch(`${baseURL}/chat/completions`, {
    method: 'POST',
    headers: { authorization: `Bearer ${ADMIN_KEY}`, 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'm', messages: [{ role: 'user', content: 'x' }], stream: true }),
  })
  t.equal(raw.status, 429)
  t.equal(raw.headers.get('retry-after'), '3')
  t.match(raw.headers.get('content-type'), /^application\/json/)
  t.match(await raw.json(), { error: { type: 'rate_limit_error' } })
})

t.test('an error after output closes the open fence before the error chunk', async (t) => {
  const { client, upstream, app } = await setup(t)
  upstream.script(toolCall({ language: 'python', code: 'print("hi")' }), httpError(500, 'exploded'), httpError(500, 'exploded'))
  const stream = await client.chat.completions.create({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'hi' }], stream: true })
  let content = ''
  const err = await failure(
    (async () => {
      for await (const chunk of stream) content += chunk.choices[0]?.delta.content ?? ''
    })(),
  )
  t.type(err, OpenAI.APIError)
  t.match(content, /```output\nhi\n```$/, 'the output fence is closed before the error')
  t.equal(await sessionCount(app), 1, 'a turn that produced output keeps its session')
})

t.test('a chat refused by a check (no upstream, busy session) leaves no session behind', async (t) => {
  const app = await build(t, { SANDBOX: 'none' })
  const res = await app.inject({ method: 'POST', url: '/v1/chat/completions', headers: { authorization: `Bearer ${ADMIN_KEY}` }, payload: { messages: [{ role: 'user', content: 'hi' }] } })
  t.equal(res.statusCode, 503)
  t.match(res.json(), { error: { code: 'llm_not_configured' } })
  const native = await app.inject({ method: 'POST', url: '/v1/chat', headers: { authorization: `Bearer ${ADMIN_KEY}` }, payload: { messages: [{ role: 'user', type: 'message', content: 'hi' }] } })
  t.equal(native.statusCode, 503)
  t.equal((await app.inject({ url: '/v1/sessions', headers: { authorization: `Bearer ${ADMIN_KEY}` } })).json().sessions.length, 0)
})

t.test('a busy session refuses a second chat with 409 before anything is stored', async (t) => {
  const { client, upstream, app } = await setup(t)
  upstream.script(text('slow answer', { firstByteMs: 60_000 }))
  const first = await app.inject({ method: 'POST', url: '/v1/sessions', headers: { authorization: `Bearer ${ADMIN_KEY}` } })
  const sessionId = first.json().session_id as string
  const running = client.chat.completions.create({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'one' }] }, { headers: { 'X-Session-Id': sessionId } }).catch(() => undefined)
  while (!app.runs.get(sessionId)) await new Promise((resolve) => setImmediate(resolve))
  const err = (await failure(client.chat.completions.create({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'two' }] }, { headers: { 'X-Session-Id': sessionId } }))) as InstanceType<typeof OpenAI.ConflictError>
  t.type(err, OpenAI.ConflictError)
  t.match(err.error, { code: 'session_busy' })
  app.runs.stop(sessionId)
  await running
  const stored = (await app.inject({ url: `/v1/sessions/${sessionId}/messages?limit=100`, headers: { authorization: `Bearer ${ADMIN_KEY}` } })).json()
  t.same(stored.messages.filter((m: { role: string }) => m.role === 'user').map((m: { content: string }) => m.content), ['one'])
  await upstream.settled()
})

const adminAuth = { authorization: `Bearer ${ADMIN_KEY}` }
const workspaceFile = async (app: Awaited<ReturnType<typeof setup>>['app'], sessionId: string, path: string) =>
  (await app.inject({ url: `/v1/sessions/${sessionId}/files/content?path=${encodeURIComponent(path)}`, headers: adminAuth })).body
const userMessages = async (app: Awaited<ReturnType<typeof setup>>['app'], sessionId: string) =>
  (await app.inject({ url: `/v1/sessions/${sessionId}/messages?limit=100`, headers: adminAuth }))
    .json()
    .messages.filter((m: { role: string }) => m.role === 'user')
    .map((m: { content: string }) => m.content)

t.test("a failure after code ran is not retried: with the SDK's default retries the code runs exactly once", async (t) => {
  const { upstream, app, baseURL } = await setup(t)
  const client = new OpenAI({ baseURL, apiKey: ADMIN_KEY })
  upstream.script(
    toolCall({ language: 'python', code: "open('runs.txt', 'a').write('ran\\n')" }),
    httpError(500, 'exploded'),
    httpError(500, 'exploded'),
    text('never reached'),
    text('never reached'),
  )
  const err = (await failure(client.chat.completions.create({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'count' }] }))) as InstanceType<typeof OpenAI.APIError>
  t.type(err, OpenAI.InternalServerError)
  t.equal(err.status, 502)
  t.equal(err.headers?.get('x-should-retry'), 'false')
  const sessionId = err.headers!.get('x-session-id')!
  t.equal(await workspaceFile(app, sessionId, 'runs.txt'), 'ran\n', 'the code ran once')
  t.same(await userMessages(app, sessionId), ['count'], 'the user message is stored once')
  t.equal(await sessionCount(app), 1, 'one session')
})

t.test("a failure before anything was stored is retried by the SDK, and leaves one session and one user message", async (t) => {
  const { upstream, app, baseURL } = await setup(t)
  const client = new OpenAI({ baseURL, apiKey: ADMIN_KEY })
  // The server retries an upstream 5xx once itself, so two 500s fail the SDK's first attempt.
  upstream.script(httpError(500, 'exploded'), httpError(500, 'exploded'), text('Second time lucky.'))
  const { data, response } = await client.chat.completions.create({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'hello' }] }).withResponse()
  t.equal(data.choices[0]!.message.content, 'Second time lucky.')
  t.equal(chatCalls(upstream), 3)
  t.equal(await sessionCount(app), 1, 'the session of the failed attempt was removed')
  t.same(await userMessages(app, response.headers.get('x-session-id')!), ['hello'])
})

t.test('Idempotency-Key: the same key and body get the stored answer, another body 422, per tenant', async (t) => {
  const { upstream, app, client, baseURL } = await setup(t)
  const body = { model: 'gpt-4o-mini', messages: [{ role: 'user' as const, content: 'run once' }] }
  upstream.script(toolCall({ language: 'python', code: "open('runs.txt', 'a').write('ran\\n')" }), text('Ran it.'))
  const first = await client.chat.completions.create(body, { headers: { 'Idempotency-Key': 'key-1' } }).withResponse()
  const again = await client.chat.completions.create(body, { headers: { 'Idempotency-Key': 'key-1' } }).withResponse()
  t.same(again.data, first.data, 'the same completion, id included')
  t.equal(again.response.headers.get('idempotent-replayed'), 'true')
  t.equal(again.response.headers.get('x-session-id'), first.response.headers.get('x-session-id'))
  t.equal(chatCalls(upstream), 2, 'the replay asked nothing upstream')
  t.equal(await workspaceFile(app, first.response.headers.get('x-session-id')!, 'runs.txt'), 'ran\n')
  t.equal(await sessionCount(app), 1)

  const other = (await failure(client.chat.completions.create({ ...body, messages: [{ role: 'user', content: 'something else' }] }, { headers: { 'Idempotency-Key': 'key-1' } }))) as InstanceType<typeof OpenAI.APIError>
  t.equal(other.status, 422)
  t.match(other.error, { code: 'idempotency_key_reused', param: 'Idempotency-Key' })

  const tenant = (await app.inject({ method: 'POST', url: '/v1/keys', headers: adminAuth, payload: { name: 'tenant' } })).json().key as string
  const theirs = new OpenAI({ baseURL, apiKey: tenant, maxRetries: 0 })
  upstream.script(text('Their own answer.'))
  const separate = await theirs.chat.completions.create(body, { headers: { 'Idempotency-Key': 'key-1' } })
  t.equal(separate.choices[0]!.message.content, 'Their own answer.', "another tenant's key-1 is its own")

  upstream.script(text('Streamed once.'))
  const streamed = async () => {
    let content = ''
    for await (const chunk of await client.chat.completions.create({ ...body, stream: true }, { headers: { 'Idempotency-Key': 'key-2' } })) content += chunk.choices[0]?.delta.content ?? ''
    return content
  }
  t.equal(await streamed(), 'Streamed once.')
  t.equal(await streamed(), 'Streamed once.', 'a stream is replayed as it was sent')
  t.equal(chatCalls(upstream), 4)
})

t.test('response_format reaches the upstream, and content is the final answer only, so it parses (parse() too)', async (t) => {
  const { client, upstream } = await setup(t)
  const messages = [{ role: 'user' as const, content: 'Compute 6*7 and answer in JSON' }]
  upstream.script(toolCall({ language: 'python', code: 'print(6 * 7)' }), text('{"answer": 42}'))
  const res = await client.chat.completions.create({ model: 'gpt-4o-mini', messages, response_format: { type: 'json_object' } })
  t.same(JSON.parse(res.choices[0]!.message.content!), { answer: 42 })
  t.equal(upstream.requests.length, 2)
  for (const request of upstream.requests) t.same(request.body.response_format, { type: 'json_object' })

  const schema = {
    type: 'json_schema' as const,
    json_schema: {
      name: 'answer',
      strict: true,
      schema: { type: 'object', properties: { answer: { type: 'number' } }, required: ['answer'], additionalProperties: false },
    },
  }
  upstream.script(toolCall({ language: 'python', code: 'print(6 * 7)' }), text('{"answer": 42}'))
  const parsed = await client.chat.completions.parse({ model: 'gpt-4o-mini', messages, response_format: schema })
  t.same(parsed.choices[0]!.message.parsed, { answer: 42 })

  upstream.script(toolCall({ language: 'python', code: 'print(6 * 7)' }), text('{"answer": 42}'))
  let streamed = ''
  for await (const chunk of await client.chat.completions.create({ model: 'gpt-4o-mini', messages, response_format: { type: 'json_object' }, stream: true }))
    streamed += chunk.choices[0]?.delta.content ?? ''
  t.same(JSON.parse(streamed), { answer: 42 }, 'a stream carries the final answer only')

  upstream.script(text('plain text'))
  const plain = await client.chat.completions.create({ model: 'gpt-4o-mini', messages, response_format: { type: 'text' } })
  t.equal(plain.choices[0]!.message.content, 'plain text')
})

t.test('stateless history binds to its session: resending the conversation keeps the kernel and its variables', async (t) => {
  const { client, upstream, app } = await setup(t)
  upstream.script(toolCall({ language: 'python', code: 'x = 41' }), text('Stored x.'))
  const history: OpenAI.ChatCompletionMessageParam[] = [{ role: 'user', content: 'set x to 41' }]
  const first = await client.chat.completions.create({ model: 'gpt-4o-mini', messages: history })
  const sessionId = (first as unknown as { session_id: string }).session_id
  t.match(sessionId, /^[0-9a-f-]{36}$/, 'the session id is in the body too')
  history.push({ role: 'assistant', content: first.choices[0]!.message.content }, { role: 'user', content: 'add one' })

  upstream.script(toolCall({ language: 'python', code: 'print(x + 1)' }), text('It is 42.'))
  const second = await client.chat.completions.create({ model: 'gpt-4o-mini', messages: history })
  t.equal((second as unknown as { session_id: string }).session_id, sessionId, 'the same session, found from the history')
  t.match(second.choices[0]!.message.content, /```output\n42\n```/, 'x survived in the kernel')
  t.same(await userMessages(app, sessionId), ['set x to 41', 'add one'], 'nothing stored twice')
  t.equal(await sessionCount(app), 1)

  // A streamed answer is remembered as it was sent.
  upstream.script(text('Streamed reply.'))
  let streamed = ''
  const stream = await client.chat.completions.create({ model: 'gpt-4o-mini', messages: history.concat({ role: 'assistant', content: second.choices[0]!.message.content }, { role: 'user', content: 'more' }), stream: true })
  for await (const chunk of stream) streamed += chunk.choices[0]?.delta.content ?? ''
  upstream.script(text('Still here.'))
  const third = await client.chat.completions.create({
    model: 'gpt-4o-mini',
    messages: [{ role: 'user', content: 'anything' }, { role: 'assistant', content: streamed }, { role: 'user', content: 'again' }],
  })
  t.equal((third as unknown as { session_id: string }).session_id, sessionId)

  upstream.script(text('Bound by metadata.'))
  const byMetadata = await client.chat.completions.create({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'hi' }], metadata: { session_id: sessionId } })
  t.equal((byMetadata as unknown as { session_id: string }).session_id, sessionId, 'metadata.session_id binds too')

  upstream.script(text('A new conversation.'))
  const unrelated = await client.chat.completions.create({
    model: 'gpt-4o-mini',
    messages: [{ role: 'user', content: 'hi' }, { role: 'assistant', content: 'an answer this server never gave' }, { role: 'user', content: 'so?' }],
  })
  t.not((unrelated as unknown as { session_id: string }).session_id, sessionId, 'an unknown history starts a new session')
})
