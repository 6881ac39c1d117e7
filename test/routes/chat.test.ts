import t from 'tap'
import { httpError, startFakeUpstream, text, toolCall } from '../fakes/upstream.js'
import { auth, build, tempDir } from '../helpers/build.js'
import type { Tap } from '../helpers/build.js'
import { parseSse } from '../helpers/sse.js'

const user = (content: string) => ({ role: 'user', type: 'message', content })
// eslint-disable-next-line @typescript-eslint/no-explicit-any -- event payloads are checked field by field
const sseJson = (body: string): { event: string | null; data: any }[] => parseSse(body).map((e) => ({ event: e.event, data: JSON.parse(e.data) }))

async function setup(t: Tap, env: Record<string, string> = {}) {
  const upstream = await startFakeUpstream()
  t.teardown(() => upstream.close())
  const app = await build(t, { LLM_BASE_URL: upstream.url, LLM_API_KEY: 'sk-upstream-secret', SANDBOX: 'none', ...env })
  return { app, upstream }
}

t.test('no upstream configured → 503 llm_not_configured naming the variable', async (t) => {
  const app = await build(t, { SANDBOX: 'none' })
  const res = await app.inject({ method: 'POST', url: '/v1/chat', headers: auth(), payload: { messages: [user('hi')] } })
  t.equal(res.statusCode, 503)
  t.match(res.json(), { error: { type: 'unavailable_error', code: 'llm_not_configured', message: /LLM_BASE_URL/ } })
})

t.test('plain answer: JSON shape, new session, history stored', async (t) => {
  const { app, upstream } = await setup(t)
  upstream.script(text('Hello there!', { usage: { prompt_tokens: 10, completion_tokens: 3, total_tokens: 13 } }))
  const res = await app.inject({ method: 'POST', url: '/v1/chat', headers: auth(), payload: { messages: [user('hi')] } })
  t.equal(res.statusCode, 200)
  const body = res.json()
  t.match(body, {
    message: { role: 'assistant', type: 'message', content: 'Hello there!', id: String, created_at: /Z$/ },
    session_id: /^[0-9a-f-]{36}$/,
    usage: { prompt_tokens: 10, completion_tokens: 3, total_tokens: 13 },
  })
  t.equal(res.headers['x-session-id'], body.session_id)
  const stored = (await app.inject({ url: `/v1/sessions/${body.session_id}/messages`, headers: auth() })).json()
  t.match(stored.messages, [{ role: 'user', content: 'hi' }, { role: 'assistant', content: 'Hello there!' }])
  t.equal(upstream.requests[0]!.headers.authorization, 'Bearer sk-upstream-secret')
  t.equal(upstream.requests[0]!.body.model, 'gpt-4o-mini')
})

t.test('a tool call runs code in the session kernel and feeds the output back', async (t) => {
  const { app, upstream } = await setup(t)
  upstream.script(toolCall({ language: 'python', code: 'x = 6 * 7\nprint(x)' }), text('The answer is 42.'))
  const res = await app.inject({ method: 'POST', url: '/v1/chat', headers: auth(), payload: { messages: [user('compute')] } })
  t.equal(res.statusCode, 200)
  const { messages, message, session_id } = res.json()
  t.match(messages, [
    { role: 'assistant', type: 'code', format: 'python', content: 'x = 6 * 7\nprint(x)' },
    { role: 'computer', type: 'console', format: 'output', stream: 'stdout', content: '42\n' },
    { role: 'assistant', type: 'message', content: 'The answer is 42.' },
  ])
  t.equal(message.content, 'The answer is 42.')
  const second = upstream.requests[1]!.body.messages
  const tool = second.find((m: { role: string }) => m.role === 'tool')
  t.match(tool.content, /42/)
  // the kernel keeps state for the next turn
  upstream.script(toolCall({ language: 'python', code: 'print(x + 1)' }), text('43'))
  const next = await app.inject({ method: 'POST', url: '/v1/chat', headers: auth(), payload: { session_id, messages: [user('again')] } })
  t.match(next.json().messages[1], { content: '43\n' })
  const events = (await app.inject({ url: `/v1/sessions/${session_id}/events?limit=100`, headers: auth() })).json().events
  const types = events.map((e: { type: string }) => e.type)
  t.ok(types.includes('run_started'))
  t.ok(types.includes('execution_started'))
  t.ok(types.includes('execution_finished'))
  t.ok(types.includes('run_finished'))
})

