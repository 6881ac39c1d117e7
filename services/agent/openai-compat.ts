import { randomBytes } from 'node:crypto'
import type {
  ChatCompletion,
  ChatCompletionChunk,
  ChatCompletionFunctionTool,
  ChatCompletionMessage,
  ChatCompletionMessageFunctionToolCall,
  ChatCompletionToolChoiceOption,
} from 'openai/resources/chat/completions'
import type { LmcChunk, LmcInput, LmcMessage } from '../../schemas/lmc.js'
import { invalidRequest } from '../errors.js'
import { EXECUTE_TOOL } from './context.js'
import { languageFromTag } from './fences.js'
import type { ClientTools, ClientToolCall, PassThrough, TokenUsage } from './loop.js'

/** A Chat Completions request message, or an LMC message sent through the same route. */
export interface CompatMessage {
  role: string
  content?: unknown
  type?: string
  format?: string
  tool_calls?: unknown
  [field: string]: unknown
}

export interface CompatConversation {
  inputs: LmcInput[]
  /** The request's system and developer messages, which replace the default system prompt. */
  systemMessage?: string
}

const LMC_ROLES = new Set(['user', 'assistant', 'computer'])
const LMC_TYPES = new Set(['message', 'code', 'image', 'console', 'file', 'confirmation'])
const LMC_FORMATS = new Set([
  'text',
  'python',
  'javascript',
  'shell',
  'html',
  'path',
  'base64.png',
  'base64.jpeg',
  'output',
  'active_line',
  'execution',
])
const DATA_IMAGE = /^data:image\/(png|jpe?g);base64,(.*)$/s

/**
 * Converts a Chat Completions `messages` array into LMC inputs for the agent. Calls to the
 * server's `execute` tool become code messages; calls to any other tool (`clientTools` wins over
 * a language-named call) become `tool_call` messages, and `tool` messages their `tool_result`s.
 */
export function fromChatMessages(messages: CompatMessage[], clientTools: ReadonlySet<string> = new Set()): CompatConversation {
  const inputs: LmcInput[] = []
  const system: string[] = []
  // Results of the server's own `execute` calls are that code's output, not a client tool result.
  const codeCalls = new Set<string>()
  messages.forEach((message, i) => {
    const at = `messages[${i}]`
    if (typeof message?.type === 'string' && LMC_TYPES.has(message.type) && LMC_ROLES.has(message.role)) {
      inputs.push(lmcInput(message, at))
      return
    }
    switch (message?.role) {
      case 'system':
      case 'developer':
        system.push(textOf(message.content, `${at}.content`))
        return
      case 'user':
        inputs.push(...userInputs(message.content, `${at}.content`))
        return
      case 'assistant':
        inputs.push(...assistantInputs(message, at, clientTools, codeCalls))
        return
      case 'tool':
        if (typeof message.tool_call_id !== 'string' || !message.tool_call_id) {
          throw invalidRequest('A tool message needs the tool_call_id it answers', `${at}.tool_call_id`, 'invalid_message')
        }
        if (codeCalls.has(message.tool_call_id)) {
          inputs.push({ role: 'computer', type: 'console', format: 'output', content: textOf(message.content, `${at}.content`) })
          return
        }
        inputs.push({ role: 'computer', type: 'tool_result', content: { tool_call_id: message.tool_call_id, content: textOf(message.content, `${at}.content`) } })
        return
      case 'function':
        inputs.push({ role: 'computer', type: 'console', format: 'output', content: textOf(message.content, `${at}.content`) })
        return
      default:
        throw invalidRequest(`Unknown message role "${String(message?.role)}"`, `${at}.role`, 'invalid_message')
    }
  })
  const systemMessage = system.filter((text) => text.trim()).join('\n\n')
  return systemMessage ? { inputs, systemMessage } : { inputs }
}

