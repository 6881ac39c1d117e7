import type { InputItemsQuery, ResponseCreateBody, ResponseObject as WireResponse } from '../schemas/responses.js'
import type { LmcChunk, LmcMessage } from '../schemas/lmc.js'
import type { RunConfig, Settings } from '../schemas/settings.js'
import type { ClientTools, PassThrough } from './agent/loop.js'
import { clientToolsOf } from './agent/openai-compat.js'
import { fromResponseInput, itemId, type OutputItem, ResponseItems, responseUsage, type StreamEvent } from './agent/response-items.js'
import type { ChatResult, ChatService } from './chat.js'
import { ApiError, invalidRequest } from './errors.js'
import type { RunRegistry } from './runs.js'
import type { SessionService } from './sessions.js'
import type { SettingsService } from './settings.js'
import type { ResponseRecord, SessionRecord, Store } from './store/types.js'

export interface ResponsesDeps {
  store: Store
  chat: ChatService
  sessions: SessionService
  settings: SettingsService
  runs: RunRegistry
}

/** The Response object as served (OpenAI wire format, openai-node `Response` without `output_text`). */
export type ResponseObject = WireResponse & Record<string, unknown> & { output: OutputItem[] }

/** A request that passed every check: what `run` or `background` needs. */
export interface PreparedResponse {
  id: string
  tenantId: string
  session: SessionRecord
  /** The session was made for this request (no container and no previous response named one). */
  newSession: boolean
  store: boolean
  background: boolean
  createdAt: Date
  previousResponseId: string | null
  input: Record<string, unknown>[]
  /** The Response object's request-derived fields. */
  frame: Record<string, unknown>
  answerOnly: boolean
  turn: {
    inputs: ReturnType<typeof fromResponseInput>['inputs']
    systemMessage?: string
    history: LmcMessage[]
    config: RunConfig
    settings: Settings
    passThrough: PassThrough
    codeTool: boolean
    clientTools?: ClientTools
  }
  /** For each of `turn.inputs`, the index of the input item it came from. */
  sources: number[]
}

export interface RunOptions {
  /** Stream events, numbered from 0; without it nothing is streamed. */
  emit?: (event: StreamEvent) => void
  /** Called once the upstream answered and the input is stored (the stream may commit to its 200). */
  onStart?: () => void
  /** Aborted when the client goes away. */
  signal?: AbortSignal
}

interface Running {
  tenantId: string
  sessionId: string
  /** The final response, or undefined when the turn failed before it started. */
  done: Promise<ResponseObject | undefined>
}

/** A request's tool: its type and whatever else it says. */
type ToolSpec = { type: string } & Record<string, unknown>

const responseNotFound = (id: string) =>
  new ApiError(404, 'not_found_error', 'response_not_found', `No response with id '${id}' was found`, 'response_id')

const unsupported = (message: string, param: string) => invalidRequest(message, param, 'unsupported_parameter')

const unix = (date: Date) => Math.floor(date.getTime() / 1000)

/**
 * OpenAI's Responses API over the agent: each response is one agent turn in a session, and the
 * code interpreter's container id is the session id. A response names what came before with
 * `previous_response_id`; its context is that chain's messages (so branches stay apart), and it
 * runs in the chain's session, with the same kernels. Responses are stored per tenant unless
 * `store: false`; other tenants get 404.
 *
 * The server's code tool is offered only when the request lists `code_interpreter`, as on
 * OpenAI: a request without it is a plain model turn that runs no code.
 */
export class ResponsesService {
  private readonly running = new Map<string, Running>()

  constructor(private readonly deps: ResponsesDeps) {}

  /** The session a request names, for the per-session rate limit (unchecked; undefined when none). */
  async namedSession(tenantId: string, body: unknown): Promise<string | undefined> {
    // Also called before validation (to find the replica that owns the session): any shape may come.
    if (!body || typeof body !== 'object') return undefined
    const { tools, previous_response_id: previous } = body as { tools?: unknown; previous_response_id?: unknown }
    const tool = Array.isArray(tools) ? (tools as unknown[]).find((t) => (t as ToolSpec | null)?.type === 'code_interpreter') : undefined
    const container = (tool as ToolSpec | undefined)?.container
    if (typeof container === 'string') return container
    if (typeof previous !== 'string' || !previous) return undefined
    return (await this.deps.store.getResponse(tenantId, previous))?.sessionId
  }

