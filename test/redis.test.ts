import { createServer } from 'node:net'
import t from 'tap'
import { auth, build } from './helpers/build.js'

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
