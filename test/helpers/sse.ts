export interface SseEvent {
  event: string | null
  data: string
}

/** Parses a text/event-stream body into events; `: ping` comments are dropped. */
export function parseSse(body: string): SseEvent[] {
  const events: SseEvent[] = []
  for (const block of body.split('\n\n')) {
    let event: string | null = null
    const data: string[] = []
    for (const line of block.split('\n')) {
      if (line.startsWith('event: ')) event = line.slice(7)
      else if (line.startsWith('data: ')) data.push(line.slice(6))
    }
    if (data.length) events.push({ event, data: data.join('\n') })
  }
  return events
}