  /**
   * Checks a request and resolves its session before anything is stored: 400 for what cannot be
   * honoured (with `param`), 404 for an unknown previous response or container, 409 when the
   * session already runs, 503 without an upstream. Only then is a new session made.
   */
  async prepare(tenantId: string, body: ResponseCreateBody): Promise<PreparedResponse> {
    for (const field of ['conversation', 'prompt'] as const) {
      if ((body as Record<string, unknown>)[field] != null) {
        throw unsupported(`"${field}" is not supported; continue a conversation with previous_response_id`, field)
      }
    }
    const store = body.store !== false
    const background = body.background === true
    if (background && !store) throw invalidRequest('Background responses must be stored (store: true)', 'background')
    if (body.input === undefined) throw invalidRequest('input is required', 'input')
    const parsed = fromResponseInput(await this.referenced(tenantId, body.input))
    const { container, codeTool, tools, clientTools } = this.tools(body)

    const previous = body.previous_response_id ? await this.deps.store.getResponse(tenantId, body.previous_response_id) : undefined
    if (body.previous_response_id && !previous) {
      throw new ApiError(404, 'not_found_error', 'previous_response_not_found', `Previous response with id '${body.previous_response_id}' not found`, 'previous_response_id')
    }
    let named = previous?.sessionId
    if (container) {
      const session = await this.deps.store.getSession(tenantId, container.id)
      if (!session) throw new ApiError(404, 'not_found_error', 'container_not_found', `Container '${container.id}' not found`, container.param)
      if (previous && previous.sessionId !== session.id) {
        throw invalidRequest('The container must be the one the previous response ran in', container.param)
      }
      named = session.id
    }

    const format = body.text?.format
    const passThrough: PassThrough = {
      ...(body.top_p != null ? { top_p: body.top_p } : {}),
      ...(body.user ? { user: body.user } : {}),
      ...(format && format.type !== 'text' ? { response_format: responseFormat(format) } : {}),
    }
    const config = {
      llm: {
        ...(body.model ? { model: body.model } : {}),
        ...(body.temperature != null ? { temperature: body.temperature } : {}),
        ...(body.max_output_tokens ? { max_tokens: body.max_output_tokens } : {}),
      },
    }
    const [settings, context] = await Promise.all([
      this.deps.settings.effective(tenantId, config),
      previous ? this.deps.store.responseContext(tenantId, previous.id) : Promise.resolve([]),
    ])
    // Last, once nothing else can refuse the request: a new session is made here.
    const session = await this.deps.chat.session(tenantId, named, () =>
      this.deps.sessions.create(tenantId, { model: body.model, metadata: { source: 'responses' } }),
    )
    const systemMessage = [body.instructions ?? '', ...parsed.system].filter((text) => text.trim()).join('\n\n')
    // A client continuing with previous_response_id may send the function calls it answers again.
    const known = new Set((context ?? []).filter((m) => m.type === 'tool_call').map((m) => (m.content as { id?: unknown }).id))
    const fresh = parsed.inputs.map((input, k) => ({ input, source: parsed.sources[k]! }))
      .filter(({ input }) => !(input.type === 'tool_call' && known.has((input.content as { id?: unknown }).id)))
    const id = itemId('resp')
    return {
      id,
      tenantId,
      session,
      newSession: !named,
      store,
      background,
      createdAt: new Date(),
      previousResponseId: previous?.id ?? null,
      input: parsed.items,
      answerOnly: passThrough.response_format !== undefined,
      frame: {
        background,
        instructions: body.instructions ?? null,
        max_output_tokens: body.max_output_tokens ?? null,
        max_tool_calls: null,
        model: body.model ?? settings.model,
        parallel_tool_calls: body.parallel_tool_calls ?? true,
        previous_response_id: previous?.id ?? null,
        reasoning: { effort: null, summary: null },
        service_tier: 'default',
        store,
        temperature: body.temperature ?? settings.temperature,
        text: { format: format ?? { type: 'text' } },
        tool_choice: body.tool_choice ?? 'auto',
        // An `auto` container is reported as the session it became, so a client can name it next time.
        tools: tools.map((tool) => (tool.type === 'code_interpreter' ? { ...tool, container: session.id } : tool)),
        top_p: body.top_p ?? null,
        truncation: 'disabled',
        user: body.user ?? null,
        metadata: body.metadata ?? {},
      },
      sources: fresh.map(({ source }) => source),
      turn: {
        inputs: fresh.map(({ input }) => input),
        ...(systemMessage ? { systemMessage } : {}),
        history: context ?? [],
        config,
        settings,
        passThrough,
        codeTool,
        ...(clientTools ? { clientTools } : {}),
      },
    }
  }

