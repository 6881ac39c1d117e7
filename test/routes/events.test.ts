import { randomBytes, randomUUID } from 'node:crypto'
import { once } from 'node:events'
import { type AddressInfo, connect } from 'node:net'
import t from 'tap'
import WebSocket from 'ws'
import { newApiKey } from '../../services/auth.js'
import { httpError, startFakeUpstream, text, toolCall } from '../fakes/upstream.js'
import { auth, build, type FastifyInstance, type Tap } from '../helpers/build.js'

const user = (content: string) => ({ role: 'user', type: 'message', content })
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

interface WireEvent {
  id: number
  type: string
  created_at: string
  // eslint-disable-next-line @typescript-eslint/no-explicit-any -- event payloads are checked field by field
  data: any
}

async function setup(t: Tap, env: Record<string, string> = {}) {
  const upstream = await startFakeUpstream()
  t.teardown(() => upstream.close())
  const app = await build(t, { LLM_BASE_URL: upstream.url, SANDBOX: 'none', ...env })
  return { app, upstream }
}

async function newSession(app: FastifyInstance, key?: string): Promise<string> {
  return (await app.inject({ method: 'POST', url: '/v1/sessions', headers: auth(key) })).json().session_id
}

/** A second tenant: a managed key made straight in the store. */
async function tenantKey(app: FastifyInstance): Promise<string> {
  const { key, record } = newApiKey('tenant-b', null)
  await app.store.createApiKey(record)
  return key
}

/** The whole log over REST, paged at the maximum page size. */
async function allEvents(app: FastifyInstance, sessionId: string): Promise<WireEvent[]> {
  const out: WireEvent[] = []
  for (;;) {
    const res = await app.inject({ url: `/v1/sessions/${sessionId}/events?limit=100&start_id=${(out.at(-1)?.id ?? 0) + 1}`, headers: auth() })
    const page = res.json()
    out.push(...page.events)
    if (!page.has_more) return out
  }
}

async function lastEventId(app: FastifyInstance, sessionId: string): Promise<number> {
  const res = await app.inject({ url: `/v1/sessions/${sessionId}/events?reverse=true&limit=1`, headers: auth() })
  return res.json().events[0]?.id ?? 0
}

const range = (from: number, to: number) => Array.from({ length: Math.max(0, to - from + 1) }, (_, i) => from + i)

/**
 * A WebSocket client that records every frame, so a test can wait for a frame and still check
 * the full sequence afterwards.
 */
class Client {
  // eslint-disable-next-line @typescript-eslint/no-explicit-any -- frames are JSON of several shapes
  readonly frames: any[] = []
  readonly closed: Promise<{ code: number; reason: string }>
  private wake: (() => void) | undefined

  constructor(readonly ws: WebSocket) {
    ws.on('message', (data) => {
      this.frames.push(JSON.parse(String(data)))
      this.wake?.()
    })
    this.closed = new Promise((resolve) => ws.on('close', (code, reason) => resolve({ code, reason: String(reason) })))
    void this.closed.then(() => this.wake?.())
  }

  static connect(url: string, headers: Record<string, string> = {}): Promise<Client> {
    const ws = new WebSocket(url, { headers })
    const client = new Client(ws)
    return new Promise((resolve, reject) => {
      ws.once('open', () => resolve(client))
      ws.once('unexpected-response', (_req, res) => reject(new Error(`HTTP ${res.statusCode}`)))
      ws.once('error', reject)
    })
  }

  get events(): WireEvent[] {
    return this.frames.filter((f) => f.type === 'event').map((f) => f.event)
  }

  send(frame: unknown): void {
    this.ws.send(JSON.stringify(frame))
  }

  /** Resolves with the first recorded frame that matches, waiting for it if needed. */
  // eslint-disable-next-line @typescript-eslint/no-explicit-any -- frames are JSON of several shapes
  async until(match: (frame: any) => boolean, timeoutMs = 20_000): Promise<any> {
    const deadline = Date.now() + timeoutMs
    for (;;) {
      const found = this.frames.find(match)
      if (found) return found
      if (this.ws.readyState === WebSocket.CLOSED) throw new Error(`socket closed while waiting; got ${JSON.stringify(this.frames.map((f) => f.event?.type ?? f.type))}`)
      if (Date.now() > deadline) throw new Error(`timed out; got ${JSON.stringify(this.frames.map((f) => f.event?.type ?? f.type))}`)
      await new Promise<void>((resolve) => {
        this.wake = resolve
        setTimeout(resolve, 200)
      })
    }
  }

