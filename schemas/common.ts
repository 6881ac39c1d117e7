import { type TSchema, Type } from '@sinclair/typebox'

export const ErrorResponse = Type.Object(
  {
    error: Type.Object(
      {
        message: Type.String(),
        type: Type.String(),
        code: Type.String(),
        param: Type.Union([Type.String(), Type.Null()]),
        retry_after: Type.Optional(Type.Integer()),
        retry_after_ms: Type.Optional(Type.Integer()),
      },
      { additionalProperties: true },
    ),
  },
  { $id: 'ErrorResponse', title: 'Error' },
)

const ERROR_DESCRIPTIONS: Record<number, string> = {
  400: 'Invalid request',
  401: 'Missing or invalid API key',
  403: 'Not allowed for this key',
  404: 'Not found',
  409: 'Conflict',
  413: 'Payload too large',
  422: 'Idempotency-Key used with another request',
  429: 'Rate limit exceeded',
  502: 'Upstream model error',
  503: 'Unavailable',
  504: 'Upstream model timed out',
}

/** Response schemas for the error statuses a route can answer with. */
export function errors(...statuses: number[]): Record<number, TSchema> {
  return Object.fromEntries(
    statuses.map((s) => [s, Type.Ref(ErrorResponse, { description: ERROR_DESCRIPTIONS[s] ?? 'Error' })]),
  )
}

/** 401 and 429 can happen on every protected route. */
export const protectedErrors = (...statuses: number[]) => errors(401, 429, ...statuses)

export const SessionIdParams = Type.Object({ id: Type.String({ description: 'Session id' }) })
