import { Agent as HttpAgent, type IncomingMessage, request as httpRequest } from 'node:http'
import { Agent as HttpsAgent, request as httpsRequest } from 'node:https'
import { Readable } from 'node:stream'
import { createBrotliDecompress, createGunzip, createInflate } from 'node:zlib'

/** Redirects followed at most, as fetch does (it allows 20). */
const MAX_REDIRECTS = 20
/** An idle pooled connection is closed before a server's usual keep-alive timeout (5 s in Node) closes it under a request. */
const IDLE_SOCKET_MS = 4000

const REDIRECT = new Set([301, 302, 303, 307, 308])

/**
 * A `fetch` for the upstream model client, on node:http(s) with pooled keep-alive connections.
 * The global fetch (undici) costs several hundred microseconds of CPU per call in request and
 * response objects, header lists and its stream plumbing, which was a fifth of a chat turn; here
 * a call is one `http.request` and the body a web stream over the response.
 *
 * Behaves as fetch does for what the `openai` client sends: string or byte bodies, an
 * AbortSignal (rejects, or errors the body, with an `AbortError`), redirects (303, and 301/302
 * after a POST, become a GET without a body; 307/308 repeat the request), gzip/deflate/br
 * response bodies decoded. Anything else (a `Request` object, a streamed or form body) goes to
 * the global fetch unchanged.
 */
export function createHttpFetch(): typeof fetch & { close(): void } {
  const agents = {
    'http:': new HttpAgent({ keepAlive: true, timeout: IDLE_SOCKET_MS, scheduling: 'lifo' }),
    'https:': new HttpsAgent({ keepAlive: true, timeout: IDLE_SOCKET_MS, scheduling: 'lifo' }),
  }

  const send = (url: URL, method: string, headers: Record<string, string>, body: string | Uint8Array | undefined, signal: AbortSignal | undefined, redirects: number): Promise<Response> =>
    new Promise((resolve, reject) => {
      const request = url.protocol === 'https:' ? httpsRequest : httpRequest
      const req = request(url, { method, headers, agent: agents[url.protocol as 'http:' | 'https:'], ...(signal ? { signal } : {}) }, (res) => {
        const status = res.statusCode ?? 0
        const location = res.headers.location
        if (REDIRECT.has(status) && location && redirects < MAX_REDIRECTS) {
          res.resume()
          const toGet = status === 303 || ((status === 301 || status === 302) && method === 'POST')
          const next = new URL(location, url)
          const nextHeaders = { ...headers }
          if (toGet) for (const name of Object.keys(nextHeaders)) if (/^content-(type|length)$/i.test(name)) delete nextHeaders[name]
          // credentials stay with the origin they were meant for, as fetch does
          if (next.origin !== url.origin) for (const name of Object.keys(nextHeaders)) if (name.toLowerCase() === 'authorization') delete nextHeaders[name]
          resolve(send(next, toGet ? 'GET' : method, nextHeaders, toGet ? undefined : body, signal, redirects + 1))
          return
        }
        resolve(toResponse(res, method, signal))
      })
      req.on('error', reject)
      req.end(body)
    })

  const lean = (async (input: string | URL | Request, init?: RequestInit): Promise<Response> => {
    const body = init?.body
    if (input instanceof Request || (body != null && typeof body !== 'string' && !(body instanceof Uint8Array))) return fetch(input, init)
    const url = new URL(input)
    if (url.protocol !== 'http:' && url.protocol !== 'https:') return fetch(input, init)
    const headers: Record<string, string> = {}
    new Headers(init?.headers).forEach((value, name) => {
      headers[name] = value
    })
    if (init?.signal?.aborted) throw abortError(init.signal)
    return send(url, (init?.method ?? 'GET').toUpperCase(), headers, body ?? undefined, init?.signal ?? undefined, 0)
  }) as typeof fetch & { close(): void }
  lean.close = () => {
    agents['http:'].destroy()
    agents['https:'].destroy()
  }
  return lean
}

const abortError = (signal: AbortSignal) =>
  signal.reason instanceof Error && signal.reason.name === 'AbortError' ? signal.reason : new DOMException('This operation was aborted', 'AbortError')

function toResponse(res: IncomingMessage, method: string, signal: AbortSignal | undefined): Response {
  const headers = new Headers()
  for (let i = 0; i < res.rawHeaders.length; i += 2) headers.append(res.rawHeaders[i]!, res.rawHeaders[i + 1]!)
  const status = res.statusCode ?? 0
  // a Response with these statuses cannot have a body
  if (method === 'HEAD' || status === 204 || status === 205 || status === 304) {
    res.resume()
    return new Response(null, { status, statusText: res.statusMessage, headers })
  }
  let stream: Readable = res
  const encoding = headers.get('content-encoding')?.trim().toLowerCase()
  const decoder = encoding === 'gzip' || encoding === 'x-gzip' ? createGunzip() : encoding === 'deflate' ? createInflate() : encoding === 'br' ? createBrotliDecompress() : undefined
  if (decoder) {
    // the decoded body no longer has the length or the encoding the headers name
    headers.delete('content-encoding')
    headers.delete('content-length')
    res.on('error', (err) => decoder.destroy(err))
    stream = res.pipe(decoder)
  }
  if (signal) {
    // the request's signal only covers the wait for the head: aborted later, the body errors as fetch's does
    const onAbort = () => stream.destroy(abortError(signal))
    signal.addEventListener('abort', onAbort, { once: true })
    stream.once('close', () => signal.removeEventListener('abort', onAbort))
  }
  return new Response(Readable.toWeb(stream) as ReadableStream<Uint8Array>, { status, statusText: res.statusMessage, headers })
}
