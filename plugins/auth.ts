import bearerAuth from '@fastify/bearer-auth'
import type { FastifyInstance, FastifyRequest } from 'fastify'
import fp from 'fastify-plugin'
import { type Principal, type RevocationChannel, KeyResolver } from '../services/auth.js'
import { ApiError } from '../services/errors.js'
import { envelope } from './errors.js'

declare module 'fastify' {
  interface FastifyInstance {
    keys: KeyResolver
  }
  interface FastifyRequest {
    principal: Principal | null
  }
}

const REVOKED_CHANNEL = 'oi-server:keys:revoked'

/**
 * Revocations reach the other replicas over Redis pub/sub, so a socket authenticated with the key
 * on another process closes as quickly as one here. Without Redis there is one process to tell.
 * A failed publish is logged: the key is deleted all the same, and the other replicas refuse it on
 * the next request or frame.
 */
function redisChannel(app: FastifyInstance, onRevoked: (keyId: string) => void): RevocationChannel | undefined {
  const redis = app.redis
  if (!redis) return undefined
  // a subscribed connection can do nothing else; its queue holds the SUBSCRIBE until Redis is up
  const subscriber = redis.duplicate({ lazyConnect: false, enableOfflineQueue: true })
  subscriber.on('error', () => {})
  subscriber.on('message', (channel: string, keyId: string) => {
    if (channel === REVOKED_CHANNEL) onRevoked(keyId)
  })
  subscriber.subscribe(REVOKED_CHANNEL).catch((err: Error) => app.log.warn({ err: err.message }, 'revocations from other replicas are not received'))
  app.addHook('onClose', async () => {
    subscriber.disconnect()
  })
  return {
    publish: async (keyId) => {
      await redis.publish(REVOKED_CHANNEL, keyId).catch((err: Error) => app.log.warn({ err: err.message, keyId }, 'revocation not sent to other replicas'))
    },
  }
}

/** Decorates the key resolver; `protect` below turns auth on for a route scope. */
export default fp(
  async function auth(app: FastifyInstance, opts: { adminKeys: string[] }) {
    const channel = redisChannel(app, (keyId) => keys.ended(keyId))
    const keys = new KeyResolver(opts.adminKeys, app.store, { channel })
    app.decorate('keys', keys)
    app.decorateRequest('principal', null)
    app.addHook('onClose', async () => keys.flush())
  },
  { name: 'auth', dependencies: ['store', 'redis'] },
)

/**
 * Requires a bearer key on every route of the scope it is registered in. It runs at preParsing so
 * the per-IP limiter (onRequest) has already counted the request: wrong keys are rate limited too.
 */
export const protect = fp(
  async function protect(scope: FastifyInstance) {
    await scope.register(bearerAuth, {
      keys: [],
      addHook: 'preParsing',
      verifyErrorLogLevel: 'info',
      auth: async (key: string, request: FastifyRequest) => {
        request.principal = (await scope.keys.resolve(key)) ?? null
        return request.principal !== null
      },
      // the plugin's types say `{error: string}`; it sends whatever object is returned
      errorResponse: ((err: Error & { code?: string }) =>
        envelope(
          err.code === 'FST_BEARER_AUTH_MISSING_AUTHORIZATION_HEADER'
            ? new ApiError(401, 'auth_error', 'missing_api_key', 'Missing API key: send Authorization: Bearer <key>')
            : new ApiError(401, 'auth_error', 'invalid_api_key', 'Invalid API key'),
        )) as unknown as (err: Error) => { error: string },
    })
  },
  { name: 'protect', dependencies: ['auth'] },
)

/** The caller, on a protected route. */
export function principal(request: FastifyRequest): Principal {
  if (!request.principal) throw new ApiError(401, 'auth_error', 'missing_api_key', 'Missing API key')
  return request.principal
}

/** preHandler for admin-only routes. */
export async function requireAdmin(request: FastifyRequest) {
  if (!principal(request).admin)
    throw new ApiError(403, 'permission_error', 'forbidden', 'This route needs an admin key')
}
