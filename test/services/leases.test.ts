import { randomUUID } from 'node:crypto'
import { createServer } from 'node:net'
import { setTimeout as sleep } from 'node:timers/promises'
import type { Redis as RedisClient } from 'ioredis'
import t from 'tap'
import { LeaseTable, type LeaseTableOptions } from '../../services/cluster/leases.js'

const url = process.env.REDIS_URL
const quiet = { info() {}, warn() {} }

async function client(t: Tap): Promise<RedisClient> {
  const { Redis } = await import('ioredis')
  // a database of its own: other tests flush database 0
  const target = new URL(url!)
  target.pathname = '/8'
  const redis = new Redis(target.href, { enableOfflineQueue: false, lazyConnect: true })
  await redis.connect()
  t.teardown(() => redis.quit())
  return redis
}
type Tap = { teardown(fn: () => unknown): void }

/** A table with recorders for its callbacks and a count of its Redis calls. */
function table(t: Tap, redis: RedisClient, name: string, opts: Partial<LeaseTableOptions> = {}) {
  const lost: string[] = []
  const stateLost: string[] = []
  const fenced: [string, number][] = []
  let calls = 0
  const counted = new Proxy(redis, {
    get(target, key, receiver) {
      const value = Reflect.get(target, key, receiver)
      if (key === 'eval') return (...args: unknown[]) => (calls++, (value as (...a: unknown[]) => unknown).apply(target, args))
      return typeof value === 'function' ? value.bind(target) : value
    },
  })
  const leases = new LeaseTable({
    redis: counted,
    replicaId: `${name}-${randomUUID()}`,
    url: `http://${name}.test:5001`,
    ttlMs: 1000,
    idleMs: 60_000,
    busy: () => false,
    onAcquired: async (id, generation) => void fenced.push([id, generation]),
    onLost: (id) => void lost.push(id),
    onStateLost: (id) => void stateLost.push(id),
    logger: quiet,
    prefix: `oi-test-${randomUUID()}:`,
    ...opts,
  })
  t.teardown(() => leases.stop())
  return { leases, lost, stateLost, fenced, calls: () => calls }
}

/** Polls until `check` holds; bounded generously from the 1 s lease, never asserted on. */
async function until(check: () => Promise<boolean> | boolean): Promise<void> {
  for (let i = 0; i < 200; i++) {
    if (await check()) return
    await sleep(50)
  }
  throw new Error('condition never held')
}

t.test('owner leases with fencing', { skip: url ? false : 'REDIS_URL not set (CI sets it)' }, async (t) => {
  const redis = await client(t)
  const prefix = `oi-test-${randomUUID()}:`

  await t.test('the first replica takes the lease; the others learn the owner once and then ask no more', async (t) => {
    const a = table(t, redis, 'a', { prefix })
    const b = table(t, redis, 'b', { prefix })
    const id = randomUUID()
    const placed = await a.leases.place(id)
    t.match(placed, { kind: 'local', generation: Number })
    t.same(a.fenced, [[id, (placed as { generation: number }).generation]], 'the store is fenced when a lease is taken')
    const before = a.calls()
    for (let i = 0; i < 100; i++) t.equal((await a.leases.place(id)).kind, 'local')
    t.equal(a.calls(), before, 'a held lease costs no round trip')
    t.match(await b.leases.place(id), { kind: 'remote', url: 'http://a.test:5001', down: false })
    const asked = b.calls()
    for (let i = 0; i < 100; i++) await b.leases.place(id)
    t.equal(b.calls(), asked, "another replica's lease is cached until its expiry")
    t.equal(a.leases.generation(id), (placed as { generation: number }).generation)
    t.equal(b.leases.generation(id), undefined)
  })

  await t.test('an owner that stops renewing loses the session to the next replica, with a larger generation and state_lost', async (t) => {
    const a = table(t, redis, 'a', { prefix })
    const b = table(t, redis, 'b', { prefix })
    const id = randomUUID()
    const first = await a.leases.place(id)
    await a.leases.markKernels(id)
    // a does not renew (its timer never started): the lease expires in Redis
    await until(async () => (await b.leases.place(id)).kind === 'local' || (b.leases.invalidate(id), false))
    const second = await b.leases.place(id)
    t.ok((second as { generation: number }).generation > (first as { generation: number }).generation, 'the fencing generation grows')
    t.same(b.stateLost, [id], 'the previous owner had kernels: their state is reported lost')
    t.equal(a.leases.generation(id), undefined, 'a counts its lease expired at its local expiry')
    await a.leases.tick()
    t.same(a.lost, [id], 'a stops what it ran for the session')
    t.match(await a.leases.place(id), { kind: 'remote', url: 'http://b.test:5001' })
  })

  await t.test('renewals keep a lease past its lifetime; a released lease is taken at once, without state_lost when no kernels ran', async (t) => {
    const a = table(t, redis, 'a', { prefix })
    const b = table(t, redis, 'b', { prefix })
    const id = randomUUID()
    await a.leases.place(id)
    const expiry = Date.now() + 1000
    while (Date.now() < expiry + 500) {
      await a.leases.tick()
      await sleep(100)
    }
    b.leases.invalidate(id)
    t.match(await b.leases.place(id), { kind: 'remote' }, 'still owned after 1.5 lifetimes')
    t.same(a.lost, [])
    await a.leases.release(id, false)
    b.leases.invalidate(id)
    t.match(await b.leases.place(id), { kind: 'local' })
    t.same(b.stateLost, [])
  })

  await t.test('a draining replica takes no free session: it names a live peer, and hands its own over', async (t) => {
    const a = table(t, redis, 'a', { prefix })
    const b = table(t, redis, 'b', { prefix })
    await b.leases.start()
    await a.leases.start()
    const held = randomUUID()
    await a.leases.place(held)
    await a.leases.markKernels(held)
    let busy = true
    const released: string[] = []
    const draining = a.leases.drain(Number.POSITIVE_INFINITY, () => busy, async (id) => {
      released.push(id)
      return true
    })
    await until(() => a.leases.draining)
    t.match(await a.leases.place(randomUUID()), { kind: 'remote', url: 'http://b.test:5001' }, 'a free session goes to a live peer')
    t.match(await a.leases.place(held), { kind: 'local' }, 'a busy session stays until its run ends')
    busy = false
    await draining
    t.same(released, [held])
    b.leases.invalidate(held)
    t.match(await b.leases.place(held), { kind: 'local' })
    t.same(b.stateLost, [held], 'its kernels stopped with the hand-over: the next owner says so')
  })
})

t.test('Redis unreachable: placing a session is 503 cluster_unavailable at once', async (t) => {
  const port = await new Promise<number>((resolve) => {
    const server = createServer().listen(0, '127.0.0.1', () => {
      const { port } = server.address() as { port: number }
      server.close(() => resolve(port))
    })
  })
  const { Redis } = await import('ioredis')
  const redis = new Redis({ port, host: '127.0.0.1', lazyConnect: true, enableOfflineQueue: false, maxRetriesPerRequest: 0, retryStrategy: () => null })
  redis.on('error', () => {})
  t.teardown(() => redis.disconnect())
  const { leases } = table(t, redis, 'a')
  await t.rejects(leases.place(randomUUID()), { statusCode: 503, code: 'cluster_unavailable' })
})
