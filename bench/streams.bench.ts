/**
 * Capacity: concurrent SSE streams one server process holds, and the memory each costs.
 * N streamed chat completions (`stream: true`, each in a new session) are opened against the
 * server, which runs in its own process; the fake upstream (test/fakes/upstream.ts, in this
 * process) sends each answer's first content chunk and then holds the stream open. Once every
 * client has seen its first chunk, the server's RSS and heap are read after a forced GC and
 * compared with the reading taken before; then the upstream lets every answer finish and each
 * stream is checked whole (every delta, then [DONE]).
 *
 * `npm run bench -- streams --streams=N` (default 5000). Loopback only; the run is bounded by
 * a deadline and stops by itself.
 */
import { setMaxListeners } from 'node:events'
import { request as httpRequest } from 'node:http'
import { availableParallelism, loadavg } from 'node:os'
import { fileURLToPath } from 'node:url'
import { buildApp } from '../app.js'
import { loadConfig } from '../config.js'
import { startFakeUpstream, text } from '../test/fakes/upstream.js'
import { type BenchResult, flag, serve, spawnServer, tempDir } from './lib.js'

const SELF = new URL(import.meta.url)
const API_KEY = 'bench-admin-key'
const MODEL = 'fake-model'
const TARGET_STREAMS = 5000
/** Connections being opened at once: well under the listen backlog (511), so none is refused. */
const OPENING = 100
const WARMUP = 50
/** Every stream must be open, and later finished, within this (plus 50 ms per stream). */
const DEADLINE_MS = 120_000
const MEMORY_ROUTE = '/bench/memory'
/** Streamed in 4 deltas of 4 characters: the role chunk and the first two ("held", " on ") go before the pause. */
const HELD_ANSWER = 'held on and done'

interface Memory {
  rss: number
  heapUsed: number
  /** Server-side sockets, read with the memory: the streams really are open there. */
  connections: number
}

const body = JSON.stringify({ model: MODEL, messages: [{ role: 'user', content: 'Say ok.' }], stream: true })

/**
 * One streamed completion on its own connection. `opened` resolves when the first content delta
 * arrives, `finished` with the whole answer's content once the stream ends.
 */
function openStream(url: URL, signal: AbortSignal): { opened: Promise<void>; finished: Promise<string> } {
  let open!: () => void
  let fail!: (err: Error) => void
  const opened = new Promise<void>((resolve, reject) => {
    open = resolve
    fail = reject
  })
  const finished = new Promise<string>((resolve, reject) => {
    const req = httpRequest(
      url,
      {
        method: 'POST',
        agent: false,
        signal,
        headers: { authorization: `Bearer ${API_KEY}`, 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) },
      },
      (res) => {
        res.setEncoding('utf8')
        let buffered = ''
        let content = ''
        let done = false
        res.on('data', (piece: string) => {
          buffered += piece
          for (let nl = buffered.indexOf('\n\n'); nl !== -1; nl = buffered.indexOf('\n\n')) {
            const event = buffered.slice(0, nl)
            buffered = buffered.slice(nl + 2)
            if (event === 'data: [DONE]') done = true
            else if (event.startsWith('data: {')) {
              const delta = (JSON.parse(event.slice(6)) as { choices: { delta?: { content?: string | null } }[] }).choices[0]?.delta?.content
              if (delta) {
                content += delta
                open()
              }
            }
          }
        })
        res.on('end', () => {
          const failure = res.statusCode !== 200 ? `answered ${res.statusCode}` : !done ? 'ended without [DONE]' : undefined
          if (failure) {
            const err = new Error(`stream ${failure}: ${content.slice(0, 200)}`)
            fail(err)
            reject(err)
          } else resolve(content)
        })
        res.on('error', (err) => {
          fail(err)
          reject(err)
        })
      },
    )
    req.on('error', (err) => {
      fail(err)
      reject(err)
    })
    req.end(body)
  })
  // the caller awaits `opened` first; a failure is reported there and again through `finished`
  finished.catch(() => {})
  opened.catch(() => {})
  return { opened, finished }
}

async function memory(server: string): Promise<Memory> {
  const res = await fetch(new URL(MEMORY_ROUTE, server))
  return (await res.json()) as Memory
}

const mib = (bytes: number) => `${(bytes / 1024 / 1024).toFixed(1)} MiB`
const kib = (bytes: number) => `${(bytes / 1024).toFixed(1)} KiB`

