import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { type BenchResult, type Measurement, measure, ratioLine, spawnServer, table, tempDir } from './lib.js'

const API_KEY = 'bench-admin-key'
const SERVER = new URL('./http.server.ts', import.meta.url)
const CONNECTIONS = 50
const WARMUP_S = 2
const DURATION_S = 10
const TARGET = 0.7

/**
 * The health-like request the target is about: a protected route that does no I/O of its own
 * (the server's MODELS list), so the figure is the cost of the stack around it.
 */
const ROUTE = '/v1/models'
/** Reported, not targeted: the same stack plus one indexed SQLite query (an empty session page). */
const DB_ROUTE = '/v1/sessions?limit=1'

async function jsonBody(url: string, headers: Record<string, string>): Promise<string> {
  const res = await fetch(url, { headers })
  const body = await res.text()
  if (res.status !== 200) throw new Error(`${url} answered ${res.status} with the bench key: ${body}`)
  if (!res.headers.get('content-type')?.startsWith('application/json')) throw new Error(`${url} did not answer JSON`)
  return body
}

/**
 * The full stack (bearer auth, per-IP rate limit, request logging at info to a file) against a
 * bare Fastify route returning the same JSON, both on loopback, one after the other.
 */
export default async function http(): Promise<BenchResult> {
  const dir = tempDir()
  const logDir = join(dir, 'logs')
  const headers = { authorization: `Bearer ${API_KEY}` }
  const load = { headers, connections: CONNECTIONS, warmup: WARMUP_S, duration: DURATION_S }

  const full = await spawnServer(SERVER, ['full'], {
    BENCH_API_KEY: API_KEY,
    BENCH_DATA_DIR: join(dir, 'data'),
    BENCH_LOG_DIR: logDir,
  })
  let body: string
  let fullResult: Measurement
  let dbResult: Measurement
  try {
    body = await jsonBody(`${full.url}${ROUTE}`, headers)
    const dbBody = await jsonBody(`${full.url}${DB_ROUTE}`, headers)
    console.log(`route: GET ${ROUTE}, response ${body.length} bytes: ${body}`)
    console.log(`also:  GET ${DB_ROUTE} (one SQLite query), response ${dbBody.length} bytes, reported only`)
    console.log(`load:  autocannon, ${CONNECTIONS} connections, ${WARMUP_S} s warm-up then ${DURATION_S} s measured, each server in its own process`)
    console.log('full:  buildApp with bearer auth, per-IP rate limit (not reached), info logging with request logs to LOG_DIR files (stdout discarded), SQLite store\n')
    fullResult = await measure({ url: `${full.url}${ROUTE}`, server: full, ...load })
    dbResult = await measure({ url: `${full.url}${DB_ROUTE}`, server: full, ...load })
  } finally {
    await full.stop()
  }

  const bare = await spawnServer(SERVER, ['bare'], { BENCH_PATH: ROUTE, BENCH_BODY: body })
  let bareResult: Measurement
  try {
    if ((await jsonBody(`${bare.url}${ROUTE}`, {})) !== body) throw new Error('the bare route does not return the same JSON')
    bareResult = await measure({ url: `${bare.url}${ROUTE}`, server: bare, ...load })
  } finally {
    await bare.stop()
  }

  for (const [name, m] of [['full', fullResult], ['full, DB route', dbResult], ['bare', bareResult]] as const)
    if (m.non2xx > 0 || m.errors > 0) throw new Error(`${name}: ${m.non2xx} non-2xx responses and ${m.errors} errors: the figures are void`)

  console.log(table([
    { name: `full stack ${ROUTE}`, m: fullResult },
    { name: `full stack ${DB_ROUTE}`, m: dbResult },
    { name: `bare fastify ${ROUTE}`, m: bareResult },
  ]))
  const log = readFileSync(join(logDir, 'server_out.log'))
  let lines = 0
  for (let at = log.indexOf(10); at !== -1; at = log.indexOf(10, at + 1)) lines++
  console.log(`\nfull stack wrote ${(log.length / 1024 / 1024).toFixed(1)} MiB to server_out.log: ${lines} lines of ${Math.round(log.length / lines)} bytes on average`)
  const dbRatio = dbResult.requestsPerSec / bareResult.requestsPerSec
  console.log(`requests/s full/bare with the DB query (not targeted): ${dbRatio.toFixed(2)}×`)
  // What the throughput ratio would be with each server alone on a core: a check on the figure
  // above when the host is busy (the load generator shares the machine too).
  console.log(`server CPU per request bare/full (not targeted): ${(bareResult.cpuPerRequest! / fullResult.cpuPerRequest!).toFixed(2)}×`)
  const ratio = ratioLine('requests/s full/bare', fullResult.requestsPerSec / bareResult.requestsPerSec, TARGET)
  console.log(ratio.text)
  return { summary: `GET ${ROUTE}: ${ratio.text}; with the DB query ${dbRatio.toFixed(2)}×`, met: ratio.met }
}
