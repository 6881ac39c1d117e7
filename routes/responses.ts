import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox'
import type { FastifyRequest } from 'fastify'
import { principal } from '../plugins/auth.js'
import { disconnectSignal, streamRun } from '../plugins/sse.js'
import { protectedErrors } from '../schemas/common.js'
import {
  InputItemList,
  InputItemsQuery,
  ResponseCreateBody,
  ResponseDeleted,
  ResponseIdParams,
  ResponseObject,
  ResponseStreamEvent,
} from '../schemas/responses.js'
import { jsonOrEventStream } from '../schemas/streams.js'

/** OpenAI's Responses API: thin HTTP over services/responses.ts. */
const responses: FastifyPluginAsyncTypebox = async (app) => {
  const sessionOf = (request: FastifyRequest) => app.responses.namedSession(principal(request).tenantId, request.body)

  app.post(
    '/v1/responses',
    {
      config: { sessionRateLimit: sessionOf, idempotent: true, sessionOwner: sessionOf },
      schema: {
        operationId: 'createResponse',
        tags: ['openai'],
        summary: 'OpenAI Responses API, with the code interpreter running in this server\'s kernels',
        description:
          'The `code_interpreter` tool runs code in a session (its container id is the session id; `{"type": "auto"}` makes one, or reuses the previous response\'s). `previous_response_id` continues a response in its session. The response carries `X-Session-Id`.',
        body: ResponseCreateBody,
        response: { 200: jsonOrEventStream('The response', ResponseObject, ResponseStreamEvent), ...protectedErrors(400, 404, 409, 422, 502, 503, 504) },
      },
    },
    async (request, reply) => {
      const { tenantId } = principal(request)
      const prepared = await app.responses.prepare(tenantId, request.body)
      reply.header('x-session-id', prepared.session.id)
      if (prepared.background) return app.responses.background(prepared)
      if (!request.body.stream) return app.responses.run(prepared, { signal: disconnectSignal(reply) })
      let sequence = 0
      return streamRun(request, reply, {
        hold: true,
        start: (send, started) =>
          app.responses.run(prepared, {
            onStart: started,
            emit: (event) => {
              sequence = event.sequence_number + 1
              send(event, event.type)
            },
          }),
        stop: () => app.runs.stop(prepared.session.id),
        done: () => {},
        // Only a fault of the server itself lands here; the service reports the turn's own failures.
        error: (sse, { error }) => sse.send({ ...error, type: 'error', sequence_number: sequence }, 'error'),
      })
    },
  )

  app.get(
    '/v1/responses/:id',
    {
      schema: {
        operationId: 'getResponse',
        tags: ['openai'],
        summary: 'Get a stored response (also while it runs)',
        params: ResponseIdParams,
        response: { 200: ResponseObject, ...protectedErrors(404) },
      },
    },
    async (request) => app.responses.get(principal(request).tenantId, request.params.id),
  )

  app.delete(
    '/v1/responses/:id',
    {
      schema: {
        operationId: 'deleteResponse',
        tags: ['openai'],
        summary: 'Delete a stored response (its session stays)',
        params: ResponseIdParams,
        response: { 200: ResponseDeleted, ...protectedErrors(404) },
      },
    },
    async (request) => app.responses.delete(principal(request).tenantId, request.params.id),
  )

  app.post(
    '/v1/responses/:id/cancel',
    {
      schema: {
        operationId: 'cancelResponse',
        tags: ['openai'],
        summary: 'Cancel a running response: the upstream call is aborted and its code interrupted',
        params: ResponseIdParams,
        response: { 200: ResponseObject, ...protectedErrors(400, 404) },
      },
    },
    async (request) => app.responses.cancel(principal(request).tenantId, request.params.id),
  )

  app.get(
    '/v1/responses/:id/input_items',
    {
      schema: {
        operationId: 'listResponseInputItems',
        tags: ['openai'],
        summary: 'The input items of a stored response',
        params: ResponseIdParams,
        querystring: InputItemsQuery,
        response: { 200: InputItemList, ...protectedErrors(400, 404) },
      },
    },
    async (request) => app.responses.inputItems(principal(request).tenantId, request.params.id, request.query),
  )
}

export default responses