function lmcInput(message: CompatMessage, at: string): LmcInput {
  if (message.format !== undefined && !LMC_FORMATS.has(message.format)) {
    throw invalidRequest(`Unknown LMC format "${message.format}"`, `${at}.format`, 'invalid_message')
  }
  const { content } = message
  if (typeof content !== 'string' && (typeof content !== 'object' || content === null || Array.isArray(content))) {
    throw invalidRequest('LMC content must be a string or an object', `${at}.content`, 'invalid_message')
  }
  return {
    role: message.role as LmcInput['role'],
    type: message.type as LmcInput['type'],
    ...(message.format ? { format: message.format as LmcInput['format'] } : {}),
    content: content as LmcInput['content'],
  }
}

/** Text of a string or of the text parts of a parts array. */
function textOf(content: unknown, at: string): string {
  if (content === null || content === undefined) return ''
  if (typeof content === 'string') return content
  if (!Array.isArray(content)) throw invalidRequest('Content must be a string or an array of parts', at, 'invalid_message')
  return content
    .map((part, j) => {
      if (part?.type === 'text' && typeof part.text === 'string') return part.text
      if (part?.type === 'refusal' && typeof part.refusal === 'string') return part.refusal
      throw invalidRequest(`Unsupported content part "${String(part?.type)}" here`, `${at}[${j}]`, 'invalid_message')
    })
    .join('\n')
}

function userInputs(content: unknown, at: string): LmcInput[] {
  if (!Array.isArray(content)) return [{ role: 'user', type: 'message', format: 'text', content: textOf(content, at) }]
  const inputs: LmcInput[] = []
  let text: string[] = []
  const flush = () => {
    if (text.length > 0) inputs.push({ role: 'user', type: 'message', format: 'text', content: text.join('\n') })
    text = []
  }
  content.forEach((part, j) => {
    if (part?.type === 'text' && typeof part.text === 'string') {
      text.push(part.text)
      return
    }
    if (part?.type === 'image_url') {
      // Fetching remote URLs from the server would let a caller reach internal hosts.
      const match = DATA_IMAGE.exec(String(part.image_url?.url ?? ''))
      if (!match) {
        throw invalidRequest('Images must be base64 data URLs (PNG or JPEG)', `${at}[${j}].image_url.url`, 'invalid_message')
      }
      flush()
      inputs.push({ role: 'user', type: 'image', format: match[1] === 'png' ? 'base64.png' : 'base64.jpeg', content: match[2] })
      return
    }
    throw invalidRequest(`Unsupported content part "${String(part?.type)}"`, `${at}[${j}]`, 'invalid_message')
  })
  flush()
  return inputs
}

function assistantInputs(message: CompatMessage, at: string, clientTools: ReadonlySet<string>, codeCalls: Set<string>): LmcInput[] {
  const inputs: LmcInput[] = []
  const text = textOf(message.content, `${at}.content`)
  if (text) inputs.push({ role: 'assistant', type: 'message', format: 'text', content: text })
  const calls = Array.isArray(message.tool_calls) ? message.tool_calls : []
  for (const call of calls) {
    const name = String(call?.function?.name ?? '')
    const raw = String(call?.function?.arguments ?? '')
    const server = !clientTools.has(name) && (name === EXECUTE_TOOL || languageFromTag(name) !== undefined)
    if (!server) {
      if (typeof call?.id !== 'string' || !call.id) throw invalidRequest('A tool call needs its id', `${at}.tool_calls`, 'invalid_message')
      inputs.push({ role: 'assistant', type: 'tool_call', content: { id: call.id, name, arguments: raw } })
      continue
    }
    let args: { language?: unknown; code?: unknown } | undefined
    try {
      args = JSON.parse(raw)
    } catch {
      args = undefined
    }
    if (args && typeof args.code === 'string') {
      if (typeof call?.id === 'string') codeCalls.add(call.id)
      const language = languageFromTag(typeof args.language === 'string' ? args.language : name) ?? 'python'
      inputs.push({ role: 'assistant', type: 'code', format: language, content: args.code })
    } else {
      inputs.push({ role: 'assistant', type: 'message', format: 'text', content: `[called ${name || 'a tool'} with ${raw}]` })
    }
  }
  return inputs
}