  untilEvent(type: string, after = 0): Promise<{ type: 'event'; event: WireEvent }> {
    return this.until((f) => f.type === 'event' && f.event.type === type && f.event.id > after)
  }

  close(): void {
    this.ws.close()
  }
}

async function listen(app: FastifyInstance): Promise<(sessionId: string, query?: string) => string> {
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as AddressInfo
  return (sessionId, query = '') => `ws://127.0.0.1:${port}/v1/sessions/${sessionId}/events/ws${query}`
}

/** Opens a socket with the admin key and closes it when the test ends. */
async function open(t: Tap, url: string, headers: Record<string, string> = auth()): Promise<Client> {
  const client = await Client.connect(url, headers)
  t.teardown(() => client.ws.terminate())
  return client
}

// ─── REST ───────────────────────────────────────────────────────────────────────────────────

t.test('a tool-call turn is logged: messages, run and execution events, ids 1..n', async (t) => {
  const { app, upstream } = await setup(t)
  upstream.script(
    toolCall({ language: 'python', code: 'print(6 * 7)' }, { usage: { prompt_tokens: 20, completion_tokens: 5, total_tokens: 25 } }),
    text('The answer is 42.', { usage: { prompt_tokens: 30, completion_tokens: 6, total_tokens: 36 } }),
  )
  const res = await app.inject({ method: 'POST', url: '/v1/chat', headers: auth(), payload: { messages: [user('compute')] } })
  t.equal(res.statusCode, 200)
  const { session_id } = res.json()

  const page = await app.inject({ url: `/v1/sessions/${session_id}/events?limit=100`, headers: auth() })
  t.equal(page.statusCode, 200)
  t.match(page.headers['content-type'], /^application\/json/)
  t.equal(page.headers['cache-control'], 'no-store')
  t.ok(page.headers['x-request-id'])
  const { events, has_more } = page.json() as { events: WireEvent[]; has_more: boolean }
  t.equal(has_more, false)
  t.same(
    events.map((e) => e.id),
    range(1, events.length),
    'ids are 1..n with no gap',
  )
  for (const e of events) t.match(e.created_at, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/, `event ${e.id} has an ISO timestamp`)
  t.same(
    events.map((e) => e.type),
    ['message', 'run_started', 'message', 'execution_started', 'execution_finished', 'message', 'message', 'run_finished'],
  )
  const [userMsg, started, code, execStarted, execFinished, output, answer, finished] = events
  t.match(userMsg!.data, { role: 'user', type: 'message', content: 'compute' })
  t.same(started!.data, { model: 'gpt-4o-mini' })
  t.match(code!.data, { role: 'assistant', type: 'code', format: 'python', content: 'print(6 * 7)' })
  t.match(execStarted!.data, { execution_id: /^[0-9a-f-]{36}$/, language: 'python', code: 'print(6 * 7)' })
  t.match(execFinished!.data, { execution_id: execStarted!.data.execution_id, exit_code: 0, duration_ms: Number, timed_out: false })
  t.ok(execFinished!.data.duration_ms >= 0)
  t.match(output!.data, { role: 'computer', type: 'console', format: 'output', stream: 'stdout', content: '42\n' })
  t.match(answer!.data, { role: 'assistant', type: 'message', content: 'The answer is 42.' })
  t.same(finished!.data, { usage: { prompt_tokens: 50, completion_tokens: 11, total_tokens: 61 }, stopped: false })

  // every stored message is a message event, with the same content and id
  const stored = (await app.inject({ url: `/v1/sessions/${session_id}/messages`, headers: auth() })).json().messages
  t.same(
    events.filter((e) => e.type === 'message').map((e) => e.data),
    stored,
  )
})

t.test('an upstream 500 is logged as run_failed with the error envelope', async (t) => {
  const { app, upstream } = await setup(t)
  const session = await newSession(app)
  // the client retries once: both answers fail
  upstream.script(httpError(500, 'upstream exploded'), httpError(500, 'upstream exploded'))
  const res = await app.inject({ method: 'POST', url: '/v1/chat', headers: auth(), payload: { session_id: session, messages: [user('hi')] } })
  t.equal(res.statusCode, 502)
  const events = await allEvents(app, session)
  t.same(
    events.map((e) => [e.id, e.type]),
    [
      [1, 'message'],
      [2, 'run_started'],
      [3, 'run_failed'],
    ],
  )
  t.same(events[2]!.data, {
    error: { message: 'The model provider answered 500: upstream exploded', type: 'upstream_error', code: 'llm_error', param: null },
  })
})

