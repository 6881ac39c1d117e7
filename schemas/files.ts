import type { Readable } from 'node:stream'
import { Type } from '@sinclair/typebox'

/** A streamed binary body, documented as such. */
export const Binary = Type.Unsafe<Readable>({ type: 'string', format: 'binary', description: 'The bytes' })

/**
 * The upload bodies, for the OpenAPI document only: these routes read the raw stream, so the body
 * is documented through the route's `swaggerTransform` and never validated.
 */
export const RawFileBody = { content: { 'application/octet-stream': { schema: { type: 'string', format: 'binary', description: 'The file' } } } }
export const MultipartFilesBody = {
  content: {
    'multipart/form-data': {
      schema: {
        type: 'object',
        properties: { file: { type: 'array', items: { type: 'string', format: 'binary' }, description: 'One part per file; its filename names it' } },
        required: ['file'],
      },
    },
  },
}

const Path = Type.String({ maxLength: 4096, description: 'Relative to the workspace' })

export const PathQuery = Type.Object({ path: Path })
export const DirQuery = Type.Object({ path: Type.String({ maxLength: 4096, default: '', description: 'Relative to the workspace; empty for its top' }) })

const LIST_LIMIT = { default: 1000, maximum: 10000 }

export const ListQuery = Type.Object({
  path: Type.String({ maxLength: 4096, default: '', description: 'Directory, relative to the workspace; empty for its top' }),
  limit: Type.Integer({ minimum: 1, maximum: LIST_LIMIT.maximum, default: LIST_LIMIT.default, description: 'Entries per page' }),
  cursor: Type.Optional(
    Type.String({ minLength: 1, maxLength: 1400, pattern: '^[A-Za-z0-9_-]+$', description: 'The next_cursor of the previous page' }),
  ),
})

export const Entry = Type.Object({
  name: Type.String(),
  path: Type.String(),
  type: Type.Union([Type.Literal('file'), Type.Literal('directory'), Type.Literal('symlink'), Type.Literal('other')], {
    description: 'other: a FIFO, socket or device (never opened by the files API)',
  }),
  size: Type.Integer(),
  modified_at: Type.String(),
  lossy_name: Type.Optional(
    Type.Literal(true, {
      description: 'The real name is not valid UTF-8: name and path show U+FFFD for the bad bytes and cannot address the entry',
    }),
  ),
})

export const Listing = Type.Object(
  {
    path: Type.String(),
    entries: Type.Array(Entry),
    next_cursor: Type.Union([Type.String(), Type.Null()], { description: 'Pass as cursor for the next page; null on the last one' }),
  },
  { description: 'A page of directory entries' },
)

export const Written = Type.Object({ path: Type.String(), size: Type.Integer() }, { description: 'The file was written' })
export const Uploaded = Type.Object({ files: Type.Array(Written) }, { description: 'The files were written' })