t.test('SSE: message chunks framed by start/end, then done; hook headers kept', async (t) => {
  const { app, upstream } = await setup(t)
  upstream.script(toolCall({ language: 'shell', code: 'echo streamed' }), text('Done streaming.'))
  const res = await app.inject({ method: 'POST', url: '/v1/chat', headers: auth(), payload: { messages: [user('go')], stream: true } })
  t.equal(res.statusCode, 200)
  t.match(res.headers['content-type'], /^text\/event-stream/)
  t.ok(res.headers['x-request-id'])
  t.ok(res.headers['x-ratelimit-limit'])
  t.ok(res.headers['x-session-id'])
  const events = parseSse(res.body)
  const messages = events.filter((e) => e.event === 'message').map((e) => JSON.parse(e.data))
  t.match(messages[0], { role: 'assistant', type: 'code', format: 'shell', start: true })
  const console = messages.filter((c) => c.type === 'console' && c.content)
  t.match(console.map((c) => c.content).join(''), /streamed/)
  for (const c of messages) t.ok(c.id && c.created_at, 'every chunk has id and created_at')
  const ids = new Set(messages.map((c) => c.id))
  for (const id of ids) {
    const own = messages.filter((c) => c.id === id)
    t.ok(own[0].start && own.at(-1).end, 'each message starts and ends')
  }
  const done = events.at(-1)!
  t.equal(done.event, 'done')
  t.match(JSON.parse(done.data), { session_id: String, usage: { total_tokens: Number } })
})

t.test('one run per session: 409 session_busy; stop cancels the run', async (t) => {
  const { app, upstream } = await setup(t)
  const { session_id } = (await app.inject({ method: 'POST', url: '/v1/sessions', headers: auth() })).json()
  upstream.script(text('slow answer', { firstByteMs: 1500 }))
  const first = app.inject({ method: 'POST', url: '/v1/chat', headers: auth(), payload: { session_id, messages: [user('1')] } })
  await new Promise((r) => setTimeout(r, 300))
  const busy = await app.inject({ method: 'POST', url: '/v1/chat', headers: auth(), payload: { session_id, messages: [user('2')] } })
  t.equal(busy.statusCode, 409)
  t.match(busy.json(), { error: { code: 'session_busy', type: 'conflict_error' } })
  const stop = await app.inject({ method: 'POST', url: `/v1/sessions/${session_id}/stop`, headers: auth() })
  t.same(stop.json(), { ok: true })
  const res = await first
  t.equal(res.statusCode, 200)
  const idle = await app.inject({ method: 'POST', url: `/v1/sessions/${session_id}/stop`, headers: auth() })
  t.same(idle.json(), { ok: false, detail: 'No run in progress' })
})