export default async function streams(): Promise<BenchResult> {
  const count = Number(flag('streams') ?? TARGET_STREAMS)
  if (!Number.isInteger(count) || count < 1) throw new Error(`--streams must be a positive integer (got ${flag('streams')})`)
  const started = Date.now()
  const upstream = await startFakeUpstream({ record: false })
  const abort = new AbortController()
  // every stream listens on it
  setMaxListeners(count + WARMUP + 10, abort.signal)
  const deadline = setTimeout(() => abort.abort(new Error('deadline passed')), DEADLINE_MS + 50 * count)
  let release!: () => void
  const resume = new Promise<void>((resolve) => (release = resolve))
  const server = await spawnServer(SELF, ['server'], {
    BENCH_DATA_DIR: tempDir(),
    BENCH_UPSTREAM: upstream.url,
    BENCH_MAX_CONNECTIONS: String(count + 100),
    NODE_OPTIONS: [process.env.NODE_OPTIONS, '--expose-gc'].filter(Boolean).join(' '),
  })
  try {
    const url = new URL('/v1/chat/completions', server.url)
    console.log(`server: buildApp, SQLite, SANDBOX=none, rate limits and logging off, MAX_CONNECTIONS_PER_IP=${count + 100}, in its own process`)
    console.log(`streams: ${count} streamed chat completions, each on its own connection in a new session, at most ${OPENING} being opened at once`)
    console.log(`load average at the start: ${loadavg().map((l) => l.toFixed(1)).join(' ')} on ${availableParallelism()} CPUs\n`)

    for (let i = 0; i < WARMUP; i++) {
      const warm = openStream(url, abort.signal)
      await warm.finished
    }
    const before = await memory(server.url)

    // The server passes content on cut after whitespace (a secret split across deltas stays
    // masked): the held part must end in a space to reach the client before the pause.
    upstream.script(...Array.from({ length: count }, () => text(HELD_ANSWER, { holdAfterChunks: 3, resume })))
    const held: { opened: Promise<void>; finished: Promise<string> }[] = []
    const openedAt = Date.now()
    let next = 0
    await Promise.all(
      Array.from({ length: Math.min(OPENING, count) }, async () => {
        while (next < count && !abort.signal.aborted) {
          const stream = openStream(url, abort.signal)
          next++
          held.push(stream)
          await stream.opened
        }
      }),
    )
    await Promise.all(held.map((s) => s.opened))
    const openSeconds = (Date.now() - openedAt) / 1000
    const during = await memory(server.url)

    release()
    const contents = await Promise.all(held.map((s) => s.finished))
    const whole = contents.filter((c) => c === HELD_ANSWER).length
    if (whole !== count) throw new Error(`${count - whole} of ${count} streams did not carry the whole answer`)
    const after = await memory(server.url)

    const perStream = { rss: (during.rss - before.rss) / count, heap: (during.heapUsed - before.heapUsed) / count }
    const rows = [
      ['', 'RSS', 'heap used', 'server sockets'],
      ['before (idle, after warm-up)', mib(before.rss), mib(before.heapUsed), String(before.connections)],
      [`${count} streams held`, mib(during.rss), mib(during.heapUsed), String(during.connections)],
      ['after they finished', mib(after.rss), mib(after.heapUsed), String(after.connections)],
    ]
    const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)))
    console.log(rows.map((r) => r.map((cell, i) => (i === 0 ? cell.padEnd(widths[i]!) : cell.padStart(widths[i]!))).join('  ')).join('\n'))
    const met = count >= TARGET_STREAMS
    const summary =
      `${count} concurrent SSE streams held by one process and finished whole (target ${TARGET_STREAMS}: ${met ? 'met' : 'MISSED'}); ` +
      `memory per held stream ${kib(perStream.rss)} RSS, ${kib(perStream.heap)} heap (after GC); all opened in ${openSeconds.toFixed(1)} s`
    console.log(`\n${summary}`)
    console.log(`load average at the end: ${loadavg().map((l) => l.toFixed(1)).join(' ')}; whole bench: ${((Date.now() - started) / 1000).toFixed(0)} s`)
    return { summary, met }
  } finally {
    clearTimeout(deadline)
    release()
    abort.abort()
    await server.stop()
    await upstream.close()
  }
}

/** Child side: the app pointed at the parent's upstream, with a memory reading route. */
async function child(): Promise<void> {
  const gc = (globalThis as { gc?: () => void }).gc
  if (!gc) throw new Error('the server needs --expose-gc')
  // Explicit settings, not the caller's environment: no stray DATABASE_URL, REDIS_URL or key.
  const config = loadConfig({
    API_KEY,
    DATA_DIR: process.env.BENCH_DATA_DIR,
    LLM_BASE_URL: process.env.BENCH_UPSTREAM,
    LLM_API_KEY: 'bench-upstream-key',
    MODELS: MODEL,
    SANDBOX: 'none',
    RATE_LIMIT_PER_MINUTE: '0',
    SESSION_RATE_LIMIT_PER_MINUTE: '0',
    MAX_CONNECTIONS_PER_IP: process.env.BENCH_MAX_CONNECTIONS,
  })
  const app = await buildApp(config)
  // bench-only and unauthenticated, on loopback
  app.get(MEMORY_ROUTE, async (): Promise<Memory> => {
    gc()
    gc()
    const { rss, heapUsed } = process.memoryUsage()
    const connections = await new Promise<number>((resolve) => app.server.getConnections((_err, n) => resolve(n)))
    return { rss, heapUsed, connections }
  })
  await serve(app)
}

if (process.argv[1] === fileURLToPath(SELF) && process.argv[2] === 'server') await child()
