import type { ExecError } from './types.js'

/**
 * The kernel protocol, shared by the three drivers. The launcher gives each driver its command
 * channel on fd 8 and its report channel on fd 3; drivers move both out of reach of the code they
 * run (descriptors that are not inherited, or closed around each execution).
 *
 * For one execution the server writes two lines at once, `BASE64(code)\n` then `NONCE\n`. The
 * driver reads the first, runs the code, and only then reads the nonce: the code never sees it.
 * It answers with JSON lines on fd 3 and, once the code has finished, writes `sentinel(nonce)` to
 * fds 1 and 2 and a `done` report carrying the nonce, so the server knows it has every byte of
 * output. A `done` with another nonce is not the end of anything.
 *
 * An execution that asks for active lines sends `BASE64(code) active_lines` as its first line
 * instead: the driver then reports `{"type":"line","line":N}` (N the 1-based line of the cell
 * about to run) each time the running line changes, as Open Interpreter's `active_line` chunks.
 */
export type Report =
  | { type: 'ready'; version: string; pid: number | null }
  | { type: 'image'; format: 'base64.png' | 'base64.jpeg'; data: string }
  | { type: 'result'; text: string }
  | ({ type: 'error' } & ExecError)
  | { type: 'done'; nonce: string; exitCode: number | null }
  | { type: 'line'; line: number }

/** The command flag that asks a driver for `line` reports. */
export const ACTIVE_LINES_FLAG = 'active_lines'

/** Line numbers are 1-based and no cell has more lines than this (the kernel also checks its own cell's length). */
export const MAX_LINE_NUMBER = 10_000_000

export const commandLines = (nonce: string, code: string, activeLines = false) =>
  `${Buffer.from(code, 'utf8').toString('base64')}${activeLines ? ` ${ACTIVE_LINES_FLAG}` : ''}\n${nonce}\n`

export const sentinel = (nonce: string) => Buffer.from(`\x02oi-end:${nonce}\x03`, 'latin1')

const isString = (value: unknown): value is string => typeof value === 'string'

/** Validates one fd-3 line; anything malformed is undefined (and logged by the caller). */
export function parseReport(line: string): Report | undefined {
  let message: unknown
  try {
    message = JSON.parse(line)
  } catch {
    return undefined
  }
  if (typeof message !== 'object' || message === null) return undefined
  const m = message as Record<string, unknown>
  switch (m.type) {
    case 'ready':
      return { type: 'ready', version: isString(m.version) ? m.version : '', pid: Number.isInteger(m.pid) ? (m.pid as number) : null }
    case 'image':
      if ((m.format !== 'base64.png' && m.format !== 'base64.jpeg') || !isString(m.data)) return undefined
      return { type: 'image', format: m.format, data: m.data }
    case 'result':
      return isString(m.text) ? { type: 'result', text: m.text } : undefined
    case 'error':
      if (!isString(m.name) || !isString(m.value)) return undefined
      return { type: 'error', name: m.name, value: m.value, traceback: isString(m.traceback) ? m.traceback : '' }
    case 'done':
      if (!isString(m.nonce)) return undefined
      return { type: 'done', nonce: m.nonce, exitCode: Number.isInteger(m.exit_code) ? (m.exit_code as number) : null }
    case 'line':
      if (!Number.isSafeInteger(m.line) || (m.line as number) < 1 || (m.line as number) > MAX_LINE_NUMBER) return undefined
      return { type: 'line', line: m.line as number }
    default:
      return undefined
  }
}

/**
 * Splits a byte stream into lines. A line longer than `maxLineBytes` is never buffered: the
 * caller hears of it once through `onOverflow` (and stops the writer) and nothing more is read.
 */
export class LineSplitter {
  private parts: Buffer[] = []
  private size = 0
  private overflowed = false

  constructor(
    private readonly maxLineBytes: number,
    private readonly onLine: (line: string) => void,
    private readonly onOverflow: (bytes: number) => void,
  ) {}

  push(chunk: Buffer): void {
    if (this.overflowed) return
    let start = 0
    for (let end = chunk.indexOf(10, start); end !== -1 && !this.overflowed; end = chunk.indexOf(10, start)) {
      if (!this.append(chunk.subarray(start, end))) return
      this.onLine(Buffer.concat(this.parts).toString('utf8'))
      this.parts = []
      this.size = 0
      start = end + 1
    }
    if (!this.overflowed) this.append(chunk.subarray(start))
  }

  /** Stops reading: nothing pushed later reaches `onLine`. */
  stop(): void {
    this.overflowed = true
    this.parts = []
  }

  private append(piece: Buffer): boolean {
    this.size += piece.length
    if (this.size > this.maxLineBytes) {
      this.stop()
      this.onOverflow(this.size)
      return false
    }
    if (piece.length > 0) this.parts.push(piece)
    return true
  }
}

/**
 * Watches one output stream for the current execution's sentinel. Bytes that could be the start
 * of the sentinel are held back until the next chunk shows whether they are, so a sentinel split
 * across reads is still found and never leaks into the output.
 */
export class SentinelScanner {
  private held: Buffer = Buffer.alloc(0)
  private expected: Buffer | undefined

  constructor(
    private readonly emit: (bytes: Buffer) => void,
    private readonly onSentinel: () => void,
  ) {}

  expect(marker: Buffer): void {
    this.expected = marker
  }

  push(chunk: Buffer): void {
    const marker = this.expected
    if (!marker) {
      this.emit(chunk)
      return
    }
    const data = this.held.length > 0 ? Buffer.concat([this.held, chunk]) : chunk
    this.held = Buffer.alloc(0)
    const at = data.indexOf(marker)
    if (at !== -1) {
      if (at > 0) this.emit(data.subarray(0, at))
      this.expected = undefined
      this.onSentinel()
      const rest = data.subarray(at + marker.length)
      if (rest.length > 0) this.emit(rest)
      return
    }
    const keep = heldPrefixLength(data, marker)
    if (data.length > keep) this.emit(data.subarray(0, data.length - keep))
    if (keep > 0) this.held = Buffer.from(data.subarray(data.length - keep))
  }

  /** Releases held bytes, when the process is gone and no sentinel can come any more. */
  flush(): void {
    this.expected = undefined
    if (this.held.length > 0) this.emit(this.held)
    this.held = Buffer.alloc(0)
  }
}

/** Length of the longest tail of `data` that is a proper prefix of `marker`. */
function heldPrefixLength(data: Buffer, marker: Buffer): number {
  const first = marker[0]
  for (let length = Math.min(marker.length - 1, data.length); length > 0; length--) {
    const start = data.length - length
    if (data[start] !== first) continue
    if (data.subarray(start).equals(marker.subarray(0, length))) return length
  }
  return 0
}