/** The ids of the tool calls of the last assistant message (a stateless client sending their results). */
export function lastToolCallIds(messages: CompatMessage[]): string[] {
  const last = messages.findLast((m) => m?.role === 'assistant' && m.type === undefined)
  const calls = Array.isArray(last?.tool_calls) ? last.tool_calls : []
  return calls.map((call) => call?.id).filter((id): id is string => typeof id === 'string' && id !== '')
}

const TOOL_NAME = /^[a-zA-Z0-9_-]{1,64}$/

/**
 * The client's tools from a Chat Completions request, checked so a mistake is a 400 naming the
 * field: function tools only, OpenAI's name rule, no duplicate, nothing named like the server's
 * own `execute` tool (a silent replacement would run the model's call as code on the server),
 * and a `tool_choice` that names a tool offered. Undefined when the request brings none.
 */
export function clientToolsOf(body: { tools?: unknown; tool_choice?: unknown; parallel_tool_calls?: boolean | null; functions?: unknown; function_call?: unknown }): ClientTools | undefined {
  if (body.functions != null || body.function_call != null) {
    throw invalidRequest('functions and function_call are deprecated; send tools and tool_choice instead', body.functions != null ? 'functions' : 'function_call', 'unsupported_parameter')
  }
  const tools: ChatCompletionFunctionTool[] = []
  const names = new Set<string>()
  const list = body.tools ?? []
  if (!Array.isArray(list)) throw invalidRequest('tools must be an array', 'tools')
  list.forEach((tool: unknown, i) => {
    const at = `tools[${i}]`
    const t = tool as { type?: unknown; function?: { name?: unknown; description?: unknown; parameters?: unknown; strict?: unknown } } | null
    if (t?.type !== 'function') throw invalidRequest(`Only function tools are supported, not "${String(t?.type)}"`, `${at}.type`, 'unsupported_parameter')
    const fn = t.function
    if (typeof fn !== 'object' || fn === null) throw invalidRequest('A function tool needs its function', `${at}.function`)
    const name = fn.name
    if (typeof name !== 'string' || !TOOL_NAME.test(name)) {
      throw invalidRequest('A function name is 1 to 64 letters, digits, underscores or dashes', `${at}.function.name`)
    }
    if (name === EXECUTE_TOOL) {
      throw invalidRequest(`"${EXECUTE_TOOL}" is the server's own code tool; give your tool another name`, `${at}.function.name`, 'tool_name_reserved')
    }
    if (names.has(name)) throw invalidRequest(`Two tools are named "${name}"`, `${at}.function.name`)
    if (fn.description !== undefined && typeof fn.description !== 'string') throw invalidRequest('description must be a string', `${at}.function.description`)
    if (fn.parameters !== undefined && (typeof fn.parameters !== 'object' || fn.parameters === null || Array.isArray(fn.parameters))) {
      throw invalidRequest('parameters must be a JSON Schema object', `${at}.function.parameters`)
    }
    if (fn.strict !== undefined && fn.strict !== null && typeof fn.strict !== 'boolean') throw invalidRequest('strict must be a boolean', `${at}.function.strict`)
    names.add(name)
    tools.push({
      type: 'function',
      function: {
        name,
        ...(fn.description !== undefined ? { description: fn.description } : {}),
        ...(fn.parameters !== undefined ? { parameters: fn.parameters as Record<string, unknown> } : {}),
        ...(typeof fn.strict === 'boolean' ? { strict: fn.strict } : {}),
      },
    })
  })
  const choice = toolChoiceOf(body.tool_choice, names)
  if (tools.length === 0 && choice === undefined) return undefined
  return {
    tools,
    ...(choice !== undefined ? { toolChoice: choice } : {}),
    ...(typeof body.parallel_tool_calls === 'boolean' && tools.length > 0 ? { parallelToolCalls: body.parallel_tool_calls } : {}),
  }
}

