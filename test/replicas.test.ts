import { spawn, spawnSync } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { once } from 'node:events'
import { chmodSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs'
import { createServer } from 'node:net'
import { join } from 'node:path'
import { performance } from 'node:perf_hooks'
import t from 'tap'
import { ADMIN_KEY, auth, tempDir } from './helpers/build.js'
import { freshDatabase } from './helpers/postgres.js'
import { type ServerProcess, startServer } from './helpers/server-process.js'
import { startFakeUpstream, text, toolCall } from './fakes/upstream.js'

/**
 * Three real server processes on loopback sharing one PostgreSQL, one Redis and one workspaces
 * directory, with nginx (Debian's package) round-robin in front: everything below goes through
 * nginx unless it says otherwise. The lease lasts 3 s here so the failover is short.
 */

const NGINX = ['/usr/sbin/nginx', '/usr/bin/nginx'].find((bin) => spawnSync(bin, ['-v']).status === 0)
const missing = [
  !process.env.DATABASE_URL && 'DATABASE_URL (PostgreSQL)',
  !process.env.REDIS_URL && 'REDIS_URL (Redis)',
  !NGINX && 'nginx (apt-get install nginx-light)',
].filter(Boolean)
const LEASE_TTL_MS = 3000
const GRACE_MS = 20_000

async function freePort(): Promise<number> {
  const server = createServer()
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  const { port } = server.address() as { port: number }
  server.close()
  await once(server, 'close')
  return port
}

interface Replica {
  name: string
  port: number
  url: string
  process?: ServerProcess
}

t.test('three replicas behind nginx serve one session as one server', { skip: missing.length ? `needs ${missing.join(', ')}; CI provides them (.ci/run)` : false, timeout: 600_000 }, async (t) => {
  const databaseUrl = await freshDatabase(t, process.env.DATABASE_URL!, 'oi_replicas')
  // A Redis database of its own: other tests flush database 0, and a second run of this file
  // (another checkout on the same Redis) must not share the replica registry. Not flushed:
  // what an earlier run left expires within a lease.
  const redisUrl = new URL(process.env.REDIS_URL!)
  redisUrl.pathname = `/${9 + (process.pid % 7)}`
  const { Redis } = await import('ioredis')
  const redis = new Redis(redisUrl.href)
  t.teardown(() => redis.quit())

  const upstream = await startFakeUpstream()
  t.teardown(() => upstream.close())
  const shared = tempDir(t, 'oi-replicas-')
  const workspaces = join(shared, 'workspaces')
  mkdirSync(workspaces)
  const common = {
    API_KEY: ADMIN_KEY,
    DATABASE_URL: databaseUrl,
    REDIS_URL: redisUrl.href,
    REPLICA_SECRET: randomBytes(32).toString('hex'),
    SECRETS_KEY: randomBytes(32).toString('hex'),
    WORKSPACES_DIR: workspaces,
    LEASE_TTL_MS: String(LEASE_TTL_MS),
    SHUTDOWN_GRACE_MS: String(GRACE_MS),
    LLM_BASE_URL: upstream.url,
    LLM_API_KEY: 'sk-test',
    RATE_LIMIT_PER_MINUTE: '100000',
    SESSION_RATE_LIMIT_PER_MINUTE: '100000',
    LOG_LEVEL: 'info',
  }
  const replicas: Replica[] = []
  for (const name of ['a', 'b', 'c']) {
    const port = await freePort()
    replicas.push({ name, port, url: `http://127.0.0.1:${port}` })
  }
  const start = async (replica: Replica) => {
    const dataDir = join(shared, `data-${replica.name}`)
    mkdirSync(dataDir, { recursive: true })
    replica.process = await startServer({ ...common, DATA_DIR: dataDir, REPLICA_URL: replica.url }, ['--port', String(replica.port)])
  }
  t.teardown(async () => {
    for (const replica of replicas) await replica.process?.stop('SIGKILL')
  })
  await Promise.all(replicas.map(start))

  // nginx: round-robin, no upstream keep-alive (each request a new connection, so a replica that
  // stopped listening is skipped at connect time), unbuffered for SSE, WebSocket upgrades passed.
  const nginxPort = await freePort()
  const nginxDir = tempDir(t, 'oi-nginx-')
  // nginx workers (user nobody when started as root) write the temp dirs
  chmodSync(nginxDir, 0o777)
  for (const dir of ['body', 'proxy', 'fastcgi', 'uwsgi', 'scgi']) mkdirSync(join(nginxDir, dir))
  writeFileSync(
    join(nginxDir, 'nginx.conf'),
    `daemon off;
worker_processes 1;
pid ${nginxDir}/nginx.pid;
error_log ${nginxDir}/error.log warn;
events { worker_connections 1024; }
http {
  log_format upstreams '$request_method $uri $status $upstream_addr';
  access_log ${nginxDir}/access.log upstreams;
  client_body_temp_path ${nginxDir}/body;
  proxy_temp_path ${nginxDir}/proxy;
  fastcgi_temp_path ${nginxDir}/fastcgi;
  uwsgi_temp_path ${nginxDir}/uwsgi;
  scgi_temp_path ${nginxDir}/scgi;
  map $http_upgrade $connection_upgrade { default upgrade; '' close; }
  upstream oi { ${replicas.map((r) => `server 127.0.0.1:${r.port} max_fails=1 fail_timeout=2s;`).join(' ')} }
  server {
    listen 127.0.0.1:${nginxPort};
    client_max_body_size 100m;
    location / {
      proxy_pass http://oi;
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_read_timeout 3600s;
      proxy_next_upstream error timeout;
    }
  }
}
`,
  )
  const nginx = spawn(NGINX!, ['-p', nginxDir, '-c', join(nginxDir, 'nginx.conf')], { stdio: ['ignore', 'ignore', 'pipe'] })
  let nginxErr = ''
  nginx.stderr!.on('data', (d) => (nginxErr += d))
  t.teardown(async () => {
    if (nginx.exitCode === null && nginx.signalCode === null) {
      nginx.kill('SIGTERM')
      await once(nginx, 'exit')
    }
  })
  const lb = `http://127.0.0.1:${nginxPort}`
  for (;;) {
    const ready = await fetch(`${lb}/v1/health`).then((r) => r.status, () => 0)
    if (ready === 200) break
    if (nginx.exitCode !== null) throw new Error(`nginx did not start: ${nginxErr}`)
    await new Promise((r) => setTimeout(r, 50))
  }

  const call = async (method: string, path: string, body?: unknown, base = lb) => {
    const response = await fetch(`${base}${path}`, {
      method,
      headers: { ...auth(), ...(body === undefined ? {} : { 'content-type': 'application/json' }) },
      body: body === undefined ? undefined : JSON.stringify(body),
    })
    const raw = await response.text()
    // biome-ignore lint/suspicious/noExplicitAny: tests reach deep into whatever JSON came back
    // eslint-disable-next-line @typescript-eslint/no-explicit-any
    let json: any
    try {
      json = JSON.parse(raw)
    } catch {
      json = raw
    }
    return { status: response.status, json, headers: response.headers }
  }
  const newSession = async () => (await call('POST', '/v1/sessions', {})).json.session_id as string
  const execute = (id: string, code: string, base = lb) => call('POST', `/v1/sessions/${id}/execute`, { language: 'python', code }, base)
  const ownerOf = async (id: string) => {
    const value = await redis.get(`oi-server:lease:${id}`)
    return value ? replicas.find((r) => value.endsWith(` ${r.url}`)) : undefined
  }

  await t.test('a Python variable set by one request is read by the next 20, whichever replica nginx picks', async (t) => {
    const id = await newSession()
    const set = await execute(id, 'counter = 41')
    t.equal(set.status, 200)
    const served = new Set<string>()
    for (let i = 0; i < 20; i++) {
      const read = await execute(id, 'counter += 1\nprint(counter)')
      t.equal(read.status, 200, JSON.stringify(read.json))
      t.equal(read.json.outputs[0]?.content, `${42 + i}\n`, `read ${i + 1}`)
      t.equal(read.json.state_lost, false)
    }
    // nginx spread the requests over the replicas; the owner served them all
    for (const line of readFileSync(join(nginxDir, 'access.log'), 'utf8').split('\n')) {
      if (line.includes(`/v1/sessions/${id}/execute`)) served.add(line.split(' ').at(-1)!)
    }
    t.equal(served.size, 3, `nginx sent them to ${[...served].join(', ')}`)
  })

  await t.test('a file uploaded through one replica is downloaded through another', async (t) => {
    const id = await newSession()
    const [a, b, c] = replicas
    // c owns the session: the upload through a and the download through b are both forwarded
    t.equal((await execute(id, 'pass', c!.url)).status, 200)
    t.equal(await ownerOf(id), c)
    const content = randomBytes(300_000)
    const form = new FormData()
    form.append('file', new Blob([content]), 'blob.bin')
    const up = await fetch(`${a!.url}/v1/sessions/${id}/files/upload`, { method: 'POST', headers: auth(), body: form })
    t.equal(up.status, 201, await up.clone().text())
    const down = await fetch(`${b!.url}/v1/sessions/${id}/files/content?path=blob.bin`, { headers: auth() })
    t.equal(down.status, 200)
    t.ok(Buffer.from(await down.arrayBuffer()).equals(content), 'the same bytes')
    const raw = randomBytes(1000)
    const put = await fetch(`${b!.url}/v1/sessions/${id}/files/content?path=raw.bin`, { method: 'PUT', headers: { ...auth(), 'content-type': 'application/octet-stream' }, body: raw })
    t.ok(put.status < 300, `raw PUT through b: ${put.status}`)
    const back = await fetch(`${a!.url}/v1/sessions/${id}/files/content?path=raw.bin`, { headers: auth() })
    t.ok(Buffer.from(await back.arrayBuffer()).equals(raw), 'a raw body streams through too')
    const seen = await execute(id, 'import os\nprint(os.path.getsize("blob.bin"), os.path.getsize("raw.bin"))')
    t.equal(seen.json.outputs[0]?.content, '300000 1000\n', 'the kernel sees them too')
  })

  await t.test('two concurrent chats in one session: exactly one 409 session_busy', async (t) => {
    const id = await newSession()
    const [a, b] = replicas
    // the first turn holds the session while the upstream takes its time
    upstream.script(text('first answer', { firstByteMs: 1500 }), text('second answer'))
    const chat = (base: string) => call('POST', '/v1/chat', { session_id: id, messages: [{ role: 'user', type: 'message', content: 'hi' }] }, base)
    const first = chat(a!.url)
    // the second starts once the first is surely running (its run_started event is in the log)
    for (;;) {
      const events = await call('GET', `/v1/sessions/${id}/events?limit=100`)
      if (events.json.events.some((e: { type: string }) => e.type === 'run_started')) break
      await new Promise((r) => setTimeout(r, 20))
    }
    const second = await chat(b!.url)
    const results = [await first, second]
    t.same(results.map((r) => r.status).sort(), [200, 409])
    t.equal(second.json.error?.code, 'session_busy')
    upstream.reset()
  })

  await t.test('a WebSocket subscriber on one replica sees, gapless and once, the events of a run served by another', async (t) => {
    const { default: WebSocket } = await import('ws')
    const id = await newSession()
    await execute(id, 'x = 1')
    const owner = (await ownerOf(id))!
    const other = replicas.find((r) => r !== owner)!
    const ws = new WebSocket(`${other.url.replace('http', 'ws')}/v1/sessions/${id}/events/ws?latest_event_id=0`, { headers: auth() })
    t.teardown(() => ws.terminate())
    const ids: number[] = []
    const types: string[] = []
    let ready!: () => void
    const isReady = new Promise<void>((resolve) => (ready = resolve))
    const finishedRuns: (() => void)[] = []
    const runFinished = () => new Promise<void>((resolve) => finishedRuns.push(resolve))
    ws.on('message', (data) => {
      const frame = JSON.parse(String(data))
      if (frame.type === 'ready') ready()
      if (frame.type === 'error') t.fail(`error frame: ${String(data)}`)
      if (frame.type !== 'event') return
      ids.push(frame.event.id)
      types.push(frame.event.type)
      if (frame.event.type === 'run_finished') finishedRuns.shift()?.()
    })
    await isReady
    upstream.script(toolCall({ language: 'python', code: 'for i in range(3): print(i)' }), text('done'))
    let finished = runFinished()
    const run = await call('POST', '/v1/chat', { session_id: id, messages: [{ role: 'user', type: 'message', content: 'count' }] }, owner.url)
    t.equal(run.status, 200)
    await finished
    // a message frame on the subscriber's replica: the run is served by the owner
    const served = upstream.requests.length
    upstream.script(toolCall({ language: 'python', code: 'print(x + 1)' }), text('two'))
    finished = runFinished()
    ws.send(JSON.stringify({ type: 'message', content: 'again' }))
    await finished
    t.equal(upstream.requests.length, served + 2, 'the frame ran one turn')
    const log = (await call('GET', `/v1/sessions/${id}/events?limit=100`)).json.events
    t.same(ids, log.map((e: { id: number }) => e.id), 'every event of the log, in order, once')
    t.same(ids, Array.from({ length: ids.length }, (_, i) => i + 1), 'gapless from 1')
    t.equal(types.filter((type) => type === 'run_finished').length, 2)
    const outputs = log.filter((e: { type: string; data: { type?: string } }) => e.type === 'message' && e.data.type === 'console')
    t.match(JSON.stringify(outputs.at(-1)), /2\\n/, 'the second run used the kernel of the first (x was 1)')
    upstream.reset()
  })

  await t.test('SSE through a replica that does not own the session streams as produced, and a client that leaves stops the run on the owner', async (t) => {
    const id = await newSession()
    await execute(id, 'z = 1')
    const owner = (await ownerOf(id))!
    const other = replicas.find((r) => r !== owner)!
    // many small chunks, slowly: the stream lasts far longer than it takes to read its first event
    upstream.script(text('word '.repeat(400), { chunkMs: 50 }))
    const requestsBefore = upstream.requests.length
    const controller = new AbortController()
    const response = await fetch(`${other.url}/v1/chat`, {
      method: 'POST',
      headers: { ...auth(), 'content-type': 'application/json' },
      body: JSON.stringify({ session_id: id, stream: true, messages: [{ role: 'user', type: 'message', content: 'talk' }] }),
      signal: controller.signal,
    })
    t.equal(response.status, 200)
    t.match(response.headers.get('content-type'), /text\/event-stream/)
    const reader = response.body!.getReader()
    let received = ''
    while (!received.includes('"content":"word')) received += new TextDecoder().decode((await reader.read()).value)
    t.notOk(upstream.requests[requestsBefore]?.finished, 'the first words arrived while the upstream was still writing')
    controller.abort()
    // the owner saw the client leave: the run ends stopped and its upstream request is cut
    for (;;) {
      const events = (await call('GET', `/v1/sessions/${id}/events?limit=100`)).json.events as { type: string; data: { stopped?: boolean } }[]
      const end = events.find((e) => e.type === 'run_finished' || e.type === 'run_failed')
      if (end) {
        t.match(end, { type: 'run_finished', data: { stopped: true } })
        break
      }
      await new Promise((r) => setTimeout(r, 50))
    }
    await upstream.settled()
    t.equal(upstream.requests[requestsBefore]?.aborted, true, 'the upstream request was aborted')

    // the same without streaming: nothing has come back yet when the client leaves
    upstream.script(text('too late', { firstByteMs: 60_000 }))
    const quiet = new AbortController()
    const pending = fetch(`${other.url}/v1/chat`, {
      method: 'POST',
      headers: { ...auth(), 'content-type': 'application/json' },
      body: JSON.stringify({ session_id: id, messages: [{ role: 'user', type: 'message', content: 'wait' }] }),
      signal: quiet.signal,
    }).catch((err: Error) => err)
    const runs = async () => ((await call('GET', `/v1/sessions/${id}/events?limit=100`)).json.events as { type: string; data: { stopped?: boolean } }[]).filter((e) => e.type === 'run_finished')
    while (upstream.requests.length < requestsBefore + 2) await new Promise((r) => setTimeout(r, 20))
    quiet.abort()
    t.match(await pending, { name: 'AbortError' })
    while ((await runs()).length < 2) await new Promise((r) => setTimeout(r, 50))
    t.match((await runs())[1], { data: { stopped: true } }, 'the owner stopped the run when the client left the replica in front')
    await upstream.settled()
    t.equal(upstream.requests[requestsBefore + 1]?.aborted, true)
    upstream.reset()
  })

  await t.test('a stateless client that resends the history continues its session through another replica', async (t) => {
    const [a, b] = replicas
    upstream.script(text('first reply'), text('second reply'))
    const first = await call('POST', '/v1/chat/completions', { model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'hello' }] }, a!.url)
    t.equal(first.status, 200)
    const answer = first.json.choices[0].message.content
    const second = await call(
      'POST',
      '/v1/chat/completions',
      { model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'hello' }, { role: 'assistant', content: answer }, { role: 'user', content: 'again' }] },
      b!.url,
    )
    t.equal(second.status, 200)
    t.equal(second.headers.get('x-session-id'), first.headers.get('x-session-id'), 'the same session')
    upstream.reset()
  })

  await t.test('the Responses API: previous_response_id keeps a Python variable whichever replica nginx picks', async (t) => {
    const tools = [{ type: 'code_interpreter', container: { type: 'auto' } }]
    upstream.script(toolCall({ language: 'python', code: 'n = 0' }), text('set'))
    let previous = await call('POST', '/v1/responses', { model: 'gpt-4o-mini', input: 'set n', tools })
    t.equal(previous.status, 200)
    const session = previous.headers.get('x-session-id')
    for (let i = 1; i <= 6; i++) {
      upstream.script(toolCall({ language: 'python', code: 'n += 1; print(n)' }), text(`n is ${i}`))
      const next = await call('POST', '/v1/responses', { model: 'gpt-4o-mini', input: 'add one', tools, previous_response_id: previous.json.id })
      t.equal(next.status, 200)
      t.equal(next.headers.get('x-session-id'), session, 'the same session')
      const logs = next.json.output.find((item: { type: string }) => item.type === 'code_interpreter_call').outputs[0].logs
      t.equal(logs, `${i}\n`, 'the kernel kept n')
      previous = next
    }
    upstream.reset()
  })

  await t.test('Idempotency-Key: a retry that nginx sends to another replica replays the first answer, the turn runs once', async (t) => {
    const [a, b] = replicas
    upstream.script(text('once'))
    const before = upstream.requests.length
    const body = JSON.stringify({ messages: [{ role: 'user', type: 'message', content: 'pay once' }] })
    const headers = { ...auth(), 'content-type': 'application/json', 'idempotency-key': `retry-${randomBytes(4).toString('hex')}` }
    const first = await fetch(`${a!.url}/v1/chat`, { method: 'POST', headers, body })
    const retry = await fetch(`${b!.url}/v1/chat`, { method: 'POST', headers, body })
    t.equal(first.status, 200)
    t.equal(retry.status, 200)
    t.equal(retry.headers.get('idempotent-replayed'), 'true')
    t.equal(retry.headers.get('x-session-id'), first.headers.get('x-session-id'))
    t.same(await retry.json(), await first.json())
    t.equal(upstream.requests.length, before + 1, 'one upstream call')
    upstream.reset()
  })

  await t.test('kill -9 of the owner: within the lease time the session works again elsewhere, history intact, state_lost reported', async (t) => {
    const id = await newSession()
    upstream.script(text('remembered'))
    t.equal((await call('POST', '/v1/chat', { session_id: id, messages: [{ role: 'user', type: 'message', content: 'remember me' }] })).status, 200)
    t.equal((await execute(id, 'secret = 7')).status, 200)
    const owner = (await ownerOf(id))!
    const killedAt = performance.now()
    await owner.process!.stop('SIGKILL')
    let attempts = 0
    let unavailable = 0
    let after
    // Generous bound from the configured lease: a lease, a renewal period and slack for a slow machine.
    while (performance.now() - killedAt < LEASE_TTL_MS * 10) {
      attempts++
      after = await execute(id, 'print(secret)')
      if (after.status === 200) break
      t.equal(after.status, 503, 'until the lease runs out the answer is 503, enveloped')
      t.match(after.json.error?.code, /^(owner_unavailable)$/)
      t.ok(Number(after.headers.get('retry-after')) >= 1)
      unavailable++
      await new Promise((r) => setTimeout(r, 100))
    }
    const failoverMs = Math.round(performance.now() - killedAt)
    t.equal(after!.status, 200, 'served again')
    t.equal(after!.json.state_lost, true, 'state_lost reported')
    t.match(JSON.stringify(after!.json.outputs), /took the session over/)
    t.match(JSON.stringify(after!.json.outputs), /NameError/, 'the kernel is fresh')
    const messages = (await call('GET', `/v1/sessions/${id}/messages`)).json.messages
    t.same(messages.map((m: { content: string }) => m.content), ['remember me', 'remembered'], 'history intact')
    const newOwner = (await ownerOf(id))!
    t.not(newOwner, owner)
    t.comment(`failover: served again ${failoverMs} ms after kill -9 (lease ${LEASE_TTL_MS} ms), ${unavailable} of ${attempts} attempts answered 503 owner_unavailable meanwhile`)
    await start(owner)
    // nginx learns the restarted replica back by itself
  })

  await t.test('SIGTERM drains: sessions are handed over without a failed request', async (t) => {
    const ids = [await newSession(), await newSession(), await newSession()]
    for (const id of ids) t.equal((await execute(id, 'n = 0')).status, 200)
    const victim = (await ownerOf(ids[0]!))!
    const held = []
    for (const id of ids) if ((await ownerOf(id)) === victim) held.push(id)
    // a steady stream of requests through nginx while the owner drains and exits
    let stop = false
    const statuses: number[] = []
    const load = (async () => {
      while (!stop) {
        for (const id of ids) {
          const r = await execute(id, 'n += 1\nprint(n)')
          statuses.push(r.status)
          if (r.status !== 200) t.fail(`a request failed during the drain: ${r.status} ${JSON.stringify(r.json)}`)
        }
      }
    })()
    // a turn in progress on the victim when SIGTERM comes: it finishes there
    const busy = await newSession()
    t.equal((await execute(busy, 'y = 1', victim.url)).status, 200)
    t.equal(await ownerOf(busy), victim)
    upstream.script(text('finished while draining', { firstByteMs: 1500 }))
    const turn = call('POST', '/v1/chat', { session_id: busy, messages: [{ role: 'user', type: 'message', content: 'take your time' }] })
    for (;;) {
      const events = await call('GET', `/v1/sessions/${busy}/events?limit=100`)
      if (events.json.events.some((e: { type: string }) => e.type === 'run_started')) break
      await new Promise((r) => setTimeout(r, 20))
    }
    const drainAt = performance.now()
    const code = await victim.process!.stop('SIGTERM')
    const drainMs = Math.round(performance.now() - drainAt)
    const finished = await turn
    t.equal(finished.status, 200, 'the running turn finished on the draining replica')
    t.equal(finished.json.message?.content, 'finished while draining')
    held.push(busy)
    // a few more rounds after the exit
    const after = statuses.length
    while (statuses.length < after + 3 * ids.length) await new Promise((r) => setTimeout(r, 20))
    stop = true
    await load
    t.equal(code, 0, 'the drained replica exits cleanly')
    t.ok(statuses.every((s) => s === 200), `${statuses.length} requests, all 200`)
    if (!statuses.every((s) => s === 200)) for (const r of replicas) t.comment(r.name, r.url, r.process!.stdout().split('\n').filter((l) => /owner|lease|handed|kernel|"level":50/.test(l)).join('\n'))
    for (const id of held) t.not(await ownerOf(id), victim, 'its sessions moved')
    const handedOver = /"sessions":(\d+),"ms":(\d+),"msg":"sessions handed over"/.exec(victim.process!.stdout())
    t.ok(handedOver, 'the replica logged the hand-over')
    t.comment(`drain: SIGTERM to exit ${drainMs} ms (a turn was running: the upstream answers after 1.5 s), hand-over of ${handedOver?.[1]} sessions took ${handedOver?.[2]} ms; ${statuses.length} requests during the drain, none failed`)
    upstream.reset()
  })
})
