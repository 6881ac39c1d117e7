import { resolveLanguage } from '../kernels/languages.js'
import type { Language } from '../kernels/types.js'

/** The language a model means by a fence tag or a `language` argument (`py`, `bash`, `js`…). */
export function languageFromTag(tag: string | undefined): Language | undefined {
  return tag ? resolveLanguage(tag) : undefined
}

export type FenceEvent =
  | { kind: 'text'; text: string }
  | { kind: 'codeStart'; language: Language }
  | { kind: 'code'; text: string }
  | { kind: 'codeEnd' }

const OPENER = /^ {0,3}```[ \t]*([\w+#.-]+)[ \t]*\r?\n$/
const CLOSER = /^ {0,3}```[ \t]*\r?\n?$/
/** A line start that may still grow into a fence, so it is held back until the line is whole. */
const MAYBE_OPENER = /^ {0,3}(`{1,2}|```[\w+#. \t-]*)?$/
const MAYBE_CLOSER = /^ {0,3}`{0,3}[ \t]*$/

/**
 * Splits a streamed reply into prose and runnable fenced code blocks, for models used without
 * tool calling (LLM_TOOLS=false): Open Interpreter runs ```python / ```shell blocks from the text.
 * Fences in other languages stay prose. Newlines around the code are the fence's, not the code's.
 */
export class FenceSplitter {
  private mode: 'text' | 'code' = 'text'
  /** The current line, held while it could still become a fence. */
  private line = ''
  /** Part of the current line was already passed on, so it cannot be a fence. */
  private lineStarted = false
  /** A code newline waiting for the next code line: the last one belongs to the closing fence. */
  private newlineHeld = false

  constructor(private readonly runnable: (tag: string) => Language | undefined) {}

  feed(delta: string): FenceEvent[] {
    const events: FenceEvent[] = []
    let rest = delta
    while (rest.length > 0) {
      const newline = rest.indexOf('\n')
      if (newline === -1) {
        this.partial(rest, events)
        break
      }
      this.whole(rest.slice(0, newline + 1), events)
      rest = rest.slice(newline + 1)
    }
    return events
  }

  /** Ends the reply: held text goes out and an unclosed code block still counts as code. */
  finish(): FenceEvent[] {
    const events: FenceEvent[] = []
    if (this.mode === 'text') {
      if (this.line) events.push({ kind: 'text', text: this.line })
    } else {
      if (this.line && !(!this.lineStarted && CLOSER.test(this.line))) {
        events.push({ kind: 'code', text: (this.newlineHeld ? '\n' : '') + this.line })
      }
      events.push({ kind: 'codeEnd' })
      this.mode = 'text'
    }
    this.line = ''
    this.lineStarted = false
    this.newlineHeld = false
    return events
  }

  private partial(piece: string, events: FenceEvent[]): void {
    const candidate = this.line + piece
    const mayBeFence = !this.lineStarted && (this.mode === 'text' ? MAYBE_OPENER : MAYBE_CLOSER).test(candidate)
    if (mayBeFence) {
      this.line = candidate
      return
    }
    this.line = ''
    this.lineStarted = true
    if (this.mode === 'text') events.push({ kind: 'text', text: candidate })
    else {
      events.push({ kind: 'code', text: (this.newlineHeld ? '\n' : '') + candidate })
      this.newlineHeld = false
    }
  }

  private whole(end: string, events: FenceEvent[]): void {
    const line = this.line + end
    const fresh = !this.lineStarted
    this.line = ''
    this.lineStarted = false
    if (this.mode === 'text') {
      const language = fresh ? OPENER.exec(line)?.[1] : undefined
      const runnable = language ? this.runnable(language) : undefined
      if (runnable) {
        this.mode = 'code'
        this.newlineHeld = false
        events.push({ kind: 'codeStart', language: runnable })
      } else events.push({ kind: 'text', text: line })
      return
    }
    if (fresh && CLOSER.test(line)) {
      this.mode = 'text'
      this.newlineHeld = false
      events.push({ kind: 'codeEnd' })
      return
    }
    const body = line.replace(/\r?\n$/, '')
    if (body || this.newlineHeld) events.push({ kind: 'code', text: (this.newlineHeld ? '\n' : '') + body })
    this.newlineHeld = true
  }
}
