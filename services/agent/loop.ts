import { randomUUID } from 'node:crypto'
import type OpenAI from 'openai'
import type {
  ChatCompletionChunk,
  ChatCompletionCreateParamsStreaming,
  ChatCompletionFunctionTool,
  ChatCompletionToolChoiceOption,
} from 'openai/resources/chat/completions'
import type { CompletionUsage } from 'openai/resources/completions'
import type { LmcChunk, LmcMessage } from '../../schemas/lmc.js'
import { upstreamError, upstreamTimeout } from '../llm.js'
import { OutputWriter } from '../output-writer.js'
import type { ExecResult, KernelOutput, Language } from '../kernels/types.js'
import { capForModel } from './cap.js'
import { buildMessages, executeTool } from './context.js'
import { ASSISTANT_TEXT, type ClientToolCall, FencedReply, type Head, KeptReply, type MessageDraft, type RawCall, type Reply, ToolReply, type Writer } from './replies.js'

export type { ClientToolCall, RawCall } from './replies.js'

export type Executor = (
  language: Language,
  code: string,
  onOutput: (output: KernelOutput) => void,
  signal: AbortSignal,
) => Promise<ExecResult>

export interface TurnOptions {
  client: OpenAI
  model: string
  temperature: number
  maxTokens: number
  /** The client's fields passed upstream as they are (stop, seed, top_p, response_format…), on every call. */
  passThrough?: PassThrough
  /** Upstream calls allowed in one turn. */
  maxIterations: number
  systemMessage?: string
  customInstructions?: string
  /** Stored history, already including this turn's user messages. */
  history: LmcMessage[]
  /** What the `execute` tool (or a fenced block) may ask for; empty: the turn runs no code and offers no tool. */
  languages: Language[]
  /** LLM_TOOLS: offer the `execute` tool; when false, fenced code blocks in the reply are run. */
  tools: boolean
  /** The client's function tools, offered beside `execute`; a call to one suspends the turn. */
  clientTools?: ClientTools
  /** False: code waits for the user's approval, which suspends the turn. */
  autoRun: boolean
  /** Continues a suspended turn; for a confirmation, with the user's decision. */
  resume?: { suspension: Suspension; approve?: boolean }
  execute: Executor
  /** Awaited once, when the first upstream call answered, before anything of the answer is emitted or persisted. */
  answered?: () => Promise<void>
  /** Called as soon as each message is complete, so a crash keeps everything before it. */
  persist: (message: LmcMessage) => Promise<void>
  emit: (chunk: LmcChunk) => void
  /** Masks secrets; applied to everything sent upstream, emitted or persisted. */
  redact: (text: string) => string
  signal: AbortSignal
  /** Budget for each code result shown to the model. */
  maxOutputChars: number
}

export type PassThrough = Partial<
  Pick<
    ChatCompletionCreateParamsStreaming,
    | 'stop'
    | 'seed'
    | 'top_p'
    | 'presence_penalty'
    | 'frequency_penalty'
    | 'logit_bias'
    | 'user'
    | 'logprobs'
    | 'top_logprobs'
    | 'response_format'
  >
>

/** The client's tools and how the model may use them: Chat Completions' `tools`, `tool_choice`, `parallel_tool_calls`. */
export interface ClientTools {
  tools: ChatCompletionFunctionTool[]
  toolChoice?: ChatCompletionToolChoiceOption
  parallelToolCalls?: boolean
}

/**
 * Where a turn stopped to wait for its client, kept (as JSON, in the store) until it is resumed.
 * Waiting for a confirmation: `confirmation` is the code asked about, and the rest of the same
 * reply (`calls`, `toolCalls`, `trailing`) follows once it is decided. Waiting for tool results:
 * `toolCalls` were returned to the client and the next upstream call needs their results.
 */
export interface Suspension {
  /** Upstream calls the turn made so far; they count against `maxIterations`. */
  iterations: number
  /** The server code waiting for approval, already shown with its confirmation message. */
  confirmation?: { messageId: string; language: Language; code: string }
  /** Server calls of the same reply not shown yet. */
  calls: RawCall[]
  /** The client's tool calls: returned and awaiting results without `confirmation`, returned after it otherwise. */
  toolCalls: ClientToolCall[]
  /** Prose the model wrote after its tool calls, said once they ran. */
  trailing: string
}

export interface TokenUsage {
  prompt_tokens: number
  completion_tokens: number
  total_tokens: number
}