t.test('paging: start_id, inclusive end_id, reverse, limit, has_more', async (t) => {
  const { app } = await setup(t)
  const session = await newSession(app)
  for (let i = 1; i <= 25; i++) await app.bus.append(session, 'custom', { n: i })
  const get = async (query: string) => {
    const res = await app.inject({ url: `/v1/sessions/${session}/events?${query}`, headers: auth() })
    t.equal(res.statusCode, 200, query)
    const body = res.json() as { events: WireEvent[]; has_more: boolean }
    return { ids: body.events.map((e) => e.id), has_more: body.has_more }
  }
  t.same(await get(''), { ids: range(1, 20), has_more: true }, 'default limit 20, oldest first')
  t.same(await get('start_id=21'), { ids: range(21, 25), has_more: false })
  t.same(await get('start_id=5&end_id=9'), { ids: range(5, 9), has_more: false }, 'end_id is inclusive')
  t.same(await get('start_id=5&end_id=9&limit=5'), { ids: range(5, 9), has_more: false }, 'exactly the limit: no more')
  t.same(await get('start_id=5&end_id=9&limit=4'), { ids: range(5, 8), has_more: true })
  t.same(await get('reverse=true&limit=3'), { ids: [25, 24, 23], has_more: true }, 'reverse starts at the newest')
  t.same(await get('reverse=true&start_id=10&end_id=8'), { ids: [10, 9, 8], has_more: false }, 'reverse walks down from start_id')
  t.same(await get('limit=1'), { ids: [1], has_more: true })
  t.same(await get('limit=100'), { ids: range(1, 25), has_more: false })
  t.same(await get('start_id=26'), { ids: [], has_more: false })
  const first = (await app.inject({ url: `/v1/sessions/${session}/events?limit=1`, headers: auth() })).json().events[0]
  t.same(first.data, { n: 1 })
  t.equal(first.type, 'custom')
})

t.test('bad input, 401 and 404 (unknown and foreign session)', async (t) => {
  const { app } = await setup(t)
  const session = await newSession(app)
  for (const [query, param] of [
    ['limit=0', 'limit'],
    ['limit=101', 'limit'],
    ['limit=abc', 'limit'],
    ['start_id=-1', 'start_id'],
    ['end_id=x', 'end_id'],
    ['reverse=maybe', 'reverse'],
  ] as const) {
    const res = await app.inject({ url: `/v1/sessions/${session}/events?${query}`, headers: auth() })
    t.equal(res.statusCode, 400, query)
    t.match(res.json(), { error: { type: 'validation_error', code: 'invalid_request', param } }, query)
  }
  const anonymous = await app.inject({ url: `/v1/sessions/${session}/events` })
  t.equal(anonymous.statusCode, 401)
  t.match(anonymous.json(), { error: { type: 'auth_error', code: 'missing_api_key' } })
  t.ok(anonymous.headers['x-request-id'])
  const wrong = await app.inject({ url: `/v1/sessions/${session}/events`, headers: auth('nope') })
  t.equal(wrong.statusCode, 401)
  t.match(wrong.json(), { error: { code: 'invalid_api_key' } })

  for (const id of [randomUUID(), 'not-a-uuid']) {
    const res = await app.inject({ url: `/v1/sessions/${id}/events`, headers: auth() })
    t.equal(res.statusCode, 404, id)
    t.match(res.json(), { error: { type: 'session_error', code: 'session_not_found' } })
  }
  await app.bus.append(session, 'custom', { private: true })
  const other = await tenantKey(app)
  const foreign = await app.inject({ url: `/v1/sessions/${session}/events`, headers: auth(other) })
  t.equal(foreign.statusCode, 404)
  t.match(foreign.json(), { error: { code: 'session_not_found' } })
  t.notMatch(foreign.body, /private/)
})

// ─── WebSocket ──────────────────────────────────────────────────────────────────────────────

