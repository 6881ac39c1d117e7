/**
 * The session store through the whole app, SQLite against PostgreSQL in one run:
 *   throughput  POST /v1/sessions and GET /v1/sessions?limit=20, requests/s per engine and the ratio
 *   memory      the server's RSS and heap (after a forced GC) with an empty store and with 10,000
 *               stored sessions; the target is flat: nothing may be held per stored session
 * Each server runs in its own process (this file, started with an argument); PostgreSQL is
 * DATABASE_URL when set, otherwise a throw-away cluster from scripts/pg-test-cluster.sh.
 */
import { execFile, execFileSync } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { promisify } from 'node:util'
import pg from 'pg'
import { buildApp } from '../app.js'
import { loadConfig } from '../config.js'
import { ADMIN_TENANT } from '../services/auth.js'
import { type BenchResult, type Measurement, measure, type RunningServer, serve, spawnServer, table, tempDir } from './lib.js'

const API_KEY = 'bench-admin-key'
const SELF = new URL(import.meta.url)
const CLUSTER_SCRIPT = fileURLToPath(new URL('../scripts/pg-test-cluster.sh', import.meta.url))
const CONNECTIONS = 50
const WARMUP_S = 2
const DURATION_S = 6
const SEEDED = 10_000
/** List requests before each memory reading, so both readings include what the route allocates once. */
const LIST_CALLS = 50
/**
 * Flat means within these. A stored session kept in memory would cost hundreds of bytes at least
 * (a record object with its strings): 10,000 of them would pass 2 MiB of heap. RSS also holds
 * SQLite's page cache, which fills as the file grows up to the 16 MB that better-sqlite3 builds
 * SQLite with (cache_size = -16000): seeded with 30,000 sessions RSS rose 17 MiB, with 80,000
 * 18 MiB, while the heap did not move. The RSS budget is that cap plus a little.
 */
const HEAP_BUDGET = 2 * 1024 * 1024
const RSS_BUDGET = 20 * 1024 * 1024

const headers = { authorization: `Bearer ${API_KEY}` }
const createBody = JSON.stringify({ title: 'bench session', metadata: { source: 'bench' } })
const mib = (bytes: number) => `${(bytes / 1024 / 1024).toFixed(1)} MiB`
const signedMib = (bytes: number) => `${bytes >= 0 ? '+' : ''}${mib(bytes)}`

interface Memory {
  rss: number
  heapUsed: number
}

interface Engine {
  name: 'SQLite' | 'PostgreSQL'
  /** Server environment for a fresh, empty store. */
  fresh(): Promise<Record<string, string>>
}

/**
 * A server process of this file: the app as server.ts builds it, with logging and rate limits
 * off and the admin key. `memory` adds two bench-only routes: a reading after a forced GC and a
 * seeding that goes straight to the store.
 */
async function runServer(mode: 'throughput' | 'memory'): Promise<void> {
  const env = (name: string) => process.env[name] || undefined
  // Explicit settings, not the caller's environment: only BENCH_DATABASE_URL picks the engine.
  const config = loadConfig({
    API_KEY,
    DATA_DIR: env('BENCH_DATA_DIR'),
    DATABASE_URL: env('BENCH_DATABASE_URL'),
    RATE_LIMIT_PER_MINUTE: '0',
    SESSION_RATE_LIMIT_PER_MINUTE: '0',
  })
  const app = await buildApp(config)
  if (mode === 'memory') {
    const gc = (globalThis as { gc?: () => void }).gc
    if (!gc) throw new Error('the memory server needs --expose-gc')
    app.get('/bench/memory', async (): Promise<Memory> => {
      // Twice: the first pass can leave weak references and finalizers for the second.
      gc()
      gc()
      const { rss, heapUsed } = process.memoryUsage()
      return { rss, heapUsed }
    })
    app.post<{ Querystring: { count: string } }>('/bench/seed', async (request) => {
      const count = Number(request.query.count)
      // Ten at a time fills the PostgreSQL pool; SQLite runs them one by one anyway.
      for (let i = 0; i < count; i += 10) {
        await Promise.all(
          Array.from({ length: Math.min(10, count - i) }, (_, j) =>
            app.store.createSession({
              tenantId: ADMIN_TENANT,
              title: `seeded ${i + j}`,
              metadata: { n: i + j },
              model: config.LITELLM_MODEL,
            }),
          ),
        )
      }
      return { count }
    })
  }
  await serve(app)
}

