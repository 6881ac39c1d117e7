import type { FastifyInstance } from 'fastify'
import fp from 'fastify-plugin'
import { createMetrics, type Metrics } from '../services/metrics.js'

declare module 'fastify' {
  interface FastifyInstance {
    metrics: Metrics
  }
}

/**
 * Records every response; GET /metrics (routes/metrics.ts) serves the registry behind auth.
 * prom-client finds a series by hashing its label object on every call; the series of each
 * (method, route, status) are looked up once and kept (routes are templates, so they are few).
 */
export default fp(
  async function metrics(app: FastifyInstance) {
    const metrics = createMetrics()
    app.decorate('metrics', metrics)
    const series = new Map<string, { requests: ReturnType<Metrics['httpRequests']['labels']>; duration: ReturnType<Metrics['httpDuration']['labels']> }>()
    app.addHook('onResponse', (request, reply, done) => {
      const route = request.routeOptions.url ?? 'unmatched'
      const status = String(reply.statusCode)
      const key = `${request.method} ${status} ${route}`
      let found = series.get(key)
      if (!found) {
        found = {
          requests: metrics.httpRequests.labels(request.method, route, status),
          duration: metrics.httpDuration.labels(request.method, route, status),
        }
        series.set(key, found)
      }
      found.requests.inc()
      found.duration.observe(reply.elapsedTime / 1000)
      done()
    })
  },
  { name: 'metrics' },
)