t.test('ws: header auth replays the log after latest_event_id, then ready, then live events', async (t) => {
  const { app } = await setup(t)
  const url = await listen(app)
  const session = await newSession(app)
  for (let i = 1; i <= 5; i++) await app.bus.append(session, 'custom', { n: i })

  const all = await open(t, url(session))
  await all.until((f) => f.type === 'ready')
  t.same(
    all.events.map((e) => e.id),
    [1, 2, 3, 4, 5],
  )
  t.match(all.frames.at(-1), { type: 'ready', latest_event_id: 5 })
  t.match(all.events[0], { id: 1, type: 'custom', created_at: /Z$/, data: { n: 1 } })

  const tail = await open(t, url(session, '?latest_event_id=3'))
  await tail.until((f) => f.type === 'ready')
  t.same(
    tail.events.map((e) => e.id),
    [4, 5],
    'only the events after latest_event_id',
  )

  const caughtUp = await open(t, url(session, '?latest_event_id=5'))
  t.same(await caughtUp.until((f) => f.type === 'ready'), { type: 'ready', latest_event_id: 5 })
  t.equal(caughtUp.events.length, 0)

  await app.bus.append(session, 'custom', { n: 6 })
  for (const client of [all, tail, caughtUp]) {
    const live = await client.untilEvent('custom', 5)
    t.match(live.event, { id: 6, data: { n: 6 } })
  }
  t.equal(app.bus.subscriberCount(session), 3)
  all.close()
  await all.closed
  await sleep(50)
  t.equal(app.bus.subscriberCount(session), 2, 'a closed socket unsubscribes')
})

t.test('ws: auth by first frame; wrong token, non-auth first frame and bad query are refused', async (t) => {
  const { app } = await setup(t)
  const url = await listen(app)
  const session = await newSession(app)
  await app.bus.append(session, 'custom', { n: 1 })

  const ok = await open(t, url(session), {})
  ok.send({ type: 'auth', token: 'test-admin-key' })
  t.same(await ok.until((f) => f.type === 'ready'), { type: 'ready', latest_event_id: 1 })
  t.equal(ok.events[0]?.id, 1)

  const wrong = await open(t, url(session), {})
  wrong.send({ type: 'auth', token: 'wrong' })
  t.match(await wrong.closed, { code: 4001, reason: 'invalid API key' })
  t.equal(wrong.frames.length, 0, 'nothing is sent before auth')

  const noAuth = await open(t, url(session), {})
  noAuth.send({ type: 'message', content: 'hi' })
  t.match(await noAuth.closed, { code: 4001, reason: 'authenticate first' })

  const garbage = await open(t, url(session), {})
  garbage.ws.send('not json')
  t.match(await garbage.closed, { code: 4001 })

  const badHeader = await open(t, url(session), auth('wrong'))
  t.match(await badHeader.closed, { code: 4001, reason: 'invalid API key' })

  // a token in the query string is never looked at
  const queryToken = await open(t, url(session, '?token=test-admin-key&api_key=test-admin-key'), {})
  queryToken.send({ type: 'message', content: 'hi' })
  t.match(await queryToken.closed, { code: 4001 })

  await t.rejects(Client.connect(url(session, '?latest_event_id=abc'), auth()), /HTTP 400/, 'a bad latest_event_id is an HTTP 400')
  await t.rejects(Client.connect(url(session, '?latest_event_id=-1'), auth()), /HTTP 400/)
})

t.test('ws: frames sent right after auth are not lost', async (t) => {
  const { app, upstream } = await setup(t)
  const url = await listen(app)
  upstream.script(text('first frame answer'), text('header answer'))

  // auth frame and a message frame back to back, before the server could answer either
  const session = await newSession(app)
  const byFrame = await open(t, url(session), {})
  byFrame.send({ type: 'auth', token: 'test-admin-key' })
  byFrame.send({ type: 'message', content: 'hello' })
  const done = await byFrame.untilEvent('run_finished')
  t.ok(done, 'the message sent with the auth frame started a run')
  t.match(
    byFrame.events.find((e) => e.type === 'message' && e.data.role === 'user'),
    { data: { content: 'hello' } },
  )

  // with a header the key is checked asynchronously too: a frame sent at once must wait for it
  const other = await newSession(app)
  const byHeader = await open(t, url(other))
  byHeader.send({ type: 'message', content: 'hello again' })
  await byHeader.untilEvent('run_finished')
  t.match(
    byHeader.events.find((e) => e.type === 'message' && e.data.role === 'assistant'),
    { data: { content: 'header answer' } },
  )
})

t.test('ws: the first frame must come within 10 s', async (t) => {
  const { app } = await setup(t)
  const url = await listen(app)
  const session = await newSession(app)
  const started = performance.now()
  const silent = await open(t, url(session), {})
  const closed = await silent.closed
  t.same(closed, { code: 4001, reason: 'authentication timed out' })
  // a lower bound only: a timer never fires early, however loaded the machine
  t.ok(performance.now() - started >= 9_900, 'not before the 10 s (timers round to the millisecond)')
})