/** PostgreSQL for the run: fresh databases on DATABASE_URL's server or on a throw-away cluster. */
async function openPostgres(): Promise<{ url(): Promise<string>; close(): Promise<void>; origin: string }> {
  let adminUrl = process.env.DATABASE_URL
  let clusterDir: string | undefined
  if (!adminUrl) {
    const { stdout, stderr } = await promisify(execFile)(CLUSTER_SCRIPT, [], { encoding: 'utf8' })
    adminUrl = stdout.trim().split('\n').at(-1)!
    clusterDir = /data directory: (.+)/.exec(stderr)?.[1]
  }
  // Synchronous, so that an interrupted run can still stop the cluster on its way out.
  const stopCluster = () => {
    if (clusterDir) execFileSync(CLUSTER_SCRIPT, ['stop', clusterDir], { stdio: 'ignore' })
    clusterDir = undefined
  }
  const admin = new pg.Client({ connectionString: adminUrl })
  try {
    await admin.connect()
  } catch (err) {
    stopCluster()
    throw err
  }
  const interrupted = () => {
    stopCluster()
    process.exit(130)
  }
  process.once('SIGINT', interrupted)
  const created: string[] = []
  return {
    origin: clusterDir
      ? 'a throw-away cluster (fsync=off, synchronous_commit=off; SQLite runs WAL with synchronous=NORMAL: neither syncs per commit)'
      : 'DATABASE_URL',
    async url() {
      const name = `oi_bench_${randomBytes(6).toString('hex')}`
      await admin.query(`CREATE DATABASE ${name}`)
      created.push(name)
      const url = new URL(adminUrl)
      url.pathname = `/${name}`
      return url.href
    },
    async close() {
      process.removeListener('SIGINT', interrupted)
      try {
        for (const name of created) await admin.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`)
        await admin.end()
      } finally {
        stopCluster()
      }
    },
  }
}

async function withServer<T>(
  mode: 'throughput' | 'memory',
  env: Record<string, string>,
  use: (server: RunningServer) => Promise<T>,
): Promise<T> {
  const server = await spawnServer(SELF, [mode], env)
  try {
    return await use(server)
  } finally {
    await server.stop()
  }
}

async function throughput(engine: Engine): Promise<{ create: Measurement; list: Measurement }> {
  return withServer('throughput', await engine.fresh(), async (server) => {
    const create = await measure({
      url: `${server.url}/v1/sessions`,
      method: 'POST',
      body: createBody,
      headers: { ...headers, 'content-type': 'application/json' },
      connections: CONNECTIONS,
      warmup: WARMUP_S,
      duration: DURATION_S,
    })
    // Over the sessions the create run left, so the page comes from a store that is not empty.
    const list = await measure({
      url: `${server.url}/v1/sessions?limit=20`,
      headers,
      connections: CONNECTIONS,
      warmup: WARMUP_S,
      duration: DURATION_S,
    })
    for (const [route, m] of [
      ['create', create],
      ['list', list],
    ] as const)
      if (m.non2xx > 0 || m.errors > 0)
        throw new Error(`${engine.name} ${route}: ${m.non2xx} non-2xx responses and ${m.errors} errors: the figures are void`)
    return { create, list }
  })
}

async function memory(engine: Engine): Promise<{ empty: Memory; seeded: Memory }> {
  const env = { ...(await engine.fresh()), NODE_OPTIONS: [process.env.NODE_OPTIONS, '--expose-gc'].filter(Boolean).join(' ') }
  return withServer('memory', env, async (server) => {
    const reading = async (expectedPage: number): Promise<Memory> => {
      for (let i = 0; i < LIST_CALLS; i++) {
        const res = await fetch(`${server.url}/v1/sessions?limit=20`, { headers })
        const body = (await res.json()) as { sessions?: unknown[] }
        if (res.status !== 200 || body.sessions?.length !== expectedPage)
          throw new Error(`${engine.name}: the list answered ${res.status} with ${body.sessions?.length} sessions, not ${expectedPage}`)
      }
      return (await (await fetch(`${server.url}/bench/memory`)).json()) as Memory
    }
    const empty = await reading(0)
    const seeded = await fetch(`${server.url}/bench/seed?count=${SEEDED}`, { method: 'POST' })
    if (seeded.status !== 200) throw new Error(`${engine.name}: seeding answered ${seeded.status} ${await seeded.text()}`)
    return { empty, seeded: await reading(20) }
  })
}

export default async function store(): Promise<BenchResult> {
  const started = Date.now()
  const dir = tempDir()
  const postgres = await openPostgres()
  try {
    let dataDirs = 0
    const engines: Engine[] = [
      { name: 'SQLite', fresh: async () => ({ BENCH_DATA_DIR: join(dir, `data-${++dataDirs}`) }) },
      {
        name: 'PostgreSQL',
        fresh: async () => ({ BENCH_DATA_DIR: join(dir, `data-${++dataDirs}`), BENCH_DATABASE_URL: await postgres.url() }),
      },
    ]
    console.log(`PostgreSQL: ${postgres.origin}`)
    console.log(
      `load: autocannon, ${CONNECTIONS} connections, ${WARMUP_S} s warm-up then ${DURATION_S} s measured per route; each server in its own process`,
    )
    console.log('app:  buildApp with the admin key, rate limits off, logger off; create first, then list over what create stored\n')

    const rows: { name: string; m: Measurement }[] = []
    const figures = new Map<Engine['name'], { create: Measurement; list: Measurement }>()
    for (const engine of engines) figures.set(engine.name, await throughput(engine))
    for (const route of ['create', 'list'] as const)
      for (const engine of engines) rows.push({ name: `${engine.name} ${route}`, m: figures.get(engine.name)![route] })
    console.log(table(rows))
    const ratio = (route: 'create' | 'list') =>
      figures.get('SQLite')![route].requestsPerSec / figures.get('PostgreSQL')![route].requestsPerSec
    const ratios = `SQLite/PostgreSQL requests/s: create ${ratio('create').toFixed(2)}×, list ${ratio('list').toFixed(2)}×`
    console.log(`\n${ratios}\n`)

    const memoryRows: string[][] = [['', 'RSS empty', `RSS ${SEEDED}`, 'RSS Δ', 'heap empty', `heap ${SEEDED}`, 'heap Δ']]
    let flat = true
    const deltas: string[] = []
    for (const engine of engines) {
      const { empty, seeded } = await memory(engine)
      const rss = seeded.rss - empty.rss
      const heap = seeded.heapUsed - empty.heapUsed
      flat &&= rss < RSS_BUDGET && heap < HEAP_BUDGET
      deltas.push(`${engine.name} heap ${signedMib(heap)}, RSS ${signedMib(rss)}`)
      memoryRows.push([
        engine.name,
        mib(empty.rss),
        mib(seeded.rss),
        signedMib(rss),
        mib(empty.heapUsed),
        mib(seeded.heapUsed),
        signedMib(heap),
      ])
    }
    const widths = memoryRows[0]!.map((_, i) => Math.max(...memoryRows.map((r) => r[i]!.length)))
    console.log(
      memoryRows.map((r) => r.map((cell, i) => (i === 0 ? cell.padEnd(widths[i]!) : cell.padStart(widths[i]!))).join('  ')).join('\n'),
    )
    const memoryLine = `memory with ${SEEDED} sessions vs empty (after GC and ${LIST_CALLS} list requests): ${deltas.join('; ')} (target: heap < ${mib(HEAP_BUDGET)}, RSS < ${mib(RSS_BUDGET)}): ${flat ? 'met' : 'MISSED'}`
    console.log(`\n${memoryLine}`)
    console.log(`whole bench: ${((Date.now() - started) / 1000).toFixed(0)} s`)
    return { summary: `${ratios}; ${memoryLine}`, met: flat }
  } finally {
    await postgres.close()
  }
}

if (process.argv[1] === fileURLToPath(SELF)) {
  const mode = process.argv[2]
  if (mode !== 'throughput' && mode !== 'memory') throw new Error(`usage: store.bench.ts throughput|memory (got ${mode})`)
  await runServer(mode)
}
