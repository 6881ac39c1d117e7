import { once } from 'node:events'
import { chmodSync, writeFileSync } from 'node:fs'
import { type AddressInfo, connect, type Socket } from 'node:net'
import { join } from 'node:path'
import t from 'tap'
import WebSocket from 'ws'
import { addressKey } from '../../plugins/connections.js'
import { auth, build, type FastifyInstance, type Tap, tempDir } from '../helpers/build.js'
import { parseSse } from '../helpers/sse.js'

async function listen(app: FastifyInstance): Promise<number> {
  await app.listen({ port: 0, host: '127.0.0.1' })
  return (app.server.address() as AddressInfo).port
}

/** A raw TCP client that records what it receives; `ended` resolves with it once the server closes. */
async function rawClient(t: Tap, port: number, send = ''): Promise<{ socket: Socket; ended: Promise<string> }> {
  const socket = connect(port, '127.0.0.1')
  t.teardown(() => socket.destroy())
  let received = ''
  socket.on('data', (d) => (received += d))
  socket.on('error', () => {})
  const ended = once(socket, 'close').then(() => received)
  await once(socket, 'connect')
  if (send) socket.write(send)
  return { socket, ended }
}

const envelopeOf = (response: string) => JSON.parse(response.slice(response.indexOf('\r\n\r\n') + 4))

t.test('addressKey: IPv4 as is, IPv4-mapped IPv6 as IPv4, IPv6 by its /64', async (t) => {
  t.equal(addressKey('203.0.113.7'), '203.0.113.7')
  t.equal(addressKey('::ffff:203.0.113.7'), '203.0.113.7')
  t.equal(addressKey('2001:db8:1:2:aaaa::1'), '2001:db8:1:2::/64')
  t.equal(addressKey('2001:db8:1:2:ffff:ffff:ffff:ffff'), '2001:db8:1:2::/64', 'the same /64')
  t.equal(addressKey('2001:0db8:0001:0002::9'), '2001:db8:1:2::/64', 'leading zeros')
  t.equal(addressKey('2001:db8:1:3::1'), '2001:db8:1:3::/64', 'the next /64 is another client')
  t.equal(addressKey('2001:db8::1'), '2001:db8:0:0::/64')
  t.equal(addressKey('::1'), '0:0:0:0::/64')
  t.equal(addressKey('fe80::1%eth0'), 'fe80:0:0:0::/64', 'zone id dropped')
  t.equal(addressKey('64:ff9b::192.0.2.1'), '64:ff9b:0:0::/64', 'embedded IPv4 counts as two groups')
  t.equal(addressKey(undefined), 'unknown')
})

