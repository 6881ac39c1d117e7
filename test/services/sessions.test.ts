import { randomUUID } from 'node:crypto'
import { setTimeout as sleep } from 'node:timers/promises'
import t, { type Test } from 'tap'
import { SessionService, type SessionServiceOptions } from '../../services/sessions.js'
import { createSqliteStore } from '../../services/store/index.js'

const HOUR = 3_600_000
const notFound = { statusCode: 404, code: 'session_not_found', message: 'Session not found' }

interface LogEntry {
  level: 'info' | 'error'
  obj: Record<string, unknown>
  msg: string
}

async function setup(t: Test, opts: Partial<SessionServiceOptions> = {}) {
  const store = createSqliteStore(':memory:')
  await store.migrate()
  const logs: LogEntry[] = []
  const service = new SessionService({
    store,
    logger: {
      info: (obj, msg) => logs.push({ level: 'info', obj: obj as Record<string, unknown>, msg }),
      error: (obj, msg) => logs.push({ level: 'error', obj: obj as Record<string, unknown>, msg }),
    },
    defaultModel: 'default-model',
    ttlHours: 0,
    ...opts,
  })
  t.teardown(async () => {
    await service.stop()
    await store.close()
  })
  return { store, service, logs }
}

t.test('create, get, list and update', async (t) => {
  const { service } = await setup(t)
  const session = await service.create('tenant-a', { title: 'Plot', metadata: { k: 'v' } })
  t.match(session, { tenantId: 'tenant-a', title: 'Plot', metadata: { k: 'v' }, model: 'default-model' })
  t.equal((await service.create('tenant-a', { model: 'other' })).model, 'other')
  t.same(await service.get('tenant-a', session.id), session)

  const page = await service.list('tenant-a', { limit: 1 })
  t.equal(page.items.length, 1)
  t.type(page.nextCursor, 'string')

  t.match(await service.update('tenant-a', session.id, { title: 'Renamed' }), { id: session.id, title: 'Renamed' })

  for (const [tenant, id] of [
    ['tenant-b', session.id],
    ['tenant-a', randomUUID()],
    ['tenant-a', 'not-a-uuid'],
    ['tenant-a', '%00'],
  ] as const) {
    await t.rejects(service.get(tenant, id), notFound, `get ${tenant} ${id}`)
    await t.rejects(service.update(tenant, id, { title: 'x' }), notFound, `update ${tenant} ${id}`)
    await t.rejects(service.delete(tenant, id), notFound, `delete ${tenant} ${id}`)
  }
})

t.test('delete runs every cleanup hook in order, even after one fails', async (t) => {
  const { service, logs } = await setup(t)
  const calls: string[] = []
  service.onDelete((id) => {
    calls.push(`first:${id}`)
  })
  service.onDelete(async (id) => {
    calls.push(`failing:${id}`)
    throw new Error('kernel would not stop')
  })
  service.onDelete(async (id) => {
    await sleep(1)
    calls.push(`last:${id}`)
  })

  const session = await service.create('tenant')
  await service.delete('tenant', session.id)
  t.same(calls, [`first:${session.id}`, `failing:${session.id}`, `last:${session.id}`])
  t.match(logs, [
    { level: 'error', msg: 'Session cleanup hook failed', obj: { sessionId: session.id, reason: 'deleted', err: Error } },
  ])
  await t.rejects(service.get('tenant', session.id), notFound)

  calls.length = 0
  await t.rejects(service.delete('tenant', session.id), notFound)
  t.same(calls, [], 'no hooks for a session that was not there')
})

t.test('sweepIdle deletes sessions idle longer than the TTL, in batches', async (t) => {
  let clock = Date.now()
  const { service, logs } = await setup(t, { ttlHours: 1, sweepBatchSize: 2, now: () => clock })
  const cleaned: string[] = []
  service.onDelete((id) => {
    cleaned.push(id)
  })

  const idle = []
  for (let i = 0; i < 5; i++) idle.push(await service.create(`tenant-${i % 2}`))
  await sleep(10)
  const mark = Date.now()
  await sleep(10)
  const active = await service.create('tenant-0')

  t.equal(await service.sweepIdle(), 0, 'nothing is an hour old yet')
  clock = mark + HOUR
  t.equal(await service.sweepIdle(), 5)
  t.same(new Set(cleaned), new Set(idle.map((s) => s.id)), 'hooks ran for every expired session')
  for (const s of idle) await t.rejects(service.get(s.tenantId, s.id), notFound)
  t.ok(await service.get('tenant-0', active.id), 'the recently created session stays')
  t.equal(logs.filter((l) => l.msg === 'Idle session expired').length, 5)
  t.equal(await service.sweepIdle(), 0)
})

t.test('concurrent sweeps share one pass', async (t) => {
  const { service } = await setup(t, { ttlHours: 1, now: () => Date.now() + 2 * HOUR })
  const cleaned: string[] = []
  service.onDelete((id) => {
    cleaned.push(id)
  })
  for (let i = 0; i < 3; i++) await service.create('tenant')
  const [a, b] = await Promise.all([service.sweepIdle(), service.sweepIdle()])
  t.equal(a, 3)
  t.equal(b, 3)
  t.equal(cleaned.length, 3, 'each session cleaned up once')
})

t.test('a TTL of 0 keeps sessions forever', async (t) => {
  const { service } = await setup(t, { ttlHours: 0, sweepIntervalMs: 5, now: () => Date.now() + 1000 * HOUR })
  const session = await service.create('tenant')
  t.equal(await service.sweepIdle(), 0)
  await service.start()
  await sleep(30)
  t.ok(await service.get('tenant', session.id))
})

t.test('start sweeps at once and then on the interval until stopped', async (t) => {
  let clock = Date.now()
  const { service } = await setup(t, { ttlHours: 1, sweepIntervalMs: 10, now: () => clock })
  const early = await service.create('tenant')
  clock += 2 * HOUR
  await service.start()
  await t.rejects(service.get('tenant', early.id), notFound, 'swept by start()')

  const later = await service.create('tenant')
  clock += 2 * HOUR
  await sleep(100)
  await t.rejects(service.get('tenant', later.id), notFound, 'swept by the timer')

  await service.stop()
  const kept = await service.create('tenant')
  clock += 2 * HOUR
  await sleep(50)
  t.ok(await service.get('tenant', kept.id), 'no sweep after stop()')
})

t.test('a failing sweep is logged, not thrown', async (t) => {
  const { store, service, logs } = await setup(t, { ttlHours: 1, sweepIntervalMs: 60_000 })
  await store.close()
  await service.start()
  await service.stop()
  t.match(logs, [{ level: 'error', msg: 'Idle session sweep failed', obj: { err: Error } }])
  await t.rejects(service.sweepIdle(), Error, 'a direct call still reports the failure')
})
