type State = 'start' | 'beforeKey' | 'key' | 'colon' | 'beforeValue' | 'string' | 'nested' | 'scalar' | 'end'

const ESCAPES: Record<string, string> = { '"': '"', '\\': '\\', '/': '/', b: '\b', f: '\f', n: '\n', r: '\r', t: '\t' }

/**
 * Reads the string values of a JSON object's top-level keys while the object text is still
 * arriving in fragments (tool-call arguments stream that way), so `code` can be shown as it grows
 * instead of after the last fragment. Tolerant: malformed input stops the reading, never throws;
 * the caller still runs `JSON.parse` on the complete text before trusting it.
 */
export class PartialJsonStrings {
  /** Decoded text of every top-level string value seen so far, complete or not. */
  readonly values = new Map<string, string>()
  /** Keys whose string value has its closing quote. */
  readonly complete = new Set<string>()
  /** False once the text turned out not to be a JSON object. */
  objectLike = true

  private state: State = 'start'
  private key = ''
  /** Undecoded tail of an escape sequence split across fragments (starts with the backslash). */
  private escape = ''
  private depth = 0
  private nestedInString = false
  private nestedEscape = false

  feed(fragment: string): void {
    let i = 0
    while (i < fragment.length && this.state !== 'end') {
      const c = fragment[i]
      switch (this.state) {
        case 'start':
          if (c === '{') this.state = 'beforeKey'
          else if (!isSpace(c)) this.stop()
          i++
          break
        case 'beforeKey':
          if (c === '"') {
            this.key = ''
            this.state = 'key'
          } else if (c === '}') this.state = 'end'
          else if (c !== ',' && !isSpace(c)) this.stop()
          i++
          break
        case 'key':
        case 'string':
          i = this.readString(fragment, i)
          break
        case 'colon':
          if (c === ':') this.state = 'beforeValue'
          else if (!isSpace(c)) this.stop()
          i++
          break
        case 'beforeValue':
          if (c === '"') {
            this.values.set(this.key, '')
            this.complete.delete(this.key)
            this.state = 'string'
          } else if (c === '{' || c === '[') {
            this.depth = 1
            this.state = 'nested'
          } else if (!isSpace(c)) this.state = 'scalar'
          i++
          break
        case 'nested':
          this.skipNested(c)
          i++
          break
        case 'scalar':
          if (c === ',') this.state = 'beforeKey'
          else if (c === '}') this.state = 'end'
          i++
          break
      }
    }
  }

  private stop(): void {
    this.objectLike = false
    this.state = 'end'
  }

  /** Consumes string characters from `at`; returns the index after what it consumed. */
  private readString(text: string, at: number): number {
    let decoded = ''
    let i = at
    while (i < text.length) {
      if (this.escape) {
        this.escape += text[i++]
        const value = this.decodeEscape()
        if (value === undefined) continue
        decoded += value
        this.escape = ''
        continue
      }
      const next = nextSpecial(text, i)
      decoded += text.slice(i, next)
      i = next
      if (i >= text.length) break
      if (text[i] === '\\') {
        this.escape = '\\'
        i++
        continue
      }
      i++
      this.append(decoded)
      if (this.state === 'key') this.state = 'colon'
      else {
        this.complete.add(this.key)
        this.state = 'beforeKey'
      }
      return i
    }
    this.append(decoded)
    return i
  }

  /** The decoded escape, or undefined while more characters are needed. */
  private decodeEscape(): string | undefined {
    const kind = this.escape[1]
    if (kind !== 'u') return ESCAPES[kind] ?? kind
    if (this.escape.length < 6) return undefined
    const code = Number.parseInt(this.escape.slice(2, 6), 16)
    return Number.isNaN(code) ? '' : String.fromCharCode(code)
  }

  private append(decoded: string): void {
    if (!decoded) return
    if (this.state === 'key') this.key += decoded
    else this.values.set(this.key, (this.values.get(this.key) ?? '') + decoded)
  }

  private skipNested(c: string): void {
    if (this.nestedInString) {
      if (this.nestedEscape) this.nestedEscape = false
      else if (c === '\\') this.nestedEscape = true
      else if (c === '"') this.nestedInString = false
      return
    }
    if (c === '"') this.nestedInString = true
    else if (c === '{' || c === '[') this.depth++
    else if (c === '}' || c === ']') {
      this.depth--
      if (this.depth === 0) this.state = 'beforeKey'
    }
  }
}

function isSpace(c: string): boolean {
  return c === ' ' || c === '\n' || c === '\r' || c === '\t'
}

function nextSpecial(text: string, from: number): number {
  for (let i = from; i < text.length; i++) {
    const c = text.charCodeAt(i)
    if (c === 0x22 || c === 0x5c) return i
  }
  return text.length
}