t.test('ws: a revoked key cannot drive the agent through a socket it opened before', async (t) => {
  const { app, upstream } = await setup(t)
  const url = await listen(app)
  const created = await app.inject({ method: 'POST', url: '/v1/keys', headers: auth(), payload: { name: 'soon revoked' } })
  const { key, id } = created.json()
  const session = await newSession(app, key)
  const client = await open(t, url(session), auth(key))
  await client.until((f) => f.type === 'ready')
  upstream.script(text('allowed'))
  client.send({ type: 'message', content: 'while valid' })
  await client.untilEvent('run_finished')

  t.equal((await app.inject({ method: 'DELETE', url: `/v1/keys/${id}`, headers: auth() })).statusCode, 204)
  const before = upstream.requests.length
  client.send({ type: 'message', content: 'after revocation' })
  t.same(await client.closed, { code: 4001, reason: 'API key revoked or expired' })
  await sleep(100)
  t.equal(upstream.requests.length, before, 'no run was started')
  t.notOk(client.events.some((e) => e.data?.content === 'after revocation'))
})

t.test('ws: unknown, malformed and foreign sessions close with 4004', async (t) => {
  const { app } = await setup(t)
  const url = await listen(app)
  const mine = await newSession(app)
  await app.bus.append(mine, 'custom', { private: true })
  const other = await tenantKey(app)
  const theirs = await newSession(app, other)

  for (const [name, id, headers] of [
    ['unknown', randomUUID(), auth()],
    ['not a uuid', 'nope', auth()],
    ['foreign (tenant → admin session)', mine, auth(other)],
    ['foreign (admin → tenant session)', theirs, auth()],
  ] as const) {
    const client = await open(t, url(id), headers)
    t.same(await client.closed, { code: 4004, reason: 'session not found' }, name)
    t.same(client.frames, [], `${name}: no event leaks`)
  }
  // first-frame auth reaches the same check
  const byFrame = await open(t, url(mine), {})
  byFrame.send({ type: 'auth', token: other })
  t.same(await byFrame.closed, { code: 4004, reason: 'session not found' })
  t.equal(app.bus.subscriberCount(mine), 0)
})

t.test('ws: replay while a run is producing events has no gap and no duplicate', async (t) => {
  const { app, upstream } = await setup(t)
  const url = await listen(app)
  const session = await newSession(app)
  // ~4 events a step, each step's answer a little late: the run keeps producing for a few
  // seconds, so every socket below connects while it runs and sees replay and live events
  const steps = 50
  upstream.script(
    ...Array.from({ length: steps }, (_, i) => toolCall({ language: 'python', code: `for j in range(3): print(${i}, j)` }, { firstByteMs: 25 })),
    text('all done'),
  )
  // Reading the log is made slow so the run appends while each socket replays: the window the
  // subscribe-then-read order has to close is then always open, not only on a lucky schedule.
  const listEvents = app.store.listEvents.bind(app.store)
  app.store.listEvents = async (...args) => {
    const page = await listEvents(...args)
    await sleep(40)
    return page
  }

  const early = await open(t, url(session, '?latest_event_id=0'))
  const running = app.inject({
    method: 'POST',
    url: '/v1/chat',
    headers: auth(),
    payload: { session_id: session, messages: [user('go')], config: { max_iterations: steps + 5 } },
  })
  let settled = false
  void running.finally(() => (settled = true))
  const clients: { from: number; client: Client }[] = [{ from: 0, client: early }]
  const waitFor = async (n: number) => {
    while (!settled && (await lastEventId(app, session)) < n) await sleep(20)
  }
  await waitFor(10)
  clients.push({ from: 0, client: await open(t, url(session, '?latest_event_id=0')) })
  await waitFor(60)
  const middle = Math.floor((await lastEventId(app, session)) / 2)
  clients.push({ from: middle, client: await open(t, url(session, `?latest_event_id=${middle}`)) })
  clients.push({ from: 0, client: await open(t, url(session, '?latest_event_id=0')) })
  await waitFor(110)
  clients.push({ from: 0, client: await open(t, url(session, '?latest_event_id=0')) })
  clients.push({ from: 100, client: await open(t, url(session, '?latest_event_id=100')) })

  const res = await running
  t.equal(res.statusCode, 200, res.statusCode === 200 ? 'the run finished' : res.body)
  t.equal(res.json().message?.content, 'all done')
  const log = await allEvents(app, session)
  const last = log.at(-1)!
  t.equal(last.type, 'run_finished')
  t.same(
    log.map((e) => e.id),
    range(1, last.id),
    'the stored log has no gap',
  )
  t.ok(last.id > 200, `the run produced ${last.id} events`)

  let replayedAndLive = 0
  for (const [i, { from, client }] of clients.entries()) {
    await client.untilEvent('run_finished')
    const ids = client.events.map((e) => e.id)
    t.same(ids, range(from + 1, last.id), `socket ${i} (latest_event_id=${from}): exactly ${from + 1}..${last.id}`)
    t.same(client.events, log.slice(from), `socket ${i}: the same events as GET /events`)
    const ready = client.frames.find((f) => f.type === 'ready')
    if (ready.latest_event_id > from && ready.latest_event_id < last.id) replayedAndLive++
  }
  t.ok(replayedAndLive >= 3, `${replayedAndLive} sockets got both a replay and live events`)
})

