import type { FastifyInstance } from 'fastify'
import fp from 'fastify-plugin'
import { SessionService } from '../services/sessions.js'

declare module 'fastify' {
  interface FastifyInstance {
    sessions: SessionService
  }
}

/** The session service over the store; its idle sweeper runs while the app is up. */
export default fp(
  async function sessions(app: FastifyInstance, opts: { defaultModel: string; ttlHours: number }) {
    const service = new SessionService({
      store: app.store,
      logger: app.log,
      defaultModel: opts.defaultModel,
      ttlHours: opts.ttlHours,
    })
    app.decorate('sessions', service)
    app.addHook('onReady', async () => service.start())
    app.addHook('preClose', async () => service.stop())
  },
  { name: 'sessions', dependencies: ['store'] },
)
