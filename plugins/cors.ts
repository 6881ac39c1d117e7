import cors from '@fastify/cors'
import type { FastifyInstance } from 'fastify'
import fp from 'fastify-plugin'

const LOCAL_ORIGIN = /^https?:\/\/(localhost|127\.0\.0\.1|\[::1\])(:\d+)?$/

/**
 * CORS_ORIGINS unset allows any localhost origin (as the OpenHands server does); `*` allows all;
 * otherwise a comma-separated list. Preflight reflects the requested headers, so the OpenAI SDKs'
 * `x-stainless-*`, `idempotency-key` and `x-session-id` pass.
 */
export default fp(
  async function corsPlugin(app: FastifyInstance, opts: { origins?: string }) {
    const list = opts.origins?.split(',').map((o) => o.trim()).filter(Boolean)
    await app.register(cors, {
      origin: list?.includes('*') ? true : (list ?? LOCAL_ORIGIN),
      methods: ['GET', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS'],
      exposedHeaders: [
        'X-Request-Id',
        'X-RateLimit-Limit',
        'X-RateLimit-Remaining',
        'X-RateLimit-Reset',
        'Retry-After',
        'Retry-After-Ms',
        'X-Should-Retry',
        'X-Session-Id',
        'Idempotent-Replayed',
      ],
      maxAge: 600,
    })
  },
  { name: 'cors' },
)
