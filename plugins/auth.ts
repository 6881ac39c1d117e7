import bearerAuth from '@fastify/bearer-auth'
import type { FastifyInstance, FastifyRequest } from 'fastify'
import fp from 'fastify-plugin'
import { type Principal, KeyResolver } from '../services/auth.js'
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

/** Decorates the key resolver; `protect` below turns auth on for a route scope. */
export default fp(
  async function auth(app: FastifyInstance, opts: { adminKeys: string[] }) {
    const keys = new KeyResolver(opts.adminKeys, app.store)
    app.decorate('keys', keys)
    app.decorateRequest('principal', null)
    app.addHook('onClose', async () => keys.flush())
  },
  { name: 'auth', dependencies: ['store'] },
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