t.test('ws: message starts a run, stop cancels it, confirm approves pending code', async (t) => {
  const { app, upstream } = await setup(t)
  const url = await listen(app)
  const session = await newSession(app)
  const client = await open(t, url(session))
  await client.until((f) => f.type === 'ready')

  // message → a whole turn, seen live
  upstream.script(toolCall({ language: 'shell', code: 'echo from-socket' }), text('socket turn done'))
  client.send({ type: 'message', content: 'run something' })
  const finished = await client.untilEvent('run_finished')
  t.same(finished.event.data.stopped, false)
  t.same(
    client.events.map((e) => e.type),
    ['message', 'run_started', 'message', 'execution_started', 'execution_finished', 'message', 'message', 'run_finished'],
  )
  t.match(client.events[5]!.data, { type: 'console', content: 'from-socket\n' })

  // stop → the running turn ends with stopped: true
  upstream.script(text('a slow answer that will be cut', { firstByteMs: 5_000 }))
  client.send({ type: 'message', content: 'take your time' })
  const startedAgain = await client.untilEvent('run_started', finished.event.id)
  client.send({ type: 'stop' })
  const stopped = await client.untilEvent('run_finished', startedAgain.event.id)
  t.equal(stopped.event.data.stopped, true)
  t.equal(app.runs.size, 0)

  // confirm → with auto_run off the run waits, and the frame approves the code
  const patched = await app.inject({ method: 'PATCH', url: '/v1/settings', headers: auth(), payload: { auto_run: false } })
  t.equal(patched.json().auto_run, false)
  upstream.script(toolCall({ language: 'python', code: 'print("approved over ws")' }), text('confirmed turn done'))
  client.send({ type: 'message', content: 'ask me first' })
  const waiting = await client.untilEvent('awaiting_confirmation', stopped.event.id)
  const confirmation = client.events.find((e) => e.id < waiting.event.id && e.id > stopped.event.id && e.data?.type === 'confirmation')
  t.match(confirmation?.data, { role: 'computer', type: 'confirmation', format: 'execution', content: { type: 'code', format: 'python' } })
  const suspended = await client.untilEvent('run_suspended', stopped.event.id)
  t.match(suspended.event.data.pending, { type: 'confirmation', language: 'python', code: 'print("approved over ws")' })
  t.equal(app.runs.size, 0, 'a suspended turn holds no run')
  client.send({ type: 'confirm', approve: true })
  const confirmed = await client.untilEvent('run_finished', waiting.event.id)
  t.equal(confirmed.event.data.stopped, false)
  const after = client.events.filter((e) => e.id > waiting.event.id)
  t.ok(after.some((e) => e.type === 'execution_finished' && e.data.exit_code === 0))
  t.ok(after.some((e) => e.type === 'message' && e.data.content === 'approved over ws\n'))

  // a frame the server does not understand is answered, not fatal
  client.ws.send('{"type":"dance"}')
  t.match(await client.until((f) => f.type === 'error'), { type: 'error', error: { type: 'validation_error', code: 'invalid_message' } })
  // a message while another run is going: the socket gets the 409 as an error frame
  upstream.script(text('slow', { firstByteMs: 3_000 }))
  client.send({ type: 'message', content: 'one' })
  await client.untilEvent('run_started', confirmed.event.id)
  client.send({ type: 'message', content: 'two' })
  t.match(await client.until((f) => f.type === 'error' && f.error.code === 'session_busy'), {
    error: { type: 'conflict_error', code: 'session_busy' },
  })
  client.send({ type: 'stop' })
  await client.untilEvent('run_finished', confirmed.event.id)
  t.equal(client.ws.readyState, WebSocket.OPEN, 'the socket stays open through errors')
})

