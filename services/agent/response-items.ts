import { randomBytes } from 'node:crypto'
import type {
  ResponseCodeInterpreterToolCall,
  ResponseFunctionToolCall,
  ResponseOutputMessage,
  ResponseStreamEvent,
  ResponseUsage,
} from 'openai/resources/responses/responses'
import type { LmcChunk, LmcInput, LmcMessage } from '../../schemas/lmc.js'
import { invalidRequest } from '../errors.js'
import { languageFromTag } from './fences.js'
import type { TokenUsage } from './loop.js'

/**
 * The Responses API's items (OpenAI's `input` and `output` items, openai-node
 * `resources/responses/responses.d.ts`) to and from this server's LMC messages. The code
 * interpreter's `code_interpreter_call` is a code message with the console and image messages
 * that follow it; an assistant text message is a `message` item with one `output_text` part.
 */

export type OutputItem = ResponseOutputMessage | (ResponseCodeInterpreterToolCall & { language?: string }) | (ResponseFunctionToolCall & { id: string })

/** A `data:` URL of a base64 PNG or JPEG, the only images the server accepts (it never fetches URLs). */
const DATA_IMAGE = /^data:image\/(png|jpe?g);base64,(.*)$/s

/** An id in OpenAI's style: a prefix and 48 hex digits (`resp_…`, `msg_…`). */
export function itemId(prefix: string): string {
  return `${prefix}_${randomBytes(24).toString('hex')}`
}

/** The output item id of an LMC message: stable, so a stream and the stored response agree. */
function idOf(prefix: 'msg' | 'ci' | 'fc', lmcId: string): string {
  return `${prefix}_${lmcId.replaceAll('-', '')}`
}

export interface ResponseInput {
  /** The LMC messages the turn stores and the model reads, in order. */
  inputs: LmcInput[]
  /** System and developer messages of the input, joined (after `instructions`). */
  system: string[]
  /** The input as a list of items with ids, as `GET /v1/responses/{id}/input_items` lists them. */
  items: Record<string, unknown>[]
  /** For each of `inputs`, the index of the input item it came from (to name it in an error). */
  sources: number[]
}

type Item = Record<string, unknown>

const isRecord = (value: unknown): value is Item => typeof value === 'object' && value !== null && !Array.isArray(value)

/**
 * Converts a request's `input` (a string, or a list of items: messages, earlier output items,
 * `function_call_output`) into LMC inputs. Refuses (400 with `param`) what it cannot honour:
 * images by URL or file id, files. Item references are resolved before (services/responses.ts).
 */
export function fromResponseInput(input: string | unknown[]): ResponseInput {
  if (typeof input === 'string') {
    const item = { id: itemId('msg'), type: 'message', role: 'user', content: [{ type: 'input_text', text: input }] }
    return { inputs: [{ role: 'user', type: 'message', format: 'text', content: input }], system: [], items: [item], sources: [0] }
  }
  const out: ResponseInput = { inputs: [], system: [], items: [], sources: [] }
  input.forEach((raw, i) => {
    const before = out.inputs.length
    const at = `input[${i}]`
    if (!isRecord(raw)) throw invalidRequest('Each input item must be an object', at, 'invalid_input')
    const type = raw.type ?? (raw.role !== undefined ? 'message' : undefined)
    switch (type) {
      case 'message':
        messageItem(raw, at, out)
        break
      case 'code_interpreter_call':
        out.inputs.push(...codeCallItem(raw, at))
        break
      case 'function_call':
        out.inputs.push({
          role: 'assistant',
          type: 'tool_call',
          content: { id: callId(raw, at), name: stringField(raw, 'name', at), arguments: stringField(raw, 'arguments', at) },
        })
        break
      case 'function_call_output':
        out.inputs.push({ role: 'computer', type: 'tool_result', content: { tool_call_id: callId(raw, at), content: outputText(raw.output, `${at}.output`) } })
        break
      case 'reasoning':
        // Reasoning of another model carries nothing the upstream here can read.
        break
      default:
        throw invalidRequest(`Unsupported input item type "${String(type)}"`, `${at}.type`, 'invalid_input')
    }
    out.items.push({ ...raw, type, id: typeof raw.id === 'string' && raw.id ? raw.id : itemId(type === 'message' ? 'msg' : 'item') })
    for (let k = before; k < out.inputs.length; k++) out.sources.push(i)
  })
  return out
}

function stringField(item: Item, field: string, at: string): string {
  const value = item[field]
  if (typeof value !== 'string') throw invalidRequest(`${field} must be a string`, `${at}.${field}`, 'invalid_input')
  return value
}

