import type { FastifyInstance } from 'fastify'
import fp from 'fastify-plugin'

/** Throws when not ready; an object it returns is shown as the check's `details`. */
export type Check = () => Promise<unknown> | unknown

declare module 'fastify' {
  interface FastifyInstance {
    /** Named checks behind GET /v1/health/ready; each plugin adds its own. */
    readiness: Map<string, Check>
  }
}

export default fp(
  async function readiness(app: FastifyInstance) {
    app.decorate('readiness', new Map<string, Check>())
  },
  { name: 'readiness' },
)
