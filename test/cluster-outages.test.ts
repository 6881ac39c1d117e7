import { type ChildProcess, spawn, spawnSync } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { once } from 'node:events'
import { createServer } from 'node:net'
import { setTimeout as sleep } from 'node:timers/promises'
import pg from 'pg'
import t from 'tap'
import { toApiError } from '../plugins/errors.js'
import { auth, build, tempDir } from './helpers/build.js'
import { freshDatabase } from './helpers/postgres.js'

/**
 * A replica whose Redis goes away answers 503 cluster_unavailable, enveloped and at once, for
 * what needs a session's placement, and works again when Redis is back. Its own Redis server, so
 * stopping it disturbs no other test.
 */
const hasRedis = spawnSync('redis-server', ['--version']).status === 0
const missing = [!process.env.DATABASE_URL && 'DATABASE_URL (PostgreSQL)', !hasRedis && 'redis-server'].filter(Boolean)

async function freePort(): Promise<number> {
  const server = createServer().listen(0, '127.0.0.1')
  await once(server, 'listening')
  const { port } = server.address() as { port: number }
  server.close()
  await once(server, 'close')
  return port
}

t.test('Redis down: 503 cluster_unavailable at once; Redis back: served again', { skip: missing.length ? `needs ${missing.join(', ')}; CI provides them` : false }, async (t) => {
  const port = await freePort()
  const dir = tempDir(t, 'oi-redis-')
  let redis: ChildProcess | undefined
  const startRedis = async () => {
    redis = spawn('redis-server', ['--bind', '127.0.0.1', '--port', String(port), '--save', '', '--appendonly', 'no', '--dir', dir], { stdio: 'ignore' })
    for (;;) {
      const up = await new Promise<boolean>((resolve) => {
        const socket = createServer().listen(port, '127.0.0.1')
        socket.once('error', () => resolve(true))
        socket.once('listening', () => socket.close(() => resolve(false)))
      })
      if (up) return
      await sleep(20)
    }
  }
  const stopRedis = async () => {
    if (!redis || redis.exitCode !== null || redis.signalCode !== null) return
    const exited = once(redis, 'exit')
    redis.kill('SIGKILL')
    await exited
  }
  t.teardown(stopRedis)
  await startRedis()

  const app = await build(t, {
    DATABASE_URL: await freshDatabase(t, process.env.DATABASE_URL!, 'oi_outage'),
    REDIS_URL: `redis://127.0.0.1:${port}`,
    REPLICA_URL: 'http://127.0.0.1:9',
    REPLICA_SECRET: randomBytes(32).toString('hex'),
    SECRETS_KEY: randomBytes(32).toString('hex'),
    SANDBOX: 'none',
    LEASE_TTL_MS: '2000',
  })
  await app.ready()
  const session = async () => (await app.inject({ method: 'POST', url: '/v1/sessions', headers: auth(), payload: {} })).json().session_id as string
  const execute = (id: string) => app.inject({ method: 'POST', url: `/v1/sessions/${id}/execute`, headers: auth(), payload: { language: 'python', code: 'print(6 * 7)' } })

  const before = await session()
  t.equal((await execute(before)).statusCode, 200, 'served while Redis is up')

  await stopRedis()
  const id = await session()
  t.ok(id, 'what needs only PostgreSQL still works')
  const refused = await execute(id)
  t.equal(refused.statusCode, 503)
  t.match(refused.json(), { error: { type: 'unavailable_error', code: 'cluster_unavailable', message: String } })
  const ready = await app.inject({ url: '/v1/health/ready' })
  t.equal(ready.statusCode, 503, 'readiness says so')

  await startRedis()
  // the client reconnects on its own (its retry strategy); bounded by attempts, not by time
  let answer = await execute(id)
  for (let i = 0; answer.statusCode !== 200 && i < 400; i++) {
    t.equal(answer.statusCode, 503, 'never anything but 503 meanwhile')
    await sleep(50)
    answer = await execute(id)
  }
  t.equal(answer.statusCode, 200, 'served again once Redis is back')
  t.match(answer.json().outputs[0], { content: '42\n' })
})

t.test('a database that cannot be reached is 503 store_unavailable, not 500', async (t) => {
  const port = await freePort()
  const client = new pg.Client({ host: '127.0.0.1', port, connectionTimeoutMillis: 2000 })
  const err = await client.connect().then(
    () => undefined,
    (e: Error) => e,
  )
  t.ok(err, 'nothing listens there')
  t.match(toApiError(err!), { statusCode: 503, type: 'unavailable_error', code: 'store_unavailable' })
  const shutdown = Object.assign(new Error('terminating connection due to administrator command'), { code: '57P01' })
  t.match(toApiError(shutdown), { statusCode: 503, code: 'store_unavailable' })
  t.match(toApiError(new Error('Connection terminated unexpectedly')), { statusCode: 503, code: 'store_unavailable' })
  t.match(toApiError(new Error('something else')), { statusCode: 500, code: 'internal_error' })
})
