import { once } from 'node:events'
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http'
import type { AddressInfo } from 'node:net'
import { gzipSync } from 'node:zlib'
import t from 'tap'
import { createHttpFetch } from '../../services/http-fetch.js'

interface Seen {
  method: string
  url: string
  body: string
  authorization?: string
}

/** A loopback server: `routes[path]` answers; every request is recorded, every connection counted. */
async function serve(t: Tap, routes: Record<string, (req: IncomingMessage, res: ServerResponse, body: string) => void>) {
  const seen: Seen[] = []
  let connections = 0
  const server = createServer(async (req, res) => {
    let body = ''
    for await (const piece of req) body += piece
    seen.push({ method: req.method!, url: req.url!, body, authorization: req.headers.authorization })
    const route = routes[req.url!.split('?')[0]!]
    if (route) route(req, res, body)
    else res.writeHead(404).end()
  })
  server.on('connection', () => connections++)
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  t.teardown(() => {
    server.closeAllConnections()
    server.close()
  })
  return { url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, seen, connections: () => connections }
}
type Tap = { teardown(fn: () => unknown): void }

t.test('keeps connections alive, sends the body and headers, reads status, headers and body', async (t) => {
  const lean = createHttpFetch()
  t.teardown(() => lean.close())
  const server = await serve(t, {
    '/echo': (req, res, body) => res.writeHead(201, { 'content-type': 'application/json', 'x-a': '1' }).end(JSON.stringify({ got: body, type: req.headers['content-type'] })),
  })
  for (let i = 0; i < 5; i++) {
    const res = await lean(`${server.url}/echo`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: `{"i":${i}}` })
    t.equal(res.status, 201)
    t.equal(res.headers.get('x-a'), '1')
    t.same(await res.json(), { got: `{"i":${i}}`, type: 'application/json' })
  }
  t.equal(server.connections(), 1, 'five sequential calls, one connection')
})

t.test('redirects as fetch: 303 becomes a GET without a body, 307 repeats, another origin gets no credentials', async (t) => {
  const lean = createHttpFetch()
  t.teardown(() => lean.close())
  const other = await serve(t, { '/there': (_req, res) => res.end('other origin') })
  const server = await serve(t, {
    '/see-other': (_req, res) => res.writeHead(303, { location: '/final' }).end(),
    '/temporary': (_req, res) => res.writeHead(307, { location: '/final' }).end(),
    '/away': (_req, res) => res.writeHead(307, { location: `${other.url}/there` }).end(),
    '/final': (req, res, body) => res.end(`${req.method} ${body}`),
  })
  const post = (path: string) => lean(`${server.url}${path}`, { method: 'POST', headers: { authorization: 'Bearer k' }, body: 'payload' })
  t.equal(await (await post('/see-other')).text(), 'GET ')
  t.equal(await (await post('/temporary')).text(), 'POST payload')
  t.equal(await (await post('/away')).text(), 'other origin')
  t.equal(other.seen[0]?.authorization, undefined, 'the key is not sent to another origin')
  t.equal(server.seen.find((s) => s.url === '/final')?.authorization, 'Bearer k', 'the same origin keeps it')
})

t.test('a compressed body is decoded; a body-less status has no body', async (t) => {
  const lean = createHttpFetch()
  t.teardown(() => lean.close())
  const server = await serve(t, {
    '/gzip': (_req, res) => res.writeHead(200, { 'content-encoding': 'gzip', 'content-type': 'text/plain' }).end(gzipSync('hello, decoded')),
    '/empty': (_req, res) => res.writeHead(204).end(),
  })
  const gz = await lean(`${server.url}/gzip`)
  t.equal(gz.headers.get('content-encoding'), null)
  t.equal(await gz.text(), 'hello, decoded')
  const empty = await lean(`${server.url}/empty`)
  t.equal(empty.status, 204)
  t.equal(empty.body, null)
})

t.test('aborting rejects before the answer and errors the body during it, with an AbortError', async (t) => {
  const lean = createHttpFetch()
  t.teardown(() => lean.close())
  let release!: () => void
  const held = new Promise<void>((resolve) => (release = resolve))
  t.teardown(() => release())
  const server = await serve(t, {
    '/slow-head': () => {},
    '/slow-body': (_req, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream' })
      res.write('data: first\n\n')
      void held.then(() => res.end())
    },
  })
  const early = new AbortController()
  const pending = lean(`${server.url}/slow-head`, { signal: early.signal })
  while (server.seen.length === 0) await new Promise((resolve) => setImmediate(resolve))
  early.abort()
  await t.rejects(pending, { name: 'AbortError' })

  const late = new AbortController()
  const res = await lean(`${server.url}/slow-body`, { signal: late.signal })
  const reader = res.body!.getReader()
  t.equal(new TextDecoder().decode((await reader.read()).value), 'data: first\n\n')
  late.abort()
  await t.rejects(reader.read(), { name: 'AbortError' })

  const already = new AbortController()
  already.abort()
  await t.rejects(lean(`${server.url}/slow-head`, { signal: already.signal }), { name: 'AbortError' })
})