function callId(item: Item, at: string): string {
  const id = stringField(item, 'call_id', at)
  if (!id) throw invalidRequest('call_id must not be empty', `${at}.call_id`, 'invalid_input')
  return id
}

function messageItem(item: Item, at: string, out: ResponseInput): void {
  const { role, content } = item
  if (role === 'system' || role === 'developer') {
    out.system.push(textParts(content, `${at}.content`))
    return
  }
  if (role === 'assistant') {
    const text = textParts(content, `${at}.content`)
    if (text) out.inputs.push({ role: 'assistant', type: 'message', format: 'text', content: text })
    return
  }
  if (role !== 'user') throw invalidRequest(`Unknown message role "${String(role)}"`, `${at}.role`, 'invalid_input')
  if (typeof content === 'string') {
    out.inputs.push({ role: 'user', type: 'message', format: 'text', content })
    return
  }
  if (!Array.isArray(content)) throw invalidRequest('Content must be a string or a list of parts', `${at}.content`, 'invalid_input')
  let text: string[] = []
  const flush = () => {
    if (text.length > 0) out.inputs.push({ role: 'user', type: 'message', format: 'text', content: text.join('\n') })
    text = []
  }
  content.forEach((part: unknown, j) => {
    const where = `${at}.content[${j}]`
    if (!isRecord(part)) throw invalidRequest('Each content part must be an object', where, 'invalid_input')
    if (part.type === 'input_text' || part.type === 'output_text') {
      if (typeof part.text !== 'string') throw invalidRequest('text must be a string', `${where}.text`, 'invalid_input')
      text.push(part.text)
      return
    }
    if (part.type === 'input_image') {
      // Fetching URLs from the server would let a caller reach hosts only the server can reach.
      const match = DATA_IMAGE.exec(typeof part.image_url === 'string' ? part.image_url : '')
      if (!match) throw invalidRequest('Images must be base64 data URLs (PNG or JPEG) in image_url', `${where}.image_url`, 'invalid_input')
      flush()
      out.inputs.push({ role: 'user', type: 'image', format: match[1] === 'png' ? 'base64.png' : 'base64.jpeg', content: match[2]! })
      return
    }
    throw invalidRequest(`Unsupported content part "${String(part.type)}"`, `${where}.type`, 'invalid_input')
  })
  flush()
}

/** Text of a string or of the text parts of a list (`input_text`, `output_text`, `refusal`). */
function textParts(content: unknown, at: string): string {
  if (content === null || content === undefined) return ''
  if (typeof content === 'string') return content
  if (!Array.isArray(content)) throw invalidRequest('Content must be a string or a list of parts', at, 'invalid_input')
  return content
    .map((part: unknown, j) => {
      if (isRecord(part) && (part.type === 'input_text' || part.type === 'output_text') && typeof part.text === 'string') return part.text
      if (isRecord(part) && part.type === 'refusal' && typeof part.refusal === 'string') return part.refusal
      throw invalidRequest('Only text parts are allowed here', `${at}[${j}]`, 'invalid_input')
    })
    .join('\n')
}

/** A function's output: a string, or a list of text parts. */
function outputText(output: unknown, at: string): string {
  if (typeof output === 'string') return output
  return textParts(output, at)
}

/** An earlier `code_interpreter_call` sent back as input: the code, then its logs and images. */
function codeCallItem(item: Item, at: string): LmcInput[] {
  const language = languageFromTag(typeof item.language === 'string' ? item.language : 'python') ?? 'python'
  const inputs: LmcInput[] = [{ role: 'assistant', type: 'code', format: language, content: typeof item.code === 'string' ? item.code : '' }]
  const outputs = Array.isArray(item.outputs) ? item.outputs : []
  outputs.forEach((output: unknown, j) => {
    if (isRecord(output) && output.type === 'logs' && typeof output.logs === 'string') {
      inputs.push({ role: 'computer', type: 'console', format: 'output', content: output.logs })
      return
    }
    const match = isRecord(output) && output.type === 'image' && typeof output.url === 'string' ? DATA_IMAGE.exec(output.url) : null
    if (!match) throw invalidRequest('Code interpreter outputs are logs or data: URL images', `${at}.outputs[${j}]`, 'invalid_input')
    inputs.push({ role: 'computer', type: 'image', format: match[1] === 'png' ? 'base64.png' : 'base64.jpeg', content: match[2]! })
  })
  return inputs
}

