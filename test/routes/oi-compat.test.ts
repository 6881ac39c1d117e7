import { spawn, spawnSync } from 'node:child_process'
import { once } from 'node:events'
import { existsSync } from 'node:fs'
import { fileURLToPath } from 'node:url'
import OpenAI from 'openai'
import t, { type Test } from 'tap'
import WebSocket from 'ws'
import { startFakeUpstream, text, toolCall } from '../fakes/upstream.js'
import { ADMIN_KEY, auth, build } from '../helpers/build.js'

const PYTHON = '/usr/bin/python3'
const CLIENT = fileURLToPath(new URL('./oi-compat-client.py', import.meta.url))

/** Runs the Python client to its end; resolves with its exit code and output. */
function runClient(env: Record<string, string>): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn('setpriv', ['--pdeathsig', 'SIGKILL', '--', PYTHON, CLIENT], { env: { PATH: process.env.PATH ?? '', ...env }, stdio: ['ignore', 'pipe', 'pipe'] })
    let stdout = ''
    let stderr = ''
    child.stdout.on('data', (d) => (stdout += d))
    child.stderr.on('data', (d) => (stderr += d))
    child.on('close', (code) => resolve({ code, stdout, stderr }))
  })
}

const hasPythonClients = () => existsSync(PYTHON) && spawnSync(PYTHON, ['-c', 'import websockets, requests']).status === 0

const noPythonClients = hasPythonClients() ? false : 'needs /usr/bin/python3 with python3-websockets and python3-requests'

t.test("Open Interpreter's test_server flow, driven by a Python client on OI_COMPAT_PORT", { skip: noPythonClients }, async (t) => {
  const upstream = await startFakeUpstream()
  t.teardown(() => upstream.close())
  const app = await build(t, { LLM_BASE_URL: upstream.url, SANDBOX: 'none' })
  const main = await app.listen({ host: '127.0.0.1', port: 0 })
  const port = await app.listenOiCompat({ host: '127.0.0.1', port: 0 })
  const poem = 'Rain on the Sound, ferries hum low, cedar and coffee, the mountain aglow; gray skies above and the markets below.'
  upstream.script(
    text("The secret word is 'crunk'."),
    text("The secret word is 'barloney'."),
    toolCall({ language: 'python', code: 'print(239023*79043)' }),
    text('239023 times 79043 is 18893094989.'),
    text(poem, { pieces: 30, chunkMs: 20 }),
  )
  const run = await runClient({ OI_PORT: String(port), MAIN_URL: main, OI_KEY: ADMIN_KEY, POEM: poem })
  t.equal(run.code, 0, run.stderr)
  const steps = Object.fromEntries(
    run.stdout
      .trim()
      .split('\n')
      .filter(Boolean)
      .map((line) => {
        const step = JSON.parse(line)
        return [step.step, step]
      }),
  )
  t.same(Object.keys(steps), ['plain', 'reset', 'awaiting', 'go', 'nothing-to-go', 'reconnect', 'wrong-key'])

  // The history posted to /settings is what the model saw, and the reset replaced it.
  const said = (i: number) => JSON.stringify(upstream.requests[i]?.body.messages)
  t.match(said(0), /crunk/)
  t.notMatch(said(1), /crunk/)
  t.match(said(1), /barloney/)
  t.notMatch(said(2), /barloney/, 'messages: [] reset the conversation')

  // Upstream's framing: code block, then approval waits with complete; go runs it, console block with active_line 1 then null.
  t.same(steps.awaiting.frames, [
    { role: 'assistant', type: 'code', format: 'python', start: true },
    ...steps.awaiting.frames.slice(1, -2),
    { role: 'assistant', type: 'code', format: 'python', end: true },
    { role: 'server', type: 'status', content: 'complete' },
  ])
  t.equal(steps.awaiting.frames.slice(1, -2).map((f: { content: string }) => f.content).join(''), 'print(239023*79043)')
  t.same(steps.go.frames[0], { role: 'computer', type: 'console', start: true })
  // The line report and the output travel on two pipes of the kernel: their relative order is not fixed.
  t.same(consoleBlock(t, steps.go.frames), { lines: [1, null], output: '18893094989\n' })
  t.same(steps.go.frames.at(-1), { role: 'server', type: 'status', content: 'complete' })
  t.equal(steps['nothing-to-go'].error.content, 'No turn in this session is waiting for a confirmation')

  // The answer was cut after four acknowledged frames; the next socket got exactly the rest.
  t.ok(steps.reconnect.first.length > 0 && steps.reconnect.rest.length > 0)
  t.equal(steps.reconnect.first + steps.reconnect.rest, poem)
  t.equal(steps['wrong-key'].status, 401)
})

