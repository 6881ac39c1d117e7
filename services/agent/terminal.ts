import stripAnsi from 'strip-ansi'

/**
 * Output as a terminal would show it: escape sequences (colours, cursor moves, titles) removed,
 * and carriage returns and backspaces applied, so a progress bar redrawn a thousand times is one
 * line. Only for what the model reads; clients get the raw stream.
 */
export function renderTerminal(text: string): string {
  const plain = stripAnsi(text)
  if (!plain.includes('\r') && !plain.includes('\b')) return plain
  return plain.split('\n').map(renderLine).join('\n')
}

/** One line: `\r` goes back to its start and `\b` one column left; what follows overwrites. */
function renderLine(line: string): string {
  const cells: string[] = []
  let column = 0
  for (const char of line) {
    if (char === '\r') column = 0
    else if (char === '\b') column = Math.max(0, column - 1)
    else cells[column++] = char
  }
  return cells.join('')
}