  /**
   * The input with each `item_reference` replaced by the stored output item it names (clients
   * such as the AI SDK send earlier items that way); 404 for an item the tenant has not got.
   */
  private async referenced(tenantId: string, input: string | unknown[]): Promise<string | unknown[]> {
    if (typeof input === 'string') return input
    const isReference = (item: unknown): item is { type: 'item_reference'; id: unknown } =>
      typeof item === 'object' && item !== null && (item as { type?: unknown }).type === 'item_reference'
    const ids = input.filter(isReference).map((item) => item.id)
    if (ids.length === 0) return input
    const found = await this.deps.store.getResponseItems(tenantId, ids.filter((id): id is string => typeof id === 'string'))
    return input.map((item, i) => {
      if (!isReference(item)) return item
      const stored = typeof item.id === 'string' ? found.get(item.id) : undefined
      if (!stored) throw new ApiError(404, 'not_found_error', 'item_not_found', `No stored item with id '${String(item.id)}'`, `input[${i}].id`)
      return stored
    })
  }

  /**
   * The request's tools: at most one code interpreter (and its container), and the client's
   * function tools, which pass through to the model; a call to one ends the response with a
   * `function_call` item and suspends the turn until a `function_call_output` answers it.
   */
  private tools(body: ResponseCreateBody) {
    const tools = (body.tools ?? []) as ToolSpec[]
    let container: { id: string; param: string } | undefined
    let interpreter = false
    // The functions in Chat Completions form, with where each came from in `tools`.
    const functions: { type: 'function'; function: Record<string, unknown> }[] = []
    const positions: number[] = []
    tools.forEach((tool, i) => {
      if (tool.type === 'function') {
        const { name, description, parameters, strict } = tool
        functions.push({ type: 'function', function: { name, description, parameters, strict } })
        positions.push(i)
        return
      }
      if (tool.type !== 'code_interpreter') {
        throw unsupported(`Tools of type "${tool.type}" are not supported; this server offers code_interpreter and function tools`, `tools[${i}].type`)
      }
      if (interpreter) throw invalidRequest('Only one code_interpreter tool may be given', `tools[${i}]`)
      interpreter = true
      const spec = tool.container
      if (typeof spec === 'string') {
        container = { id: spec, param: `tools[${i}].container` }
        return
      }
      const auto = spec as { type?: unknown; file_ids?: unknown } | undefined
      if (auto?.type !== 'auto') throw invalidRequest('container must be a container id or {"type": "auto"}', `tools[${i}].container`)
      if (Array.isArray(auto.file_ids) && auto.file_ids.length > 0) {
        throw unsupported('file_ids are not supported: upload files to the container (the session workspace) instead', `tools[${i}].container.file_ids`)
      }
    })
    const choice = toolChoice(body.tool_choice, functions.length > 0)
    let clientTools: ClientTools | undefined
    try {
      clientTools = clientToolsOf({ tools: functions, tool_choice: choice, parallel_tool_calls: body.parallel_tool_calls })
    } catch (err) {
      // Chat Completions names the field in its own shape; say where it is in this request.
      throw renamed(err, (param) =>
        param
          .replace(/^tools\[(\d+)\]\.function/, (_, k: string) => `tools[${positions[Number(k)]}]`)
          .replace(/^tool_choice\.function\.name$/, 'tool_choice.name'),
      )
    }
    return { container, codeTool: interpreter && choice !== 'none', tools, clientTools }
  }

