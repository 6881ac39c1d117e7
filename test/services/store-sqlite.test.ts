import { randomUUID } from 'node:crypto'
import { existsSync, mkdtempSync, rmSync, statSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import { fileURLToPath } from 'node:url'
import Sqlite from 'better-sqlite3'
import t from 'tap'
import { createSqliteStore, createStore } from '../../services/store/index.js'
import { spawnNode } from '../helpers/server-process.js'
import { storeContract } from './store-contract.js'

const dir = mkdtempSync(join(tmpdir(), 'oi-store-'))
t.teardown(() => rmSync(dir, { recursive: true, force: true }))
const file = join(dir, 'contract.db')

storeContract(t, async () => createSqliteStore(file))

t.test('the file is in WAL mode and survives a reopen', async (t) => {
  const path = join(dir, 'reopen.db')
  const first = createSqliteStore(path)
  await first.migrate()
  const session = await first.createSession({ tenantId: 'tenant', title: 'kept', model: 'm' })
  await first.appendMessage(session.id, {
    id: randomUUID(),
    role: 'user',
    type: 'message',
    content: 'still here',
    created_at: new Date().toISOString(),
  })
  await first.close()

  const raw = new Sqlite(path, { readonly: true })
  t.equal(raw.pragma('journal_mode', { simple: true }), 'wal')
  raw.close()

  const second = createSqliteStore(path)
  t.teardown(() => second.close())
  await second.migrate()
  t.match(await second.getSession('tenant', session.id), { title: 'kept', messageCount: 1 })
  t.match(await second.allMessages(session.id), [{ content: 'still here' }])
})

t.test('an acknowledged write survives SIGKILL', async (t) => {
  const path = join(dir, 'killed.db')
  const storeModule = fileURLToPath(new URL('../../services/store/index.ts', import.meta.url))
  const writer = `
    const { createSqliteStore } = await import(${JSON.stringify(storeModule)})
    const store = createSqliteStore(${JSON.stringify(path)})
    await store.migrate()
    const session = await store.createSession({ tenantId: 'tenant', model: 'm' })
    console.log(session.id)
    for (;;) {
      const event = await store.appendEvent(session.id, 'tick', null)
      console.log(event.id)
    }
  `
  const child = spawnNode(['--import', 'tsx', '--input-type=module', '-e', writer], { stdio: ['ignore', 'pipe', 'inherit'] })
  // also when an assertion below throws: a writer left running grows its file forever
  t.teardown(() => {
    child.kill('SIGKILL')
  })
  const lines = createInterface({ input: child.stdout! })
  let sessionId = ''
  let acknowledged = 0
  for await (const line of lines) {
    if (!sessionId) sessionId = line
    else acknowledged = Number(line)
    if (acknowledged >= 200) break
  }
  child.kill('SIGKILL')
  await new Promise((resolve) => child.once('exit', resolve))

  const store = createSqliteStore(path)
  t.teardown(() => store.close())
  const { events } = await store.listEvents(sessionId, { reverse: true, limit: 1 })
  t.ok((events[0]?.id ?? 0) >= acknowledged, `event ${acknowledged} was acknowledged and is on disk`)
})

t.test('createStore picks the engine from DATABASE_URL', async (t) => {
  const dataDir = join(dir, 'nested', 'data')
  const store = createStore({ dataDir })
  t.teardown(() => store.close())
  t.equal(store.engine, 'sqlite')
  t.ok(existsSync(join(dataDir, 'oi-server.db')))
  t.equal(statSync(dataDir).mode & 0o777, 0o700, 'the data directory is private')
  const fallback = createStore({ databaseUrl: '', dataDir })
  t.equal(fallback.engine, 'sqlite', 'an empty URL means SQLite')
  await fallback.close()

  t.throws(() => createStore({ databaseUrl: 'mysql://localhost/db', dataDir }), /postgres:\/\//)
  const postgres = createStore({ databaseUrl: 'postgresql://user@127.0.0.1:1/none', dataDir })
  t.equal(postgres.engine, 'postgres', 'the pool connects lazily')
  await postgres.close()
})
