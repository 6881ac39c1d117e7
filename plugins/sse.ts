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

/** Whether the client asked for an event stream. */
export const wantsStream = (stream: boolean | undefined) => stream === true

/** Aborts when the client of a plain (non-stream) request disconnects before the answer. */
export function disconnectSignal(reply: FastifyReply): AbortSignal {
  const controller = new AbortController()
  reply.raw.on('close', () => {
    if (!reply.raw.writableFinished) controller.abort()
  })
  return controller.signal
}
