import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox'
import { Type } from '@sinclair/typebox'
import { requireAdmin } from '../plugins/auth.js'
import { protectedErrors } from '../schemas/common.js'
import { newApiKey } from '../services/auth.js'
import { invalidRequest, notFound } from '../services/errors.js'
import type { ApiKeyRecord } from '../services/store/types.js'

const KeyView = Type.Object({
  id: Type.String(),
  name: Type.String(),
  prefix: Type.String({ description: 'The first characters of the key, to recognise it' }),
  created_at: Type.String(),
  expires_at: Type.Union([Type.String(), Type.Null()]),
  last_used_at: Type.Union([Type.String(), Type.Null()]),
})
const CreatedKey = Type.Composite([KeyView, Type.Object({ key: Type.String({ description: 'Shown once; only its hash is stored' }) })], {
  description: 'The new key',
})

const view = (k: ApiKeyRecord) => ({
  id: k.id,
  name: k.name,
  prefix: k.prefix,
  created_at: k.createdAt,
  expires_at: k.expiresAt,
  last_used_at: k.lastUsedAt,
})

/** Managed API keys: admin keys only. Each managed key is a tenant of its own. */
const keys: FastifyPluginAsyncTypebox = async (app) => {
  app.addHook('preHandler', requireAdmin)

  app.post(
    '/v1/keys',
    {
      schema: {
        operationId: 'createKey',
        tags: ['keys'],
        summary: 'Create an API key (the key is shown once)',
        body: Type.Object(
          {
            name: Type.String({ minLength: 1, maxLength: 100, pattern: '^[^\\u0000]*$' }),
            // A type list, not a union with Null: under the server's type coercion "" would fall
            // into the null branch and make a key that never expires.
            expires_at: Type.Optional(Type.Unsafe<string | null>({ type: ['string', 'null'], format: 'date-time' })),
          },
          { additionalProperties: false, examples: [{ name: 'app-1', expires_at: null }] },
        ),
        response: { 201: CreatedKey, ...protectedErrors(400, 403) },
      },
    },
    async (request, reply) => {
      const expires = request.body.expires_at ? new Date(request.body.expires_at) : null
      if (expires && expires.getTime() <= Date.now()) throw invalidRequest('expires_at must be in the future', 'expires_at')
      const { key, record } = newApiKey(request.body.name, expires ? expires.toISOString() : null)
      await app.store.createApiKey(record)
      return reply.code(201).send({ ...view(record), key })
    },
  )

  app.get(
    '/v1/keys',
    {
      schema: {
        operationId: 'listKeys',
        tags: ['keys'],
        summary: 'List API keys',
        response: { 200: Type.Object({ keys: Type.Array(KeyView) }, { description: 'The managed keys' }), ...protectedErrors(403) },
      },
    },
    async () => {
      await app.keys.flush()
      return { keys: (await app.store.listApiKeys()).map(view) }
    },
  )

  app.delete(
    '/v1/keys/:id',
    {
      schema: {
        operationId: 'revokeKey',
        tags: ['keys'],
        summary: 'Revoke an API key (its next request fails; its open WebSockets close with 4001)',
        params: Type.Object({ id: Type.String() }),
        response: { 204: Type.Null({ description: 'Revoked' }), ...protectedErrors(403, 404) },
      },
    },
    async (request, reply) => {
      if (!(await app.keys.revoke(request.params.id))) throw notFound('API key')
      return reply.code(204).send(null)
    },
  )
}

export default keys