t.test('MAX_CONNECTIONS_PER_IP: the connection past the cap is closed on accept; a freed slot is reused', async (t) => {
  const app = await build(t, { MAX_CONNECTIONS_PER_IP: '2' })
  const port = await listen(app)
  const accepted: Socket[] = []
  app.server.on('connection', (socket: Socket) => accepted.push(socket))

  const first = await rawClient(t, port)
  const second = await rawClient(t, port)
  const third = await rawClient(t, port)
  t.equal(await third.ended, '', 'the third connection is closed without a byte')
  t.equal(accepted.length, 3)
  t.ok(accepted[2]!.destroyed)

  // the second connection still works
  second.socket.write('GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
  t.match(await second.ended, /^HTTP\/1\.1 200 /)

  // once the server has seen the first one go, a new connection is served
  const gone = once(accepted[0]!, 'close')
  first.socket.destroy()
  await gone
  const fresh = await rawClient(t, port, 'GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
  t.match(await fresh.ended, /^HTTP\/1\.1 200 /)

  const metrics = await app.inject({ url: '/metrics', headers: auth() })
  t.match(metrics.body, /^oi_http_connections_refused_total 1$/m)
})

t.test('MAX_CONNECTIONS_PER_IP=0 turns the cap off', async (t) => {
  const app = await build(t, { MAX_CONNECTIONS_PER_IP: '0' })
  const port = await listen(app)
  const clients = await Promise.all(Array.from({ length: 5 }, () => rawClient(t, port)))
  const last = clients.at(-1)!
  last.socket.write('GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
  t.match(await last.ended, /^HTTP\/1\.1 200 /)
})

t.test('half-sent requests are cut by the header and request timeouts; streams and sockets live on', async (t) => {
  const app = await build(t, {
    HEADERS_TIMEOUT_MS: '200',
    REQUEST_TIMEOUT_MS: '400',
    KEEP_ALIVE_TIMEOUT_MS: '300',
    MAX_CONNECTIONS_PER_IP: '8',
    SANDBOX: 'none',
  })
  t.equal(app.server.headersTimeout, 200)
  t.equal(app.server.requestTimeout, 400)
  t.equal(app.server.keepAliveTimeout, 300)
  const port = await listen(app)
  const base = `http://127.0.0.1:${port}`
  const session = (await app.inject({ method: 'POST', url: '/v1/sessions', headers: auth() })).json().session_id

  // long-lived responses opened first: they are older than every timeout by the time the
  // half-sent requests below have been cut
  const ws = new WebSocket(`ws://127.0.0.1:${port}/v1/sessions/${session}/events/ws`, { headers: auth() })
  t.teardown(() => ws.terminate())
  const frames: { type: string; event?: { data: unknown } }[] = []
  const ready = new Promise<void>((resolve) =>
    ws.on('message', (data) => {
      frames.push(JSON.parse(String(data)))
      if (frames.at(-1)?.type === 'ready') resolve()
    }),
  )
  await ready
  // kernels run as a user of their own: the directory of the file they wait for must be open to it
  const gateDir = tempDir(t)
  chmodSync(gateDir, 0o755)
  const gate = join(gateDir, 'go')
  const stream = await fetch(`${base}/v1/sessions/${session}/execute`, {
    method: 'POST',
    headers: { ...auth(), 'content-type': 'application/json' },
    body: JSON.stringify({ language: 'shell', code: `while [ ! -e '${gate}' ]; do sleep 0.05; done; echo released`, stream: true }),
  })
  t.equal(stream.status, 200)
  t.match(stream.headers.get('content-type'), /^text\/event-stream/)

  const silent = await rawClient(t, port)
  const headers = await rawClient(t, port, 'GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: ')
  const body = await rawClient(
    t,
    port,
    `POST /v1/sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer test-admin-key\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"ti`,
  )
  for (const [name, client] of [
    ['nothing sent', silent],
    ['headers never finished', headers],
    ['body never finished', body],
  ] as const) {
    const response = await client.ended
    t.match(response, /^HTTP\/1\.1 408 Request Timeout\r\n/, name)
    t.match(response, /\r\nConnection: close\r\n/i, name)
    t.same(envelopeOf(response), {
      error: { message: 'The request did not arrive in time', type: 'invalid_request_error', code: 'request_timeout', param: null },
    })
  }

  // both long-lived responses still work
  await app.bus.append(session, 'custom', { after: 'timeouts' })
  const live = await new Promise((resolve) => ws.on('message', (data) => JSON.parse(String(data)).type === 'event' && resolve(JSON.parse(String(data)))))
  t.match(live, { type: 'event', event: { type: 'custom', data: { after: 'timeouts' } } })
  t.equal(ws.readyState, WebSocket.OPEN)
  writeFileSync(gate, '')
  const events = parseSse(await stream.text())
  t.match(
    events.find((e) => e.event === 'message' && e.data.includes('released')),
    { event: 'message' },
    'the stream ran to its end',
  )
  t.equal(events.at(-1)?.event, 'done')
})

t.test('an answer sent before the body was read closes the connection after it', async (t) => {
  const app = await build(t, { BODY_LIMIT: '1024' })
  const port = await listen(app)
  // 413 from Content-Length alone; the body is then sent in full and thrown away
  const body = 'x'.repeat(200_000)
  const tooLarge = await rawClient(
    t,
    port,
    `POST /v1/sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer test-admin-key\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n`,
  )
  tooLarge.socket.write(body)
  const response = await tooLarge.ended
  t.match(response, /^HTTP\/1\.1 413 /)
  t.match(response, /\r\nconnection: close\r\n/i)
  t.match(envelopeOf(response), { error: { code: 'payload_too_large', type: 'validation_error' } })

  // a small body answered normally keeps the connection alive
  const kept = await rawClient(t, port, 'POST /v1/sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer test-admin-key\r\nContent-Length: 0\r\n\r\n')
  const first = await new Promise<string>((resolve) => kept.socket.once('data', (d) => resolve(String(d))))
  t.match(first, /^HTTP\/1\.1 201 /)
  t.match(first, /\r\nconnection: keep-alive\r\n/i)
  kept.socket.destroy()
})