t.test('the HTTP side under /oi on the main port: keys, settings allowlist, default session', async (t) => {
  const upstream = await startFakeUpstream()
  t.teardown(() => upstream.close())
  const app = await build(t, { LLM_BASE_URL: upstream.url, SANDBOX: 'none' })
  const key = { 'x-api-key': ADMIN_KEY }

  const heartbeat = await app.inject({ url: '/oi/heartbeat' })
  t.same(heartbeat.json(), { status: 'alive' })
  t.equal((await app.inject({ url: '/oi/settings/llm' })).json().error.code, 'missing_api_key')
  const wrong = await app.inject({ url: '/oi/settings/llm', headers: { 'x-api-key': 'nope' } })
  t.equal(wrong.statusCode, 401)
  t.equal(wrong.json().error.code, 'invalid_api_key')
  t.same((await app.inject({ url: '/oi/settings/llm', headers: auth() })).json(), { llm: { model: 'gpt-4o-mini', temperature: 0.7, max_tokens: 4096 } })
  t.equal((await app.inject({ url: '/oi/settings/computer', headers: key })).statusCode, 404)

  const post = (payload: object) => app.inject({ method: 'POST', url: '/oi/settings', headers: key, payload })
  const refusals: [object, number, string][] = [
    [{ auto_run: false }, 403, 'auto_run'],
    [{ auto_run: true, messages: [] }, 403, 'auto_run'],
    [{ computer: { verbose: true } }, 403, 'computer'],
    [{ llm: { api_base: 'http://evil.example/v1' } }, 403, 'llm.api_base'],
    [{ llm: { api_key: 'sk-x' } }, 403, 'llm.api_key'],
    [{ llm: { supports_functions: false } }, 400, 'llm.supports_functions'],
    [{ verbose: false }, 400, 'verbose'],
    [{ llm: { temperature: 7 } }, 400, 'llm.temperature'],
  ]
  for (const [payload, status, param] of refusals) {
    const res = await post(payload)
    t.equal(res.statusCode, status, JSON.stringify(payload))
    t.equal(res.json().error.param, param)
  }
  t.equal((await post({ custom_instructions: 'Be brief.', llm: { model: 'fake-model', temperature: 0.2 } })).statusCode, 200)
  t.match((await app.inject({ url: '/v1/settings', headers: auth() })).json(), { custom_instructions: 'Be brief.', model: 'fake-model', temperature: 0.2, auto_run: true })

  t.equal((await post({ messages: [{ role: 'user', type: 'message', content: 'The word is crunk.' }] })).statusCode, 200)
  const messages = await app.inject({ url: '/oi/settings/messages', headers: key })
  t.same(messages.json(), { messages: [{ role: 'user', type: 'message', content: 'The word is crunk.' }] })
  const sessions = (await app.inject({ url: '/v1/sessions', headers: auth() })).json().sessions
  t.equal(sessions.length, 1, 'one default session for the key')
  // A deleted default session is replaced on next use.
  t.equal((await app.inject({ method: 'DELETE', url: `/v1/sessions/${sessions[0].session_id}`, headers: auth() })).statusCode, 204)
  t.same((await app.inject({ url: '/oi/settings/messages', headers: key })).json(), { messages: [] })
  const after = (await app.inject({ url: '/v1/sessions', headers: auth() })).json().sessions
  t.equal(after.length, 1)
  t.not(after[0].session_id, sessions[0].session_id)
})

