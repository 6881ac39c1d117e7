import { type FastifyInstance, type FastifyReply, type FastifyRequest, LogController } from 'fastify'
import fp from 'fastify-plugin'

/**
 * Headers every response carries: the request id (set first, so 401/404/429 have it too),
 * `Cache-Control: no-store` on API responses (the docs' static assets may be cached), HSTS when
 * the server terminates TLS itself.
 */
export default fp(
  async function http(app: FastifyInstance, opts: { tls: boolean }) {
    // callback hooks: an async one costs a promise and a microtask on every request
    app.addHook('onRequest', (request, reply, done) => {
      reply.header('x-request-id', request.id)
      reply.header('x-content-type-options', 'nosniff')
      if (opts.tls) reply.header('strict-transport-security', 'max-age=31536000; includeSubDomains')
      done()
    })
    app.addHook('onSend', (request, reply, payload, done) => {
      if (!reply.hasHeader('cache-control') && !request.url.startsWith('/docs/static/'))
        reply.header('cache-control', 'no-store')
      done(null, payload)
    })
  },
  { name: 'http' },
)

/**
 * One log line per request instead of Fastify's two ("incoming request" then "request
 * completed"): formatting and writing each line is a large share of a cheap request's cost, and
 * the completion line can carry everything the first one had (method, url, host, peer address,
 * through the `req` serializer; request id through the child logger's bindings). The trade-off:
 * a request that never completes leaves no line. Error, 404 and stream lines keep Fastify's
 * defaults, which `disableRequestLogging` would silence too (and it is deprecated in Fastify 5).
 */
export class RequestLog extends LogController {
  override incomingRequest(): void {}

  override requestCompleted(error: Error | null | undefined, request: FastifyRequest, reply: FastifyReply): void {
    if (this.isLogDisabled(request)) return
    if (error) reply.log.error({ req: request, res: reply, err: error, responseTime: reply.elapsedTime }, 'request errored')
    else reply.log.info({ req: request, res: reply, responseTime: reply.elapsedTime }, 'request completed')
  }
}

const SANE_REQUEST_ID = /^[\w.:-]{1,128}$/

/** Keeps a sane incoming X-Request-Id (so a proxy's id follows the request), otherwise makes one. */
export function requestId(header: string | string[] | undefined): string {
  return typeof header === 'string' && SANE_REQUEST_ID.test(header) ? header : crypto.randomUUID()
}
