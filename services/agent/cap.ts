import { renderTerminal } from './terminal.js'

/** Open Interpreter's default budget for output shown to the model. */
export const MODEL_OUTPUT_CHARS = 2800

/**
 * Output as the model sees it: rendered as a terminal shows it (see renderTerminal), then
 * shortened. Both ends are kept because the head usually says
 * what ran and the tail holds the result or the error; the cut is marked so the model knows.
 */
export function capForModel(raw: string, maxChars: number = MODEL_OUTPUT_CHARS): string {
  const text = renderTerminal(raw)
  if (text.length <= maxChars) return text
  const marker = (cut: number) => `\n[… ${cut} characters cut …]\n`
  const room = Math.max(0, maxChars - marker(text.length).length)
  const head = Math.ceil(room * 0.4)
  const tail = room - head
  return `${text.slice(0, head)}${marker(text.length - head - tail)}${tail > 0 ? text.slice(-tail) : ''}`
}
