import type { FastifyInstance } from 'fastify'
import fp from 'fastify-plugin'

/**
 * Headers every response carries: the request id (set first, so 401/404/429 have it too),
 * `Cache-Control: no-store` on API responses (the docs' static assets may be cached), HSTS when
 * the server terminates TLS itself.
 */
export default fp(
  async function http(app: FastifyInstance, opts: { tls: boolean }) {
    app.addHook('onRequest', async (request, reply) => {
      reply.header('x-request-id', request.id)
      reply.header('x-content-type-options', 'nosniff')
      if (opts.tls) reply.header('strict-transport-security', 'max-age=31536000; includeSubDomains')
    })
    app.addHook('onSend', async (request, reply, payload) => {
      if (!reply.hasHeader('cache-control') && !request.url.startsWith('/docs/static/'))
        reply.header('cache-control', 'no-store')
      return payload
    })
  },
  { name: 'http' },
)

const SANE_REQUEST_ID = /^[\w.:-]{1,128}$/

/** Keeps a sane incoming X-Request-Id (so a proxy's id follows the request), otherwise makes one. */
export function requestId(header: string | string[] | undefined): string {
  return typeof header === 'string' && SANE_REQUEST_ID.test(header) ? header : crypto.randomUUID()
}
