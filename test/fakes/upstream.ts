import { randomUUID } from 'node:crypto'
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http'
import type { AddressInfo } from 'node:net'

/**
 * A scripted OpenAI-compatible upstream on loopback. Tests queue what the next
 * `/v1/chat/completions` calls answer; with nothing queued it answers "ok" so benchmarks can
 * hammer it. It is also the latency baseline of a benchmark, so the default path stays cheap.
 */

export interface Usage {
  prompt_tokens: number
  completion_tokens: number
  total_tokens: number
}

/** How a step is delivered when the request streams. */
export interface Delivery {
  /** Wait this long before the first byte (status line included). */
  firstByteMs?: number
  /** Wait this long between streamed chunks. */
  chunkMs?: number
  /** Destroy the socket after this many chunks have been written (streaming only). */
  breakAfterChunks?: number
  /** The finish_reason sent; null sends none at all. Default: `tool_calls` or `stop`. */
  finishReason?: string | null
  /** Repeat the (cumulative) usage on every chunk, as some upstreams do, instead of once at the end. */
  usageEveryChunk?: boolean
  /** End the stream by closing it cleanly, without `data: [DONE]`. */
  noDone?: boolean
  /** How many deltas the text is cut into (default 4). */
  pieces?: number
  /** After this many chunks, hold the rest until `resume` settles or the client goes away (a model mid-answer, without timing). */
  holdAfterChunks?: number
  resume?: Promise<unknown>
}

export interface ScriptedCall {
  language?: string
  code?: string
  /** Raw `arguments` text, sent instead of `{language, code}` (for malformed or reordered JSON). */
  arguments?: string
  name?: string
}

export type Step =
  | ({ kind: 'text'; text: string; usage?: Usage } & Delivery)
  | ({ kind: 'tool'; calls: ScriptedCall[]; text?: string; usage?: Usage } & Delivery)
  | ({ kind: 'error'; status: number; message: string; type?: string; code?: string | null; param?: string | null; headers?: Record<string, string> } & Delivery)

export interface RecordedRequest {
  method: string
  path: string
  headers: IncomingMessage['headers']
  /** Parsed JSON body, or the raw text when it is not JSON, or undefined when empty. */
  // biome-ignore lint/suspicious/noExplicitAny: tests reach deep into whatever JSON the client sent
  body: any
  /** The client closed the connection before the response was complete. */
  aborted: boolean
  /** The whole response has been written (a test can tell what happened while it was streaming). */
  finished: boolean
}

export interface FakeUpstream {
  /** Base URL ending in `/v1`, ready for `new OpenAI({ baseURL })`. */
  url: string
  requests: RecordedRequest[]
  /** Queues answers for the next chat completion calls, in order. */
  script(...steps: Step[]): void
  /** Resolves when no response is in flight. */
  settled(): Promise<void>
  reset(): void
  close(): Promise<void>
}

export const text = (content: string, delivery: Delivery & { usage?: Usage } = {}): Step => ({
  kind: 'text',
  text: content,
  ...delivery,
})

export const toolCall = (
  calls: ScriptedCall | ScriptedCall[],
  options: Delivery & { text?: string; usage?: Usage } = {},
): Step => ({ kind: 'tool', calls: Array.isArray(calls) ? calls : [calls], ...options })

export const httpError = (
  status: number,
  message: string,
  options: Delivery & { type?: string; code?: string; param?: string; headers?: Record<string, string> } = {},
): Step => ({
  kind: 'error',
  status,
  message,
  ...options,
})

/** The fields of a chat completion request the fake looks at. */
interface ChatBody {
  model?: unknown
  messages?: unknown
  stream?: unknown
  stream_options?: { include_usage?: unknown }
}

const DEFAULT_STEP: Step = { kind: 'text', text: 'ok' }
const MODELS = ['fake-model', 'gpt-4o-mini']

/** Splits into about `parts` pieces so every answer arrives as several deltas. */
function split(value: string, parts: number): string[] {
  if (value.length === 0) return []
  const size = Math.max(1, Math.ceil(value.length / parts))
  const pieces: string[] = []
  for (let i = 0; i < value.length; i += size) pieces.push(value.slice(i, i + size))
  return pieces
}