/** Chat Completions usage as the Responses API counts it. */
export function responseUsage(usage: TokenUsage): ResponseUsage {
  return {
    input_tokens: usage.prompt_tokens,
    input_tokens_details: { cached_tokens: 0 },
    output_tokens: usage.completion_tokens,
    output_tokens_details: { reasoning_tokens: 0 },
    total_tokens: usage.total_tokens,
  } as ResponseUsage
}

/** A stream event as sent: its type, its sequence number and its fields (openai-node `ResponseStreamEvent`). */
export type StreamEvent = { type: ResponseStreamEvent['type']; sequence_number: number } & Record<string, unknown>

interface OpenText {
  kind: 'text'
  index: number
  item: ResponseOutputMessage
  text: string
}

interface OpenCall {
  kind: 'code'
  index: number
  item: OutputItem & { type: 'code_interpreter_call' }
  /** The code is complete and running: outputs are being collected. */
  running: boolean
}

/**
 * Builds a response's output items from the LMC chunks of its turn, as they arrive, and the
 * stream events that tell a client about them (OpenAI's "Streaming events" reference): a
 * `message` item's `output_item.added`, `content_part.added`, `output_text.delta`… `.done`; a
 * `code_interpreter_call`'s `output_item.added`, `code_interpreter_call.in_progress`,
 * `code_interpreter_call_code.delta`/`.done`, `.interpreting`, then (once its outputs are in)
 * `.completed` and `output_item.done`. Sequence numbers count from 0 across the whole stream.
 *
 * With `answerOnly` (structured output) text is held back and only the final answer becomes a
 * message item, so `output_text` parses.
 */
export class ResponseItems {
  readonly items: OutputItem[] = []
  private seq = 0
  private open: OpenText | OpenCall | undefined
  private call: OpenCall | undefined
  private held: { id: string; text: string } | undefined

  constructor(
    private readonly containerId: string,
    private readonly send: (event: StreamEvent) => void = () => {},
    private readonly answerOnly = false,
  ) {}

  /** Sends a lifecycle or error event, numbered in the same sequence as the item events. */
  event(type: StreamEvent['type'], fields: Record<string, unknown>): void {
    this.send({ type, sequence_number: this.seq++, ...fields })
  }

  push(chunk: LmcChunk): void {
    if (chunk.role === 'user' || chunk.type === 'confirmation' || chunk.format === 'active_line') return
    if (chunk.type === 'tool_result') return
    if (chunk.type === 'tool_call') this.functionCall(chunk)
    else if (chunk.role === 'assistant' && chunk.type === 'code') this.code(chunk)
    else if (chunk.role === 'assistant') this.text(chunk)
    else this.output(chunk)
  }

  /**
   * Completes what is still open. `incomplete` marks items cut short (a cancelled or failed turn);
   * `final` is the turn's answer, sent whole when text was held back.
   */
  finish(opts: { incomplete?: boolean; final?: LmcMessage } = {}): OutputItem[] {
    const status = opts.incomplete ? 'incomplete' : 'completed'
    if (this.open?.kind === 'text') this.endText(this.open, status)
    if (this.open?.kind === 'code') this.endCode(this.open)
    this.closeCall(status)
    if (this.answerOnly && !opts.incomplete) {
      const final = opts.final && typeof opts.final.content === 'string' ? { id: opts.final.id, text: opts.final.content } : this.held
      if (final) {
        const open = this.startText(final.id)
        if (final.text) this.delta(open, final.text)
        this.endText(open, 'completed')
      }
    }
    return this.items
  }

  private code(chunk: LmcChunk): void {
    if (chunk.start) {
      this.closeCall('completed')
      const item = {
        id: idOf('ci', chunk.id),
        type: 'code_interpreter_call' as const,
        status: 'in_progress' as const,
        code: '',
        container_id: this.containerId,
        outputs: [],
        ...(chunk.format ? { language: chunk.format } : {}),
      }
      const open: OpenCall = { kind: 'code', index: this.add(item), item, running: false }
      this.open = open
      this.event('response.code_interpreter_call.in_progress', { output_index: open.index, item_id: item.id })
      return
    }
    const open = this.open
    if (open?.kind !== 'code') return
    if (chunk.end) {
      this.endCode(open)
      return
    }
    if (typeof chunk.content !== 'string' || !chunk.content) return
    open.item.code += chunk.content
    this.event('response.code_interpreter_call_code.delta', { output_index: open.index, item_id: open.item.id, delta: chunk.content })
  }

