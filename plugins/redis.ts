import type { FastifyInstance } from 'fastify'
import fp from 'fastify-plugin'
import { Redis } from 'ioredis'

declare module 'fastify' {
  interface FastifyInstance {
    /** Shared Redis client when REDIS_URL is set. */
    redis: Redis | null
  }
}

/**
 * Redis is optional. Commands fail fast while it is unreachable (no offline queue) so callers
 * such as the rate limiter can fall back instead of hanging requests.
 */
export default fp(
  async function redis(app: FastifyInstance, opts: { url?: string }) {
    if (!opts.url) {
      app.decorate('redis', null)
      return
    }
    const client = new Redis(opts.url, {
      lazyConnect: true,
      enableOfflineQueue: false,
      maxRetriesPerRequest: 1,
      connectTimeout: 2000,
      retryStrategy: (attempt) => Math.min(attempt * 200, 5000),
    })
    let warned = false
    client.on('error', (err) => {
      if (!warned) app.log.warn({ err: err.message }, 'redis unreachable: rate limits fall back to allowing requests')
      warned = true
    })
    client.on('ready', () => {
      if (warned) app.log.info('redis reachable again')
      warned = false
    })
    await client.connect().catch((err) => app.log.warn({ err: err.message }, 'redis not reachable at start'))
    app.decorate('redis', client)
    app.addHook('onClose', async () => {
      client.disconnect()
    })
  },
  { name: 'redis' },
)