t.test('auto_run false: a non-stream chat returns at once with the pending confirmation, and POST /confirm resumes the turn', async (t) => {
  const { app, upstream } = await setup(t)
  const { session_id } = (await app.inject({ method: 'POST', url: '/v1/sessions', headers: auth() })).json()
  upstream.script(toolCall({ language: 'python', code: 'print("approved")' }), text('ran it'))
  const first = await app.inject({
    method: 'POST',
    url: '/v1/chat',
    headers: auth(),
    payload: { session_id, messages: [user('run')], config: { auto_run: false } },
  })
  t.equal(first.statusCode, 200)
  const suspended = first.json()
  t.match(suspended.messages, [
    { type: 'code', format: 'python', content: 'print("approved")' },
    { role: 'computer', type: 'confirmation', format: 'execution', content: { type: 'code', format: 'python', content: 'print("approved")' } },
  ])
  t.same(suspended.pending, { type: 'confirmation', message_id: suspended.messages[0].id, language: 'python', code: 'print("approved")' })
  t.equal(app.runs.size, 0, 'nothing is left running')
  t.equal(upstream.requests.length, 1)

  const busyChatless = await app.inject({ method: 'POST', url: `/v1/sessions/${session_id}/confirm`, headers: auth(), payload: { approve: 'yes' } })
  t.equal(busyChatless.statusCode, 400, 'approve must be a boolean')

  const confirmed = await app.inject({ method: 'POST', url: `/v1/sessions/${session_id}/confirm`, headers: auth(), payload: { approve: true } })
  t.equal(confirmed.statusCode, 200)
  const resumed = confirmed.json()
  t.equal(resumed.pending, undefined)
  t.match(resumed.messages, [
    { type: 'console', content: 'approved\n' },
    { type: 'message', content: 'ran it' },
  ])
  t.equal(resumed.message.content, 'ran it')
  const sent = upstream.requests[1]!.body.messages
  t.same(sent.map((m: { role: string }) => m.role), ['system', 'user', 'assistant', 'tool'])
  t.equal(sent[3].content, 'approved\n')

  const nothing = await app.inject({ method: 'POST', url: `/v1/sessions/${session_id}/confirm`, headers: auth(), payload: { approve: true } })
  t.equal(nothing.statusCode, 409)
  t.match(nothing.json(), { error: { code: 'nothing_to_confirm' } })
  const events = (await app.inject({ url: `/v1/sessions/${session_id}/events?limit=100`, headers: auth() })).json().events.map((e: { type: string }) => e.type)
  const runEvents = events.filter((type: string) => type.startsWith('run_') || type === 'awaiting_confirmation')
  t.same(runEvents, ['run_started', 'awaiting_confirmation', 'run_suspended', 'run_started', 'run_finished'])
})

t.test('auto_run false: declining through the next chat request (a confirmation message), streamed, and a new message ends a waiting turn', async (t) => {
  const { app, upstream } = await setup(t)
  upstream.script(toolCall({ language: 'shell', code: 'rm -rf /tmp/nothing' }), text('I will not run it.'))
  const first = await app.inject({ method: 'POST', url: '/v1/chat', headers: auth(), payload: { messages: [user('clean up')], config: { auto_run: false }, stream: true } })
  const done = sseJson(first.body).find((e) => e.event === 'done')
  t.match(done?.data, { stopped: false, pending: { type: 'confirmation', language: 'shell', code: 'rm -rf /tmp/nothing' } })
  const session_id = first.headers['x-session-id'] as string

  const declined = await app.inject({
    method: 'POST',
    url: '/v1/chat',
    headers: auth(),
    payload: { session_id, messages: [{ role: 'user', type: 'confirmation', content: { approve: false } }] },
  })
  t.equal(declined.statusCode, 200)
  t.match(declined.json().messages, [{ type: 'console', content: /declined/ }, { type: 'message', content: 'I will not run it.' }])
  t.match(upstream.requests[1]!.body.messages.at(-1), { role: 'tool', content: /declined/ })

  upstream.script(toolCall({ language: 'python', code: 'print(1)' }), text('Fine, something else.'))
  await app.inject({ method: 'POST', url: '/v1/chat', headers: auth(), payload: { session_id, messages: [user('print one')], config: { auto_run: false } } })
  const moved = await app.inject({ method: 'POST', url: '/v1/chat', headers: auth(), payload: { session_id, messages: [user('never mind, just say hi')] } })
  t.equal(moved.statusCode, 200)
  t.equal(moved.json().message.content, 'Fine, something else.')
  const sent = upstream.requests[3]!.body.messages
  t.match(sent.slice(-3), [{ role: 'assistant', tool_calls: [{ function: { name: 'execute' } }] }, { role: 'tool', content: /not approved|did not approve/ }, { role: 'user', content: 'never mind, just say hi' }])
  const again = await app.inject({ method: 'POST', url: `/v1/sessions/${session_id}/confirm`, headers: auth(), payload: { approve: true } })
  t.equal(again.statusCode, 409, 'the waiting turn is over')
  const lone = await app.inject({ method: 'POST', url: '/v1/chat', headers: auth(), payload: { session_id, messages: [user('x'), { role: 'user', type: 'confirmation', content: { approve: true } }] } })
  t.equal(lone.statusCode, 400)
  t.match(lone.json(), { error: { code: 'invalid_message', param: 'messages[1]' } })
})

