import { createServer, type Server } from 'node:net'
import type { AddressInfo } from 'node:net'
import type { IncomingMessage } from 'node:http'
import type { FastifyInstance } from 'fastify'
import fp from 'fastify-plugin'
import { OiCompat } from '../services/oi-compat.js'

declare module 'fastify' {
  interface FastifyInstance {
    oiCompat: OiCompat
    /**
     * Opens the Open Interpreter listener (`OI_COMPAT_PORT`): its connections are served by this
     * app, with every path under `OI_COMPAT_PREFIX`, so unchanged clients dial its root. Returns
     * the port it listens on; it closes with the app.
     */
    listenOiCompat(opts: { host: string; port: number }): Promise<number>
  }
}

/** Where the Open Interpreter protocol is mounted on the main port. */
export const OI_COMPAT_PREFIX = '/oi'

/**
 * Ports whose requests are Open Interpreter ones. `rewriteUrl` (set when the app is built, before
 * routing, also for WebSocket upgrades) puts their paths under the prefix.
 */
export class CompatPorts {
  private readonly ports = new Set<number>()

  add(port: number): void {
    this.ports.add(port)
  }

  delete(port: number): void {
    this.ports.delete(port)
  }

  rewrite(req: IncomingMessage): string {
    const url = req.url ?? '/'
    const port = req.socket.localPort
    if (port === undefined || !this.ports.has(port)) return url
    return `${OI_COMPAT_PREFIX}${url}`
  }
}

/**
 * The Open Interpreter protocol's service (one default session and channel per tenant) and its
 * optional listener. The listener hands each accepted connection to the main HTTP(S) server, so
 * TLS, timeouts, connection limits, rate limits and the error envelope are the same on both ports.
 */
export default fp(
  async function oiCompat(app: FastifyInstance, opts: { ports: CompatPorts }) {
    const service = new OiCompat({
      store: app.store,
      bus: app.bus,
      chat: app.chat,
      runs: app.runs,
      sessions: app.sessions,
      settings: app.settings,
      onError: (err) => app.log.error({ err }, 'Open Interpreter channel failed'),
    })
    app.decorate('oiCompat', service)
    const listeners: Server[] = []
    app.decorate('listenOiCompat', async ({ host, port }: { host: string; port: number }) => {
      const listener = createServer({ pauseOnConnect: false }, (socket) => app.server.emit('connection', socket))
      await new Promise<void>((resolve, reject) => {
        listener.once('error', reject)
        listener.listen(port, host, () => {
          listener.off('error', reject)
          resolve()
        })
      })
      const bound = (listener.address() as AddressInfo).port
      opts.ports.add(bound)
      listeners.push(listener)
      return bound
    })
    app.addHook('preClose', async () => {
      await service.close()
    })
    app.addHook('onClose', async () => {
      await Promise.all(
        listeners.map(
          (listener) =>
            new Promise<void>((resolve) => {
              const port = (listener.address() as AddressInfo | null)?.port
              if (port !== undefined) opts.ports.delete(port)
              listener.close(() => resolve())
            }),
        ),
      )
    })
  },
  { name: 'oi-compat', dependencies: ['agent', 'sessions', 'store'] },
)