export interface TurnResult {
  /** Everything produced this turn, in order, as persisted. */
  messages: LmcMessage[]
  /**
   * The last assistant text message. A turn stopped before any text gets an empty one that is
   * neither emitted nor persisted.
   */
  final: LmcMessage
  /** The last usage each upstream call reported, summed over the calls. */
  usage: TokenUsage
  /** The last upstream call's finish_reason, null when it gave none (a clean end counts as complete). */
  finishReason: string | null
  stopped: boolean
  /** Set when the turn waits for its client (a confirmation, tool results) instead of having ended. */
  suspended?: Suspension
}

export async function runTurn(opts: TurnOptions): Promise<TurnResult> {
  return new Turn(opts).run()
}

interface Io {
  emit: (chunk: LmcChunk) => void
  persist: (message: LmcMessage) => Promise<void>
  redact: (text: string) => string
  messages: LmcMessage[]
  open: Set<Draft>
}

/**
 * One message being streamed. Content goes out in pieces cut after whitespace, so a secret is
 * always redacted whole rather than leaking half before its end arrives.
 */
class Draft implements MessageDraft {
  readonly id = randomUUID()
  readonly createdAt = new Date().toISOString()
  private raw = ''
  private pending = ''
  private done: Promise<LmcMessage> | undefined

  constructor(
    private readonly io: Io,
    readonly head: Head,
  ) {
    io.open.add(this)
    io.emit({ ...this.frame(), start: true })
  }

  get ended(): boolean {
    return this.done !== undefined
  }

  get text(): string {
    return this.raw
  }

  append(text: string): void {
    if (!text || this.done) return
    this.raw += text
    this.pending += text
    // Kernel output comes masked already, held back by the execution's stream masker where a
    // value could be split: it goes out as written, as through POST /execute.
    const cut = this.head.role === 'computer' ? this.pending.length - 1 : lastWhitespace(this.pending)
    if (cut === -1) return
    this.send(this.pending.slice(0, cut + 1))
    this.pending = this.pending.slice(cut + 1)
  }

  end(content?: Record<string, unknown>): Promise<LmcMessage> {
    this.done ??= this.finish(content)
    return this.done
  }

  private async finish(content: Record<string, unknown> | undefined): Promise<LmcMessage> {
    if (content) this.io.emit({ ...this.frame(), content })
    else if (this.pending) this.send(this.pending)
    this.pending = ''
    this.io.emit({ ...this.frame(), end: true })
    this.io.open.delete(this)
    const message: LmcMessage = { id: this.id, ...this.fields(), content: content ?? this.io.redact(this.raw), created_at: this.createdAt }
    this.io.messages.push(message)
    await this.io.persist(message)
    return message
  }

  private send(text: string): void {
    this.io.emit({ ...this.frame(), content: this.io.redact(text) })
  }

  private fields(): Head {
    const { role, type, format, stream } = this.head
    return { role, type, ...(format ? { format } : {}), ...(stream ? { stream } : {}) }
  }

  private frame(): LmcChunk {
    return { id: this.id, ...this.fields(), created_at: this.createdAt }
  }
}

function lastWhitespace(text: string): number {
  for (let i = text.length - 1; i >= 0; i--) {
    const c = text.charCodeAt(i)
    if (c === 0x20 || c === 0x0a || c === 0x09 || c === 0x0d) return i
  }
  return -1
}

const consoleHead = (stream: 'stdout' | 'stderr'): Head => ({ role: 'computer', type: 'console', format: 'output', stream })

class Turn implements Writer {
  private readonly messages: LmcMessage[] = []
  private readonly io: Io
  private readonly usage: TokenUsage = { prompt_tokens: 0, completion_tokens: 0, total_tokens: 0 }
  private finishReason: string | null = null
  readonly clientTools: ReadonlySet<string>

  constructor(private readonly opts: TurnOptions) {
    this.io = { emit: opts.emit, persist: opts.persist, redact: opts.redact, messages: this.messages, open: new Set() }
    this.clientTools = new Set(opts.clientTools?.tools.map((tool) => tool.function.name))
  }

