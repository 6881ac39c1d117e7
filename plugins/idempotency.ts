import { createHash } from 'node:crypto'
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import fp from 'fastify-plugin'
import { invalidRequest } from '../services/errors.js'
import { IdempotencyKeys, type IdempotencyStore, RedisIdempotencyKeys, type StoredResponse } from '../services/idempotency.js'
import { principal } from './auth.js'

declare module 'fastify' {
  interface FastifyContextConfig {
    /** Honour `Idempotency-Key` on this route. */
    idempotent?: boolean
  }
}

/** Headers a replay needs to mean what the first answer meant. */
const KEPT_HEADERS = ['content-type', 'x-session-id', 'retry-after', 'x-should-retry']

/**
 * Records what goes out on the raw response, streamed or not, and decides once it is done: a
 * success, or a failure after side effects (`x-should-retry: false`), is kept for replays; a
 * failure that changed nothing is forgotten so a retry runs as new.
 */
function record(reply: FastifyReply, finish: (response: StoredResponse) => void, abandon: () => void): void {
  const raw = reply.raw
  const chunks: Buffer[] = []
  const keep = (chunk: unknown) => {
    if (typeof chunk === 'string') chunks.push(Buffer.from(chunk))
    else if (chunk instanceof Uint8Array) chunks.push(Buffer.from(chunk))
  }
  const write = raw.write.bind(raw) as (...args: unknown[]) => boolean
  const end = raw.end.bind(raw) as (...args: unknown[]) => typeof raw
  // Some responses (light-my-request's) write the last chunk through write() from inside end().
  let ending = false
  raw.write = ((chunk: unknown, ...rest: unknown[]) => {
    if (!ending) keep(chunk)
    return write(chunk, ...rest)
  }) as typeof raw.write
  raw.end = ((chunk?: unknown, ...rest: unknown[]) => {
    if (typeof chunk !== 'function') keep(chunk)
    ending = true
    try {
      return end(chunk, ...rest)
    } finally {
      ending = false
    }
  }) as typeof raw.end
  raw.once('close', () => {
    // Fastify's own headers (a plain reply) and the raw ones (a hijacked stream).
    const sent = reply.getHeaders()
    const final = sent['x-should-retry'] === 'false'
    if (!raw.headersSent || (raw.statusCode >= 300 && !final)) return abandon()
    const headers: Record<string, string> = {}
    for (const name of KEPT_HEADERS) {
      const value = sent[name]
      if (value !== undefined) headers[name] = String(value)
    }
    finish({ status: raw.statusCode, headers, body: Buffer.concat(chunks) })
  })
}

/**
 * `Idempotency-Key` on routes with `config: { idempotent: true }`: per tenant, for 24 hours, the
 * same key and request get the first response again (with `Idempotent-Replayed: true`).
 */
export default fp(
  async function idempotency(app: FastifyInstance) {
    // Shared by replicas: a retry may reach any of them.
    const keys: IdempotencyStore = app.redis ? new RedisIdempotencyKeys(app.redis, { logger: app.log }) : new IdempotencyKeys()
    app.addHook('onRoute', (route) => {
      if (!route.config?.idempotent) return
      const hook = async (request: FastifyRequest, reply: FastifyReply) => {
        const key = request.headers['idempotency-key']
        if (key === undefined) return
        if (typeof key !== 'string' || key.length === 0 || key.length > 255) {
          throw invalidRequest('Idempotency-Key must be one value of 1 to 255 characters', 'Idempotency-Key')
        }
        const session = request.headers['x-session-id']
        const fingerprint = createHash('sha256')
          .update(JSON.stringify([request.method, request.routeOptions.url, typeof session === 'string' ? session : null, request.body]))
          .digest('hex')
        const outcome = await keys.begin(principal(request).tenantId, key, fingerprint)
        if (outcome.kind === 'replay') {
          const { status, headers, body } = outcome.response
          return reply.code(status).headers({ ...headers, 'idempotent-replayed': 'true' }).send(body)
        }
        record(reply, outcome.finish, outcome.abandon)
      }
      route.preHandler = [...[route.preHandler ?? []].flat(), hook]
    })
  },
  { name: 'idempotency', dependencies: ['auth', 'errors', 'redis'] },
)
