import pg from 'pg'
import t from 'tap'
import { createPostgresStore } from '../../services/store/index.js'
import { freshDatabase } from '../helpers/postgres.js'
import { storeContract } from './store-contract.js'

const adminUrl = process.env.DATABASE_URL

if (!adminUrl) {
  t.skip(
    'PostgreSQL store contract: DATABASE_URL is not set (scripts/pg-test-cluster.sh starts a throw-away server)',
    () => {},
  )
} else {
  // A database of its own: the contract never meets rows from other runs or other test files.
  const url = new URL(await freshDatabase(t, adminUrl, 'oi_test'))

  t.test('replicas starting together migrate once', async (t) => {
    const replicas = [createPostgresStore(url.href), createPostgresStore(url.href), createPostgresStore(url.href)]
    t.teardown(() => Promise.all(replicas.map((store) => store.close())))
    await Promise.all(replicas.map((store) => store.migrate()))
    for (const store of replicas) await store.ping()
  })

  storeContract(t, async () => createPostgresStore(url.href))

  t.test('sort keys use byte order whatever the database locale', async (t) => {
    const client = new pg.Client({ connectionString: url.href })
    await client.connect()
    t.teardown(() => client.end())
    const { rows } = await client.query<{ column_name: string; collation_name: string | null }>(
      `SELECT column_name, collation_name FROM information_schema.columns
       WHERE table_name = 'sessions' AND column_name IN ('id', 'created_at', 'updated_at') ORDER BY column_name`,
    )
    t.same(
      rows.map((row) => [row.column_name, row.collation_name]),
      [
        ['created_at', 'C'],
        ['id', 'C'],
        ['updated_at', 'C'],
      ],
    )
  })

  t.test('a store whose server is unreachable fails ping', async (t) => {
    const unreachable = new URL(url.href)
    unreachable.port = '1'
    const store = createPostgresStore(unreachable.href)
    t.teardown(() => store.close())
    await t.rejects(store.ping())
  })
}