t.test("/oi/openai/chat/completions through the openai SDK: the last user message against the server's history", async (t) => {
  const upstream = await startFakeUpstream()
  t.teardown(() => upstream.close())
  const app = await build(t, { LLM_BASE_URL: upstream.url, SANDBOX: 'none' })
  const main = await app.listen({ host: '127.0.0.1', port: 0 })
  const client = new OpenAI({ baseURL: `${main}/oi/openai`, apiKey: ADMIN_KEY, maxRetries: 0 })

  upstream.script(text('Hello there.'))
  const first = await client.chat.completions.create({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'Hi, I am Ann.' }] })
  t.equal(first.choices[0]?.message.content, 'Hello there.')

  // The client sends only what it has; the server's history is what counts.
  upstream.script(text('You are Ann.', { pieces: 5 }))
  const stream = await client.chat.completions.create({ model: 'gpt-4o-mini', stream: true, messages: [{ role: 'system', content: 'ignored' }, { role: 'user', content: 'Who am I?' }] })
  let streamed = ''
  for await (const chunk of stream) streamed += chunk.choices[0]?.delta.content ?? ''
  t.equal(streamed, 'You are Ann.')
  const seen = JSON.stringify(upstream.requests.at(-1)?.body.messages)
  t.match(seen, /Hi, I am Ann\./)
  t.match(seen, /Hello there\./)
  t.notMatch(seen, /ignored/)

  // auto_run off: the answer stops at the code and asks; the turn waits for approval.
  await app.inject({ method: 'PATCH', url: '/v1/settings', headers: auth(), payload: { auto_run: false } })
  upstream.script(toolCall({ language: 'python', code: 'print(6*7)' }), text('It is 42.'))
  const asked = await client.chat.completions.create({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'six times seven?' }] }).withResponse()
  t.match(asked.data.choices[0]?.message.content, /```python\nprint\(6\*7\)\n```\n\nDo you want to run this code\?$/)
  const sessionId = asked.response.headers.get('x-session-id')
  const confirmed = await app.inject({ method: 'POST', url: `/v1/sessions/${sessionId}/confirm`, headers: auth(), payload: { approve: true } })
  t.equal(confirmed.statusCode, 200)
  t.equal(confirmed.json().message.content, 'It is 42.')

  const refused = await client.chat.completions.create({ model: 'gpt-4o-mini', messages: [{ role: 'assistant', content: 'x' }] }).catch((err: unknown) => err)
  t.match(refused, { status: 400, error: { param: 'messages[0].role' } })
})

t.test('the compat listener serves only the protocol: the native API is not reachable through it', async (t) => {
  const app = await build(t, { SANDBOX: 'none' })
  await app.listen({ host: '127.0.0.1', port: 0 })
  const port = await app.listenOiCompat({ host: '127.0.0.1', port: 0 })
  const heartbeat = await fetch(`http://127.0.0.1:${port}/heartbeat`)
  t.same(await heartbeat.json(), { status: 'alive' })
  t.ok(heartbeat.headers.get('x-request-id'), 'the same hooks run')
  const native = await fetch(`http://127.0.0.1:${port}/v1/sessions`, { headers: auth() })
  t.equal(native.status, 404)
  t.equal(((await native.json()) as { error: { code: string } }).error.code, 'not_found')
})

/** A WebSocket client that queues what it receives. */
async function socketTo(t: Test, url: string) {
  const ws = new WebSocket(url)
  const queue: unknown[] = []
  const waiting: ((frame: unknown) => void)[] = []
  ws.on('message', (data) => {
    const frame = JSON.parse(String(data))
    const next = waiting.shift()
    if (next) next(frame)
    else queue.push(frame)
  })
  await once(ws, 'open')
  t.teardown(() => ws.close())
  const next = () => (queue.length > 0 ? Promise.resolve(queue.shift()) : new Promise<unknown>((resolve) => waiting.push(resolve)))
  return {
    send: (frame: object) => ws.send(JSON.stringify(frame)),
    say: (text: string, type = 'message') => {
      for (const chunk of [{ start: true }, { content: text }, { end: true }]) ws.send(JSON.stringify({ role: 'user', type, ...chunk }))
    },
    next,
    /** Frames up to and including the next complete. */
    async untilComplete(): Promise<Record<string, unknown>[]> {
      const frames: Record<string, unknown>[] = []
      for (;;) {
        const frame = (await next()) as Record<string, unknown>
        frames.push(frame)
        if (frame.role === 'server' && frame.content === 'complete') return frames
      }
    },
    close: () => ws.close(),
  }
}

const contentOf = (frames: Record<string, unknown>[]) => frames.map((f) => (f.role !== 'server' && typeof f.content === 'string' ? f.content : '')).join('')
const completes = (frames: Record<string, unknown>[]) => frames.filter((f) => f.role === 'server' && f.content === 'complete').length

