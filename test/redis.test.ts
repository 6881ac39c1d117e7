import { type AddressInfo, createServer } from 'node:net'
import t from 'tap'
import { auth, build, tempDir } from './helpers/build.js'

const url = process.env.REDIS_URL

t.test('two app instances sharing one Redis share one per-IP counter', { skip: url ? false : 'REDIS_URL not set (CI sets it)' }, async (t) => {
  const { Redis } = await import('ioredis')
  const redis = new Redis(url!)
  await redis.flushdb()
  await redis.quit()
  const a = await build(t, { REDIS_URL: url!, RATE_LIMIT_PER_MINUTE: '5' })
  const b = await build(t, { REDIS_URL: url!, RATE_LIMIT_PER_MINUTE: '5' })
  const statuses: number[] = []
  for (const app of [a, b, a, b, a]) statuses.push((await app.inject({ url: '/metrics', headers: auth() })).statusCode)
  t.same(statuses, [200, 200, 200, 200, 200])
  const sixth = await b.inject({ url: '/metrics', headers: auth() })
  t.equal(sixth.statusCode, 429, 'the sixth request, on the other instance, is limited')
  t.equal(sixth.headers['x-ratelimit-remaining'], '0')
  t.ok(Number(sixth.headers['retry-after']) > 0)
  const ready = await a.inject({ url: '/v1/health/ready' })
  t.match(ready.json(), { checks: { redis: { ok: true } } })
})

t.test('Redis unreachable: requests keep being answered, readiness says why', async (t) => {
  const port = await new Promise<number>((resolve) => {
    const srv = createServer()
    srv.listen(0, '127.0.0.1', () => {
      const p = (srv.address() as { port: number }).port
      srv.close(() => resolve(p))
    })
  })
  const app = await build(t, { REDIS_URL: `redis://127.0.0.1:${port}`, RATE_LIMIT_PER_MINUTE: '5' })
  const res = await app.inject({ url: '/metrics', headers: auth() })
  t.equal(res.statusCode, 200)
  const ready = await app.inject({ url: '/v1/health/ready' })
  t.equal(ready.statusCode, 503)
  t.match(ready.json(), { status: 'not_ready', checks: { redis: { ok: false, error: String } } })
})

t.test('a key revoked on one instance closes its socket on another at once (pub/sub)', { skip: url ? false : 'REDIS_URL not set (CI sets it)' }, async (t) => {
  const { default: WebSocket } = await import('ws')
  const shared = tempDir(t)
  const { Redis } = await import('ioredis')
  const redis = new Redis(url!)
  t.teardown(() => redis.quit())
  const subscribers = async () => Number(((await redis.pubsub('NUMSUB', 'oi-server:keys:revoked')) as [string, number])[1])
  const before = await subscribers()
  const a = await build(t, { REDIS_URL: url!, DATA_DIR: shared })
  const b = await build(t, { REDIS_URL: url!, DATA_DIR: shared })
  // both instances subscribe in the background; a revocation published earlier would be missed
  while ((await subscribers()) < before + 2) await new Promise((r) => setTimeout(r, 20))
  const { key, id } = (await a.inject({ method: 'POST', url: '/v1/keys', headers: auth(), payload: { name: 'replicated' } })).json()
  const session = (await a.inject({ method: 'POST', url: '/v1/sessions', headers: auth(key) })).json().session_id
  await b.listen({ port: 0, host: '127.0.0.1' })
  const { port } = b.server.address() as AddressInfo
  const ws = new WebSocket(`ws://127.0.0.1:${port}/v1/sessions/${session}/events/ws`, { headers: auth(key) })
  t.teardown(() => ws.terminate())
  const closed = new Promise<{ code: number; reason: string }>((resolve) => ws.on('close', (code, reason) => resolve({ code, reason: String(reason) })))
  await new Promise<void>((resolve) => ws.on('message', (data) => JSON.parse(String(data)).type === 'ready' && resolve()))

  t.equal((await a.inject({ method: 'DELETE', url: `/v1/keys/${id}`, headers: auth() })).statusCode, 204)
  t.same(await closed, { code: 4001, reason: 'API key revoked or expired' })
})
