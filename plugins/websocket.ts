import websocket from '@fastify/websocket'
import type { FastifyInstance } from 'fastify'
import fp from 'fastify-plugin'
import type { WebSocket } from 'ws'

/** WebSocket close codes of the API (documented in the README). */
export const CLOSE = { unauthorized: 4001, notFound: 4004, tooSlow: 4008 } as const
export const TOO_SLOW_REASON = 'subscriber too slow; reconnect with latest_event_id'

export interface WebSocketOptions {
  maxPayload: number
  /** How often every socket is pinged; see below. */
  pingIntervalMs: number
}

/**
 * WebSocket support with a heartbeat. Every interval each open socket is pinged; one that has
 * not answered the previous ping is not reading (or is gone): it is closed with 4008. A socket
 * still closing one interval later (its close frame queued behind data nobody reads) is
 * terminated, which frees its buffers. One timer serves every socket; a client that reads
 * answers pings without any code of its own (browsers and `ws` do it).
 */
export default fp(
  async function sockets(app: FastifyInstance, opts: WebSocketOptions) {
    await app.register(websocket, { options: { maxPayload: opts.maxPayload } })
    const server = app.websocketServer
    const unanswered = new WeakSet<WebSocket>()
    const closing = new WeakSet<WebSocket>()
    server.on('connection', (socket: WebSocket) => {
      socket.on('pong', () => unanswered.delete(socket))
    })
    const beat = () => {
      for (const socket of server.clients) {
        if (socket.readyState === socket.CLOSING) {
          if (closing.has(socket)) socket.terminate()
          else closing.add(socket)
        } else if (socket.readyState === socket.OPEN) {
          if (unanswered.has(socket)) {
            socket.close(CLOSE.tooSlow, TOO_SLOW_REASON)
          } else {
            unanswered.add(socket)
            socket.ping()
          }
        }
      }
    }
    const timer = setInterval(beat, opts.pingIntervalMs).unref()
    app.addHook('onClose', async () => clearInterval(timer))
  },
  { name: 'websocket' },
)
