import { envelope, toApiError } from './errors.js'
import type { FastifyReply, FastifyRequest } from 'fastify'

export interface SseStream {
  /** `event: <name>` + `data: <json>`; with no event name only the data line (OpenAI style). */
  send(data: unknown, event?: string): void
  /** Raw `data:` payload, e.g. `[DONE]`. */
  data(text: string): void
  close(): void
  /** Aborted when the client goes away before the stream was closed. */
  readonly signal: AbortSignal
}

/**
 * Turns the reply into a text/event-stream. Hijacking skips Fastify's send pipeline, so the
 * headers the hooks already set (request id, rate limit, CORS) are copied onto the raw response.
 * A `: ping` comment keeps proxies from closing an idle stream.
 */
export function openSse(_request: FastifyRequest, reply: FastifyReply, pingMs = 15_000): SseStream {
  const controller = new AbortController()
  const raw = reply.raw
  reply.hijack()
  const hooked = Object.entries(reply.getHeaders()).filter((e): e is [string, string | number | string[]] => e[1] !== undefined)
  raw.writeHead(200, {
    ...Object.fromEntries(hooked),
    'content-type': 'text/event-stream; charset=utf-8',
    'cache-control': 'no-store',
    connection: 'keep-alive',
    'x-accel-buffering': 'no',
  })
  raw.flushHeaders()
  let closed = false
  const ping = setInterval(() => raw.write(': ping\n\n'), pingMs)
  raw.on('close', () => {
    clearInterval(ping)
    if (!closed) controller.abort()
    closed = true
  })
  const write = (text: string) => {
    if (!closed && !raw.destroyed) raw.write(text)
  }
  return {
    send(data, event) {
      write(`${event ? `event: ${event}\n` : ''}data: ${JSON.stringify(data)}\n\n`)
    },
    data(text) {
      write(`data: ${text}\n\n`)
    },
    close() {
      if (closed) return
      closed = true
      clearInterval(ping)
      raw.end()
    },
    signal: controller.signal,
  }
}

/** Aborts when the client of a plain (non-stream) request disconnects before the answer. */
export function disconnectSignal(reply: FastifyReply): AbortSignal {
  const controller = new AbortController()
  reply.raw.on('close', () => {
    if (!reply.raw.writableFinished) controller.abort()
  })
  return controller.signal
}

/**
 * Streams one run over SSE. With `hold`, the status is held until the run calls `started` (the
 * upstream answered) or ends: a run that fails before that (409 busy, 503 no upstream, an
 * upstream 429 or 400) gets a plain HTTP error with the envelope, which clients and their SDKs
 * understand. Once the stream is open, a client that goes away calls `stop`, and a failure is written by `error`
 * in the dialect's own way (an `event: error` or an OpenAI-style data line).
 */
export async function streamRun<T>(
  request: FastifyRequest,
  reply: FastifyReply,
  opts: {
    start: (send: SseStream['send'], started: () => void) => Promise<T>
    /** Wait for `started` before sending the 200; otherwise the stream opens at once. */
    hold?: boolean
    stop: () => void
    open?: (sse: SseStream) => void
    done: (sse: SseStream, result: T) => void
    error: (sse: SseStream, body: ReturnType<typeof envelope>) => void
    end?: (sse: SseStream) => void
  },
): Promise<FastifyReply> {
  let sse: SseStream | undefined
  // What the run sends between `started` and the stream being open waits here, in order.
  const early: [unknown, string | undefined][] = []
  let started!: () => void
  const answered = new Promise<void>((resolve) => (started = resolve))
  const running = opts.start((data, event) => (sse ? sse.send(data, event) : early.push([data, event])), started)
  if (!opts.hold) started()
  // A client gone before the status was sent stops the run all the same.
  const gone = disconnectSignal(reply)
  gone.addEventListener('abort', opts.stop, { once: true })
  try {
    await Promise.race([answered, running])
  } finally {
    gone.removeEventListener('abort', opts.stop)
  }
  sse = openSse(request, reply)
  sse.signal.addEventListener('abort', opts.stop, { once: true })
  opts.open?.(sse)
  for (const [data, event] of early) sse.send(data, event)
  try {
    opts.done(sse, await running)
  } catch (err) {
    const apiError = toApiError(err as Error)
    if (apiError.type === 'server_error') request.log.error({ err }, 'streamed run failed')
    else if (apiError.statusCode >= 500) request.log.warn({ code: apiError.code, status: apiError.statusCode }, apiError.message)
    opts.error(sse, envelope(apiError))
  } finally {
    opts.end?.(sse)
    sse.close()
  }
  return reply
}