t.test('on the /oi/ socket of the main port: a new message interrupts the answer, stop ends one without complete', async (t) => {
  const upstream = await startFakeUpstream()
  t.teardown(() => upstream.close())
  const app = await build(t, { LLM_BASE_URL: upstream.url, SANDBOX: 'none' })
  const main = await app.listen({ host: '127.0.0.1', port: 0 })
  const ws = await socketTo(t, `${main.replace('http', 'ws')}/oi/`)
  ws.send({ auth: ADMIN_KEY })
  t.same(await ws.next(), { auth: true })

  const long = 'one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen'
  // The first answer stops after two pieces and waits for its client, who interrupts it.
  upstream.script(text(long, { pieces: 16, holdAfterChunks: 3 }), text('Second answer.'))
  ws.say('first')
  t.same(await ws.next(), { role: 'assistant', type: 'message', start: true })
  t.match(await ws.next(), { role: 'assistant', type: 'message', content: /^one/ })
  ws.say('second')
  const rest = await ws.untilComplete()
  t.equal(completes(rest), 1, 'the interrupted answer has no complete of its own')
  t.match(contentOf(rest), /Second answer\.$/)
  t.notMatch(contentOf(rest), /sixteen/, 'the first answer stopped')
  t.match(JSON.stringify(upstream.requests[1]?.body.messages), /second/)

  upstream.script(text(long, { pieces: 16, holdAfterChunks: 3 }), text('After the stop.'))
  ws.say('third')
  t.same(await ws.next(), { role: 'assistant', type: 'message', start: true })
  await ws.next()
  ws.say('stop', 'command')
  ws.say('fourth')
  const after = await ws.untilComplete()
  t.equal(completes(after), 1, 'no complete after stop, one after the next answer')
  t.match(contentOf(after), /After the stop\.$/)
})

t.test('a socket that connects gets the output no socket received (a turn run through the native API)', async (t) => {
  const upstream = await startFakeUpstream()
  t.teardown(() => upstream.close())
  const app = await build(t, { LLM_BASE_URL: upstream.url, SANDBOX: 'none' })
  const main = await app.listen({ host: '127.0.0.1', port: 0 })
  const first = await socketTo(t, `${main.replace('http', 'ws')}/oi/`)
  first.send({ auth: ADMIN_KEY })
  t.same(await first.next(), { auth: true })
  first.close()

  const sessionId = (await app.inject({ url: '/v1/sessions', headers: auth() })).json().sessions[0].session_id
  upstream.script(toolCall({ language: 'python', code: 'print(6*7)' }), text('It is 42.'))
  const turn = await app.inject({ method: 'POST', url: '/v1/chat', headers: auth(), payload: { session_id: sessionId, messages: [{ role: 'user', content: '6*7?' }] } })
  t.equal(turn.statusCode, 200)

  const second = await socketTo(t, `${main.replace('http', 'ws')}/oi/`)
  second.send({ auth: ADMIN_KEY })
  t.same(await second.next(), { auth: true })
  t.same(await second.untilComplete(), [
    { role: 'assistant', type: 'code', format: 'python', start: true },
    { role: 'assistant', type: 'code', format: 'python', content: 'print(6*7)' },
    { role: 'assistant', type: 'code', format: 'python', end: true },
    { role: 'computer', type: 'console', start: true },
    { role: 'computer', type: 'console', format: 'output', content: '42\n' },
    { role: 'computer', type: 'console', format: 'active_line', content: null },
    { role: 'computer', type: 'console', end: true },
    { role: 'assistant', type: 'message', start: true },
    { role: 'assistant', type: 'message', content: 'It is 42.' },
    { role: 'assistant', type: 'message', end: true },
    { role: 'server', type: 'status', content: 'complete' },
  ])
  // Received now: a third socket gets nothing old, and frames before auth are refused.
  const third = await socketTo(t, `${main.replace('http', 'ws')}/oi/`)
  third.say('hello')
  t.same([await third.next(), await third.next(), await third.next()], [{ auth: false }, { auth: false }, { auth: false }])
  third.send({ auth: ADMIN_KEY })
  t.same(await third.next(), { auth: true })
  third.send({ role: 'user', type: 'message', content: 'no start' })
  t.same(await third.next(), { role: 'server', type: 'error', content: "Send a 'start' chunk first to create the message" })
  t.same(await third.next(), { role: 'server', type: 'status', content: 'complete' })
})