t.test('ws: a session id in another letter case still drives and streams its own session', async (t) => {
  const { app, upstream } = await setup(t)
  const url = await listen(app)
  const session = await newSession(app)
  upstream.script(text('case-insensitive'))
  const client = await open(t, url(session.toUpperCase()))
  await client.until((f) => f.type === 'ready')
  client.send({ type: 'message', content: 'hi' })
  const finished = await client.untilEvent('run_finished')
  t.equal(finished.event.data.stopped, false)
  const log = await allEvents(app, session)
  t.same(
    client.events.map((e) => e.id),
    log.map((e) => e.id),
    'the events of the run were stored in the session and streamed to the socket',
  )
})

t.test('ws: many subscribers on one session see the same events', async (t) => {
  const { app, upstream } = await setup(t)
  const url = await listen(app)
  const session = await newSession(app)
  const clients = await Promise.all(Array.from({ length: 8 }, () => open(t, url(session))))
  await Promise.all(clients.map((c) => c.until((f) => f.type === 'ready')))
  t.equal(app.bus.subscriberCount(session), 8)
  upstream.script(toolCall({ language: 'python', code: 'print("fan-out")' }), text('shared'))
  const res = await app.inject({ method: 'POST', url: '/v1/chat', headers: auth(), payload: { session_id: session, messages: [user('go')] } })
  t.equal(res.statusCode, 200)
  const log = await allEvents(app, session)
  for (const [i, client] of clients.entries()) {
    await client.untilEvent('run_finished')
    t.same(client.events, log, `subscriber ${i}`)
  }
  for (const client of clients) client.close()
  await Promise.all(clients.map((c) => c.closed))
  await sleep(50)
  t.equal(app.bus.subscriberCount(session), 0)
})

t.test('ws: a subscriber that stops reading is closed with 4008 and resumes with latest_event_id', async (t) => {
  const { app } = await setup(t)
  const url = await listen(app)
  const session = await newSession(app)
  const slow = await open(t, url(session))
  await slow.until((f) => f.type === 'ready')
  const fast = await open(t, url(session))
  await fast.until((f) => f.type === 'ready')
  // The slow client stops reading its TCP socket: the kernel buffers fill, then the server's.
  const raw = (slow.ws as unknown as { _socket: import('node:net').Socket })._socket
  raw.pause()

  // 200 events of 200 kB: 40 MB, far past the 4 MiB buffer plus what loopback TCP can hold.
  // The clients live in this process, so each append yields to let the reading one read.
  const total = 200
  const filler = 'x'.repeat(200_000)
  for (let i = 1; i <= total; i++) {
    await app.bus.append(session, 'bulk', { i, filler })
    await sleep(2)
  }
  await fast.until((f) => f.type === 'event' && f.event.data.i === total)
  // the slow socket is still paused: had appends waited for it, they could not have completed
  t.ok(raw.isPaused(), 'every append completed while the slow subscriber read nothing')
  t.equal(fast.events.length, total, 'the reading subscriber got every event')

  t.equal(app.bus.subscriberCount(session), 1, 'the dropped subscriber stopped receiving at once, before its socket closed')

  raw.resume()
  t.same(await slow.closed, { code: 4008, reason: 'subscriber too slow; reconnect with latest_event_id' })
  const got = slow.events.map((e) => e.id)
  t.ok(got.length < total, `the slow subscriber got ${got.length} events before it was dropped`)
  t.same(got, range(1, got.length), 'what it got has no gap')

  const resumed = await open(t, url(session, `?latest_event_id=${got.length}`))
  await resumed.until((f) => f.type === 'ready')
  t.same(
    resumed.events.map((e) => e.id),
    range(got.length + 1, total),
    'resuming delivers the rest',
  )
  t.equal(fast.ws.readyState, WebSocket.OPEN, 'the reading subscriber stays connected')
})