  /**
   * Runs a prepared response to its end and returns the final Response object. Stored (unless
   * `store: false`) once the upstream first answered, updated when the turn ends. A failure
   * before that throws and leaves nothing behind; a failure after it is stored as `failed` and,
   * when streaming, reported as `response.failed` rather than thrown.
   */
  run(prepared: PreparedResponse, opts: RunOptions = {}, created?: Promise<unknown>): Promise<ResponseObject> {
    // Synchronous up to chat.run, so a busy session is refused before the caller commits to anything.
    let resolve!: (response: ResponseObject | undefined) => void
    const entry: Running = { tenantId: prepared.tenantId, sessionId: prepared.session.id, done: new Promise((r) => (resolve = r)) }
    const items = new ResponseItems(prepared.session.id, opts.emit, prepared.answerOnly)
    let stored = created
    let started = false
    const onStart = () => {
      started = true
      const response = this.snapshot(prepared, 'in_progress')
      if (prepared.store) stored ??= this.deps.store.createResponse(this.record(prepared, response, []))
      items.event('response.created', { response })
      items.event('response.in_progress', { response })
      opts.onStart?.()
    }
    const turn = this.deps.chat.run({
      tenantId: prepared.tenantId,
      sessionId: prepared.session.id,
      newSession: prepared.newSession && !prepared.background,
      storeOnAnswer: true,
      inputs: prepared.turn.inputs,
      config: prepared.turn.config,
      settings: prepared.turn.settings,
      passThrough: prepared.turn.passThrough,
      ...(prepared.turn.systemMessage ? { systemMessage: prepared.turn.systemMessage } : {}),
      history: prepared.turn.history,
      codeTool: prepared.turn.codeTool,
      ...(prepared.turn.clientTools ? { tools: prepared.turn.clientTools } : {}),
      emit: (chunk: LmcChunk) => items.push(chunk),
      onStart,
      ...(opts.signal ? { signal: opts.signal } : {}),
    })
    this.running.set(prepared.id, entry)
    const finished = this.settle(prepared, turn, items, { streaming: opts.emit !== undefined, started: () => started, stored: () => stored })
    finished.then(resolve, () => resolve(undefined)).finally(() => this.running.delete(prepared.id))
    return finished
  }

  private async settle(
    prepared: PreparedResponse,
    turn: Promise<ChatResult>,
    items: ResponseItems,
    state: { streaming: boolean; started: () => boolean; stored: () => Promise<unknown> | undefined },
  ): Promise<ResponseObject> {
    const { started, stored } = state
    let result: ChatResult
    try {
      result = await turn
    } catch (err) {
      const apiError = err instanceof ApiError ? renamed(err, (param) => inputParam(param, prepared.sources)) : undefined
      if (!started() && !prepared.background) throw apiError ?? err
      const output = items.finish({ incomplete: true })
      const error = { code: apiError?.code ?? 'server_error', message: apiError?.message ?? 'Internal server error' }
      const response = this.snapshot(prepared, 'failed', { output, error })
      await this.persist(prepared, stored(), response, [])
      await this.forget(prepared)
      // A plain request answers with the error (marked not retryable by the chat service); a
      // stream has committed to its 200 and ends with the failed response, as OpenAI's do.
      if (!state.streaming) throw err
      items.event('response.failed', { response })
      return response
    }
    const cancelled = result.stopped
    // Code waiting for the user's approval (auto_run: false) has not run: the response stops short.
    const awaiting = result.pending?.type === 'confirmation'
    const output = items.finish({ incomplete: cancelled || awaiting, ...(result.pending ? {} : { final: result.final }) })
    const reason = awaiting
      ? 'confirmation_required'
      : result.finishReason === 'length'
        ? 'max_output_tokens'
        : result.finishReason === 'content_filter'
          ? 'content_filter'
          : undefined
    const status = cancelled ? 'cancelled' : reason ? 'incomplete' : 'completed'
    const response = this.snapshot(prepared, status, {
      output,
      usage: responseUsage(result.usage),
      ...(reason ? { incomplete_details: { reason } } : {}),
    })
    await this.persist(prepared, stored(), response, [...result.inputs, ...result.messages])
    // OpenAI has no stream event for a cancelled response; `response.incomplete` ends the stream
    // with the response, whose status says cancelled.
    items.event(status === 'completed' ? 'response.completed' : 'response.incomplete', { response })
    await this.forget(prepared)
    return response
  }

