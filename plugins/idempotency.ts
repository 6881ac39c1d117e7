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
 * failure that changed nothing is forgotten so a retry runs as new. A client that went away
 * first (its SDK timed out and will retry) does not decide it: the answer the turn still writes
 * is what the retry gets.
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
  let ended = false
  let closed = false
  let decided = false
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
      ended = true
      if (closed) decide()
    }
  }) as typeof raw.end
  raw.once('close', () => {
    closed = true
    if (ended) decide()
  })
  const decide = () => {
    if (decided) return
    decided = true
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
  }
}

/**
 * The attempt number the OpenAI SDKs (Stainless-generated: openai, and LangChain through it)
 * send in `x-stainless-retry-count`: 0 for the first try, n for the n-th retry. Undefined for
 * other clients.
 */
function sdkAttempt(header: string | string[] | undefined): number | undefined {
  if (typeof header !== 'string' || !/^\d{1,3}$/.test(header)) return undefined
  return Number(header)
}

/**
 * `Idempotency-Key` on routes with `config: { idempotent: true }`: per tenant, for 24 hours, the
 * same key and request get the first response again (with `Idempotent-Replayed: true`).
 *
 * An SDK's own retry is recognised the same way without a key: a request with
 * `x-stainless-retry-count` above 0 whose tenant, session and body match an attempt made in the
 * last 15 minutes gets that attempt's response (or 409 while it still runs, which the SDK retries
 * after a pause) instead of running the turn again. A first attempt (`0`) always runs: asking the
 * same thing twice on purpose is not a retry.
 */
export default fp(
  async function idempotency(app: FastifyInstance) {
    // Shared by replicas: a retry may reach any of them.
    const keys: IdempotencyStore = app.redis ? new RedisIdempotencyKeys(app.redis, { logger: app.log }) : new IdempotencyKeys()
    const attempts = new IdempotencyKeys({ ttlMs: 15 * 60_000, maxKeys: 2_000 })
    app.addHook('onRoute', (route) => {
      if (!route.config?.idempotent) return
      const hook = async (request: FastifyRequest, reply: FastifyReply) => {
        const key = request.headers['idempotency-key']
        const attempt = sdkAttempt(request.headers['x-stainless-retry-count'])
        if (key === undefined && attempt === undefined) return
        if (key !== undefined && (typeof key !== 'string' || key.length === 0 || key.length > 255)) {
          throw invalidRequest('Idempotency-Key must be one value of 1 to 255 characters', 'Idempotency-Key')
        }
        const session = request.headers['x-session-id']
        const fingerprint = createHash('sha256')
          .update(JSON.stringify([request.method, request.routeOptions.url, request.params ?? null, typeof session === 'string' ? session : null, request.body]))
          .digest('hex')
        const { tenantId } = principal(request)
        let outcome
        if (typeof key === 'string') outcome = await keys.begin(tenantId, key, fingerprint)
        else if (attempt === 0) outcome = attempts.claim(tenantId, fingerprint, fingerprint)
        else outcome = attempts.begin(tenantId, fingerprint, fingerprint)
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
