import { statSync } from 'node:fs'
import { join } from 'node:path'
import { type BenchResult, measure, ratioLine, spawnServer, table, tempDir } from './lib.js'

const API_KEY = 'bench-admin-key'
const SERVER = new URL('./http.server.ts', import.meta.url)
const CONNECTIONS = 50
const WARMUP_S = 2
const DURATION_S = 10
const TARGET = 0.6

/**
 * Protected routes in order of preference, cheapest first: a one-row page of the (empty) session
 * list costs a single indexed query; /metrics serializes the whole registry and is the fallback.
 */
const CANDIDATES = ['/v1/sessions?limit=1', '/metrics']

/**
 * The full stack (bearer auth, per-IP rate limit, request logging at info to a file) against a
 * bare Fastify route returning the same JSON, both on loopback, one after the other.
 */
export default async function http(): Promise<BenchResult> {
  const dir = tempDir()
  const logDir = join(dir, 'logs')
  const headers = { authorization: `Bearer ${API_KEY}` }

  const full = await spawnServer(SERVER, ['full'], {
    BENCH_API_KEY: API_KEY,
    BENCH_DATA_DIR: join(dir, 'data'),
    BENCH_LOG_DIR: logDir,
  })
  let path: string | undefined
  let body = ''
  let contentType = ''
  let fullResult
  try {
    for (const candidate of CANDIDATES) {
      const res = await fetch(`${full.url}${candidate}`, { headers })
      if (res.status === 200) {
        path = candidate
        body = await res.text()
        contentType = res.headers.get('content-type') ?? ''
        break
      }
      await res.body?.cancel()
    }
    if (!path) throw new Error(`none of ${CANDIDATES.join(', ')} answered 200 with the bench key`)
    if (!contentType.startsWith('application/json'))
      throw new Error(`${path} answered ${contentType}, the bare route needs JSON to mirror`)
    console.log(`route: GET ${path} (the cheapest protected route present), response ${body.length} bytes: ${body}`)
    console.log(`load:  autocannon, ${CONNECTIONS} connections, ${WARMUP_S} s warm-up then ${DURATION_S} s measured, each server in its own process`)
    console.log('full:  buildApp with bearer auth, per-IP rate limit (not reached), info logging with request logs to LOG_DIR files (stdout discarded), SQLite store\n')
    fullResult = await measure({ url: `${full.url}${path}`, headers, connections: CONNECTIONS, warmup: WARMUP_S, duration: DURATION_S })
  } finally {
    await full.stop()
  }

  const bare = await spawnServer(SERVER, ['bare'], { BENCH_PATH: path.split('?')[0]!, BENCH_BODY: body })
  let bareResult
  try {
    const check = await fetch(`${bare.url}${path}`)
    if ((await check.text()) !== body) throw new Error('the bare route does not return the same JSON')
    bareResult = await measure({ url: `${bare.url}${path}`, headers, connections: CONNECTIONS, warmup: WARMUP_S, duration: DURATION_S })
  } finally {
    await bare.stop()
  }

  for (const [name, m] of [['full', fullResult], ['bare', bareResult]] as const)
    if (m.non2xx > 0 || m.errors > 0) throw new Error(`${name}: ${m.non2xx} non-2xx responses and ${m.errors} errors: the figures are void`)

  console.log(table([
    { name: 'full stack', m: fullResult },
    { name: 'bare fastify', m: bareResult },
  ]))
  const logBytes = statSync(join(logDir, 'server_out.log')).size
  console.log(`\nfull stack wrote ${(logBytes / 1024 / 1024).toFixed(1)} MiB to server_out.log`)
  const ratio = ratioLine('requests/s full/bare', fullResult.requestsPerSec / bareResult.requestsPerSec, TARGET)
  console.log(ratio.text)
  return { summary: `GET ${path}: ${ratio.text}`, met: ratio.met }
}
