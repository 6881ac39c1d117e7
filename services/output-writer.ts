import { randomUUID } from 'node:crypto'
import type { LmcChunk, LmcMessage } from '../schemas/lmc.js'
import type { ExecResult, KernelOutput } from './kernels/types.js'

/** What a message is: the LMC fields besides its id, content and time. */
export type MessageHead = Pick<LmcMessage, 'role' | 'type' | 'format' | 'stream'>

/**
 * Where the messages of an execution go: the agent's turn (persisted to the session and streamed
 * to the client) or the answer of POST /execute. Content arrives already masked (ExecutionService).
 */
export interface MessageTarget {
  /** Starts a message whose content arrives in pieces, each streamed as it comes. */
  open(head: MessageHead): { append(text: string): void; end(): Promise<unknown> }
  /** A message known whole at once. */
  say(head: MessageHead, content: string): Promise<unknown>
  /**
   * The running line of the code (Open Interpreter's `{"role":"computer","type":"console",
   * "format":"active_line","content":N}` chunk): streamed, never stored. Targets without it drop it.
   */
  activeLine?(line: number): void
}

const consoleHead = (stream: 'stdout' | 'stderr'): MessageHead => ({ role: 'computer', type: 'console', format: 'output', stream })

/**
 * The one writer that turns kernel output into LMC messages, for every endpoint: consecutive
 * output of one stream is one console message streamed piece by piece as the kernel writes it;
 * an image, a trailing value and a notice are messages of their own. At the end come the
 * error's traceback (unless the stderr output already showed it) and a note on how the run
 * ended (timed out, interrupted, state lost, output cut) unless the kernel said so itself.
 * Kernel callbacks are synchronous while targets may persist, so output goes through one
 * ordered chain.
 */
export class OutputWriter {
  private chain: Promise<void> = Promise.resolve()
  private current: { append(text: string): void; end(): Promise<unknown> } | undefined
  private currentStream: 'stdout' | 'stderr' | undefined
  private stderr = ''
  private noticed = false
  private failure: unknown

  constructor(private readonly target: MessageTarget) {}

  push(output: KernelOutput): void {
    this.chain = this.chain
      .then(() => this.handle(output))
      .catch((err: unknown) => {
        this.failure ??= err
      })
  }

  /** Ends the messages; with the result, adds the traceback and the end-of-run note. Throws what a target failed with. */
  async finish(result?: ExecResult): Promise<void> {
    await this.chain
    await this.closeCurrent()
    if (this.failure) throw this.failure
    if (!result) return
    if (result.error) {
      const traceback = result.error.traceback.trim() || `${result.error.name}: ${result.error.value}`
      if (!this.stderr.includes(traceback)) await this.target.say(consoleHead('stderr'), traceback)
    }
    const note = this.noticed ? undefined : endNote(result)
    if (note) await this.target.say(consoleHead('stderr'), note)
  }

  private async handle(output: KernelOutput): Promise<void> {
    // A line number says where the code is, not what it printed: the console message stays open.
    if (output.type === 'active_line') return this.target.activeLine?.(output.line)
    if (output.type === 'stream') {
      if (this.currentStream !== output.stream || !this.current) {
        await this.closeCurrent()
        this.current = this.target.open(consoleHead(output.stream))
        this.currentStream = output.stream
      }
      this.current.append(output.text)
      if (output.stream === 'stderr') this.stderr += output.text
      return
    }
    await this.closeCurrent()
    if (output.type === 'image') await this.target.say({ role: 'computer', type: 'image', format: output.format }, output.data)
    else if (output.type === 'result') await this.target.say(consoleHead('stdout'), output.text)
    else {
      this.noticed = true
      await this.target.say(consoleHead('stderr'), output.text)
    }
  }

  private async closeCurrent(): Promise<void> {
    const current = this.current
    this.current = undefined
    this.currentStream = undefined
    await current?.end()
  }
}

/** What the user and the model should know about how a run ended, when the kernel said nothing. */
export function endNote(result: ExecResult): string | undefined {
  const lost = result.stateLost ? ' The kernel was restarted: variables and imports are lost.' : ''
  const notes: string[] = []
  if (result.timedOut) notes.push(`Execution timed out after ${Math.round(result.durationMs / 1000)} s.${lost}`)
  else if (result.interrupted) notes.push(`Execution was interrupted.${lost}`)
  else if (lost) notes.push(lost.trim())
  if (result.truncated) notes.push('The output went past the limit and was cut.')
  return notes.length > 0 ? notes.join(' ') : undefined
}

/**
 * The target of POST /execute: collects the messages and, given `emit`, streams each as LMC
 * chunks (start, content pieces, end) as it is written.
 */
export class MessageCollector implements MessageTarget {
  readonly messages: LmcMessage[] = []

  constructor(private readonly emit: (chunk: LmcChunk) => void = () => {}) {}

  open(head: MessageHead): { append(text: string): void; end(): Promise<unknown> } {
    const message = this.begin(head, '')
    return {
      append: (text) => {
        message.content = `${message.content as string}${text}`
        this.emit({ ...frame(message), content: text })
      },
      end: async () => this.emit({ ...frame(message), end: true }),
    }
  }

  async say(head: MessageHead, content: string): Promise<unknown> {
    const message = this.begin(head, content)
    this.emit({ ...frame(message), content })
    this.emit({ ...frame(message), end: true })
    return message
  }

  private begin(head: MessageHead, content: string): LmcMessage {
    const message = { id: randomUUID(), ...fields(head), content, created_at: new Date().toISOString() } as LmcMessage
    this.messages.push(message)
    this.emit({ ...frame(message), start: true })
    return message
  }
}

function fields(head: MessageHead): MessageHead {
  const { role, type, format, stream } = head
  return { role, type, ...(format ? { format } : {}), ...(stream ? { stream } : {}) }
}

function frame(m: LmcMessage): LmcChunk {
  return { id: m.id, ...fields(m), created_at: m.created_at }
}
