import { randomBytes } from 'node:crypto'
import { copyFileSync, existsSync } from 'node:fs'
import { join } from 'node:path'
import { isDeepStrictEqual } from 'node:util'
import Sqlite from 'better-sqlite3'
import t, { type Test } from 'tap'
import { auth, tempDir } from './helpers/build.js'
import { freshDatabase } from './helpers/postgres.js'
import { type ServerProcess, startServer } from './helpers/server-process.js'

const KEY = 'durability-key'
const CLIENTS = 8
const KILL_AFTER_ACKS = 300
/** Where the kill lands is luck; each extra round is another chance to cut a write mid-commit. */
const ROUNDS = 3

interface Content {
  title: string
  metadata: Record<string, unknown>
}

interface Tracked {
  id: string
  /** What the last 2xx answer (or the last restart) said the session holds. */
  acked: Content
  /**
   * The write sent after the last acknowledged one that never got an answer. Each client waits
   * for an answer before its next request and PATCHes only its own sessions, so a session has
   * at most one such write: the one in flight when the server died.
   */
  unanswered?: Content
}

/** What the clients know, carried from round to round over the same store. */
interface Knowledge {
  sessions: Tracked[]
  byClient: Tracked[][]
  /** Creates sent whose answer (or its session id) never came: they may or may not be stored. */
  unansweredCreates: number
}

interface Round {
  acks: number
  inFlightAtKill: number
  /** Requests the kill left without an answer. */
  cutOff: number
}

/** About 12 KiB of metadata: each row spills onto SQLite overflow pages, so every commit writes several pages a kill could tear. */
const filler = (seed: string) => Object.fromEntries(Array.from({ length: 48 }, (_, i) => [`f${i}`, `${seed}:${i}:`.padEnd(250, 'x')]))

/**
 * CLIENTS sequential clients create sessions and PATCH their own ones until KILL_AFTER_ACKS
 * writes are acknowledged; then the server gets SIGKILL while the clients wait for answers.
 * A request that fails before the kill fails the test: only the kill may cost answers.
 */
