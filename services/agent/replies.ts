import { randomUUID } from 'node:crypto'
import type { ChatCompletionChunk } from 'openai/resources/chat/completions'
import type { LmcMessage } from '../../schemas/lmc.js'
import type { Language } from '../kernels/types.js'
import { EXECUTE_TOOL } from './context.js'
import { FenceSplitter, languageFromTag } from './fences.js'
import { PartialJsonStrings } from './partial-json.js'

/**
 * Reply parsers: what one upstream answer asks for. The model's prose becomes assistant
 * messages as it streams; its code (an `execute` tool call, or a fenced block when tools are off)
 * becomes code messages to run; its calls to the client's own function tools are collected to be
 * returned to the client.
 */

export type Head = Pick<LmcMessage, 'role' | 'type' | 'format' | 'stream'>

/** One message being written (services/agent/loop.ts `Draft`). */
export interface MessageDraft {
  readonly ended: boolean
  /** Everything appended so far, unredacted. */
  readonly text: string
  append(text: string): void
  end(content?: Record<string, unknown>): Promise<LmcMessage>
}

/** What a reply needs from its turn. */
export interface Writer {
  open(head: Head): MessageDraft
  /** A message known whole at once. */
  say(head: Head, content: string | Record<string, unknown>): Promise<LmcMessage>
  readonly languages: Language[]
  /** Names of the client's function tools: calls to them go back to the client, never run here. */
  readonly clientTools: ReadonlySet<string>
}

export const ASSISTANT_TEXT: Head = { role: 'assistant', type: 'message', format: 'text' }

/** A server call of the reply that was not shown yet: its name and complete `arguments` text. */
export interface RawCall {
  name: string
  arguments: string
}

/** A call to one of the client's tools, as OpenAI returns it in `message.tool_calls[]` (`arguments` is JSON text). */
export interface ClientToolCall {
  id: string
  name: string
  arguments: string
}

/** Code the model asked to run, once its message is complete, or why it cannot run. */
export type PendingCode = { message: LmcMessage } & ({ language: Language; code: string } | { problem: string })

export interface Reply {
  /** Returns true when the rest of the upstream answer is not wanted. */
  delta(delta: ChatCompletionChunk.Choice.Delta): Promise<boolean>
  /** Completes the open messages once the answer is over. */
  finish(): Promise<void>
  /**
   * The next server call to run, settled: its code message is shown now, after the output of the
   * call before it. Undefined when none is left.
   */
  next(): Promise<PendingCode | undefined>
  /** The server calls `next` has not reached yet, as they came. */
  rest(): RawCall[]
  /** The calls to the client's tools, in order, each with an id. */
  clientCalls(): ClientToolCall[]
  /** Prose that came after the tool calls, said once the code ran so tool results stay paired. */
  trailingText(): string
}

/** Tool call ids as OpenAI makes them, for upstreams that send none. */
export const newToolCallId = () => `call_${randomUUID().replaceAll('-', '')}`

/** Prose streamed as one assistant message, opened only once something visible arrives. */
class ProseWriter {
  private draft: MessageDraft | undefined

  constructor(private readonly writer: Writer) {}

  write(text: string): void {
    if (!this.draft) {
      const visible = text.trimStart()
      if (!visible) return
      this.draft = this.writer.open(ASSISTANT_TEXT)
      this.draft.append(visible)
      return
    }
    this.draft.append(text)
  }

  async close(): Promise<void> {
    const draft = this.draft
    this.draft = undefined
    await draft?.end()
  }
}

interface CallState {
  index: number
  id: string
  name: string
  args: string
  reader: PartialJsonStrings
  draft?: MessageDraft
  /** How much of the streamed `code` the draft already holds. */
  shown: number
}

/** Tool-call fragments put together by their `index`, as OpenAI streams them. */
class CallAssembler {
  readonly calls: CallState[] = []