t.test('a suspended turn survives a restart: a new app on the same data directory resumes it', async (t) => {
  const upstream = await startFakeUpstream()
  t.teardown(() => upstream.close())
  const dir = tempDir(t)
  const env = { LLM_BASE_URL: upstream.url, SANDBOX: 'none', DATA_DIR: dir }
  const before = await build(t, env)
  upstream.script(toolCall({ language: 'python', code: 'print(6 * 7)' }), text('It is 42.'))
  const first = await before.inject({ method: 'POST', url: '/v1/chat', headers: auth(), payload: { messages: [user('compute')], config: { auto_run: false } } })
  const { session_id, pending } = first.json()
  t.equal(pending.type, 'confirmation')
  await before.close()

  const after = await build(t, env)
  const resumed = await after.inject({ method: 'POST', url: `/v1/sessions/${session_id}/confirm`, headers: auth(), payload: { approve: true, stream: true } })
  t.equal(resumed.statusCode, 200)
  const events = sseJson(resumed.body)
  // output streams as produced: print() may arrive as "42" then "\n"
  const output = events.filter((e) => e.event === 'message' && e.data.type === 'console' && typeof e.data.content === 'string')
  t.equal(output.map((e) => e.data.content).join(''), '42\n', 'the approved code ran in the new process')
  t.match(events.at(-1), { event: 'done', data: { session_id, stopped: false } })
  t.notOk('pending' in events.at(-1)!.data)
})

t.test('upstream failures: 502 llm_error without leaking the upstream key; event: error mid-stream', async (t) => {
  const { app, upstream } = await setup(t)
  upstream.script(httpError(500, 'upstream exploded with key sk-upstream-secret'), httpError(500, 'again sk-upstream-secret'))
  const res = await app.inject({ method: 'POST', url: '/v1/chat', headers: auth(), payload: { messages: [user('hi')] } })
  t.equal(res.statusCode, 502)
  t.match(res.json(), { error: { type: 'upstream_error', code: 'llm_error' } })
  t.notMatch(res.body, /sk-upstream-secret/)

  upstream.script(text('this stream breaks in the middle of a long answer', { breakAfterChunks: 2 }))
  const broken = await app.inject({ method: 'POST', url: '/v1/chat', headers: auth(), payload: { messages: [user('hi')], stream: true } })
  const events = parseSse(broken.body)
  const error = events.find((e) => e.event === 'error')
  t.ok(error, 'an error event is sent')
  t.match(JSON.parse(error!.data), { error: { code: 'llm_error' } })
})

t.test('a client that disconnects cancels the upstream request', async (t) => {
  const { app, upstream } = await setup(t)
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as { port: number }
  upstream.script(text('a b c d e f g h i j k l m n o p', { chunkMs: 200 }))
  const controller = new AbortController()
  const res = await fetch(`http://127.0.0.1:${port}/v1/chat`, {
    method: 'POST',
    headers: { ...auth(), 'content-type': 'application/json' },
    body: JSON.stringify({ messages: [user('hi')], stream: true }),
    signal: controller.signal,
  })
  const reader = res.body!.getReader()
  await reader.read()
  controller.abort()
  for (let i = 0; i < 40 && app.runs.size > 0; i++) await new Promise((r) => setTimeout(r, 100))
  t.equal(app.runs.size, 0, 'the run ended')
  await upstream.settled()
  t.ok(upstream.requests[0]!.aborted, 'the upstream request was aborted')
})

