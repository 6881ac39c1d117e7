import { randomBytes } from 'node:crypto'
import { copyFileSync, existsSync, statSync } from 'node:fs'
import { join } from 'node:path'
import { isDeepStrictEqual } from 'node:util'
import Sqlite from 'better-sqlite3'
import pg from 'pg'
import t, { type Test } from 'tap'
import { auth, tempDir } from './helpers/build.js'
import { type ServerProcess, startServer } from './helpers/server-process.js'

const KEY = 'durability-key'
const CLIENTS = Number(process.env.XC ?? 8)
const KILL_AFTER_ACKS = 300

/** Heavy enough bodies (about 12 KiB of metadata) keep the server busy while requests are queued. */
const filler = (seed: string) =>
  Object.fromEntries(Array.from({ length: 48 }, (_, i) => [`f${i}`, `${seed}:${i}:`.padEnd(250, 'x')]))

interface Content {
  title: string
  metadata: Record<string, unknown>
}

interface Tracked {
  id: string
  /** What the last 2xx answer said the session holds. */
  acked: Content
  /**
   * The write sent after the last acknowledged one that never got an answer. A client waits for
   * each answer before its next request and only a client's own sessions get its PATCHes, so
   * a session has at most one such write: the one in flight when the server died.
   */
  unanswered?: Content
}

interface Burst {
  sessions: Tracked[]
  acks: number
  /** Creates sent whose answer never came: they may or may not have been stored. */
  unansweredCreates: number
  inFlightAtKill: number
  /** Requests the kill left without an answer. */
  cutOff: number
}

/**
 * CLIENTS sequential clients create sessions and PATCH their own ones until KILL_AFTER_ACKS
 * writes are acknowledged; then the server gets SIGKILL while the other clients wait for answers.
 * A request that fails before the kill fails the test: only the kill may cost answers.
 */
async function burstThenKill(t: Test, server: ServerProcess): Promise<Burst> {
  const burst: Burst = { sessions: [], acks: 0, unansweredCreates: 0, inFlightAtKill: 0, cutOff: 0 }
  let inFlight = 0
  let killed: Promise<number | null> | undefined
  const headers = { ...auth(KEY), 'content-type': 'application/json' }

  const send = async (method: 'POST' | 'PATCH', path: string, body: Content) => {
    inFlight++
    try {
      const res = await fetch(`${server.url}${path}`, {
        method,
        headers,
        body: JSON.stringify(body),
        signal: AbortSignal.timeout(15_000),
      })
      // The handler answers only after the store call returned, so a 2xx status line means the
      // write had committed; reading the body may still fail if the kill cuts the socket.
      const json = res.ok ? ((await res.json().catch(() => undefined)) as { session_id?: string } | undefined) : undefined
      if (!res.ok) t.fail(`${method} ${path} answered ${res.status} ${await res.text()}`)
      return { ok: res.ok, json }
    } catch (err) {
      if (!killed) t.fail(`${method} ${path} failed before the kill: ${(err as Error).message}`)
      burst.cutOff++
      return undefined
    } finally {
      inFlight--
    }
  }

  const acknowledged = () => {
    burst.acks++
    if (burst.acks === KILL_AFTER_ACKS) {
      // Counted before the kill: this client's own request has its answer, the others do not.
      burst.inFlightAtKill = inFlight - 1
      killed = server.stop('SIGKILL')
    }
  }

  const client = async (c: number) => {
    const own: Tracked[] = []
    for (let step = 0; !killed; step++) {
      const padding = filler(`${c}.${step}`)
      const target = step % 3 === 0 || own.length === 0 ? undefined : own[(step * 7) % own.length]!
      if (!target) {
        const content: Content = { title: `c${c} s${own.length} v0`, metadata: { client: c, session: own.length, version: 0, ...padding } }
        const res = await send('POST', '/v1/sessions', content)
        if (res?.json?.session_id) {
          const tracked: Tracked = { id: res.json.session_id, acked: content }
          own.push(tracked)
          burst.sessions.push(tracked)
          acknowledged()
        } else {
          // A 201 whose body the kill cut off names no id to check: as unknown as no answer.
          burst.unansweredCreates++
        }
      } else {
        const version = Number(target.acked.metadata.version) + 1
        const content: Content = {
          title: `c${c} s${target.acked.metadata.session} v${version}`,
          metadata: { ...target.acked.metadata, version, ...padding },
        }
        target.unanswered = content
        const res = await send('PATCH', `/v1/sessions/${target.id}`, content)
        if (res?.ok) {
          target.acked = content
          target.unanswered = undefined
          acknowledged()
        }
      }
    }
  }

  await Promise.all(Array.from({ length: CLIENTS }, (_, c) => client(c)))
  await killed
  return burst
}