  /** Adds one fragment; returns its call and whether the fragment started it. */
  add(part: ChatCompletionChunk.Choice.Delta.ToolCall): { call: CallState; started: boolean } {
    let call = this.calls.find((c) => c.index === part.index)
    const started = !call
    if (!call) {
      call = { index: part.index, id: '', name: '', args: '', reader: new PartialJsonStrings(), shown: 0 }
      this.calls.push(call)
    }
    if (part.id && !call.id) call.id = part.id
    if (part.function?.name && !call.name) call.name = part.function.name
    if (part.function?.arguments) {
      call.args += part.function.arguments
      call.reader.feed(part.function.arguments)
    }
    return { call, started }
  }

  /** Every call gets an id once the answer is over: tool results are matched by it. */
  finish(): void {
    for (const call of this.calls) call.id ||= newToolCallId()
  }

  client(writer: Writer): ClientToolCall[] {
    return this.calls.filter((c) => writer.clientTools.has(c.name)).map((c) => ({ id: c.id, name: c.name, arguments: c.args }))
  }
}

/** An answer from a model offered the `execute` tool (and the client's tools). */
export class ToolReply implements Reply {
  private readonly prose: ProseWriter
  private readonly assembler = new CallAssembler()
  private trailing = ''
  private cursor = 0

  constructor(private readonly writer: Writer) {
    this.prose = new ProseWriter(writer)
  }

  async delta(delta: ChatCompletionChunk.Choice.Delta): Promise<boolean> {
    if (delta.content) {
      if (this.assembler.calls.length > 0) this.trailing += delta.content
      else this.prose.write(delta.content)
    }
    for (const part of delta.tool_calls ?? []) {
      const { call, started } = this.assembler.add(part)
      if (started) await this.prose.close()
      // Only the first call streams live: the others would land between a code message and its
      // output, so they are shown when their turn to run comes.
      if (call === this.assembler.calls[0]) await this.stream(call)
    }
    return false
  }

  async finish(): Promise<void> {
    this.assembler.finish()
    await this.prose.close()
  }

  async next(): Promise<PendingCode | undefined> {
    const call = this.server()[this.cursor]
    if (!call) return undefined
    this.cursor++
    return settleCall(this.writer, call)
  }

  rest(): RawCall[] {
    return this.server()
      .slice(this.cursor)
      .map((c) => ({ name: c.name, arguments: c.args }))
  }

  clientCalls(): ClientToolCall[] {
    return this.assembler.client(this.writer)
  }

  trailingText(): string {
    return this.trailing
  }

  private server(): CallState[] {
    return this.assembler.calls.filter((c) => !this.writer.clientTools.has(c.name))
  }

  private async stream(call: CallState): Promise<void> {
    // Until its name is known a call could be the client's, which is never shown as code.
    if (call.draft?.ended || !call.name || this.writer.clientTools.has(call.name)) return
    if (!call.draft) {
      const language = call.reader.complete.has('language') ? call.reader.values.get('language') : languageNamedByTool(call.name)
      if (language === undefined) return
      call.draft = this.writer.open({ role: 'assistant', type: 'code', format: languageFromTag(language) ?? 'text' })
    }
    const code = call.reader.values.get('code') ?? ''
    call.draft.append(code.slice(call.shown))
    call.shown = code.length
    if (call.reader.complete.has('code')) await call.draft.end()
  }
}

/** The rest of a reply that a suspended turn kept: server calls not shown yet, the client's calls, trailing prose. */
export class KeptReply implements Reply {
  private readonly calls: RawCall[]

  constructor(
    private readonly writer: Writer,
    calls: RawCall[],
    private readonly toolCalls: ClientToolCall[],
    private readonly trailing: string,
  ) {
    this.calls = [...calls]
  }

  async delta(): Promise<boolean> {
    return true
  }

  async finish(): Promise<void> {}

  async next(): Promise<PendingCode | undefined> {
    const call = this.calls.shift()
    if (!call) return undefined
    const reader = new PartialJsonStrings()
    reader.feed(call.arguments)
    return settleCall(this.writer, { name: call.name, args: call.arguments, reader })
  }

  rest(): RawCall[] {
    return [...this.calls]
  }

  clientCalls(): ClientToolCall[] {
    return this.toolCalls
  }

  trailingText(): string {
    return this.trailing
  }
}

