import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox'
import { Type } from '@sinclair/typebox'
import { principal } from '../plugins/auth.js'
import { protectedErrors, SessionIdParams } from '../schemas/common.js'
import {
  CreatedSession,
  CreateSessionBody,
  ListMessagesQuery,
  ListSessionsQuery,
  METADATA_MAX_BYTES,
  MessageList,
  PatchSessionBody,
  Session,
  SessionList,
} from '../schemas/sessions.js'
import { invalidRequest } from '../services/errors.js'
import type { SessionRecord } from '../services/store/types.js'

const view = (s: SessionRecord) => ({
  session_id: s.id,
  created_at: s.createdAt,
  updated_at: s.updatedAt,
  model: s.model,
  title: s.title,
  metadata: s.metadata,
  message_count: s.messageCount,
})

function checkMetadata(metadata: Record<string, unknown> | undefined) {
  if (metadata && Buffer.byteLength(JSON.stringify(metadata)) > METADATA_MAX_BYTES)
    throw invalidRequest(`metadata must be at most ${METADATA_MAX_BYTES} bytes as JSON`, 'metadata')
}

const sessions: FastifyPluginAsyncTypebox = async (app) => {
  app.post(
    '/v1/sessions',
    {
      schema: {
        operationId: 'createSession',
        tags: ['sessions'],
        summary: 'Create a session (the body is optional)',
        body: Type.Optional(CreateSessionBody),
        response: { 201: CreatedSession, ...protectedErrors(400) },
      },
      // no body at all (and no content type) is a valid request: treat it as {}
      preValidation: async (request) => {
        request.body ??= {}
      },
    },
    async (request, reply) => {
      checkMetadata(request.body.metadata)
      const s = await app.sessions.create(principal(request).tenantId, request.body)
      return reply.code(201).send({ session_id: s.id, created_at: s.createdAt, model: s.model, title: s.title, metadata: s.metadata })
    },
  )

  app.get(
    '/v1/sessions',
    {
      schema: {
        operationId: 'listSessions',
        tags: ['sessions'],
        summary: 'List sessions, newest first',
        querystring: ListSessionsQuery,
        response: { 200: SessionList, ...protectedErrors(400) },
      },
    },
    async (request) => {
      const page = await app.sessions.list(principal(request).tenantId, request.query)
      return { sessions: page.items.map(view), next_cursor: page.nextCursor }
    },
  )

  app.get(
    '/v1/sessions/:id',
    {
      schema: { operationId: 'getSession', tags: ['sessions'], summary: 'Get a session', params: SessionIdParams, response: { 200: Session, ...protectedErrors(404) } },
    },
    async (request) => view(await app.sessions.get(principal(request).tenantId, request.params.id)),
  )

  app.patch(
    '/v1/sessions/:id',
    {
      schema: {
        operationId: 'updateSession',
        tags: ['sessions'],
        summary: 'Update title or metadata',
        params: SessionIdParams,
        body: PatchSessionBody,
        response: { 200: Session, ...protectedErrors(400, 404) },
      },
    },
    async (request) => {
      checkMetadata(request.body.metadata)
      return view(await app.sessions.update(principal(request).tenantId, request.params.id, request.body))
    },
  )

  app.delete(
    '/v1/sessions/:id',
    {
      config: { sessionOwner: 'params' },
      schema: {
        operationId: 'deleteSession',
        tags: ['sessions'],
        summary: 'Delete a session, its messages, kernels and workspace',
        params: SessionIdParams,
        response: { 204: Type.Null({ description: 'Deleted' }), ...protectedErrors(404) },
      },
    },
    async (request, reply) => {
      await app.sessions.delete(principal(request).tenantId, request.params.id)
      return reply.code(204).send(null)
    },
  )

  app.get(
    '/v1/sessions/:id/messages',
    {
      schema: {
        operationId: 'listMessages',
        tags: ['sessions'],
        summary: 'List the stored LMC messages, oldest first',
        params: SessionIdParams,
        querystring: ListMessagesQuery,
        response: { 200: MessageList, ...protectedErrors(400, 404) },
      },
    },
    async (request) => {
      const session = await app.sessions.get(principal(request).tenantId, request.params.id)
      const { messages, hasMore } = await app.store.listMessages(session.id, request.query)
      return { messages, has_more: hasMore }
    },
  )

  app.delete(
    '/v1/sessions/:id/messages',
    {
      schema: {
        operationId: 'clearMessages',
        tags: ['sessions'],
        summary: 'Clear the conversation history',
        params: SessionIdParams,
        response: { 204: Type.Null({ description: 'Cleared' }), ...protectedErrors(404) },
      },
    },
    async (request, reply) => {
      const session = await app.sessions.get(principal(request).tenantId, request.params.id)
      await app.store.clearMessages(session.id)
      return reply.code(204).send(null)
    },
  )
}

export default sessions