/** Every acknowledged write is back after the restart, each session as acknowledged or as its in-flight write left it. */
async function checkRestored(t: Test, server: ServerProcess, burst: Burst) {
  let stale = 0
  let inFlightApplied = 0
  const queue = [...burst.sessions]
  const reader = async () => {
    for (let s = queue.shift(); s; s = queue.shift()) {
      const res = await fetch(`${server.url}/v1/sessions/${s.id}`, { headers: auth(KEY) })
      if (res.status !== 200) {
        t.fail(`acknowledged session ${s.id} answers ${res.status} after the restart`)
        continue
      }
      const got = (await res.json()) as Content
      const stored = { title: got.title, metadata: got.metadata }
      const matches = (c: Content | undefined) => c !== undefined && isDeepStrictEqual(stored, c)
      if (matches(s.acked)) continue
      if (matches(s.unanswered)) {
        inFlightApplied++
        continue
      }
      stale++
      t.fail(`session ${s.id} lost an acknowledged write`, { found: stored, acknowledged: s.acked, inFlight: s.unanswered })
    }
  }
  await Promise.all(Array.from({ length: CLIENTS }, reader))
  t.equal(stale, 0, `all ${burst.sessions.length} acknowledged sessions hold their acknowledged content`)
  t.comment(`${inFlightApplied} session(s) show a write that was in flight at the kill`)

  // Nothing else appeared either: the store holds the acknowledged creates plus at most the unanswered ones.
  let total = 0
  let cursor: string | null = null
  do {
    const page = new URL(`${server.url}/v1/sessions`)
    page.searchParams.set('limit', '100')
    if (cursor) page.searchParams.set('cursor', cursor)
    const res = await fetch(page, { headers: auth(KEY) })
    t.equal(res.status, 200)
    const body = (await res.json()) as { sessions: unknown[]; next_cursor: string | null }
    total += body.sessions.length
    cursor = body.next_cursor
  } while (cursor)
  t.ok(
    total >= burst.sessions.length && total <= burst.sessions.length + burst.unansweredCreates,
    `${total} stored sessions: ${burst.sessions.length} acknowledged, up to ${burst.unansweredCreates} more in flight`,
  )
}

/** A burst killed too early, or with nothing in flight, would pass without proving anything. */
const sanity = (t: Test, burst: Burst) => {
  t.ok(burst.acks >= KILL_AFTER_ACKS, `${burst.acks} writes acknowledged before the server died`)
  t.ok(burst.inFlightAtKill > 0, `${burst.inFlightAtKill} request(s) in flight at the kill`)
  t.comment(`${burst.cutOff} request(s) never answered`)
  t.ok(burst.sessions.length > 0 && burst.sessions.length < burst.acks, 'the burst mixes creates and updates')
}

const baseEnv = { API_KEY: KEY, RATE_LIMIT_PER_MINUTE: '0', SESSION_RATE_LIMIT_PER_MINUTE: '0' }

t.test('SQLite: SIGKILL mid-burst loses no acknowledged write and leaves an intact file', async (t) => {
  const dataDir = tempDir(t, 'oi-durability-')
  const env = { ...baseEnv, DATA_DIR: dataDir }
  const file = join(dataDir, 'oi-server.db')

  const first = await startServer(env)
  t.teardown(() => first.stop('SIGKILL'))
  const burst = await burstThenKill(t, first)
  sanity(t, burst)
  t.equal(first.child.signalCode, 'SIGKILL', 'the server was killed, not shut down')

  // The state exactly as the kill left it (main file plus WAL, no checkpoint): a copy keeps the
  // restart below from recovering the original before it has been checked.
  const crashCopy = tempDir(t, 'oi-durability-copy-')
  for (const suffix of ['', '-wal']) {
    if (existsSync(file + suffix)) copyFileSync(file + suffix, join(crashCopy, `oi-server.db${suffix}`))
  }
  t.comment(`WAL at the kill: ${existsSync(`${file}-wal`) ? statSync(`${file}-wal`).size : 0} bytes`)
  const crashed = new Sqlite(join(crashCopy, 'oi-server.db'))
  t.equal(crashed.pragma('integrity_check', { simple: true }), 'ok', 'integrity_check on the file as the kill left it')
  crashed.close()

  const second = await startServer(env)
  t.teardown(() => second.stop('SIGKILL'))
  await checkRestored(t, second, burst)
  t.equal(await second.stop('SIGTERM'), 0)

  const db = new Sqlite(file, { fileMustExist: true })
  t.teardown(() => db.close())
  t.equal(db.pragma('integrity_check', { simple: true }), 'ok', 'integrity_check after the restart')
})

const adminUrl = process.env.DATABASE_URL

if (!adminUrl) {
  t.skip('PostgreSQL: DATABASE_URL is not set (scripts/pg-test-cluster.sh starts a throw-away server)', () => {})
} else {
  t.test('PostgreSQL: SIGKILL mid-burst loses no acknowledged write', async (t) => {
    // A database of its own, so the session count is this run's alone.
    const name = `oi_durability_${randomBytes(6).toString('hex')}`
    const url = new URL(adminUrl)
    url.pathname = `/${name}`
    const admin = new pg.Client({ connectionString: adminUrl })
    await admin.connect()
    await admin.query(`CREATE DATABASE ${name}`)
    t.teardown(async () => {
      await admin.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`)
      await admin.end()
    })

    const env = { ...baseEnv, DATA_DIR: tempDir(t, 'oi-durability-'), DATABASE_URL: url.href }
    const first = await startServer(env)
    t.teardown(() => first.stop('SIGKILL'))
    t.match(first.stdout(), /storage: +PostgreSQL/)
    const burst = await burstThenKill(t, first)
    sanity(t, burst)
    t.equal(first.child.signalCode, 'SIGKILL', 'the server was killed, not shut down')

    const second = await startServer(env)
    t.teardown(() => second.stop('SIGKILL'))
    await checkRestored(t, second, burst)
    t.equal(await second.stop('SIGTERM'), 0)
  })
}