  /** Starts a background response and returns it as it is now (`in_progress`); GET shows how it goes. */
  async background(prepared: PreparedResponse): Promise<ResponseObject> {
    const response = this.snapshot(prepared, 'in_progress')
    const created = this.deps.store.createResponse(this.record(prepared, response, []))
    try {
      this.run(prepared, {}, created).catch(() => {
        // The failure is stored with the response, where the client polling it reads it.
      })
    } catch (err) {
      // Refused before it began (the session got busy meanwhile): nothing of it may stay.
      await created
      await this.deps.store.deleteResponse(prepared.tenantId, prepared.id)
      throw err
    }
    await created
    return response
  }

  /** Resolves once every response running now has ended and been stored. */
  async settled(): Promise<void> {
    await Promise.all([...this.running.values()].map((entry) => entry.done))
  }

  async get(tenantId: string, id: string): Promise<ResponseObject> {
    const record = await this.deps.store.getResponse(tenantId, id)
    if (!record) throw responseNotFound(id)
    return record.response as ResponseObject
  }

  /** Deletes a stored response; a turn still running goes on, but is no longer stored. */
  async delete(tenantId: string, id: string): Promise<{ id: string; object: 'response'; deleted: true }> {
    if (!(await this.deps.store.deleteResponse(tenantId, id))) throw responseNotFound(id)
    return { id, object: 'response', deleted: true }
  }

  /**
   * Cancels a running response (streamed, plain or background): its upstream call is aborted and
   * its code interrupted. Answers the response as it ended (`cancelled`). A response that is not
   * running any more cannot be cancelled (400), except that cancelling a cancelled one answers it again.
   */
  async cancel(tenantId: string, id: string): Promise<ResponseObject> {
    const entry = this.running.get(id)
    if (entry && entry.tenantId === tenantId) {
      this.deps.runs.stop(entry.sessionId)
      const response = await entry.done
      if (response) return response
    }
    const record = await this.deps.store.getResponse(tenantId, id)
    if (!record) throw responseNotFound(id)
    if (record.status === 'cancelled') return record.response as ResponseObject
    throw invalidRequest(`Only a running response can be cancelled; this one is ${record.status}`, 'response_id', 'response_not_running')
  }

  /** The input items of a stored response, newest first by default (OpenAI's list shape). */
  async inputItems(tenantId: string, id: string, query: InputItemsQuery) {
    const record = await this.deps.store.getResponse(tenantId, id)
    if (!record) throw responseNotFound(id)
    const ordered = query.order === 'asc' ? record.input : [...record.input].reverse()
    let start = 0
    if (query.after !== undefined) {
      const at = ordered.findIndex((item) => item.id === query.after)
      if (at === -1) throw invalidRequest(`No input item with id '${query.after}' in this response`, 'after')
      start = at + 1
    }
    const limit = query.limit ?? 20
    const data = ordered.slice(start, start + limit)
    return {
      object: 'list' as const,
      data: data as { id: string; type: string }[],
      first_id: (data[0]?.id as string | undefined) ?? null,
      last_id: (data.at(-1)?.id as string | undefined) ?? null,
      has_more: start + limit < ordered.length,
    }
  }

