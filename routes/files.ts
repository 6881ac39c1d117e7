import { basename } from 'node:path'
import { Readable } from 'node:stream'
import multipart, { type MultipartFile } from '@fastify/multipart'
import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox'
import { Type } from '@sinclair/typebox'
import { principal } from '../plugins/auth.js'
import { protectedErrors, SessionIdParams } from '../schemas/common.js'
import { Binary, DirQuery, Listing, ListQuery, MultipartFilesBody, PathQuery, RawFileBody, Uploaded, Written } from '../schemas/files.js'
import { ApiError, invalidRequest } from '../services/errors.js'

/**
 * The bytes of an uploaded part, failing at their end when busboy cut the part at the size limit:
 * a cut part ends like a whole one, and only the write's failure keeps the truncated copy from
 * replacing the file. Lazy, so the failure reaches the write's pipeline and nothing else.
 */
function whole(part: MultipartFile, limit: number): Readable {
  return Readable.from(
    (async function* () {
      yield* part.file
      if (part.file.truncated) throw new ApiError(413, 'validation_error', 'payload_too_large', `The file is larger than ${limit} bytes`, 'file')
    })(),
    { objectMode: false },
  )
}

/**
 * The session workspace (what the kernels see as /workspace). Content is streamed both ways
 * and binary-safe: in this scope every request body, whatever its content type, reaches the
 * handler as the raw stream (multipart uploads excepted).
 */
const files: FastifyPluginAsyncTypebox<{ maxFileBytes: number }> = async (app, opts) => {
  app.removeAllContentTypeParsers()
  await app.register(multipart, { limits: { fileSize: opts.maxFileBytes, files: 100, fields: 10 }, throwFileSizeLimit: true })
  app.addContentTypeParser('*', (_request, payload, done) => done(null, payload))

  const owned = async (tenantId: string, id: string) => (await app.sessions.get(tenantId, id)).id

  app.get(
    '/v1/sessions/:id/files',
    {
      config: { sessionOwner: 'params' },
      schema: {
        operationId: 'listFiles',
        tags: ['files'],
        summary: 'List a workspace directory, one page at a time',
        params: SessionIdParams,
        querystring: ListQuery,
        response: { 200: Listing, ...protectedErrors(400, 404) },
      },
    },
    async (request) => {
      const id = await owned(principal(request).tenantId, request.params.id)
      const { path, limit, cursor } = request.query
      const page = await app.workspaces.list(id, path, { limit, cursor })
      return { path, entries: page.entries, next_cursor: page.nextCursor }
    },
  )

  app.get(
    '/v1/sessions/:id/files/content',
    {
      config: { sessionOwner: 'params' },
      schema: {
        operationId: 'downloadFile',
        tags: ['files'],
        summary: 'Download a file',
        params: SessionIdParams,
        querystring: PathQuery,
        response: { 200: Binary, ...protectedErrors(400, 404, 413) },
      },
    },
    async (request, reply) => {
      const id = await owned(principal(request).tenantId, request.params.id)
      const { stream, size } = await app.workspaces.readStream(id, request.query.path)
      reply.type('application/octet-stream')
      reply.header('content-length', size)
      reply.header('content-disposition', `attachment; filename*=UTF-8''${encodeURIComponent(basename(request.query.path))}`)
      return reply.send(stream)
    },
  )

  app.put(
    '/v1/sessions/:id/files/content',
    {
      config: { sessionOwner: 'params', swaggerTransform: ({ schema, url }) => ({ schema: { ...schema, body: RawFileBody }, url }) },
      schema: {
        operationId: 'uploadFile',
        tags: ['files'],
        summary: 'Upload a file as the raw request body (parents are created)',
        params: SessionIdParams,
        querystring: PathQuery,
        response: { 201: Written, ...protectedErrors(400, 404, 413) },
      },
      preValidation: async (request) => {
        request.body ??= undefined
      },
    },
    async (request, reply) => {
      const id = await owned(principal(request).tenantId, request.params.id)
      const body = request.body as Readable | undefined
      if (!body || typeof (body as Readable).pipe !== 'function') throw invalidRequest('Send the file as the request body', 'body')
      const size = await app.workspaces.write(id, request.query.path, body)
      return reply.code(201).send({ path: request.query.path, size })
    },
  )

  app.delete(
    '/v1/sessions/:id/files/content',
    {
      config: { sessionOwner: 'params' },
      schema: {
        operationId: 'deleteFile',
        tags: ['files'],
        summary: 'Delete a file or directory',
        params: SessionIdParams,
        querystring: PathQuery,
        response: { 204: Type.Null({ description: 'Deleted' }), ...protectedErrors(400, 404) },
      },
    },
    async (request, reply) => {
      const id = await owned(principal(request).tenantId, request.params.id)
      await app.workspaces.remove(id, request.query.path)
      return reply.code(204).send(null)
    },
  )

  app.post(
    '/v1/sessions/:id/files/upload',
    {
      config: { sessionOwner: 'params', swaggerTransform: ({ schema, url }) => ({ schema: { ...schema, body: MultipartFilesBody }, url }) },
      schema: {
        operationId: 'uploadFiles',
        tags: ['files'],
        summary: 'Multipart upload of one or more files into a directory (?path=)',
        params: SessionIdParams,
        querystring: DirQuery,
        consumes: ['multipart/form-data'],
        response: { 201: Uploaded, ...protectedErrors(400, 404, 413, 415) },
      },
    },
    async (request, reply) => {
      const id = await owned(principal(request).tenantId, request.params.id)
      if (!request.isMultipart()) throw new ApiError(415, 'validation_error', 'unsupported_media_type', 'Send multipart/form-data')
      const written: { path: string; size: number }[] = []
      for await (const part of request.files()) {
        const path = [request.query.path, basename(part.filename || part.fieldname)].filter(Boolean).join('/')
        written.push({ path, size: await app.workspaces.write(id, path, whole(part, opts.maxFileBytes)) })
      }
      if (written.length === 0) throw invalidRequest('No file in the upload', 'file')
      return reply.code(201).send({ files: written })
    },
  )

  app.get(
    '/v1/sessions/:id/files/archive',
    {
      config: { sessionOwner: 'params' },
      schema: {
        operationId: 'downloadArchive',
        tags: ['files'],
        summary: 'The whole workspace as a zip',
        params: SessionIdParams,
        response: { 200: Binary, ...protectedErrors(404) },
      },
    },
    async (request, reply) => {
      const id = await owned(principal(request).tenantId, request.params.id)
      reply.type('application/zip')
      reply.header('content-disposition', `attachment; filename="workspace-${id}.zip"`)
      return reply.send(app.workspaces.archive(id))
    },
  )
}

export default files
