import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox'
import { Type } from '@sinclair/typebox'
import { requireAdmin } from '../plugins/auth.js'
import { protectedErrors } from '../schemas/common.js'

/**
 * Prometheus exposition, behind the same bearer auth as the API (no separate port to secure),
 * for admin keys only: the series describe every tenant's traffic and the whole host.
 */
const metrics: FastifyPluginAsyncTypebox = async (app) => {
  app.get(
    '/metrics',
    {
      preHandler: requireAdmin,
      schema: {
        operationId: 'getMetrics',
        tags: ['metrics'],
        summary: 'Prometheus metrics (admin keys only)',
        produces: ['text/plain'],
        response: { 200: Type.String({ description: 'Prometheus text format' }), ...protectedErrors(403) },
      },
    },
    async (_request, reply) => {
      reply.type(app.metrics.registry.contentType)
      return app.metrics.registry.metrics()
    },
  )
}

export default metrics
