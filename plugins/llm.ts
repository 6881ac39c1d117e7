import type { FastifyInstance } from 'fastify'
import fp from 'fastify-plugin'
import OpenAI from 'openai'
import { ApiError } from '../services/errors.js'

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
const passRateLimits: typeof fetch = async (input, init) => {
  const response = await fetch(input, init)
  if (response.status !== 429) return response
  const headers = new Headers(response.headers)
  headers.set('x-should-retry', 'false')
  return new Response(response.body, { status: response.status, statusText: response.statusText, headers })
}

export class Llm {
  readonly client: OpenAI | null
  private cached: { at: number; ids: Promise<string[]> } | undefined

  constructor(private readonly opts: LlmOptions) {
    this.client = opts.baseURL
      ? new OpenAI({
          baseURL: opts.baseURL,
          // local upstreams (Ollama, vLLM, llama.cpp) need no key, but the client insists on one
          apiKey: opts.apiKey ?? 'not-needed',
          timeout: opts.timeoutMs,
          // one retry on connection errors and 5xx before any byte of the answer was streamed
          maxRetries: 1,
          fetch: passRateLimits,
        })
      : null
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

declare module 'fastify' {
  interface FastifyInstance {
    llm: Llm
  }
}

/** The one upstream client (the `openai` package) pointed at LLM_BASE_URL. */
export default fp(
  async function llm(app: FastifyInstance, opts: LlmOptions) {
    app.decorate('llm', new Llm(opts))
  },
  { name: 'llm' },
)