t.test('ws: revoking a key closes its open sockets at once with 4001; other sockets stay', async (t) => {
  const { app } = await setup(t)
  const url = await listen(app)
  const { key, id } = (await app.inject({ method: 'POST', url: '/v1/keys', headers: auth(), payload: { name: 'revoked' } })).json()
  const other = await tenantKey(app)
  const session = await newSession(app, key)
  const otherSession = await newSession(app, other)
  const adminSession = await newSession(app)

  const byHeader = await open(t, url(session), auth(key))
  const byFrame = await open(t, url(session), {})
  byFrame.send({ type: 'auth', token: key })
  const bystanders = [await open(t, url(otherSession), auth(other)), await open(t, url(adminSession))]
  for (const client of [byHeader, byFrame, ...bystanders]) await client.until((f) => f.type === 'ready')

  // no frame is sent after the revocation: the revocation alone closes the sockets
  t.equal((await app.inject({ method: 'DELETE', url: `/v1/keys/${id}`, headers: auth() })).statusCode, 204)
  t.same(await byHeader.closed, { code: 4001, reason: 'API key revoked or expired' })
  t.same(await byFrame.closed, { code: 4001, reason: 'API key revoked or expired' })

  await app.bus.append(otherSession, 'custom', { n: 1 })
  await app.bus.append(adminSession, 'custom', { n: 1 })
  for (const client of bystanders) {
    t.match((await client.untilEvent('custom')).event, { data: { n: 1 } })
    t.equal(client.ws.readyState, WebSocket.OPEN, 'a socket of another key stays open')
  }
})

t.test('ws: a key that expires while its socket is open closes it with 4001', async (t) => {
  const { app } = await setup(t)
  const url = await listen(app)
  const { key, record } = newApiKey('short-lived', new Date(Date.now() + 2000).toISOString())
  await app.store.createApiKey(record)
  const session = await newSession(app, key)
  const client = await open(t, url(session), auth(key))
  t.same(await client.closed, { code: 4001, reason: 'API key revoked or expired' })
  t.ok(client.frames.some((f) => f.type === 'ready'), 'it was open and ready before the key expired')
})

/**
 * Completes the WebSocket handshake over a raw TCP socket and then never reads: what the server
 * sends stays in the kernel buffers and then in the server's.
 */
async function nonReader(t: Tap, url: string): Promise<import('node:net').Socket> {
  const { hostname, port, pathname, search } = new URL(url)
  const socket = connect(Number(port), hostname)
  t.teardown(() => socket.destroy())
  await once(socket, 'connect')
  socket.pause()
  socket.write(
    [
      `GET ${pathname}${search} HTTP/1.1`,
      `Host: ${hostname}:${port}`,
      'Upgrade: websocket',
      'Connection: Upgrade',
      `Sec-WebSocket-Key: ${randomBytes(16).toString('base64')}`,
      'Sec-WebSocket-Version: 13',
      'Authorization: Bearer test-admin-key',
      '',
      '',
    ].join('\r\n'),
  )
  return socket
}

t.test('ws: a replay reader that never reads is closed with 4008 and released; the server keeps serving', async (t) => {
  const { app } = await setup(t, { WS_PING_INTERVAL_MS: '200' })
  const url = await listen(app)
  const session = await newSession(app)
  // 60 events of 200 kB: 12 MB to replay, far more than loopback TCP and the replay window hold
  const total = 60
  const filler = 'x'.repeat(200_000)
  for (let i = 1; i <= total; i++) await app.bus.append(session, 'bulk', { i, filler })

  const accepted = once(app.websocketServer, 'connection') as Promise<[WebSocket]>
  const client = await nonReader(t, url(session))
  const [serverSide] = await accepted
  const codes: number[] = []
  const close = serverSide.close.bind(serverSide)
  serverSide.close = (code?: number, reason?: string | Buffer) => {
    if (code !== undefined) codes.push(code)
    close(code, reason)
  }

  await once(serverSide, 'close')
  t.same(codes, [4008], 'the server closed it as too slow')
  t.equal(serverSide.bufferedAmount, 0, 'nothing is left buffered for it')
  t.equal(app.websocketServer.clients.size, 0)
  t.equal(app.bus.subscriberCount(session), 0, 'its subscription is gone')

  // the client, reading at last, finds its connection ended
  const ended = once(client, 'close')
  client.resume()
  await ended

  const reader = await open(t, url(session, `?latest_event_id=${total - 2}`))
  t.same(await reader.until((f) => f.type === 'ready'), { type: 'ready', latest_event_id: total })
  t.same(
    reader.events.map((e) => e.data.i),
    [total - 1, total],
  )
  const rest = await app.inject({ url: `/v1/sessions/${session}/events?reverse=true&limit=1`, headers: auth() })
  t.equal(rest.json().events[0].id, total)
})