  async run(): Promise<TurnResult> {
    try {
      const { resume, signal } = this.opts
      let iterations = resume?.suspension.iterations ?? 0
      let reply: Reply | undefined
      if (resume?.suspension.confirmation) {
        const { suspension } = resume
        await this.decide(suspension.confirmation!, resume.approve === true)
        if (signal.aborted) return this.stop()
        reply = new KeptReply(this, suspension.calls, suspension.toolCalls, suspension.trailing)
      }
      // Resumed with the client's tool results (already in the history): the model is asked next.
      for (;;) {
        let acted = reply !== undefined
        if (!reply) {
          if (iterations >= this.opts.maxIterations) {
            await this.say(
              ASSISTANT_TEXT,
              `I stopped after ${this.opts.maxIterations} steps because the iteration limit was reached. Ask me to continue if you want me to keep going.`,
            )
            return this.done()
          }
          iterations++
          reply = this.opts.tools ? new ToolReply(this) : new FencedReply(this)
          await this.ask(reply)
          if (signal.aborted) return this.stop()
          await reply.finish()
        }
        for (let item = await reply.next(); item; item = await reply.next()) {
          acted = true
          if ('problem' in item) {
            await this.say(consoleHead('stderr'), item.problem)
            continue
          }
          if (!this.opts.autoRun) {
            await this.say(
              { role: 'computer', type: 'confirmation', format: 'execution' },
              { type: 'code', format: item.language, content: this.opts.redact(item.code) },
            )
            return this.suspend({
              iterations,
              confirmation: { messageId: item.message.id, language: item.language, code: item.code },
              calls: reply.rest(),
              toolCalls: reply.clientCalls(),
              trailing: reply.trailingText(),
            })
          }
          await this.runCode(item.language, item.code)
          if (signal.aborted) return this.stop()
        }
        const trailing = reply.trailingText().trim()
        if (trailing) await this.say(ASSISTANT_TEXT, trailing)
        // The server's own calls ran first: parallel calls are independent by definition, and the
        // client's results are all the turn waits for now.
        const toolCalls = reply.clientCalls().map((call) => ({ ...call, arguments: this.opts.redact(call.arguments) }))
        if (toolCalls.length > 0) {
          for (const call of toolCalls) await this.say({ role: 'assistant', type: 'tool_call' }, { ...call })
          return this.suspend({ iterations, calls: [], toolCalls, trailing: '' })
        }
        if (!acted) return this.done()
        reply = undefined
      }
    } catch (err) {
      await this.closeOpen()
      if (this.opts.signal.aborted) return this.result(true)
      throw err
    }
  }

  /**
   * The `execute` tool is offered: tool calling is on and there is something to run code in.
   * Replies are still read as tool calls whenever tool calling is on, for the client's tools.
   */
  private get tools(): boolean {
    return this.opts.tools && this.opts.languages.length > 0
  }

  open(head: Head): Draft {
    return new Draft(this.io, head)
  }

  /** The running line of the code: one `active_line` chunk, streamed and never persisted. */
  activeLine(line: number): void {
    this.io.emit({ id: randomUUID(), role: 'computer', type: 'console', format: 'active_line', content: line, created_at: new Date().toISOString() })
  }

  /** A message known whole at once: framed and persisted like a streamed one. */
  say(head: Head, content: string | Record<string, unknown>): Promise<LmcMessage> {
    const draft = this.open(head)
    if (typeof content === 'string') {
      draft.append(content)
      return draft.end()
    }
    return draft.end(content)
  }

  get languages(): Language[] {
    return this.opts.languages
  }

  /** The user's answer to a confirmation: the code runs, or the model is told it was declined. */
  private async decide(code: NonNullable<Suspension['confirmation']>, approve: boolean): Promise<void> {
    if (approve) await this.runCode(code.language, code.code)
    else await this.say(consoleHead('stdout'), 'The user declined to run this code.')
  }

