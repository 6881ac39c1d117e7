import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox'
import { principal } from '../plugins/auth.js'
import { protectedErrors, SessionIdParams } from '../schemas/common.js'
import { Binary } from '../schemas/files.js'
import { CreatedSession, METADATA_MAX_BYTES } from '../schemas/sessions.js'
import { ExportQuery, SessionExport } from '../schemas/transfer.js'
import { ApiError, invalidRequest } from '../services/errors.js'
import { openExportZip, type SessionExport as ExportDocument, TransferService, type ZipFiles } from '../services/transfer.js'

const ImportBody = {
  content: {
    'application/json': { schema: SessionExport },
    'application/zip': { schema: { type: 'string', format: 'binary', description: 'A zip from export?workspace=true' } },
  },
}

const ExportResponse = {
  description: 'The export: JSON, or the zip with ?workspace=true',
  content: { 'application/json': { schema: SessionExport }, 'application/zip': { schema: Binary } },
}

/** Session export (JSON, or a zip with the workspace) and import as a new session of the caller. */
const transfer: FastifyPluginAsyncTypebox<{ maxFileBytes: number }> = async (app, opts) => {
  const service = new TransferService({
    store: app.store,
    bus: app.bus,
    sessions: app.sessions,
    settings: app.settings,
    workspaces: app.workspaces,
    maxFileBytes: opts.maxFileBytes,
  })
  app.addContentTypeParser('application/zip', { parseAs: 'buffer' }, (_request, body, done) => done(null, body))

  app.get(
    '/v1/sessions/:id/export',
    {
      schema: {
        operationId: 'exportSession',
        tags: ['sessions'],
        summary: 'Export a session: messages, events and settings as JSON, or with ?workspace=true a zip that adds the workspace',
        description:
          'The zip holds session.json (the same document) and the workspace files under workspace/. Kernel state (variables, imports) is not exported: an imported session starts with fresh kernels.',
        params: SessionIdParams,
        querystring: ExportQuery,
        response: protectedErrors(404),
      },
      // Two media types for one status: documented here, the JSON body is serialized as it is
      config: {
        swaggerTransform: ({ schema, url }) => ({
          schema: { ...schema, response: { ...(schema as { response: object }).response, 200: ExportResponse } },
          url,
        }),
      },
    },
    async (request, reply) => {
      const { tenantId } = principal(request)
      if (!request.query.workspace) return service.document(tenantId, request.params.id)
      const zip = await service.zip(tenantId, request.params.id)
      reply.type('application/zip')
      reply.header('content-disposition', `attachment; filename="session-${request.params.id.replace(/[^\w-]/g, '')}.zip"`)
      return reply.send(zip)
    },
  )

  app.post(
    '/v1/sessions/import',
    {
      config: { swaggerTransform: ({ schema, url }) => ({ schema: { ...schema, body: ImportBody }, url }) },
      schema: {
        operationId: 'importSession',
        tags: ['sessions'],
        summary: 'Make a new session from an export (JSON, or the zip with its workspace)',
        description: 'Limited by BODY_LIMIT. Messages get new ids; events are renumbered; a session_imported event ends the log. Settings in the export are not applied.',
        response: { 201: CreatedSession, ...protectedErrors(400, 413, 415) },
      },
    },
    async (request, reply) => {
      const { tenantId } = principal(request)
      const type = (request.headers['content-type'] ?? '').split(';')[0]!.trim().toLowerCase()
      let document: unknown
      let files: ZipFiles | undefined
      if (type === 'application/zip') {
        ;({ document, files } = await openExportZip(request.body as Buffer, opts.maxFileBytes))
      } else if (type === 'application/json') {
        document = request.body
      } else {
        throw new ApiError(415, 'validation_error', 'unsupported_media_type', 'Send the export as application/json or application/zip')
      }
      const valid = request.compileValidationSchema(SessionExport)
      if (!valid(document)) {
        const first = valid.errors?.[0]
        throw invalidRequest(`Not a session export: ${first?.instancePath || '/'} ${first?.message ?? 'is invalid'}`, first?.instancePath.replace(/^\//, '').replaceAll('/', '.') || 'body', 'invalid_export')
      }
      const parsed = document as ExportDocument
      if (Buffer.byteLength(JSON.stringify(parsed.session.metadata)) > METADATA_MAX_BYTES)
        throw invalidRequest(`metadata must be at most ${METADATA_MAX_BYTES} bytes as JSON`, 'session.metadata')
      const session = await service.import(tenantId, parsed, files)
      reply.code(201)
      return { session_id: session.id, created_at: session.createdAt, model: session.model, title: session.title, metadata: session.metadata }
    },
  )
}

export default transfer