  private endCode(open: OpenCall): void {
    this.open = undefined
    open.item.status = 'interpreting'
    open.running = true
    this.call = open
    this.event('response.code_interpreter_call_code.done', { output_index: open.index, item_id: open.item.id, code: open.item.code })
    this.event('response.code_interpreter_call.interpreting', { output_index: open.index, item_id: open.item.id })
  }

  /** Console and image messages belong to the call that ran; the model's next words end it. */
  private output(chunk: LmcChunk): void {
    const call = this.call
    if (!call || typeof chunk.content !== 'string' || !chunk.content) return
    const outputs = (call.item.outputs ??= [])
    if (chunk.type === 'image') {
      const mime = chunk.format === 'base64.jpeg' ? 'image/jpeg' : 'image/png'
      outputs.push({ type: 'image', url: `data:${mime};base64,${chunk.content}` })
      return
    }
    const last = outputs.at(-1)
    if (last?.type === 'logs') last.logs += chunk.content
    else outputs.push({ type: 'logs', logs: chunk.content })
  }

  private closeCall(status: 'completed' | 'incomplete'): void {
    const call = this.call
    if (!call) return
    this.call = undefined
    call.item.status = status
    if (status === 'completed') this.event('response.code_interpreter_call.completed', { output_index: call.index, item_id: call.item.id })
    this.event('response.output_item.done', { output_index: call.index, item: structuredClone(call.item) })
  }

  /** A call to one of the client's functions: known whole (the turn suspends on it), sent as one delta. */
  private functionCall(chunk: LmcChunk): void {
    const call = chunk.content
    if (typeof call !== 'object' || call === null) return
    this.closeCall('completed')
    const { id, name, arguments: args } = call as { id?: unknown; name?: unknown; arguments?: unknown }
    const item = {
      id: idOf('fc', chunk.id),
      type: 'function_call' as const,
      status: 'in_progress' as const,
      call_id: String(id),
      name: String(name),
      arguments: '',
    }
    const index = this.add(item)
    const text = String(args ?? '')
    if (text) this.event('response.function_call_arguments.delta', { item_id: item.id, output_index: index, delta: text })
    item.arguments = text
    this.event('response.function_call_arguments.done', { item_id: item.id, output_index: index, name: item.name, arguments: text })
    const done = { ...item, status: 'completed' as const }
    this.items[index] = done
    this.event('response.output_item.done', { output_index: index, item: structuredClone(done) })
  }

  private text(chunk: LmcChunk): void {
    if (chunk.start) {
      this.closeCall('completed')
      if (this.answerOnly) this.held = { id: chunk.id, text: '' }
      else this.open = this.startText(chunk.id)
      return
    }
    if (this.answerOnly) {
      if (this.held && typeof chunk.content === 'string') this.held.text += chunk.content
      return
    }
    const open = this.open
    if (open?.kind !== 'text') return
    if (chunk.end) this.endText(open, 'completed')
    else if (typeof chunk.content === 'string' && chunk.content) this.delta(open, chunk.content)
  }

  private startText(lmcId: string): OpenText {
    const item: ResponseOutputMessage = { id: idOf('msg', lmcId), type: 'message', status: 'in_progress', role: 'assistant', content: [] }
    const open: OpenText = { kind: 'text', index: this.add(item), item, text: '' }
    this.event('response.content_part.added', {
      item_id: item.id,
      output_index: open.index,
      content_index: 0,
      part: { type: 'output_text', text: '', annotations: [], logprobs: [] },
    })
    return open
  }

  private delta(open: OpenText, delta: string): void {
    open.text += delta
    this.event('response.output_text.delta', { item_id: open.item.id, output_index: open.index, content_index: 0, delta, logprobs: [] })
  }

  private endText(open: OpenText, status: 'completed' | 'incomplete'): void {
    if (this.open === open) this.open = undefined
    const part = { type: 'output_text' as const, text: open.text, annotations: [], logprobs: [] }
    this.event('response.output_text.done', { item_id: open.item.id, output_index: open.index, content_index: 0, text: open.text, logprobs: [] })
    this.event('response.content_part.done', { item_id: open.item.id, output_index: open.index, content_index: 0, part })
    open.item.content = [part]
    open.item.status = status
    this.event('response.output_item.done', { output_index: open.index, item: structuredClone(open.item) })
  }

  /** Appends an item and announces it; returns its output index. */
  private add(item: OutputItem): number {
    const index = this.items.push(item) - 1
    this.event('response.output_item.added', { output_index: index, item: structuredClone(item) })
    return index
  }
}
