/**
 * What the server adds on top of the model, for a plain answer (no tool call), in one run:
 *   straight   POST /v1/chat/completions on the fake upstream (test/fakes/upstream.ts, answers "ok")
 *   ephemeral  the same request through the server: a new session per request (the default)
 *   bound      through the server into an empty session created beforehand (untimed), so the
 *              difference to ephemeral is the cost of creating the session
 * each non-stream and stream. Latency: sequential requests (concurrency 1) on one keep-alive
 * node:http agent, the three targets interleaved request by request so that they see the same
 * machine; time to first chunk is the time to the first `data:` line whose delta carries content.
 * Throughput: autocannon, 20 connections for 5 s per target. The upstream and the server each run
 * in their own process on loopback; this process only drives the load.
 */
import { request as httpRequest, Agent } from 'node:http'
import { availableParallelism, loadavg } from 'node:os'
import { fileURLToPath } from 'node:url'
import autocannon from 'autocannon'
import { buildApp } from '../app.js'
import { loadConfig } from '../config.js'
import { startFakeUpstream } from '../test/fakes/upstream.js'
import { type BenchResult, type RunningServer, serve, spawnServer, tempDir } from './lib.js'

const SELF = new URL(import.meta.url)
const API_KEY = 'bench-admin-key'
const MODEL = 'fake-model'
const WARMUP = 100
const MEASURED = 400
const CONNECTIONS = 20
const THROUGHPUT_S = 5
const THROUGHPUT_WARMUP_S = 1
/** The targets (ms): added latency, and server CPU per turn. */
const TARGET = { p50: 1, p99: 5, firstChunk: 1, cpuPerTurn: 0.8 }
const CPU_ROUTE = '/bench/cpu'

const headers = { authorization: `Bearer ${API_KEY}`, 'content-type': 'application/json' }
const bodyOf = (stream: boolean, sessionId?: string) =>
  JSON.stringify({
    model: MODEL,
    messages: [{ role: 'user', content: 'Say ok.' }],
    ...(stream ? { stream: true, stream_options: { include_usage: true } } : {}),
    ...(sessionId ? { session_id: sessionId } : {}),
  })

interface Sample {
  total: number
  /** Stream only. */
  firstChunk?: number
}

/** One request, timed from before it is written until the last byte of the answer. */
function timed(agent: Agent, url: URL, body: string, stream: boolean): Promise<Sample> {
  return new Promise((resolve, reject) => {
    const started = performance.now()
    const req = httpRequest(
      url,
      { method: 'POST', agent, headers: { ...headers, 'content-length': Buffer.byteLength(body) } },
      (res) => {
        res.setEncoding('utf8')
        let text = ''
        let firstChunk: number | undefined
        let scanned = 0
        res.on('data', (piece: string) => {
          text += piece
          if (!stream || firstChunk !== undefined) return
          // only whole lines; a data line split across reads is looked at once it is complete
          for (let nl = text.indexOf('\n', scanned); nl !== -1; nl = text.indexOf('\n', scanned)) {
            const line = text.slice(scanned, nl)
            scanned = nl + 1
            if (!line.startsWith('data: {')) continue
            const chunk = JSON.parse(line.slice(6)) as { choices: { delta?: { content?: string | null } }[] }
            if (chunk.choices[0]?.delta?.content) {
              firstChunk = performance.now() - started
              break
            }
          }
        })
        res.on('end', () => {
          const total = performance.now() - started
          try {
            check(res.statusCode, text, stream)
            resolve({ total, firstChunk })
          } catch (err) {
            reject(err)
          }
        })
        res.on('error', reject)
      },
    )
    req.on('error', reject)
    req.end(body)
  })
}

/** A figure from a failed or empty answer would be void, so every answer is checked. */
function check(status: number | undefined, text: string, stream: boolean): void {
  if (status !== 200) throw new Error(`answered ${status}: ${text.slice(0, 300)}`)
  if (stream) {
    const content = text
      .split('\n')
      .filter((l) => l.startsWith('data: {'))
      .map((l) => (JSON.parse(l.slice(6)) as { choices: { delta?: { content?: string | null } }[] }).choices[0]?.delta?.content ?? '')
      .join('')
    if (content !== 'ok' || !text.endsWith('data: [DONE]\n\n')) throw new Error(`unexpected stream: ${text.slice(0, 300)}`)
  } else {
    const content = (JSON.parse(text) as { choices: { message: { content: string } }[] }).choices[0]?.message.content
    if (content !== 'ok') throw new Error(`unexpected answer: ${text.slice(0, 300)}`)
  }
}

async function newSession(agent: Agent, server: string): Promise<string> {
  const body = JSON.stringify({ title: 'bench' })
  return new Promise((resolve, reject) => {
    const req = httpRequest(
      new URL('/v1/sessions', server),
      { method: 'POST', agent, headers: { ...headers, 'content-length': Buffer.byteLength(body) } },
      (res) => {
        let text = ''
        res.setEncoding('utf8')
        res.on('data', (piece: string) => {
          text += piece
        })
        res.on('end', () => (res.statusCode === 201 || res.statusCode === 200 ? resolve((JSON.parse(text) as { id: string }).id) : reject(new Error(`POST /v1/sessions answered ${res.statusCode}: ${text}`))))
        res.on('error', reject)
      },
    )
    req.on('error', reject)
    req.end(body)
  })
}

