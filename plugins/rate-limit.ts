import rateLimit, { type FastifyRateLimitStore, type FastifyRateLimitStoreCtor } from '@fastify/rate-limit'
import type { FastifyInstance, FastifyRequest, preHandlerHookHandler } from 'fastify'
import fp from 'fastify-plugin'
import { ApiError } from '../services/errors.js'
import { MemoryRateStore, type RateStore, RedisRateStore } from '../services/rate-limits.js'

declare module 'fastify' {
  interface FastifyContextConfig {
    /**
     * Apply the per-session limit (SESSION_RATE_LIMIT_PER_MINUTE) to this route: `true` finds the
     * session where most routes name it; a function finds it for a route that names it otherwise.
     */
    sessionRateLimit?: boolean | ((request: FastifyRequest) => Promise<string | undefined>)
  }
  interface FastifyInstance {
    /** The per-IP limit as a hook, for handlers outside the routes (not found, 405); null when it is off. */
    ipRateLimit: preHandlerHookHandler | null
  }
}

export interface RateLimitOptions {
  perMinute: number
  sessionPerMinute: number
  /** Requests the per-IP limit does not count: those another replica forwarded (it counted them). */
  exempt?: (request: FastifyRequest) => boolean
}

const exceeded = (retryMs: number) => {
  const retryAfter = Math.max(1, Math.ceil(retryMs / 1000))
  return new ApiError(429, 'rate_limit_error', 'rate_limit_exceeded', `Rate limit exceeded, retry in ${retryAfter} seconds`, null, {
    retry_after: retryAfter,
    retry_after_ms: Math.max(1, Math.ceil(retryMs)),
  })
}

/**
 * Our GCRA buckets behind @fastify/rate-limit's store interface, which thinks in counts and
 * windows: an allowed request reports `limit - remaining` used and the time until the bucket is
 * full; a refused one reports `limit + 1` and the wait until the next request is allowed, which
 * the plugin turns into `Retry-After`.
 */
function storeFor(buckets: RateStore): FastifyRateLimitStoreCtor {
  return class implements FastifyRateLimitStore {
    incr(key: string, callback: (error: Error | null, result?: { current: number; ttl: number }) => void, timeWindow: number, max: number): void {
      buckets.take(key, max, timeWindow).then(
        (d) => callback(null, d.allowed ? { current: max - d.remaining, ttl: d.resetMs } : { current: max + 1, ttl: d.retryMs }),
        (err: Error) => callback(err),
      )
    }

    child(): FastifyRateLimitStore {
      return this
    }
  }
}

/**
 * The session id a request names: the `:id` param, the body's `session_id` (or
 * `metadata.session_id`), or `X-Session-Id`.
 * Raw client input: it only counts once the store has matched it to a session of the caller.
 */
function namedSession(request: FastifyRequest): string | undefined {
  const params = request.params as { id?: string } | undefined
  const body = request.body as { session_id?: unknown; metadata?: { session_id?: unknown } | null } | undefined
  const named = body && typeof body === 'object' ? (body.session_id ?? body.metadata?.session_id) : undefined
  const fromBody = typeof named === 'string' ? named : undefined
  const header = request.headers['x-session-id']
  return params?.id ?? fromBody ?? (typeof header === 'string' ? header : undefined)
}

/**
 * Per-IP limit on every route registered after this plugin (routes opt out with
 * `config: { rateLimit: false }`), and a per-session limit on routes with
 * `config: { sessionRateLimit: true }`. Counters live in Redis when configured; if Redis is
 * unreachable requests are let through (availability over strictness) and a warning is logged.
 * A limit of 0 turns that limit off everywhere, the not-found handler included. A limit is a
 * rate (GCRA, services/rate-limits.ts): a refused client is told the wait until its next request.
 *
 * The per-session counter is keyed on the session's canonical id from the store, looked up with
 * the caller's tenant: another spelling of the same id (letter case) shares its counter, and an
 * unknown or another tenant's id counts against nothing (the route answers 404; the per-IP limit
 * still applies). A request that creates its session names none and is not counted here.
 */
export default fp(
  async function rateLimits(app: FastifyInstance, opts: RateLimitOptions) {
    const buckets = app.redis ? new RedisRateStore(app.redis, 'oi-server:rl:') : new MemoryRateStore()
    await app.register(rateLimit, {
      global: opts.perMinute > 0,
      max: opts.perMinute || 1,
      timeWindow: 60_000,
      hook: 'onRequest',
      store: storeFor(buckets),
      skipOnError: true,
      ...(opts.exempt ? { allowList: opts.exempt } : {}),
      errorResponseBuilder: (_req, ctx) => exceeded(ctx.ttl),
    })
    app.decorate('ipRateLimit', opts.perMinute > 0 ? app.rateLimit() : null)

    if (opts.sessionPerMinute <= 0) return
    const canonical = new WeakMap<FastifyRequest, string>()
    const limiter = app.createRateLimit({
      max: opts.sessionPerMinute,
      timeWindow: 60_000,
      keyGenerator: (request) => `session:${canonical.get(request)}`,
    })
    app.addHook('onRoute', (route) => {
      const sessionOf = route.config?.sessionRateLimit
      if (!sessionOf) return
      const hook = async (request: FastifyRequest) => {
        const named = sessionOf === true ? namedSession(request) : request.principal && (await sessionOf(request))
        if (!named || !request.principal) return
        const session = await app.store.getSession(request.principal.tenantId, named)
        if (!session) return
        canonical.set(request, session.id)
        const result = await limiter(request)
        if (!result.isAllowed && result.isExceeded) throw exceeded(result.ttl)
      }
      route.preHandler = [...[route.preHandler ?? []].flat(), hook]
    })
  },
  { name: 'rate-limit', dependencies: ['redis', 'store', 'auth'] },
)
