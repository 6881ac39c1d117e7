import t from 'tap'
import { IdempotencyKeys, RedisIdempotencyKeys } from '../../services/idempotency.js'

const response = (text: string) => ({ status: 200, headers: { 'content-type': 'text/plain' }, body: Buffer.from(text) })

t.test('run once, replay after, 409 while running, 422 for another request, forgotten after the TTL', async (t) => {
  let now = 0
  const keys = new IdempotencyKeys({ ttlMs: 1_000, now: () => now })
  const first = keys.begin('tenant', 'k', 'body-a')
  t.equal(first.kind, 'run')
  t.throws(() => keys.begin('tenant', 'k', 'body-a'), { statusCode: 409, code: 'idempotency_in_progress' })
  t.throws(() => keys.begin('tenant', 'k', 'body-b'), { statusCode: 422, code: 'idempotency_key_reused', retryable: false })
  if (first.kind === 'run') first.finish(response('answer'))
  t.match(keys.begin('tenant', 'k', 'body-a'), { kind: 'replay', response: { status: 200 } })
  t.equal(keys.begin('other-tenant', 'k', 'body-b').kind, 'run', 'keys are per tenant')
  now = 1_000
  t.equal(keys.begin('tenant', 'k', 'body-b').kind, 'run', 'after the TTL the key is free')
})

t.test('an abandoned claim frees the key; the oldest keys go past maxKeys', async (t) => {
  const keys = new IdempotencyKeys({ maxKeys: 2 })
  const claim = keys.begin('t', 'a', 'x')
  if (claim.kind === 'run') claim.abandon()
  t.equal(keys.begin('t', 'a', 'x').kind, 'run', 'a failure without side effects can be retried')
  for (const key of ['b', 'c']) {
    const c = keys.begin('t', key, 'x')
    if (c.kind === 'run') c.finish(response(key))
  }
  t.equal(keys.begin('t', 'a', 'y').kind, 'run', 'the oldest key was forgotten')
  t.equal(keys.begin('t', 'c', 'x').kind, 'replay')
})

t.test('in Redis, shared by replicas: a retry that reaches another replica is recognised', { skip: process.env.REDIS_URL ? false : 'REDIS_URL not set (CI sets it)' }, async (t) => {
  const { Redis } = await import('ioredis')
  const target = new URL(process.env.REDIS_URL!)
  target.pathname = '/8'
  const redis = new Redis(target.href)
  t.teardown(() => redis.quit())
  const prefix = `oi-test-idempotency-${Math.random().toString(36).slice(2)}:`
  const a = new RedisIdempotencyKeys(redis, { prefix })
  const b = new RedisIdempotencyKeys(redis, { prefix })
  const first = await a.begin('tenant', 'k', 'body-a')
  t.equal(first.kind, 'run')
  await t.rejects(b.begin('tenant', 'k', 'body-a'), { statusCode: 409, code: 'idempotency_in_progress' })
  await t.rejects(b.begin('tenant', 'k', 'body-b'), { statusCode: 422, code: 'idempotency_key_reused', retryable: false })
  const body = Buffer.from([0, 1, 2, 255, 0x7b])
  if (first.kind === 'run') first.finish({ status: 200, headers: { 'content-type': 'application/octet-stream', 'x-session-id': 's' }, body })
  let replay = await b.begin('tenant', 'k', 'body-a')
  // the finish is written in the background: wait for it to land
  while (replay.kind !== 'replay') replay = await b.begin('tenant', 'k', 'body-a').catch(() => replay)
  t.match(replay, { kind: 'replay', response: { status: 200, headers: { 'x-session-id': 's' } } })
  t.ok(replay.kind === 'replay' && replay.response.body.equals(body), 'the bytes as they went out')
  t.equal((await b.begin('other-tenant', 'k', 'body-b')).kind, 'run', 'keys are per tenant')

  const abandoned = await a.begin('tenant', 'k2', 'x')
  if (abandoned.kind === 'run') abandoned.abandon()
  let again = await b.begin('tenant', 'k2', 'x').catch(() => undefined)
  while (again?.kind !== 'run') again = await b.begin('tenant', 'k2', 'x').catch(() => undefined)
  t.equal(again.kind, 'run', 'an abandoned claim frees the key everywhere')
})

t.test('in Redis, Redis unreachable: 503 cluster_unavailable, never an unguarded run', async (t) => {
  const { Redis } = await import('ioredis')
  const redis = new Redis({ host: '127.0.0.1', port: 1, lazyConnect: true, enableOfflineQueue: false, maxRetriesPerRequest: 0, retryStrategy: () => null })
  redis.on('error', () => {})
  t.teardown(() => redis.disconnect())
  await t.rejects(new RedisIdempotencyKeys(redis).begin('tenant', 'k', 'x'), { statusCode: 503, code: 'cluster_unavailable' })
})

t.test('claim: a first attempt always runs, and its retries then find it', async (t) => {
  const keys = new IdempotencyKeys()
  const first = keys.claim('tenant', 'fp', 'fp')
  first.finish({ status: 200, headers: {}, body: Buffer.from('one') })
  t.match(keys.begin('tenant', 'fp', 'fp'), { kind: 'replay', response: { body: Buffer.from('one') } }, 'a retry replays')
  const again = keys.claim('tenant', 'fp', 'fp')
  t.equal(again.kind, 'run', 'the same request as a new first attempt runs again')
  t.throws(() => keys.begin('tenant', 'fp', 'fp'), { statusCode: 409, code: 'idempotency_in_progress' }, 'its retry waits for it')
  first.finish({ status: 200, headers: {}, body: Buffer.from('stale') })
  again.finish({ status: 200, headers: {}, body: Buffer.from('two') })
  t.match(keys.begin('tenant', 'fp', 'fp'), { kind: 'replay', response: { body: Buffer.from('two') } }, 'the replaced attempt cannot overwrite the new one')
})
