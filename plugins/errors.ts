import { STATUS_CODES } from 'node:http'
import type { Socket } from 'node:net'
import type { FastifyError, FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import fp from 'fastify-plugin'
import FindMyWay from 'find-my-way'
import { ApiError } from '../services/errors.js'

/** The one error envelope of the API. */
export function envelope(err: ApiError) {
  return {
    error: { message: err.message, type: err.type, code: err.code, param: err.param, ...err.extra },
  }
}

/** Headers an error carries beside its envelope: when to retry, and whether to at all. */
export function errorHeaders(err: ApiError): Record<string, string> {
  const headers: Record<string, string> = {}
  if ((err.statusCode === 429 || err.statusCode === 503) && err.extra.retry_after !== undefined) headers['retry-after'] = String(err.extra.retry_after)
  if (err.statusCode === 429 && err.extra.retry_after_ms !== undefined) headers['retry-after-ms'] = String(err.extra.retry_after_ms)
  if (!err.retryable) headers['x-should-retry'] = 'false'
  return headers
}

const METHODS = ['GET', 'POST', 'PUT', 'PATCH', 'DELETE'] as const

// Socket errors, and PostgreSQL's SQLSTATE classes 08 (connection exception) and 57P (operator
// intervention: shutdown, crash, cannot connect now).
const UNREACHABLE = new Set(['ECONNREFUSED', 'ECONNRESET', 'ETIMEDOUT', 'EHOSTUNREACH', 'ENETUNREACH', 'EPIPE', 'ENOTFOUND', 'EAI_AGAIN'])

/** Whether an error says the database cannot be reached (node-postgres errors, pool timeouts). */
function storeUnreachable(err: Error & { code?: unknown }): boolean {
  const code = typeof err.code === 'string' ? err.code : ''
  if (UNREACHABLE.has(code) || code.startsWith('08') || code.startsWith('57P')) return true
  // node-postgres says these in words only
  return /^(Connection terminated|timeout exceeded when trying to connect)/.test(err.message)
}

/** Maps whatever was thrown (ours, Fastify's, a plugin's or a bug) to an ApiError. */
export function toApiError(err: FastifyError | ApiError | Error): ApiError {
  if (err instanceof ApiError) return err
  const e = err as FastifyError & { validation?: { instancePath?: string; params?: Record<string, unknown> }[] }
  if (e.validation) {
    const first = e.validation[0]
    const missing = first?.params?.missingProperty as string | undefined
    const extra = first?.params?.additionalProperty as string | undefined
    const path = [first?.instancePath?.replace(/^\//, '').replaceAll('/', '.'), missing ?? extra].filter(Boolean).join('.')
    const where = e.validationContext ?? 'body'
    return new ApiError(400, 'validation_error', 'invalid_request', `${where}${path ? `.${path}` : ''} ${e.message.replace(/^\S+ /, '')}`, path || where)
  }
  switch (e.code) {
    case 'FST_ERR_CTP_INVALID_JSON_BODY':
    case 'FST_ERR_CTP_EMPTY_JSON_BODY':
      return new ApiError(400, 'validation_error', 'invalid_json', 'Request body is not valid JSON')
    case 'FST_ERR_CTP_BODY_TOO_LARGE':
    case 'FST_REQ_FILE_TOO_LARGE':
      return new ApiError(413, 'validation_error', 'payload_too_large', 'Request body is too large')
    case 'FST_ERR_CTP_INVALID_MEDIA_TYPE':
    case 'FST_INVALID_MULTIPART_CONTENT_TYPE':
      return new ApiError(415, 'validation_error', 'unsupported_media_type', 'Unsupported content type')
    case 'FST_ERR_CTP_INVALID_CONTENT_LENGTH':
      return new ApiError(400, 'validation_error', 'invalid_request', 'Content-Length does not match the body')
  }
  if (storeUnreachable(err)) return new ApiError(503, 'unavailable_error', 'store_unavailable', 'The database cannot be reached; retry shortly')
  const status = e.statusCode ?? 500
  if (status === 429)
    return new ApiError(429, 'rate_limit_error', 'rate_limit_exceeded', 'Rate limit exceeded')
  if (status >= 400 && status < 500)
    return new ApiError(status, 'invalid_request_error', 'invalid_request', e.message)
  return new ApiError(500, 'server_error', 'internal_error', 'Internal server error')
}

const CLIENT_ERRORS: Record<string, [status: number, code: string, message: string]> = {
  ERR_HTTP_REQUEST_TIMEOUT: [408, 'request_timeout', 'The request did not arrive in time'],
  HPE_HEADER_OVERFLOW: [431, 'headers_too_large', 'Request headers are too large'],
  HPE_CHUNK_EXTENSIONS_OVERFLOW: [413, 'payload_too_large', 'Chunk extensions are too large'],
}

/**
 * The server's `clientErrorHandler`: a request cut by a timeout or too malformed to reach a route
 * still gets the envelope (Fastify's default writes a body of its own), then the connection is
 * closed. Nothing is written on a socket whose writing side is already done.
 */
export function clientErrorHandler(err: Error & { code?: string }, socket: Socket): void {
  if (err.code === 'ECONNRESET' || socket.destroyed) return
  const [status, code, message] = CLIENT_ERRORS[err.code ?? ''] ?? [400, 'bad_request', 'Malformed HTTP request']
  const body = JSON.stringify(envelope(new ApiError(status, 'invalid_request_error', code, message)))
  if (socket.writable) {
    socket.write(
      `HTTP/1.1 ${status} ${STATUS_CODES[status]}\r\nConnection: close\r\nContent-Type: application/json; charset=utf-8\r\n` +
        `Content-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`,
    )
  }
  socket.destroy(err)
}

declare module 'fastify' {
  interface FastifyInstance {
    /** Sends the error envelope (used where a reply is written outside the error handler). */
    replyError(reply: FastifyReply, err: ApiError): FastifyReply
  }
}

/**
 * One error handler and one not-found handler produce the envelope for every failure. Unknown
 * paths get 404; a known path with another method gets 405 with `Allow`.
 */
export default fp(
  async function errors(app: FastifyInstance) {
    const known = FindMyWay()
    app.addHook('onRoute', (route) => {
      for (const method of [route.method].flat()) {
        if (method === 'HEAD' || method === 'OPTIONS') continue
        try {
          known.on(method as 'GET', route.url, () => {})
        } catch {
          // the same method and path registered twice (e.g. HEAD twins): one entry is enough
        }
      }
    })

    app.decorate('replyError', (reply: FastifyReply, err: ApiError) => {
      if (err.statusCode === 405 && err.extra.allow) reply.header('allow', err.extra.allow as string)
      for (const [header, value] of Object.entries(errorHeaders(err))) reply.header(header, value)
      return reply.code(err.statusCode).type('application/json; charset=utf-8').send(envelope(err))
    })

    app.setErrorHandler((err: FastifyError, request: FastifyRequest, reply: FastifyReply) => {
      const apiError = toApiError(err)
      // Only a server fault needs its stack; a refused request or an upstream or host condition
      // the error names (llm_not_configured, llm_timeout, kernel_unavailable…) is one line.
      if (apiError.type === 'server_error') request.log.error({ err }, 'request failed')
      else if (apiError.statusCode >= 500) request.log.warn({ code: apiError.code, status: apiError.statusCode }, apiError.message)
      else request.log.info({ code: apiError.code, status: apiError.statusCode }, apiError.message)
      return app.replyError(reply, apiError)
    })

    app.setNotFoundHandler(
      { preHandler: app.ipRateLimit ?? undefined },
      async (request: FastifyRequest, reply: FastifyReply) => {
        const path = request.url.split('?')[0] ?? '/'
        const allowed = METHODS.filter((m) => known.find(m, path))
        if (allowed.length > 0) {
          return app.replyError(
            reply.header('allow', allowed.join(', ')),
            new ApiError(405, 'invalid_request_error', 'method_not_allowed', `Method ${request.method} not allowed on ${path}`),
          )
        }
        return app.replyError(reply, new ApiError(404, 'not_found_error', 'not_found', `Route ${request.method} ${path} not found`))
      },
    )
  },
  { name: 'errors', dependencies: ['rate-limit'] },
)
