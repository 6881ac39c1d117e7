/**
 * The one error type services and routes throw. The error handler plugin turns it into the
 * envelope {"error": {message, type, code, param}} with the given status.
 */
export type ErrorType =
  | 'validation_error'
  | 'auth_error'
  | 'permission_error'
  | 'not_found_error'
  | 'session_error'
  | 'invalid_request_error'
  | 'conflict_error'
  | 'rate_limit_error'
  | 'server_error'
  | 'upstream_error'
  | 'unavailable_error'

export class ApiError extends Error {
  constructor(
    readonly statusCode: number,
    readonly type: ErrorType,
    readonly code: string,
    message: string,
    readonly param: string | null = null,
    readonly extra: Record<string, unknown> = {},
    options?: ErrorOptions,
  ) {
    super(message, options)
    this.name = 'ApiError'
  }

  /**
   * False when repeating the request would repeat a side effect (a stored message, code that ran)
   * or cannot succeed; sent as `x-should-retry`, which the OpenAI SDKs obey.
   */
  retryable = true

  /** Marks this error as not to be retried and returns it. */
  final(): this {
    this.retryable = false
    return this
  }
}

export const sessionNotFound = () => new ApiError(404, 'session_error', 'session_not_found', 'Session not found')
export const notFound = (what = 'Resource') => new ApiError(404, 'not_found_error', 'not_found', `${what} not found`)
export const invalidRequest = (message: string, param: string | null = null, code = 'invalid_request') =>
  new ApiError(400, 'validation_error', code, message, param)
export const sessionBusy = () =>
  new ApiError(409, 'conflict_error', 'session_busy', 'A run is already in progress in this session')
/** A write for a session whose lease this process no longer holds (another replica owns it now). */
export const sessionMoved = () =>
  new ApiError(503, 'unavailable_error', 'session_moved', 'This session moved to another server process while the request ran; retry it')
