import { type ChildProcess, fork } from 'node:child_process'
import { once } from 'node:events'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import autocannon from 'autocannon'
import type { FastifyInstance } from 'fastify'

/** What a `*.bench.ts` module's default export resolves to; bench/run.ts prints the summaries. */
export interface BenchResult {
  summary: string
  /** Whether the benchmark met its stated target. */
  met: boolean
}

export interface RunningServer {
  url: string
  /** CPU time (user + system, µs) the server process has used so far, all its threads included. */
  cpuTime(): Promise<number>
  stop(): Promise<void>
}

const START_TIMEOUT_MS = 30_000
const STOP_TIMEOUT_MS = 10_000

/**
 * Runs a server in its own process so the load generator never shares an event loop with it
 * (in one process, autocannon's own work would be billed to the server). `entry` is a module
 * that calls `serve()`; its stdout is discarded, stderr passes through.
 */
export async function spawnServer(entry: string | URL, args: string[] = [], env: Record<string, string> = {}): Promise<RunningServer> {
  const child: ChildProcess = fork(entry, args, {
    execArgv: ['--import', 'tsx'],
    env: { ...process.env, ...env },
    stdio: ['ignore', 'ignore', 'inherit', 'ipc'],
  })
  const url = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${entry} did not start within ${START_TIMEOUT_MS} ms`)), START_TIMEOUT_MS)
    child.once('message', (msg: { url?: string }) => {
      clearTimeout(timer)
      if (msg.url) resolve(msg.url)
      else reject(new Error(`${entry} sent ${JSON.stringify(msg)}`))
    })
    child.once('exit', (code) => {
      clearTimeout(timer)
      reject(new Error(`${entry} exited with ${code} before listening`))
    })
  })
  let asked = 0
  const pending = new Map<number, (usage: number) => void>()
  child.on('message', (msg: { cpu?: number; usage?: number }) => {
    if (msg.cpu !== undefined && msg.usage !== undefined) pending.get(msg.cpu)?.(msg.usage)
  })
  return {
    url,
    cpuTime() {
      const id = ++asked
      return new Promise<number>((resolve) => {
        pending.set(id, (usage) => {
          pending.delete(id)
          resolve(usage)
        })
        child.send({ cpu: id })
      })
    },
    async stop() {
      if (child.exitCode !== null || child.signalCode !== null) return
      const exited = once(child, 'exit')
      child.kill('SIGTERM')
      const timer = setTimeout(() => child.kill('SIGKILL'), STOP_TIMEOUT_MS)
      await exited
      clearTimeout(timer)
    },
  }
}

/** Child side of spawnServer: listens on a free loopback port, reports the URL, closes on SIGTERM. */
export async function serve(app: FastifyInstance): Promise<void> {
  const url = await app.listen({ port: 0, host: '127.0.0.1' })
  process.once('SIGTERM', () => {
    app.close().then(
      () => process.exit(0),
      () => process.exit(1),
    )
  })
  // the parent died without stopping us: do not linger
  process.once('disconnect', () => process.kill(process.pid, 'SIGTERM'))
  process.on('message', (msg: { cpu?: number }) => {
    if (msg.cpu === undefined) return
    const usage = process.cpuUsage()
    process.send!({ cpu: msg.cpu, usage: usage.user + usage.system })
  })
  process.send!({ url })
}

export interface LoadOptions {
  url: string
  method?: 'GET' | 'POST'
  body?: string
  headers?: Record<string, string>
  connections?: number
  /** Measured seconds. */
  duration?: number
  /** Seconds of discarded load first, so JIT and caches settle. */
  warmup?: number
  /**
   * The server under load, to report its CPU time per request: unlike requests/s, that figure
   * holds when other processes compete for the same cores, as they do on a shared host.
   */
  server?: RunningServer
}

export interface Measurement {
  requestsPerSec: number
  p50: number
  p99: number
  total: number
  non2xx: number
  errors: number
  /** Server CPU time per completed request (µs), when `server` was given. */
  cpuPerRequest?: number
}

/** Drives load with autocannon: a warm-up run that is thrown away, then the measured run. */
export async function measure(opts: LoadOptions): Promise<Measurement> {
  const base = {
    url: opts.url,
    method: opts.method ?? 'GET',
    ...(opts.body === undefined ? {} : { body: opts.body }),
    headers: opts.headers,
    connections: opts.connections ?? 50,
  }
  if (opts.warmup) await autocannon({ ...base, duration: opts.warmup })
  const cpuBefore = await opts.server?.cpuTime()
  const result = await autocannon({ ...base, duration: opts.duration ?? 10 })
  const cpuAfter = await opts.server?.cpuTime()
  return {
    ...(cpuBefore !== undefined && cpuAfter !== undefined && result.requests.total > 0
      ? { cpuPerRequest: (cpuAfter - cpuBefore) / result.requests.total }
      : {}),
    requestsPerSec: result.requests.average,
    p50: result.latency.p50,
    p99: result.latency.p99,
    total: result.requests.total,
    non2xx: result.non2xx,
    errors: result.errors,
  }
}

// autocannon records latency in whole milliseconds
const ms = (value: number) => (value < 1 ? '<1' : value.toFixed(0))

/** A fixed-width table of measurements, one row per target; the CPU column only when measured. */
export function table(rows: { name: string; m: Measurement }[]): string {
  const cpu = rows.some(({ m }) => m.cpuPerRequest !== undefined)
  const header = ['', 'req/s', 'p50 ms', 'p99 ms', 'requests', 'non-2xx', 'errors', ...(cpu ? ['server CPU µs/req'] : [])]
  const body = rows.map(({ name, m }) => [
    name,
    Math.round(m.requestsPerSec).toString(),
    ms(m.p50),
    ms(m.p99),
    m.total.toString(),
    m.non2xx.toString(),
    m.errors.toString(),
    ...(cpu ? [m.cpuPerRequest === undefined ? '-' : m.cpuPerRequest.toFixed(1)] : []),
  ])
  const all = [header, ...body]
  const widths = header.map((_, i) => Math.max(...all.map((r) => r[i]!.length)))
  return all.map((r) => r.map((cell, i) => (i === 0 ? cell.padEnd(widths[i]!) : cell.padStart(widths[i]!))).join('  ')).join('\n')
}

/** "0.72× (target ≥ 0.60×): met" */
export function ratioLine(label: string, value: number, target: number): { text: string; met: boolean } {
  const met = value >= target
  return { met, text: `${label}: ${value.toFixed(2)}× (target ≥ ${target.toFixed(2)}×): ${met ? 'met' : 'MISSED'}` }
}

/** A temporary directory removed when the process exits. */
/** `--name=value` from the command line (bench/run.ts passes flags through). */
export function flag(name: string): string | undefined {
  const prefix = `--${name}=`
  return process.argv.find((a) => a.startsWith(prefix))?.slice(prefix.length)
}

export function tempDir(prefix = 'oi-bench-'): string {
  const dir = mkdtempSync(join(tmpdir(), prefix))
  process.once('exit', () => rmSync(dir, { recursive: true, force: true }))
  return dir
}