  private snapshot(
    prepared: PreparedResponse,
    status: string,
    fields: Partial<Pick<ResponseObject, 'output' | 'usage' | 'error' | 'incomplete_details'>> = {},
  ): ResponseObject {
    return {
      id: prepared.id,
      object: 'response',
      created_at: unix(prepared.createdAt),
      status,
      ...(status === 'completed' ? { completed_at: unix(new Date()) } : {}),
      error: fields.error ?? null,
      incomplete_details: fields.incomplete_details ?? null,
      ...prepared.frame,
      output: structuredClone(fields.output ?? []),
      usage: fields.usage ?? null,
    }
  }

  private record(prepared: PreparedResponse, response: ResponseObject, messages: LmcMessage[]): ResponseRecord {
    return {
      id: prepared.id,
      tenantId: prepared.tenantId,
      sessionId: prepared.session.id,
      previousResponseId: prepared.previousResponseId,
      status: response.status,
      createdAt: prepared.createdAt.toISOString(),
      response,
      input: prepared.input,
      messages,
    }
  }

  private async persist(prepared: PreparedResponse, stored: Promise<unknown> | undefined, response: ResponseObject, messages: LmcMessage[]): Promise<void> {
    if (!prepared.store) return
    await stored
    await this.deps.store.updateResponse(prepared.tenantId, prepared.id, { status: response.status, response, messages })
  }

  /** `store: false` keeps nothing beyond a session the client named: a session made for it goes. */
  private async forget(prepared: PreparedResponse): Promise<void> {
    if (prepared.store || !prepared.newSession) return
    await this.deps.sessions.delete(prepared.tenantId, prepared.session.id).catch(() => {})
  }
}

/** `text.format` as the Chat Completions `response_format` the upstream understands. */
function responseFormat(format: NonNullable<NonNullable<ResponseCreateBody['text']>['format']>): NonNullable<PassThrough['response_format']> {
  if (format.type === 'json_schema') {
    if (!format.name || !format.schema) throw invalidRequest('A json_schema format needs a name and a schema', 'text.format')
    return {
      type: 'json_schema',
      json_schema: {
        name: format.name,
        schema: format.schema,
        ...(format.strict != null ? { strict: format.strict } : {}),
        ...(format.description ? { description: format.description } : {}),
      },
    }
  }
  return { type: 'json_object' }
}

/**
 * Responses' `tool_choice` in Chat Completions form. Forcing a tool only makes sense for the
 * client's functions, whose call ends the turn; forced on the server's code tool, every step of
 * the turn would have to run code again.
 */
function toolChoice(choice: ResponseCreateBody['tool_choice'], functions: boolean): unknown {
  if (choice === undefined || choice === 'auto' || choice === 'none') return choice
  const named = typeof choice === 'object' ? (choice as { type: string; name?: unknown }) : undefined
  if (functions && choice === 'required') return choice
  if (functions && named?.type === 'function') return { type: 'function', function: { name: named.name } }
  throw unsupported('tool_choice must be "auto", "none", or with function tools "required" or a function', 'tool_choice')
}

/** The same error with its `param` renamed. */
function renamed<E>(err: E, rename: (param: string) => string): E | ApiError {
  if (!(err instanceof ApiError) || err.param === null) return err
  const param = rename(err.param)
  if (param === err.param) return err
  const copy = new ApiError(err.statusCode, err.type, err.code, err.message, param, err.extra, { cause: err })
  return err.retryable ? copy : copy.final()
}

/** `messages[k]…` (the chat service's name for the turn's k-th input) as the input item it came from. */
function inputParam(param: string, sources: number[]): string {
  if (param === 'messages') return 'input'
  return param.replace(/^messages\[(\d+)\]\.tool_call_id/, (_, k: string) => `input[${sources[Number(k)] ?? k}].call_id`).replace(/^messages\[(\d+)\]/, (_, k: string) => `input[${sources[Number(k)] ?? k}]`)
}