t.test('bad input, 401 and 404', async (t) => {
  const { app } = await setup(t)
  t.equal((await app.inject({ method: 'POST', url: '/v1/chat', payload: { messages: [user('x')] } })).statusCode, 401)
  const empty = await app.inject({ method: 'POST', url: '/v1/chat', headers: auth(), payload: { messages: [] } })
  t.equal(empty.statusCode, 400)
  t.match(empty.json(), { error: { type: 'validation_error', param: 'messages' } })
  const badRole = await app.inject({ method: 'POST', url: '/v1/chat', headers: auth(), payload: { messages: [{ role: 'wizard', content: 'x' }] } })
  t.equal(badRole.statusCode, 400)
  const unknown = await app.inject({
    method: 'POST',
    url: '/v1/chat',
    headers: auth(),
    payload: { session_id: '00000000-0000-4000-8000-000000000000', messages: [user('x')] },
  })
  t.equal(unknown.statusCode, 404)
  t.match(unknown.json(), { error: { code: 'session_not_found' } })
  for (const path of ['stop', 'confirm']) {
    const res = await app.inject({ method: 'POST', url: `/v1/sessions/nope/${path}`, headers: auth(), payload: { approve: true } })
    t.equal(res.statusCode, 404, path)
  }
})

t.test('Idempotency-Key on /v1/chat: a repeat replays the first answer; a malformed key is 400', async (t) => {
  const { app, upstream } = await setup(t)
  upstream.script(text('Only once.'))
  const send = (key: string, content = 'hi') =>
    app.inject({ method: 'POST', url: '/v1/chat', headers: { ...auth(), 'idempotency-key': key }, payload: { messages: [user(content)] } })
  const first = await send('k1')
  const again = await send('k1')
  t.equal(again.statusCode, 200)
  t.equal(again.body, first.body)
  t.equal(again.headers['idempotent-replayed'], 'true')
  t.equal(again.headers['x-session-id'], first.headers['x-session-id'])
  t.equal(upstream.requests.length, 1, 'the repeat asked nothing upstream')
  const reused = await send('k1', 'another question')
  t.equal(reused.statusCode, 422)
  t.match(reused.json(), { error: { code: 'idempotency_key_reused' } })
  t.equal(reused.headers['x-should-retry'], 'false')
  const tooLong = await send('x'.repeat(256))
  t.equal(tooLong.statusCode, 400)
  t.match(tooLong.json(), { error: { param: 'Idempotency-Key' } })
})

t.test('POST /confirm honours Idempotency-Key: a repeat replays the resumed turn; the same key on another session is another request (422), never its answer', async (t) => {
  const { app, upstream } = await setup(t)
  const suspend = async () => {
    upstream.script(toolCall({ language: 'python', code: 'print("once")' }), text('done'))
    const res = await app.inject({ method: 'POST', url: '/v1/chat', headers: auth(), payload: { messages: [user('run')], config: { auto_run: false } } })
    return res.json().session_id as string
  }
  const a = await suspend()
  const confirm = (session: string, key: string) =>
    app.inject({ method: 'POST', url: `/v1/sessions/${session}/confirm`, headers: { ...auth(), 'idempotency-key': key }, payload: { approve: true } })
  const first = await confirm(a, 'k-1')
  const again = await confirm(a, 'k-1')
  t.equal(first.statusCode, 200)
  t.equal(again.headers['idempotent-replayed'], 'true')
  t.same(again.json(), first.json())
  const b = await suspend()
  const reused = await confirm(b, 'k-1')
  t.equal(reused.statusCode, 422)
  t.match(reused.json(), { error: { code: 'idempotency_key_reused' } })
  const other = await confirm(b, 'k-2')
  t.equal(other.statusCode, 200)
  t.match(other.json().messages, [{ type: 'console', content: 'once\n' }, { content: 'done' }])
})