  /** Streams one upstream answer into `reply`. Returns quietly when the turn was aborted. */
  private async ask(reply: Reply): Promise<void> {
    const { client, signal } = this.opts
    const controller = new AbortController()
    const cancel = () => controller.abort()
    signal.addEventListener('abort', cancel, { once: true })
    // The client's timeout only covers the wait for headers; a stream that stalls is caught here.
    let idle: NodeJS.Timeout | undefined
    let stalled = false
    const arm = () => {
      clearTimeout(idle)
      idle = setTimeout(() => {
        stalled = true
        controller.abort()
      }, client.timeout)
    }
    // Some upstreams repeat their cumulative usage on every chunk: only the last report counts.
    let usage: CompletionUsage | undefined
    // Only failures of the upstream itself are mapped; a failing store or executor is not the model's fault.
    const failed = (err: unknown) => {
      if (signal.aborted) return undefined
      return stalled ? upstreamTimeout() : upstreamError(err, client.apiKey, this.opts.redact)
    }
    try {
      let stream: AsyncIterator<ChatCompletionChunk>
      try {
        const response = await client.chat.completions.create(this.request(), { signal: controller.signal })
        stream = response[Symbol.asyncIterator]()
      } catch (err) {
        const mapped = failed(err)
        if (mapped) throw mapped
        return
      }
      await this.opts.answered?.()
      this.finishReason = null
      arm()
      for (;;) {
        let next: IteratorResult<ChatCompletionChunk>
        try {
          next = await stream.next()
        } catch (err) {
          const mapped = failed(err)
          if (mapped) throw mapped
          return
        }
        if (next.done) break
        // Paused while the chunk is handled: a slow store is not a stalled model.
        clearTimeout(idle)
        const chunk = next.value
        if (chunk.usage) usage = chunk.usage
        const choice = chunk.choices[0]
        if (choice?.finish_reason) this.finishReason = choice.finish_reason
        if (choice && (await reply.delta(choice.delta))) {
          controller.abort()
          return
        }
        arm()
      }
      if (signal.aborted) return
      if (stalled) throw upstreamTimeout()
    } finally {
      if (usage) this.addUsage(usage)
      clearTimeout(idle)
      signal.removeEventListener('abort', cancel)
    }
  }

  private request(): ChatCompletionCreateParamsStreaming {
    const { opts } = this
    return {
      model: opts.model,
      messages: buildMessages([...opts.history, ...this.messages], {
        languages: opts.languages,
        tools: this.tools,
        systemMessage: opts.systemMessage,
        customInstructions: opts.customInstructions,
        maxOutputChars: opts.maxOutputChars,
        capForModel,
        redact: opts.redact,
      }),
      temperature: opts.temperature,
      max_tokens: opts.maxTokens,
      ...opts.passThrough,
      stream: true,
      stream_options: { include_usage: true },
      ...this.toolFields(),
    }
  }

  /** `execute` (unless code travels in fences) and the client's tools, with the client's choice fields. */
  private toolFields(): Partial<ChatCompletionCreateParamsStreaming> {
    const { clientTools } = this.opts
    const tools = [...(this.tools ? [executeTool(this.opts.languages)] : []), ...(clientTools?.tools ?? [])]
    if (tools.length === 0) return {}
    return {
      tools,
      ...(clientTools?.toolChoice !== undefined ? { tool_choice: clientTools.toolChoice } : {}),
      ...(clientTools?.parallelToolCalls !== undefined ? { parallel_tool_calls: clientTools.parallelToolCalls } : {}),
    }
  }

  private addUsage(usage: CompletionUsage): void {
    this.usage.prompt_tokens += usage.prompt_tokens ?? 0
    this.usage.completion_tokens += usage.completion_tokens ?? 0
    this.usage.total_tokens += usage.total_tokens ?? 0
  }

  private async runCode(language: Language, code: string): Promise<void> {
    const writer = new OutputWriter(this)
    let result: ExecResult
    try {
      result = await this.opts.execute(language, code, (output) => writer.push(output), this.opts.signal)
    } catch (err) {
      await writer.finish()
      throw err
    }
    await writer.finish(result)
  }

  private async closeOpen(): Promise<void> {
    for (const draft of [...this.io.open]) {
      try {
        await draft.end()
      } catch {
        // The failure being reported matters more than a partial message that could not be saved.
      }
    }
  }

  private async stop(): Promise<TurnResult> {
    await this.closeOpen()
    return this.result(true)
  }

  private suspend(suspension: Suspension): TurnResult {
    return { ...this.result(false), suspended: suspension }
  }

  private async done(): Promise<TurnResult> {
    if (!this.lastText()) await this.say(ASSISTANT_TEXT, '')
    return this.result(false)
  }

  private lastText(): LmcMessage | undefined {
    return this.messages.findLast((m) => m.role === 'assistant' && m.type === 'message')
  }

  private result(stopped: boolean): TurnResult {
    const final = this.lastText() ?? {
      id: randomUUID(),
      ...ASSISTANT_TEXT,
      content: '',
      created_at: new Date().toISOString(),
    }
    return { messages: [...this.messages], final, usage: { ...this.usage }, finishReason: this.finishReason, stopped }
  }
}