function toolChoiceOf(choice: unknown, names: ReadonlySet<string>): ChatCompletionToolChoiceOption | undefined {
  if (choice === undefined || choice === null) return undefined
  if (choice === 'none' || choice === 'auto' || choice === 'required') return choice
  const named = choice as { type?: unknown; function?: { name?: unknown } }
  if (named?.type === 'function' && typeof named.function?.name === 'string') {
    const name = named.function.name
    if (name !== EXECUTE_TOOL && !names.has(name)) throw invalidRequest(`tool_choice names "${name}", which is not among the tools`, 'tool_choice.function.name')
    return { type: 'function', function: { name } }
  }
  throw invalidRequest('tool_choice is "none", "auto", "required" or {"type": "function", "function": {"name"}}', 'tool_choice', 'unsupported_parameter')
}

/** The client's tool calls as Chat Completions' `message.tool_calls`. */
export function toolCallsOf(calls: ClientToolCall[]): ChatCompletionMessageFunctionToolCall[] {
  return calls.map((call) => ({ id: call.id, type: 'function', function: { name: call.name, arguments: call.arguments } }))
}

/** The text of the last assistant message, as a client resends an answer it was given. */
export function lastAssistantText(messages: CompatMessage[]): string | undefined {
  const last = messages.findLast((m) => m?.role === 'assistant' && m.type === undefined)
  if (!last) return undefined
  if (typeof last.content === 'string') return last.content
  if (!Array.isArray(last.content)) return undefined
  return last.content.map((part) => (part?.type === 'text' && typeof part.text === 'string' ? part.text : '')).join('')
}

type Block = 'text' | 'code' | 'output' | 'image'

function blockOf(chunk: Pick<LmcChunk, 'role' | 'type' | 'format'>): Block | undefined {
  if (chunk.role === 'user' || chunk.type === 'confirmation' || chunk.format === 'active_line') return undefined
  // The client's tool calls travel in `tool_calls`, not in the text.
  if (chunk.type === 'tool_call' || chunk.type === 'tool_result') return undefined
  if (chunk.type === 'code') return 'code'
  if (chunk.type === 'image') return 'image'
  if (chunk.type === 'console' || chunk.role === 'computer') return 'output'
  return 'text'
}

/**
 * Renders LMC chunks as the Markdown of one assistant `content`: code in a fence tagged with its
 * language, consecutive console messages merged into one ```output fence. Newlines at the end
 * of a fenced block are held back until more content shows they were not the last.
 */
class ContentRenderer {
  private wrote = false
  private current: Block | undefined
  private fenced: { kind: 'code' | 'output'; ticks: string } | undefined
  private held = ''
  private lastChar = ''
  private breakBeforeOutput = false

  start(chunk: LmcChunk, ticks = '```'): string {
    const block = blockOf(chunk)
    this.current = block
    if (!block) return ''
    if (block === 'output' && this.fenced?.kind === 'output') {
      this.breakBeforeOutput = this.held === '' && this.lastChar !== '\n'
      return ''
    }
    let out = this.close()
    if (this.wrote) out += '\n\n'
    if (block === 'code' || block === 'output') {
      out += `${ticks}${block === 'code' ? (chunk.format ?? '') : 'output'}\n`
      this.fenced = { kind: block, ticks }
    }
    return this.write(out)
  }

  content(chunk: LmcChunk): string {
    const block = this.current
    if (!block || typeof chunk.content !== 'string' || chunk.content === '') return ''
    if (block === 'text') return this.write(chunk.content)
    if (block === 'image') {
      const mime = chunk.format === 'base64.jpeg' ? 'image/jpeg' : 'image/png'
      return this.write(`![image](data:${mime};base64,${chunk.content})`)
    }
    const text = (this.breakBeforeOutput ? '\n' : '') + this.held + chunk.content
    this.breakBeforeOutput = false
    const body = text.replace(/\n+$/, '')
    this.held = text.slice(body.length)
    return body ? this.write(body) : ''
  }

  end(): string {
    const block = this.current
    this.current = undefined
    return block === 'code' ? this.close() : ''
  }

