import OpenAI, { APIConnectionError, APIConnectionTimeoutError, APIError } from 'openai'
import { ApiError } from './errors.js'
import { createHttpFetch } from './http-fetch.js'

/**
 * The model client: the `openai` package pointed at the configured upstream (LLM_BASE_URL), the
 * model list, and how the upstream's failures are reported to our clients.
 */

export interface LlmOptions {
  baseURL?: string
  apiKey?: string
  timeoutMs: number
  /** MODELS: a fixed list for /v1/models; otherwise the upstream's /models, cached. */
  models?: string
  defaultModel: string
}

const MODELS_TTL_MS = 5 * 60_000

/**
 * An upstream 429 goes back to our client with its Retry-After, and the client's SDK waits and
 * retries; retrying here as well would multiply the calls and the wait.
 */
const passRateLimits =
  (transport: typeof fetch): typeof fetch =>
  async (input, init) => {
    const response = await transport(input, init)
    if (response.status !== 429) return response
    const headers = new Headers(response.headers)
    headers.set('x-should-retry', 'false')
    return new Response(response.body, { status: response.status, statusText: response.statusText, headers })
  }

export class Llm {
  readonly client: OpenAI | null
  private cached: { at: number; ids: Promise<string[]> } | undefined
  /** Pooled keep-alive connections to the upstream (services/http-fetch.ts). */
  private readonly transport = createHttpFetch()

  constructor(private readonly opts: LlmOptions) {
    this.client = opts.baseURL
      ? new OpenAI({
          baseURL: opts.baseURL,
          // local upstreams (Ollama, vLLM, llama.cpp) need no key, but the client insists on one
          apiKey: opts.apiKey ?? 'not-needed',
          timeout: opts.timeoutMs,
          // one retry on connection errors and 5xx before any byte of the answer was streamed
          maxRetries: 1,
          fetch: passRateLimits(this.transport),
        })
      : null
  }

  /** Closes the pooled upstream connections. */
  close(): void {
    this.transport.close()
  }

  /** The client, or 503 naming the variable to set. */
  require(): OpenAI {
    if (!this.client)
      throw new ApiError(503, 'unavailable_error', 'llm_not_configured', 'No upstream model is configured: set LLM_BASE_URL (and LLM_API_KEY if it needs one)')
    return this.client
  }

  /** Model ids for /v1/models: MODELS, else the upstream's list (cached), else the default model. */
  async models(): Promise<string[]> {
    if (this.opts.models) return this.opts.models.split(',').map((m) => m.trim()).filter(Boolean)
    const client = this.client
    if (!client) return [this.opts.defaultModel]
    if (!this.cached || Date.now() - this.cached.at > MODELS_TTL_MS) {
      const ids = client.models
        .list()
        .then(async (page) => {
          const ids: string[] = []
          for await (const model of page) ids.push(model.id)
          return ids.includes(this.opts.defaultModel) ? ids : [this.opts.defaultModel, ...ids]
        })
        .catch(() => {
          this.cached = undefined
          return [this.opts.defaultModel]
        })
      this.cached = { at: Date.now(), ids }
    }
    return this.cached.ids
  }
}

/**
 * The upstream failure as the API reports it, keeping its meaning: what the client got wrong
 * stays a 4xx with the upstream's `code` and `param`, a rate limit stays a 429 with its wait, and
 * what only the operator can fix (the upstream refused our key) is a 502 not worth retrying.
 * Upstream messages can quote the key that was refused, so it is masked along with anything the
 * redactor knows.
 */
export function upstreamError(err: unknown, apiKey: string | null, redact: (text: string) => string = (t) => t): ApiError {
  if (err instanceof ApiError) return err
  const clean = (message: string) => {
    let text = apiKey ? message.replaceAll(apiKey, '***') : message
    text = text.replace(/\b(sk|pk|rk)-[\w*-]{4,}/g, '$1-***').replace(/Bearer\s+\S+/gi, 'Bearer ***')
    return redact(text)
  }
  if (err instanceof APIConnectionTimeoutError) return upstreamTimeout()
  if (err instanceof APIConnectionError) {
    return new ApiError(502, 'upstream_error', 'llm_error', clean(`Could not reach the model: ${err.message}`))
  }
  if (!(err instanceof APIError)) return brokenStream()
  const detail = (err.error as { message?: unknown } | undefined)?.message
  const said = clean(typeof detail === 'string' && detail ? detail : err.message)
  const code = typeof err.code === 'string' && err.code ? err.code : undefined
  const param = typeof err.param === 'string' && err.param ? err.param : null
  const status = err.status ?? 0
  if (status === 404 && (code === 'model_not_found' || /model/i.test(said))) {
    return new ApiError(404, 'invalid_request_error', 'model_not_found', `The model provider does not know this model: ${said}`, 'model')
  }
  if (status === 400 || status === 422) return new ApiError(400, 'invalid_request_error', code ?? 'upstream_invalid_request', said, param)
  if (status === 429) {
    const wait = retryAfterMs(err.headers)
    const limited = new ApiError(429, 'rate_limit_error', code ?? 'upstream_rate_limited', `The model provider is rate limiting: ${said}`, null, {
      ...(wait !== undefined ? { retry_after: Math.max(1, Math.ceil(wait / 1000)), retry_after_ms: wait } : {}),
    })
    // An exhausted quota does not come back by waiting.
    return code === 'insufficient_quota' ? limited.final() : limited
  }
  const prefix = status ? `The model provider answered ${status}` : 'The model provider reported an error'
  if (status === 401 || status === 403) return new ApiError(502, 'upstream_error', 'llm_auth_failed', `${prefix}: ${said}`).final()
  if (status === 503) return new ApiError(503, 'unavailable_error', 'llm_unavailable', `${prefix}: ${said}`)
  return new ApiError(502, 'upstream_error', 'llm_error', `${prefix}: ${said}`)
}

/** The upstream's `retry-after-ms` or `retry-after` (seconds or an HTTP date), in milliseconds. */
function retryAfterMs(headers: Headers | undefined): number | undefined {
  const ms = Number.parseFloat(headers?.get('retry-after-ms') ?? '')
  if (Number.isFinite(ms) && ms >= 0) return Math.ceil(ms)
  const value = headers?.get('retry-after')
  if (!value) return undefined
  const seconds = Number.parseFloat(value)
  if (Number.isFinite(seconds) && seconds >= 0) return Math.ceil(seconds * 1000)
  const at = Date.parse(value)
  return Number.isFinite(at) ? Math.max(0, at - Date.now()) : undefined
}

export const upstreamTimeout = () => new ApiError(504, 'upstream_error', 'llm_timeout', 'The model did not answer in time')
const brokenStream = () =>
  new ApiError(502, 'upstream_error', 'llm_error', 'The connection to the model broke before the answer was complete')