const percentile = (sorted: number[], p: number) => sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)]!

interface Stats {
  p50: number
  p99: number
  ttfc50?: number
  ttfc99?: number
}

function stats(samples: Sample[]): Stats {
  const totals = samples.map((s) => s.total).sort((a, b) => a - b)
  const firsts = samples.flatMap((s) => (s.firstChunk === undefined ? [] : [s.firstChunk])).sort((a, b) => a - b)
  return {
    p50: percentile(totals, 50),
    p99: percentile(totals, 99),
    ...(firsts.length > 0 ? { ttfc50: percentile(firsts, 50), ttfc99: percentile(firsts, 99) } : {}),
  }
}

type Target = 'straight' | 'ephemeral' | 'bound'
const TARGETS: Target[] = ['straight', 'ephemeral', 'bound']

/** Sequential requests, the targets taking turns; the first WARMUP rounds are thrown away. */
async function latency(upstream: string, server: string, stream: boolean): Promise<Record<Target, Stats>> {
  const agent = new Agent({ keepAlive: true, maxSockets: 1 })
  const straightUrl = new URL(`${upstream}/chat/completions`)
  const serverUrl = new URL('/v1/chat/completions', server)
  const samples: Record<Target, Sample[]> = { straight: [], ephemeral: [], bound: [] }
  try {
    for (let i = 0; i < WARMUP + MEASURED; i++) {
      const sessionId = await newSession(agent, server)
      const round = {
        straight: await timed(agent, straightUrl, bodyOf(stream), stream),
        ephemeral: await timed(agent, serverUrl, bodyOf(stream), stream),
        bound: await timed(agent, serverUrl, bodyOf(stream, sessionId), stream),
      }
      if (i >= WARMUP) for (const t of TARGETS) samples[t].push(round[t])
    }
  } finally {
    agent.destroy()
  }
  return { straight: stats(samples.straight), ephemeral: stats(samples.ephemeral), bound: stats(samples.bound) }
}

/** The server process's CPU time so far, in µs (a bench-only route of the server child). */
async function serverCpu(server: string): Promise<number> {
  const usage = (await (await fetch(new URL(CPU_ROUTE, server))).json()) as NodeJS.CpuUsage
  return usage.user + usage.system
}

interface Load {
  rps: number
  /** Server CPU per request in µs; only when `server` is given. */
  cpu?: number
}

async function throughput(url: string, body: string, server?: string): Promise<Load> {
  const base = { url, method: 'POST' as const, headers, body, connections: CONNECTIONS }
  await autocannon({ ...base, duration: THROUGHPUT_WARMUP_S })
  const before = server ? await serverCpu(server) : 0
  const result = await autocannon({ ...base, duration: THROUGHPUT_S })
  const cpu = server ? (await serverCpu(server)) - before : undefined
  if (result.non2xx > 0 || result.errors > 0 || result.timeouts > 0)
    throw new Error(`${url}: ${result.non2xx} non-2xx, ${result.errors} errors, ${result.timeouts} timeouts: the figure is void`)
  return { rps: result.requests.average, ...(cpu === undefined ? {} : { cpu: cpu / result.requests.total }) }
}

const f = (ms: number | undefined) => (ms === undefined ? '-' : ms.toFixed(2))
const signed = (ms: number) => `${ms >= 0 ? '+' : ''}${ms.toFixed(2)}`

function render(rows: string[][]): string {
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)))
  return rows.map((r) => r.map((cell, i) => (i === 0 ? cell.padEnd(widths[i]!) : cell.padStart(widths[i]!))).join('  ')).join('\n')
}