  /** Closes the open fence; call before the answer ends. */
  close(): string {
    if (!this.fenced) return ''
    const out = `\n${this.fenced.ticks}`
    this.fenced = undefined
    this.held = ''
    this.breakBeforeOutput = false
    return this.write(out)
  }

  private write(text: string): string {
    if (text) {
      this.wrote = true
      this.lastChar = text.at(-1) ?? ''
    }
    return text
  }
}

/** The whole turn as one assistant `content` string. */
export function renderContent(messages: LmcMessage[]): string {
  const renderer = new ContentRenderer()
  let out = ''
  messages.forEach((message, i) => {
    const chunk: LmcChunk = {
      id: message.id,
      role: message.role,
      type: message.type,
      format: message.format,
      content: message.content,
      created_at: message.created_at,
    }
    out += renderer.start(chunk, ticksFor(blockRun(messages, i)))
    out += renderer.content(chunk)
    out += renderer.end()
  })
  return out + renderer.close()
}

/** The messages sharing a fence with `messages[i]`: console output runs share one. */
function blockRun(messages: LmcMessage[], i: number): LmcMessage[] {
  if (blockOf(messages[i]) !== 'output') return [messages[i]]
  const run: LmcMessage[] = []
  for (let j = i; j < messages.length; j++) {
    const block = blockOf(messages[j])
    if (block === undefined) continue
    if (block !== 'output') break
    run.push(messages[j])
  }
  return run
}

