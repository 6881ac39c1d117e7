import { isIPv6, Socket } from 'node:net'
import type { FastifyInstance, FastifyRequest } from 'fastify'
import fp from 'fastify-plugin'

export interface ConnectionOptions {
  /** Open connections one client address may hold; 0 = no cap. */
  maxPerAddress: number
  /** Body bytes read and thrown away after an early answer before the connection is cut. */
  drainBytes: number
}

/**
 * The address a connection cap counts: IPv4 as it is, IPv6 by its /64, since one client is
 * usually given a whole /64 and could otherwise open a fresh address for every connection.
 */
export function addressKey(address: string | undefined): string {
  if (!address) return 'unknown'
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(address)
  if (mapped) return mapped[1]!
  const plain = address.split('%')[0]!
  if (!isIPv6(plain)) return plain
  const [head = '', tail] = plain.split('::')
  const groups = (part: string) => (part ? part.split(':').flatMap((g) => (g.includes('.') ? ['0', '0'] : [g])) : [])
  const front = groups(head)
  const back = tail === undefined ? [] : groups(tail)
  const all = [...front, ...Array<string>(8 - front.length - back.length).fill('0'), ...back]
  return `${all.slice(0, 4).map((g) => parseInt(g, 16).toString(16)).join(':')}::/64`
}

/** A request whose body is still arriving: answering it now leaves unread bytes on the socket. */
function bodyPending(request: FastifyRequest): boolean {
  const raw = request.raw
  if (raw.complete || !(raw.socket instanceof Socket)) return false
  return raw.headers['transfer-encoding'] !== undefined || Number(raw.headers['content-length']) > 0
}

/**
 * Closes the connection of an answer sent before the request body was read (413, 401, 415, 429
 * and the like) without losing that answer. Node's server calls `socket.destroySoon()` after a
 * `Connection: close` response; with body bytes still unread the kernel then answers the
 * client's next segment with a reset, and a client still sending (fetch with a 60 MB body) gets
 * EPIPE instead of the response. So the response goes out, the writing side is ended, and the
 * rest of the body is read and thrown away until it ends (the client saw the answer and stopped,
 * or finished) or `limit` bytes went by; then the socket is closed. REQUEST_TIMEOUT_MS bounds
 * the time this takes like any other body.
 */
function lingerAfterAnswer(request: FastifyRequest, limit: number, lingering: Set<Socket>): void {
  const req = request.raw
  const socket = req.socket as Socket & { destroySoon?: () => void }
  if (lingering.has(socket)) return
  let drained = 0
  req.on('data', (chunk: Buffer) => {
    drained += chunk.length
    if (drained > limit) socket.destroy()
  })
  req.resume()
  const destroySoon = socket.destroySoon
  socket.destroySoon = () => {
    if (req.complete) return destroySoon?.call(socket)
    socket.end()
    req.once('end', () => socket.destroy())
  }
  lingering.add(socket)
  socket.once('close', () => lingering.delete(socket))
}

/**
 * Transport limits below the routes: a cap on open connections per client address (checked on
 * accept, before TLS or any byte of HTTP, so half-sent requests cannot use up descriptors), and
 * a clean close after an answer sent while the body was still arriving.
 */
export default fp(
  async function connections(app: FastifyInstance, opts: ConnectionOptions) {
    if (opts.maxPerAddress > 0) {
      const open = new Map<string, number>()
      app.server.on('connection', (socket: Socket) => {
        const key = addressKey(socket.remoteAddress)
        const count = open.get(key) ?? 0
        if (count >= opts.maxPerAddress) {
          app.metrics.connectionsRefused.inc()
          socket.destroy()
          return
        }
        open.set(key, count + 1)
        socket.once('close', () => {
          const left = (open.get(key) ?? 1) - 1
          if (left > 0) open.set(key, left)
          else open.delete(key)
        })
      })
    }

    const lingering = new Set<Socket>()
    // a callback hook: an async one costs a promise and a microtask on every response
    app.addHook('onSend', (request, reply, payload, done) => {
      if (bodyPending(request)) {
        reply.header('connection', 'close')
        lingerAfterAnswer(request, opts.drainBytes, lingering)
      }
      done(null, payload)
    })
    // before the server stops listening, which would otherwise wait for these to drain
    app.addHook('preClose', async () => {
      for (const socket of lingering) socket.destroy()
    })
  },
  { name: 'connections', dependencies: ['metrics'] },
)
