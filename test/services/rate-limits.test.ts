import t from 'tap'
import { MemoryRateStore, RedisRateStore, type RateStore } from '../../services/rate-limits.js'

/** A store and a clock the test moves by hand. */
function memory() {
  let now = 1_000_000
  const store = new MemoryRateStore({ now: () => now, maxKeys: 3 })
  return { store, advance: (ms: number) => (now += ms) }
}

t.test('a limit is a rate: a burst of `limit`, then one request every window/limit', async (t) => {
  const { store, advance } = memory()
  const taken = []
  for (let i = 0; i < 3; i++) taken.push(await store.take('k', 3, 60_000))
  t.same(
    taken.map((d) => [d.allowed, d.remaining]),
    [
      [true, 2],
      [true, 1],
      [true, 0],
    ],
  )
  const refused = await store.take('k', 3, 60_000)
  t.same(refused, { allowed: false, remaining: 0, resetMs: 60_000, retryMs: 20_000 }, 'the wait is window/limit, not the rest of a window')
  advance(19_999)
  t.equal((await store.take('k', 3, 60_000)).allowed, false, 'one millisecond early is still too early')
  advance(1)
  t.match(await store.take('k', 3, 60_000), { allowed: true, remaining: 0 })
  t.equal((await store.take('k', 3, 60_000)).retryMs, 20_000)
  advance(60_000)
  t.match(await store.take('k', 3, 60_000), { allowed: true, remaining: 2 }, 'a full window later the whole burst is back')
})

t.test('with 60 a minute a refused client waits about a second', async (t) => {
  const { store } = memory()
  for (let i = 0; i < 60; i++) t.equal((await store.take('k', 60, 60_000)).allowed, true)
  const refused = await store.take('k', 60, 60_000)
  t.equal(refused.allowed, false)
  t.ok(refused.retryMs > 0 && refused.retryMs <= 1_000, `retry in ${refused.retryMs} ms`)
})

t.test('keys are independent, and full buckets are forgotten past maxKeys', async (t) => {
  const { store, advance } = memory()
  t.equal((await store.take('a', 1, 60_000)).allowed, true)
  t.equal((await store.take('a', 1, 60_000)).allowed, false)
  t.equal((await store.take('b', 1, 60_000)).allowed, true, 'another key has its own bucket')
  advance(60_000)
  for (const key of ['c', 'd', 'e']) await store.take(key, 1, 60_000)
  t.equal((await store.take('c', 1, 60_000)).allowed, false, 'a busy bucket survives pruning')
})

const url = process.env.REDIS_URL
t.test('Redis: the same rate, shared by every store on one Redis', { skip: url ? false : 'REDIS_URL not set (CI sets it)' }, async (t) => {
  const { Redis } = await import('ioredis')
  const redis = new Redis(url!)
  t.teardown(() => redis.quit())
  const prefix = `test:gcra:${process.pid}:${Date.now()}:`
  const a: RateStore = new RedisRateStore(redis, prefix)
  const b: RateStore = new RedisRateStore(redis, prefix)
  const taken = [await a.take('k', 3, 60_000), await b.take('k', 3, 60_000), await a.take('k', 3, 60_000)]
  t.same(taken.map((d) => [d.allowed, d.remaining]), [[true, 2], [true, 1], [true, 0]])
  const refused = await b.take('k', 3, 60_000)
  t.equal(refused.allowed, false)
  t.ok(refused.retryMs > 19_000 && refused.retryMs <= 20_000, `retry in ${refused.retryMs} ms, about window/limit`)
  t.equal((await a.take('other', 3, 60_000)).allowed, true)
  const ttl = await redis.pttl(`${prefix}k`)
  t.ok(ttl > 0 && ttl <= 60_000, 'the key expires once its bucket would be full')
})
