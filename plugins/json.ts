import type { FastifyInstance } from 'fastify'
import fp from 'fastify-plugin'
import { invalidRequest } from '../services/errors.js'

/** The deepest nesting of objects and arrays a JSON body may have. */
export const MAX_JSON_DEPTH = 64

/**
 * Whether the objects and arrays of a JSON text nest deeper than `limit`, found in one pass over
 * the text before anything is built from it. Strings are skipped whole, so brackets inside them
 * do not count. Malformed text is left to the parser.
 */
export function nestsDeeperThan(text: string, limit: number): boolean {
  // every level needs an opening and a closing character
  if (text.length <= 2 * limit) return false
  let depth = 0
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i)
    if (c === 0x22) {
      // the closing quote is the next one not escaped by an odd run of backslashes
      for (;;) {
        i = text.indexOf('"', i + 1)
        if (i === -1) return false
        let slashes = 0
        while (text.charCodeAt(i - 1 - slashes) === 0x5c) slashes++
        if (slashes % 2 === 0) break
      }
    } else if (c === 0x7b || c === 0x5b) {
      if (++depth > limit) return true
    } else if (c === 0x7d || c === 0x5d) {
      depth--
    }
  }
  return false
}

/**
 * JSON bodies with a nesting limit. Parsing a deeply nested body works, but everything after it
 * (prototype-poisoning scan, validation, storage, serialization) walks it recursively and fails
 * with a stack overflow, which would be a 500; refusing it before parsing makes it a 400.
 * Otherwise Fastify's own parser runs, with its defaults (`__proto__` and `constructor` refused).
 */
export default fp(
  async function json(app: FastifyInstance) {
    const parse = app.getDefaultJsonParser('error', 'error')
    app.removeContentTypeParser('application/json')
    app.addContentTypeParser('application/json', { parseAs: 'string' }, (request, body, done) => {
      if (nestsDeeperThan(body as string, MAX_JSON_DEPTH))
        return done(invalidRequest(`JSON nests deeper than ${MAX_JSON_DEPTH} levels`), undefined)
      parse(request, body as string, done)
    })
  },
  { name: 'json' },
)