/** Parses a server call's complete arguments and shows its code message; only now is the code trusted enough to run. */
async function settleCall(writer: Writer, call: Pick<CallState, 'name' | 'args' | 'reader' | 'draft'>): Promise<PendingCode> {
  const args = parseArguments(call.args)
  const code = typeof args?.code === 'string' ? args.code : (call.reader.values.get('code') ?? '')
  const named = typeof args?.language === 'string' ? args.language : languageNamedByTool(call.name)
  const language = languageFromTag(named)
  let message: LmcMessage
  if (call.draft) {
    if (code.startsWith(call.draft.text)) call.draft.append(code.slice(call.draft.text.length))
    message = await call.draft.end()
  } else {
    message = await writer.say({ role: 'assistant', type: 'code', format: language ?? 'text' }, code)
  }
  if (!args) {
    return {
      message,
      problem: 'The tool call arguments were not valid JSON (the answer may have been cut off by the token limit); the code was not run.',
    }
  }
  if (call.name !== EXECUTE_TOOL && !languageNamedByTool(call.name)) {
    const tools = [EXECUTE_TOOL, ...writer.clientTools].map((name) => `"${name}"`).join(', ')
    return { message, problem: `There is no tool named "${call.name}"; the tools are ${tools}. The code was not run.` }
  }
  if (!language || !writer.languages.includes(language)) {
    return {
      message,
      problem: `The language "${named ?? ''}" is not available; use one of: ${writer.languages.join(', ')}. The code was not run.`,
    }
  }
  if (!code.trim()) return { message, problem: 'No code was given.' }
  return { message, language, code }
}

/** Models often call a tool after the language instead of `execute` (`python`, `shell`…). */
function languageNamedByTool(name: string): string | undefined {
  return name !== EXECUTE_TOOL && languageFromTag(name) ? name : undefined
}

function parseArguments(args: string): Record<string, unknown> | undefined {
  try {
    const parsed: unknown = JSON.parse(args)
    return parsed && typeof parsed === 'object' && !Array.isArray(parsed) ? (parsed as Record<string, unknown>) : undefined
  } catch {
    return undefined
  }
}

/**
 * An answer from a model without tool calling for code. As in Open Interpreter the answer is cut
 * at the end of the first runnable block: the model cannot know the output yet, so what follows
 * is guesswork. Calls to the client's tools (offered even so) are collected.
 */
export class FencedReply implements Reply {
  private readonly prose: ProseWriter
  private readonly splitter: FenceSplitter
  private readonly assembler = new CallAssembler()
  private code: { draft: MessageDraft; language: Language } | undefined
  private found: PendingCode | undefined
  private taken = false

  constructor(private readonly writer: Writer) {
    this.prose = new ProseWriter(writer)
    this.splitter = new FenceSplitter((tag) => {
      const language = languageFromTag(tag)
      return language && writer.languages.includes(language) ? language : undefined
    })
  }

  async delta(delta: ChatCompletionChunk.Choice.Delta): Promise<boolean> {
    for (const part of delta.tool_calls ?? []) this.assembler.add(part)
    if (!delta.content || this.found) return this.found !== undefined
    await this.apply(this.splitter.feed(delta.content))
    return this.found !== undefined
  }

  async finish(): Promise<void> {
    this.assembler.finish()
    if (!this.found) await this.apply(this.splitter.finish())
    await this.prose.close()
  }

  async next(): Promise<PendingCode | undefined> {
    if (this.taken) return undefined
    this.taken = true
    return this.found
  }

  rest(): RawCall[] {
    return []
  }

  clientCalls(): ClientToolCall[] {
    return this.assembler.client(this.writer)
  }

  trailingText(): string {
    return ''
  }

  private async apply(events: ReturnType<FenceSplitter['feed']>): Promise<void> {
    for (const event of events) {
      if (this.found) return
      if (event.kind === 'text') this.prose.write(event.text)
      else if (event.kind === 'codeStart') {
        await this.prose.close()
        this.code = { draft: this.writer.open({ role: 'assistant', type: 'code', format: event.language }), language: event.language }
      } else if (event.kind === 'code') this.code?.draft.append(event.text)
      else if (this.code) {
        const { draft, language } = this.code
        this.code = undefined
        const message = await draft.end()
        this.found = { message, language, code: draft.text }
      }
    }
  }
}