/** Longer than any backtick run inside, so the content cannot close the fence early. */
function ticksFor(messages: LmcMessage[]): string {
  let longest = 0
  for (const { content } of messages) {
    if (typeof content !== 'string') continue
    for (const run of content.match(/`{3,}/g) ?? []) longest = Math.max(longest, run.length)
  }
  return '`'.repeat(Math.max(3, longest + 1))
}

/**
 * The finish_reason a client sees: `tool_calls` when the turn waits for the client's tool
 * results; otherwise the last upstream call's, except that the server's own `execute` calls are
 * not the client's tool calls (the turn ended at the iteration limit), and an upstream that gave
 * none ended cleanly.
 */
export function clientFinishReason(upstream: string | null, toolCalls = false): ChatCompletion.Choice['finish_reason'] {
  if (toolCalls) return 'tool_calls'
  return upstream === 'length' || upstream === 'content_filter' ? upstream : 'stop'
}

const PASS_THROUGH = [
  'stop',
  'seed',
  'top_p',
  'presence_penalty',
  'frequency_penalty',
  'logit_bias',
  'user',
  'logprobs',
  'top_logprobs',
  'response_format',
] as const

/**
 * The request fields passed upstream as they are. One turn answers with one choice, so `n` above
 * 1 is refused rather than quietly answered once.
 */
export function passThroughOf(body: Partial<Record<(typeof PASS_THROUGH)[number] | 'n', unknown>>): PassThrough {
  if (typeof body.n === 'number' && body.n > 1) {
    throw invalidRequest('Only n: 1 is supported: each request runs one agent turn with one answer', 'n', 'unsupported_parameter')
  }
  const fields: Record<string, unknown> = {}
  for (const field of PASS_THROUGH) if (body[field] !== undefined && body[field] !== null) fields[field] = body[field]
  return fields as PassThrough
}

export function completionId(): string {
  return `chatcmpl-${randomBytes(12).toString('base64url')}`
}

export interface CompletionMeta {
  id: string
  /** Unix seconds. */
  created: number
  model: string
}

/** A `chat.completion` whose tool calls are function calls (the only kind the server returns). */
export type Completion = Omit<ChatCompletion, 'choices'> & {
  choices: (Omit<ChatCompletion.Choice, 'message'> & { message: Omit<ChatCompletionMessage, 'tool_calls'> & { tool_calls?: ChatCompletionMessageFunctionToolCall[] } })[]
}

/** A `chat.completion`; with `toolCalls` the message carries them (content null when there is no text, as OpenAI sends it). */
export function buildCompletion(
  meta: CompletionMeta,
  content: string,
  usage: TokenUsage,
  finishReason: ChatCompletion.Choice['finish_reason'] = 'stop',
  toolCalls: ClientToolCall[] = [],
): Completion {
  const message: Completion['choices'][number]['message'] =
    toolCalls.length > 0
      ? { role: 'assistant', content: content || null, refusal: null, tool_calls: toolCallsOf(toolCalls) }
      : { role: 'assistant', content, refusal: null }
  return {
    id: meta.id,
    object: 'chat.completion',
    created: meta.created,
    model: meta.model,
    choices: [{ index: 0, message, logprobs: null, finish_reason: finishReason }],
    usage: { ...usage },
  }
}

/** Argument fragments of a streamed tool call, about this many characters each (OpenAI streams a few tokens at a time). */
const ARGUMENT_PIECE = 32

/**
 * Builds the `chat.completion.chunk` stream of one turn from its LMC chunks, as they arrive:
 * `start()` once, `push()` per LMC chunk, `finish()`, then `usage()` when the client asked.
 */
export class CompletionChunks {
  private readonly renderer = new ContentRenderer()
  private sent = ''

  constructor(private readonly meta: CompletionMeta) {}

  /** Opens the stream with the role, as OpenAI does. */
  start(): ChatCompletionChunk {
    return this.chunk({ role: 'assistant', content: '' })
  }

  push(lmc: LmcChunk): ChatCompletionChunk[] {
    let text: string
    if (lmc.start) text = this.renderer.start(lmc)
    else if (lmc.end) text = this.renderer.end()
    else text = this.renderer.content(lmc)
    return text ? [this.chunk({ content: text })] : []
  }

  finish(reason: ChatCompletionChunk.Choice['finish_reason'] = 'stop'): ChatCompletionChunk[] {
    const closing = this.renderer.close()
    return [...(closing ? [this.chunk({ content: closing })] : []), this.chunk({}, reason)]
  }

  /**
   * The client's tool calls as OpenAI streams them: per call, a delta with its `index`, `id`,
   * `type` and `function.name` (arguments empty), then deltas with fragments of the arguments.
   */
  toolCalls(calls: ClientToolCall[]): ChatCompletionChunk[] {
    const closing = this.renderer.close()
    const chunks = closing ? [this.chunk({ content: closing })] : []
    calls.forEach((call, index) => {
      chunks.push(this.chunk({ tool_calls: [{ index, id: call.id, type: 'function', function: { name: call.name, arguments: '' } }] }))
      for (let at = 0; at < call.arguments.length; ) {
        let end = Math.min(at + ARGUMENT_PIECE, call.arguments.length)
        // Never between the halves of a surrogate pair: each fragment must be valid text on its own.
        if (end < call.arguments.length && /[\uD800-\uDBFF]/.test(call.arguments[end - 1]!)) end++
        chunks.push(this.chunk({ tool_calls: [{ index, function: { arguments: call.arguments.slice(at, end) } }] }))
        at = end
      }
    })
    return chunks
  }

  /** Text sent as it is, outside the rendering of the turn (the final answer of structured output). */
  content(text: string): ChatCompletionChunk {
    return this.chunk({ content: text })
  }

  /** Closes an open fence before an error is reported, so the text read so far stays well-formed. */
  interrupt(): ChatCompletionChunk[] {
    const closing = this.renderer.close()
    return closing ? [this.chunk({ content: closing })] : []
  }

  usage(usage: TokenUsage): ChatCompletionChunk {
    return { id: this.meta.id, object: 'chat.completion.chunk', created: this.meta.created, model: this.meta.model, choices: [], usage: { ...usage } }
  }

  /** All the content sent so far. */
  get text(): string {
    return this.sent
  }

  private chunk(delta: ChatCompletionChunk.Choice.Delta, finishReason: ChatCompletionChunk.Choice['finish_reason'] = null): ChatCompletionChunk {
    this.sent += delta.content ?? ''
    return {
      id: this.meta.id,
      object: 'chat.completion.chunk',
      created: this.meta.created,
      model: this.meta.model,
      choices: [{ index: 0, delta, logprobs: null, finish_reason: finishReason }],
    }
  }
}
