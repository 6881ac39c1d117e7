import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox'
import { Type } from '@sinclair/typebox'
import { principal } from '../plugins/auth.js'
import { protectedErrors } from '../schemas/common.js'
import { Settings, SettingsPatch } from '../schemas/settings.js'
import { notFound } from '../services/errors.js'
import { ENV_NAME_PATTERN } from '../services/kernels/environment.js'

const SecretName = Type.String({ pattern: ENV_NAME_PATTERN, description: 'An environment variable name', examples: ['API_TOKEN'] })

/** Per-tenant settings and secrets. Secret values go in and never come out. */
const settings: FastifyPluginAsyncTypebox = async (app) => {
  app.get(
    '/v1/settings',
    { schema: { operationId: 'getSettings', tags: ['settings'], summary: "The caller's effective settings", response: { 200: Settings, ...protectedErrors() } } },
    async (request) => app.settings.get(principal(request).tenantId),
  )

  app.patch(
    '/v1/settings',
    {
      schema: {
        operationId: 'updateSettings',
        tags: ['settings'],
        summary: 'Change settings (null resets a field to the server default)',
        body: SettingsPatch,
        response: { 200: Settings, ...protectedErrors(400) },
      },
    },
    async (request) => app.settings.patch(principal(request).tenantId, request.body),
  )

  app.get(
    '/v1/secrets',
    {
      schema: {
        operationId: 'listSecrets',
        tags: ['settings'],
        summary: 'List secret names (never values)',
        response: {
          200: Type.Object(
            { secrets: Type.Array(Type.Object({ name: Type.String(), created_at: Type.String(), updated_at: Type.String() })) },
            { description: 'The secret names' },
          ),
          ...protectedErrors(),
        },
      },
    },
    async (request) => ({ secrets: await app.secrets.list(principal(request).tenantId) }),
  )

  app.put(
    '/v1/secrets/:name',
    {
      schema: {
        operationId: 'setSecret',
        tags: ['settings'],
        summary: "Set a secret: encrypted at rest, injected into the tenant's kernels, masked in output",
        params: Type.Object({ name: SecretName }),
        body: Type.Object({ value: Type.String({ minLength: 1, maxLength: 65_536 }) }, { additionalProperties: false, examples: [{ value: 's3cr3t' }] }),
        response: { 204: Type.Null({ description: 'Stored' }), ...protectedErrors(400) },
      },
    },
    async (request, reply) => {
      await app.secrets.put(principal(request).tenantId, request.params.name, request.body.value)
      return reply.code(204).send(null)
    },
  )

  app.delete(
    '/v1/secrets/:name',
    {
      schema: {
        operationId: 'deleteSecret',
        tags: ['settings'],
        summary: 'Delete a secret',
        params: Type.Object({ name: Type.String({ maxLength: 100, examples: ['API_TOKEN'] }) }),
        response: { 204: Type.Null({ description: 'Deleted' }), ...protectedErrors(404) },
      },
    },
    async (request, reply) => {
      if (!(await app.secrets.delete(principal(request).tenantId, request.params.name))) throw notFound('Secret')
      return reply.code(204).send(null)
    },
  )
}

export default settings
