import swagger from '@fastify/swagger'
import swaggerUi from '@fastify/swagger-ui'
import { OptionalKind } from '@sinclair/typebox'
import type { FastifyInstance } from 'fastify'
import fp from 'fastify-plugin'

type Operation = {
  operationId?: string
  parameters?: { required?: boolean; schema?: { default?: unknown } }[]
  requestBody?: { required?: boolean }
}
type RouteSchema = { operationId?: string; body?: object; params?: { properties?: Record<string, { title?: string }>; required?: string[] } }

const AUTH_DESCRIPTION = [
  'Paste an API key as it is, without `Bearer `:',
  '- the **admin key**: `API_KEY`, or, when that is unset, the key the server generated on its first start. It is kept in',
  '  `DATA_DIR/admin.key` (`cat data/admin.key`), printed in the banner of that start and reused by every restart;',
  '- or a **managed key** made with `POST /v1/keys`: it sees only its own sessions, settings and secrets.',
  '',
  'Swagger UI keeps the key in this browser, so it survives a reload.',
].join('\n')

/**
 * A trailing `*` is how Fastify matches the rest of a path, slashes included; OpenAPI has no such
 * parameter. It is documented as a named path parameter (the `title` of the params schema's `*`
 * property): a client that encodes the value (`a%2Fb`) reaches the same route.
 */
function namedWildcard(url: string, schema: RouteSchema): { url: string; schema: RouteSchema } | undefined {
  const wildcard = schema.params?.properties?.['*']
  if (!url.endsWith('/*') || !wildcard?.title) return undefined
  const { title, ...param } = wildcard
  return {
    url: `${url.slice(0, -1)}:${title}`,
    schema: { ...schema, params: { ...schema.params, properties: { [title]: param }, required: [title] } },
  }
}

/**
 * OpenAPI 3.1 generated from the route schemas, served at /openapi.json, with Swagger UI at
 * /docs. Registered before the routes (it collects them as they are added) and before the rate
 * limiter (the docs are public and not limited).
 */
export default fp(
  async function openapi(app: FastifyInstance, opts: { version: string }) {
    // operations whose body may be left out (`body: Type.Optional(...)`): @fastify/swagger marks
    // every body required, and a generated client would then insist on one
    const optionalBodies = new Set<string>()
    await app.register(swagger, {
      refResolver: { buildLocalReference: (json, _base, _fragment, i) => (json.$id as string) ?? `def-${i}` },
      openapi: {
        openapi: '3.1.0',
        info: {
          title: 'oi-server',
          version: opts.version,
          description:
            'An Open Interpreter-style code agent over HTTP: native REST + SSE, an OpenAI-compatible API and a control plane.',
          license: { name: 'MIT', identifier: 'MIT' },
        },
        servers: [{ url: '/', description: 'The server that serves this document' }],
        components: {
          securitySchemes: {
            bearerAuth: { type: 'http', scheme: 'bearer', description: AUTH_DESCRIPTION },
            oiApiKey: { type: 'apiKey', in: 'header', name: 'X-API-KEY', description: 'The same key, as Open Interpreter clients send it (routes under /oi only)' },
          },
        },
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
          { name: 'open-interpreter', description: "Open Interpreter's --server protocol, under /oi (and at the root of OI_COMPAT_PORT)" },
          { name: 'mcp', description: 'Model Context Protocol server (Streamable HTTP)' },
        ],
      },
      transform: ({ schema, url }) => {
        const routeSchema = schema as RouteSchema
        if (routeSchema?.operationId && routeSchema.body && OptionalKind in routeSchema.body) optionalBodies.add(routeSchema.operationId)
        return (routeSchema && namedWildcard(url, routeSchema)) ?? { schema, url }
      },
      transformObject: (document) => {
        if (!('openapiObject' in document)) return document.swaggerObject
        const { openapiObject } = document
        for (const item of Object.values(openapiObject.paths ?? {})) {
          for (const operation of Object.values(item as Record<string, Operation>)) {
            if (operation.requestBody && optionalBodies.has(operation.operationId ?? '')) operation.requestBody.required = false
            // a parameter with a default need not be sent
            for (const parameter of operation.parameters ?? []) if (parameter.schema?.default !== undefined) parameter.required = false
          }
        }
        return openapiObject
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
