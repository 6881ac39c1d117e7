import swagger from '@fastify/swagger'
import swaggerUi from '@fastify/swagger-ui'
import type { FastifyInstance } from 'fastify'
import fp from 'fastify-plugin'

/**
 * OpenAPI 3.1 generated from the route schemas, served at /openapi.json, with Swagger UI at
 * /docs. Registered before the routes (it collects them as they are added) and before the rate
 * limiter (the docs are public and not limited).
 */
export default fp(
  async function openapi(app: FastifyInstance, opts: { version: string }) {
    await app.register(swagger, {
      refResolver: { buildLocalReference: (json, _base, _fragment, i) => (json.$id as string) ?? `def-${i}` },
      openapi: {
        openapi: '3.1.0',
        info: {
          title: 'oi-server',
          version: opts.version,
          description:
            'An Open Interpreter-style code agent over HTTP: native REST + SSE, an OpenAI-compatible API and a control plane.',
        },
        components: { securitySchemes: { bearerAuth: { type: 'http', scheme: 'bearer' } } },
        security: [{ bearerAuth: [] }],
        tags: [
          { name: 'health', description: 'Liveness and readiness' },
          { name: 'sessions', description: 'Sessions and their messages' },
          { name: 'chat', description: 'The agent' },
          { name: 'openai', description: 'OpenAI-compatible API' },
          { name: 'execute', description: 'Code execution in the session kernel' },
          { name: 'files', description: 'The session workspace' },
          { name: 'events', description: 'Event log and live socket' },
          { name: 'keys', description: 'Managed API keys (admin)' },
          { name: 'settings', description: 'Per-tenant settings and secrets' },
          { name: 'metrics', description: 'Prometheus metrics' },
        ],
      },
    })
    await app.register(swaggerUi, {
      routePrefix: '/docs',
      uiConfig: { persistAuthorization: true, tryItOutEnabled: true },
      staticCSP: false,
    })
    app.get('/openapi.json', { schema: { hide: true } }, async () => app.swagger())
  },
  { name: 'swagger' },
)