/** The console block of an answer: its active_line contents in order, and its output. */
function consoleBlock(t: Test, frames: Record<string, unknown>[]) {
  const from = frames.findIndex((f) => f.type === 'console' && f.start === true)
  const to = frames.findIndex((f, i) => i > from && f.type === 'console' && f.end === true)
  t.ok(from >= 0 && to > from, 'one console block')
  const block = frames.slice(from + 1, to)
  t.ok(
    block.every((f) => f.role === 'computer' && f.type === 'console'),
    'active lines travel inside the console block',
  )
  t.same(block.at(-1), { role: 'computer', type: 'console', format: 'active_line', content: null }, 'null closes it')
  return {
    lines: block.filter((f) => f.format === 'active_line').map((f) => f.content),
    output: block.map((f) => (f.format === 'output' ? f.content : '')).join(''),
  }
}

t.test('code run over the protocol reports its active lines: integers as they change, null at the end', async (t) => {
  const upstream = await startFakeUpstream()
  t.teardown(() => upstream.close())
  const app = await build(t, { LLM_BASE_URL: upstream.url, SANDBOX: 'none' })
  const main = await app.listen({ host: '127.0.0.1', port: 0 })
  const ws = await socketTo(t, `${main.replace('http', 'ws')}/oi/`)
  ws.send({ auth: ADMIN_KEY })
  t.same(await ws.next(), { auth: true })

  upstream.script(toolCall({ language: 'python', code: 'a = 1\nb = a + 1\nprint(a + b)' }), text('3.'))
  ws.say('three lines')
  const three = consoleBlock(t, await ws.untilComplete())
  t.same(three.lines, [1, 2, 3, null], 'a Python cell of three lines: 1, 2, 3, then null')
  t.equal(three.output, '3\n', 'the output carries no marker')

  upstream.script(toolCall({ language: 'python', code: 'for i in range(2):\n    x = i\n    y = i * 2\nx + y' }), text('Done.'))
  ws.say('loop')
  const loop = consoleBlock(t, await ws.untilComplete())
  t.same(loop.lines, [1, 2, 3, 2, 3, 4, null], 'a loop reports its body on every pass')
  t.equal(loop.output, '3', 'the trailing expression is still displayed')

  upstream.script(toolCall({ language: 'python', code: 'x = 1\nprint(undefined_name)' }), text('Failed.'))
  ws.say('error')
  const failed = consoleBlock(t, await ws.untilComplete())
  t.same(failed.lines, [1, 2, null])
  t.match(failed.output, /line 2, in <module>[\s\S]*NameError: name 'undefined_name' is not defined/, 'the error names the line the user wrote')

  upstream.script(toolCall({ language: 'shell', code: 'echo one\necho two' }), text('Echoed.'))
  ws.say('shell')
  const shell = consoleBlock(t, await ws.untilComplete())
  t.same(shell.lines, [1, 2, null], 'shell: two lines give 1, 2')
  t.equal(shell.output, 'one\ntwo\n')

  // Line numbers are live only: the stored messages and a replay have none.
  const messages = (await app.inject({ url: '/oi/settings/messages', headers: { 'x-api-key': ADMIN_KEY } })).json().messages as { format?: string }[]
  t.notOk(
    messages.some((m) => m.format === 'active_line'),
    'no active_line is stored',
  )
  upstream.script(toolCall({ language: 'python', code: 'v = 6\nv * 7' }), text('42.'))
  const sessionId = (await app.inject({ url: '/v1/sessions', headers: auth() })).json().sessions[0].session_id
  const native = await app.inject({ method: 'POST', url: '/v1/chat', headers: auth(), payload: { session_id: sessionId, messages: [{ role: 'user', content: 'native' }], stream: true } })
  t.equal(native.statusCode, 200)
  t.notMatch(native.body, /active_line/, 'a turn of the native API reports no lines')
  const replayed = consoleBlock(t, await ws.untilComplete())
  t.same(replayed.lines, [null], 'and its console block over the protocol closes with null alone')
  t.equal(replayed.output, '42')
})