export default async function openai(): Promise<BenchResult> {
  const started = Date.now()
  const dir = tempDir()
  let upstream: RunningServer | undefined
  let server: RunningServer | undefined
  try {
    upstream = await spawnServer(SELF, ['upstream'])
    server = await spawnServer(SELF, ['server'], { BENCH_DATA_DIR: dir, BENCH_UPSTREAM: upstream.url })
    console.log(`upstream: fake on ${upstream.url}, answering "ok" (4 chunks when streamed); server: buildApp, SQLite, SANDBOX=none, rate limits and logging off`)
    console.log(`latency: ${MEASURED} sequential requests per target after ${WARMUP} of warm-up, targets interleaved, one keep-alive node:http agent`)
    console.log(`throughput: autocannon, ${CONNECTIONS} connections, ${THROUGHPUT_WARMUP_S} s warm-up then ${THROUGHPUT_S} s per target`)
    console.log(`load average at the start: ${loadavg().map((l) => l.toFixed(1)).join(' ')} on ${availableParallelism()} CPUs\n`)

    const lat = { plain: await latency(upstream.url, server.url, false), stream: await latency(upstream.url, server.url, true) }
    const load: Record<string, Load> = {}
    for (const stream of [false, true]) {
      const mode = stream ? 'stream' : 'plain'
      load[`straight ${mode}`] = await throughput(`${upstream.url}/chat/completions`, bodyOf(stream))
      load[`ephemeral ${mode}`] = await throughput(new URL('/v1/chat/completions', server.url).href, bodyOf(stream), server.url)
    }
    const rps = (key: string) => load[key]?.rps
    const ratio = (mode: string) => rps(`ephemeral ${mode}`)! / rps(`straight ${mode}`)!

    const rows = [['', 'p50 ms', 'p99 ms', 'added p50', 'added p99', 'first chunk p50', 'p99', 'added first chunk p50', 'p99', 'req/s', 'ratio', 'server CPU/req']]
    for (const mode of ['plain', 'stream'] as const) {
      const base = lat[mode].straight
      for (const t of TARGETS) {
        const s = lat[mode][t]
        const key = `${t} ${mode}`
        rows.push([
          `${t}, ${mode === 'plain' ? 'non-stream' : 'stream'}`,
          f(s.p50),
          f(s.p99),
          t === 'straight' ? '' : signed(s.p50 - base.p50),
          t === 'straight' ? '' : signed(s.p99 - base.p99),
          f(s.ttfc50),
          f(s.ttfc99),
          t === 'straight' || s.ttfc50 === undefined ? '' : signed(s.ttfc50 - base.ttfc50!),
          t === 'straight' || s.ttfc99 === undefined ? '' : signed(s.ttfc99 - base.ttfc99!),
          rps(key) === undefined ? '' : Math.round(rps(key)!).toString(),
          t === 'ephemeral' ? `${ratio(mode).toFixed(3)}×` : '',
          load[key]?.cpu === undefined ? '' : `${(load[key].cpu / 1000).toFixed(2)} ms`,
        ])
      }
    }
    console.log(render(rows))
    console.log('\nadded = through − straight, percentile against percentile (the requests are not paired)')
    console.log('server CPU/req: the server process\'s user + system CPU time over the measured throughput run, per request')
    console.log(`load average at the end: ${loadavg().map((l) => l.toFixed(1)).join(' ')} (other processes on the machine inflate the wall-clock figures, the tails most)`)

    const added = {
      p50: lat.plain.ephemeral.p50 - lat.plain.straight.p50,
      p99: lat.plain.ephemeral.p99 - lat.plain.straight.p99,
      firstChunk: lat.stream.ephemeral.ttfc50! - lat.stream.straight.ttfc50!,
    }
    // What one core could serve if it did nothing else: the machine's load does not bend it.
    const perCore = (mode: string) => 1e6 / load[`ephemeral ${mode}`]!.cpu!
    console.log(
      `chat turns per second per core (1 / server CPU per turn, against the fake upstream): ${perCore('plain').toFixed(0)} non-stream, ${perCore('stream').toFixed(0)} stream`,
    )
    const cpuMs = load['ephemeral plain']!.cpu! / 1000
    const met = added.p50 <= TARGET.p50 && added.p99 <= TARGET.p99 && added.firstChunk <= TARGET.firstChunk && cpuMs <= TARGET.cpuPerTurn
    const summary =
      `ephemeral session, non-stream added p50 ${signed(added.p50)} ms (target ≤ ${TARGET.p50}), p99 ${signed(added.p99)} ms (target ≤ ${TARGET.p99}); ` +
      `stream added first chunk p50 ${signed(added.firstChunk)} ms (target ≤ ${TARGET.firstChunk}); ` +
      `throughput through/straight ${ratio('plain').toFixed(3)}× non-stream, ${ratio('stream').toFixed(3)}× stream ` +
      `(server CPU ${cpuMs.toFixed(2)} ms per request (target ≤ ${TARGET.cpuPerTurn}), ${perCore('plain').toFixed(0)} turns/s per core): ${met ? 'met' : 'MISSED'}`
    console.log(`\n${summary}`)
    console.log(`whole bench: ${((Date.now() - started) / 1000).toFixed(0)} s`)
    return { summary, met }
  } finally {
    await server?.stop()
    await upstream?.stop()
  }
}

/** Child side: the fake upstream, or the app pointed at it. */
async function child(mode: string | undefined): Promise<void> {
  if (mode === 'upstream') {
    const upstream = await startFakeUpstream({ record: false })
    process.once('SIGTERM', () => {
      upstream.close().then(
        () => process.exit(0),
        () => process.exit(1),
      )
    })
    process.once('disconnect', () => process.kill(process.pid, 'SIGTERM'))
    process.send!({ url: upstream.url })
    return
  }
  if (mode !== 'server') throw new Error(`usage: openai.bench.ts upstream|server (got ${mode})`)
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
  })
  const app = await buildApp(config)
  // bench-only and unauthenticated, on loopback: the parent reads the server's CPU time around a load run
  app.get(CPU_ROUTE, async () => process.cpuUsage())
  await serve(app)
}

if (process.argv[1] === fileURLToPath(SELF)) await child(process.argv[2])