function estimateUsage(body: ChatBody, completionChars: number): Usage {
  const prompt = Math.max(1, Math.ceil(JSON.stringify(body.messages ?? []).length / 4))
  const completion = Math.max(1, Math.ceil(completionChars / 4))
  return { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion }
}

function callArguments(call: ScriptedCall): string {
  return call.arguments ?? JSON.stringify({ language: call.language ?? 'python', code: call.code ?? '' })
}

const sleep = (ms: number | undefined, signal: AbortSignal) =>
  new Promise<void>((resolve) => {
    if (!ms || signal.aborted) return resolve()
    const timer = setTimeout(resolve, ms)
    signal.addEventListener(
      'abort',
      () => {
        clearTimeout(timer)
        resolve()
      },
      { once: true },
    )
  })

export interface FakeUpstreamOptions {
  /** Keep every request in `requests` (default). Benchmarks turn it off so memory stays flat. */
  record?: boolean
}

export async function startFakeUpstream(options: FakeUpstreamOptions = {}): Promise<FakeUpstream> {
  const keep = options.record ?? true
  const queue: Step[] = []
  const requests: RecordedRequest[] = []
  const inFlight = new Set<Promise<void>>()

  const server = createServer((req, res) => {
    const chunks: Buffer[] = []
    req.on('data', (chunk: Buffer) => chunks.push(chunk))
    req.on('end', () => {
      const raw = Buffer.concat(chunks).toString('utf8')
      let body: unknown
      try {
        body = raw ? JSON.parse(raw) : undefined
      } catch {
        body = raw
      }
      const entry: RecordedRequest = {
        method: req.method ?? 'GET',
        path: req.url ?? '/',
        headers: req.headers,
        body,
        aborted: false,
        finished: false,
      }
      if (keep) requests.push(entry)
      res.on('finish', () => {
        entry.finished = true
      })
      const done = handle(entry, res).catch(() => {
        res.destroy()
      })
      inFlight.add(done)
      done.finally(() => inFlight.delete(done))
    })
  })

  async function handle(record: RecordedRequest, res: ServerResponse): Promise<void> {
    const closed = new AbortController()
    res.on('close', () => {
      if (!res.writableFinished) record.aborted = true
      closed.abort()
    })
    const path = record.path.split('?')[0]
    if (record.method === 'GET' && path === '/v1/models') {
      return json(res, 200, {
        object: 'list',
        data: MODELS.map((id) => ({ id, object: 'model', created: 1_700_000_000, owned_by: 'fake' })),
      })
    }
    if (record.method !== 'POST' || path !== '/v1/chat/completions') {
      return json(res, 404, { error: { message: `No route ${record.method} ${path}`, type: 'invalid_request_error', code: null, param: null } })
    }
    const step = queue.shift() ?? DEFAULT_STEP
    await sleep(step.firstByteMs, closed.signal)
    if (closed.signal.aborted) return
    if (step.kind === 'error') {
      return json(
        res,
        step.status,
        { error: { message: step.message, type: step.type ?? 'server_error', code: step.code ?? null, param: step.param ?? null } },
        step.headers,
      )
    }
    const body: ChatBody = typeof record.body === 'object' && record.body !== null ? record.body : {}
    const model = typeof body.model === 'string' ? body.model : 'fake-model'
    if (body.stream === true) return stream(step, body, model, res, closed.signal)
    return json(res, 200, completion(step, body, model))
  }

  function completion(step: Extract<Step, { kind: 'text' | 'tool' }>, body: ChatBody, model: string) {
    const content = step.kind === 'text' ? step.text : (step.text ?? null)
    const toolCalls =
      step.kind === 'tool'
        ? step.calls.map((call) => ({
            id: `call_${randomUUID().replaceAll('-', '')}`,
            type: 'function',
            function: { name: call.name ?? 'execute', arguments: callArguments(call) },
          }))
        : undefined
    const chars = (content ?? '').length + (toolCalls?.reduce((n, c) => n + c.function.arguments.length, 0) ?? 0)
    return {
      id: `chatcmpl-${randomUUID()}`,
      object: 'chat.completion',
      created: Math.floor(Date.now() / 1000),
      model,
      choices: [
        {
          index: 0,
          message: { role: 'assistant', content, refusal: null, ...(toolCalls ? { tool_calls: toolCalls } : {}) },
          logprobs: null,
          finish_reason: step.finishReason === undefined ? (toolCalls ? 'tool_calls' : 'stop') : step.finishReason,
        },
      ],
      usage: step.usage ?? estimateUsage(body, chars),
    }
  }

  async function stream(
    step: Extract<Step, { kind: 'text' | 'tool' }>,
    body: ChatBody,
    model: string,
    res: ServerResponse,
    closed: AbortSignal,
  ): Promise<void> {
    const id = `chatcmpl-${randomUUID()}`
    const created = Math.floor(Date.now() / 1000)
    const chunk = (delta: object, finish: string | null = null) => ({
      id,
      object: 'chat.completion.chunk',
      created,
      model,
      choices: [{ index: 0, delta, logprobs: null, finish_reason: finish }],
    })

    const events: object[] = [chunk({ role: 'assistant', content: '' })]
    const leadText = step.kind === 'text' ? step.text : (step.text ?? '')
    for (const piece of split(leadText, step.pieces ?? 4)) events.push(chunk({ content: piece }))
    let chars = leadText.length
    if (step.kind === 'tool') {
      step.calls.forEach((call, index) => {
        const args = callArguments(call)
        chars += args.length
        events.push(
          chunk({
            tool_calls: [
              {
                index,
                id: `call_${randomUUID().replaceAll('-', '')}`,
                type: 'function',
                function: { name: call.name ?? 'execute', arguments: '' },
              },
            ],
          }),
        )
        for (const piece of split(args, 6)) events.push(chunk({ tool_calls: [{ index, function: { arguments: piece } }] }))
      })
    }
    const finish = step.finishReason === undefined ? (step.kind === 'tool' ? 'tool_calls' : 'stop') : step.finishReason
    if (finish !== null) events.push(chunk({}, finish))
    const usage = step.usage ?? estimateUsage(body, chars)
    if (step.usageEveryChunk) for (const event of events) Object.assign(event, { usage })
    else if (body.stream_options?.include_usage === true) events.push({ id, object: 'chat.completion.chunk', created, model, choices: [], usage })
    const done = step.noDone ? '' : 'data: [DONE]\n\n'

    res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache', connection: 'keep-alive' })
    if (!step.chunkMs && step.breakAfterChunks === undefined && step.holdAfterChunks === undefined) {
      res.end(`${events.map((e) => `data: ${JSON.stringify(e)}\n\n`).join('')}${done}`)
      return
    }
    for (let i = 0; i < events.length; i++) {
      if (closed.aborted) return
      if (step.breakAfterChunks !== undefined && i >= step.breakAfterChunks) {
        res.socket?.destroy()
        return
      }
      if (i > 0 && i === step.holdAfterChunks) {
        await new Promise<void>((resolve) => {
          closed.addEventListener('abort', () => resolve(), { once: true })
          void Promise.resolve(step.resume).finally(() => step.resume && resolve())
        })
      }
      if (i > 0 && step.chunkMs) await sleep(step.chunkMs, closed)
      if (closed.aborted) return
      // Wait for the flush so a later socket destroy cannot swallow chunks already "sent".
      await new Promise<void>((resolve) => res.write(`data: ${JSON.stringify(events[i])}\n\n`, () => resolve()))
    }
    res.end(done)
  }

  function json(res: ServerResponse, status: number, payload: unknown, headers: Record<string, string> = {}): void {
    const data = JSON.stringify(payload)
    res.writeHead(status, { ...headers, 'content-type': 'application/json', 'content-length': Buffer.byteLength(data) })
    res.end(data)
  }

  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const { port } = server.address() as AddressInfo

  return {
    url: `http://127.0.0.1:${port}/v1`,
    requests,
    script: (...steps) => {
      queue.push(...steps)
    },
    settled: async () => {
      while (inFlight.size > 0) await Promise.allSettled([...inFlight])
    },
    reset: () => {
      queue.length = 0
      requests.length = 0
    },
    close: async () => {
      server.closeAllConnections()
      await new Promise<void>((resolve, reject) => server.close((err) => (err ? reject(err) : resolve())))
    },
  }
}
