import type { FastifyInstance } from 'fastify'
import fp from 'fastify-plugin'
import { createStore } from '../services/store/index.js'
import type { Store } from '../services/store/types.js'

declare module 'fastify' {
  interface FastifyInstance {
    store: Store
  }
}

/** Opens the store (SQLite by default, PostgreSQL with DATABASE_URL), migrates it, closes it on shutdown. */
export default fp(
  async function store(app: FastifyInstance, opts: { databaseUrl?: string; dataDir: string; store?: Store }) {
    const store = opts.store ?? createStore({ databaseUrl: opts.databaseUrl, dataDir: opts.dataDir })
    await store.migrate()
    app.decorate('store', store)
    app.addHook('onClose', async () => store.close())
    app.readiness.set('store', () => store.ping())
  },
  { name: 'store', dependencies: ['readiness'] },
)