async function burstThenKill(t: Test, server: ServerProcess, known: Knowledge): Promise<Round> {
  const round: Round = { acks: 0, inFlightAtKill: 0, cutOff: 0 }
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
      if (!res.ok) t.fail(`${method} ${path} answered ${res.status} ${await res.text()}`)
      // The handler answers only after the store call returned, so a 2xx status line means the
      // write had committed, even if the kill then cuts the body short.
      const json = (await res.json().catch(() => undefined)) as { session_id?: string } | undefined
      return { ok: res.ok, json }
    } catch (err) {
      if (!killed) t.fail(`${method} ${path} failed before the kill: ${(err as Error).message}`)
      round.cutOff++
      return undefined
    } finally {
      inFlight--
    }
  }

  const acknowledged = () => {
    if (++round.acks !== KILL_AFTER_ACKS) return
    // Killing from inside this answer's callback would find the server idle (that answer was
    // its last work); a moment later the clients' next requests are on the wire or being handled.
    setTimeout(() => {
      round.inFlightAtKill = inFlight
      killed = server.stop('SIGKILL')
    }, 1)
  }

  const client = async (c: number) => {
    const own = known.byClient[c] ?? []
    known.byClient[c] = own
    for (let step = 0; !killed; step++) {
      const seed = `${c}.${step}.${randomBytes(3).toString('hex')}`
      const target = step % 3 === 0 || own.length === 0 ? undefined : own[(step * 7) % own.length]!
      if (!target) {
        const content: Content = {
          title: `c${c} s${own.length} v0`,
          metadata: { client: c, session: own.length, version: 0, ...filler(seed) },
        }
        const res = await send('POST', '/v1/sessions', content)
        if (res?.json?.session_id) {
          const tracked: Tracked = { id: res.json.session_id, acked: content }
          own.push(tracked)
          known.sessions.push(tracked)
          acknowledged()
        } else {
          // A 201 whose body the kill cut off names no id to check: as unknown as no answer.
          known.unansweredCreates++
        }
      } else {
        const version = Number(target.acked.metadata.version) + 1
        const content: Content = {
          title: `c${c} s${target.acked.metadata.session} v${version}`,
          metadata: { ...target.acked.metadata, version, ...filler(seed) },
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
  t.equal(server.child.signalCode, 'SIGKILL', 'the server was killed, not shut down')
  t.ok(round.acks >= KILL_AFTER_ACKS, `${round.acks} writes acknowledged`)
  // A burst killed with nothing in flight would pass without proving anything.
  t.ok(round.inFlightAtKill > 0, `${round.inFlightAtKill} request(s) in flight at the kill, ${round.cutOff} never answered`)
  return round
}

/**
 * Every acknowledged session is back with its acknowledged content, or with the content of the
 * write that was in flight at the kill (committed, answer lost); then that is what is known.
 */
async function checkRestored(t: Test, server: ServerProcess, known: Knowledge): Promise<number> {
  let lost = 0
  let committedUnanswered = 0
  const queue = [...known.sessions]
  const reader = async () => {
    for (let s = queue.shift(); s; s = queue.shift()) {
      const res = await fetch(`${server.url}/v1/sessions/${s.id}`, { headers: auth(KEY) })
      if (res.status !== 200) {
        lost++
        t.fail(`acknowledged session ${s.id} answers ${res.status} after the restart`)
        continue
      }
      const body = (await res.json()) as Content
      const stored: Content = { title: body.title, metadata: body.metadata }
      if (s.unanswered && isDeepStrictEqual(stored, s.unanswered)) {
        committedUnanswered++
        s.acked = s.unanswered
      } else if (!isDeepStrictEqual(stored, s.acked)) {
        lost++
        t.fail(`session ${s.id} lost an acknowledged write`, {
          found: stored.title,
          acknowledged: s.acked.title,
          inFlight: s.unanswered?.title,
        })
      }
      s.unanswered = undefined
    }
  }
  await Promise.all(Array.from({ length: CLIENTS }, reader))
  t.equal(lost, 0, `all ${known.sessions.length} acknowledged sessions hold their acknowledged content`)

  // Nothing else appeared either: the acknowledged creates plus at most the unanswered ones.
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
  const acked = known.sessions.length
  t.ok(
    total >= acked && total <= acked + known.unansweredCreates,
    `${total} stored sessions: ${acked} acknowledged, at most ${known.unansweredCreates} more were in flight`,
  )
  return committedUnanswered
}

/**
 * ROUNDS times: burst, SIGKILL, restart on the same store, check. `afterKill` inspects the store
 * while no server runs.
 */
async function killAndRestart(
  t: Test,
  env: Record<string, string>,
  storage: RegExp,
  afterKill: (t: Test, round: number) => void = () => {},
) {
  const known: Knowledge = { sessions: [], byClient: [], unansweredCreates: 0 }
  let server = await startServer(env)
  t.teardown(() => server.stop('SIGKILL'))
  t.match(server.stderr(), storage)
  let cutOff = 0
  let committedUnanswered = 0
  for (let round = 1; round <= ROUNDS; round++) {
    cutOff += (await burstThenKill(t, server, known)).cutOff
    afterKill(t, round)
    server = await startServer(env)
    committedUnanswered += await checkRestored(t, server, known)
  }
  t.comment(`${cutOff} request(s) cut off by ${ROUNDS} kills; ${committedUnanswered} of them had committed`)
  t.equal(await server.stop('SIGTERM'), 0, 'the restarted server shuts down cleanly')
}

const baseEnv = { API_KEY: KEY, RATE_LIMIT_PER_MINUTE: '0', SESSION_RATE_LIMIT_PER_MINUTE: '0' }

t.test('SQLite: SIGKILL mid-burst loses no acknowledged write and leaves an intact file', async (t) => {
  const dataDir = tempDir(t, 'oi-durability-')
  const file = join(dataDir, 'oi-server.db')

  await killAndRestart(t, { ...baseEnv, DATA_DIR: dataDir }, /storage: +SQLite/, (t, round) => {
    // The file as the kill left it, WAL not yet replayed: checked on a copy, so that the
    // restart still has the original to recover from.
    const copy = join(tempDir(t, 'oi-durability-copy-'), 'oi-server.db')
    copyFileSync(file, copy)
    if (existsSync(`${file}-wal`)) copyFileSync(`${file}-wal`, `${copy}-wal`)
    const crashed = new Sqlite(copy)
    t.equal(crashed.pragma('integrity_check', { simple: true }), 'ok', `integrity_check after kill ${round}`)
    crashed.close()
  })

  const db = new Sqlite(file, { fileMustExist: true })
  t.teardown(() => db.close())
  t.equal(db.pragma('integrity_check', { simple: true }), 'ok', 'integrity_check after the last restart')
})

const adminUrl = process.env.DATABASE_URL

if (!adminUrl) {
  t.skip('PostgreSQL: DATABASE_URL is not set (scripts/pg-test-cluster.sh starts a throw-away server)', () => {})
} else {
  t.test('PostgreSQL: SIGKILL mid-burst loses no acknowledged write', async (t) => {
    // A database of its own, so the session count is this run's alone.
    const url = await freshDatabase(t, adminUrl, 'oi_durability')
    await killAndRestart(t, { ...baseEnv, DATA_DIR: tempDir(t, 'oi-durability-'), DATABASE_URL: url }, /storage: +PostgreSQL/)
  })
}
