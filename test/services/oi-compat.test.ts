import t from 'tap'
import type { LmcMessage } from '../../schemas/lmc.js'
import { COMPLETE, type OiFrame, OiFramer, OiInput, type OiPosition, oiMessages } from '../../services/oi-compat.js'
import type { EventRecord } from '../../services/store/types.js'

const at = '2026-01-01T00:00:00.000Z'
let nextId = 0
const message = (role: LmcMessage['role'], type: LmcMessage['type'], format: LmcMessage['format'] | undefined, content: LmcMessage['content']): LmcMessage => ({
  id: `m${++nextId}`,
  role,
  type,
  ...(format ? { format } : {}),
  content,
  created_at: at,
})

/** A turn as the log holds it, with the pieces each message was streamed in. */
function turn(): { events: EventRecord[]; pieces: Map<string, string[]> } {
  const items: ({ type: string; data: unknown } & { pieces?: string[] })[] = [
    { type: 'message', data: message('user', 'message', undefined, 'plot it') },
    { type: 'run_started', data: {} },
    { type: 'message', data: message('assistant', 'message', 'text', 'Let me plot it. '), pieces: ['Let ', 'me ', 'plot ', 'it. '] },
    { type: 'message', data: message('assistant', 'code', 'python', 'print(1)\nprint(2)'), pieces: ['print(1)\n', 'print(2)'] },
    { type: 'execution_started', data: {} },
    { type: 'message', data: message('computer', 'console', 'output', '1\n'), pieces: ['1\n'] },
    { type: 'message', data: message('computer', 'console', 'output', 'Traceback\n'), pieces: ['Trace', 'back\n'] },
    { type: 'message', data: message('computer', 'image', 'base64.png', 'iVBORw0KGgo='), pieces: ['iVBORw0KGgo='] },
    { type: 'execution_finished', data: {} },
    { type: 'message', data: message('computer', 'confirmation', 'execution', { type: 'code' }) },
    { type: 'awaiting_confirmation', data: {} },
    { type: 'run_suspended', data: {} },
    { type: 'run_started', data: { resumed: true } },
    { type: 'message', data: message('assistant', 'message', 'text', 'Done.'), pieces: ['Done.'] },
    { type: 'run_finished', data: { stopped: false } },
    { type: 'message', data: message('user', 'message', undefined, 'again') },
    { type: 'run_started', data: {} },
    { type: 'run_failed', data: { error: { message: 'The model did not answer in time' } } },
  ]
  const pieces = new Map<string, string[]>()
  const events = items.map((item, i) => {
    if (item.pieces) pieces.set((item.data as LmcMessage).id, item.pieces)
    return { id: i + 1, type: item.type, createdAt: at, data: item.data }
  })
  return { events, pieces }
}

/** Frames with consecutive content pieces of one block joined: how much arrives per frame is not the protocol. */
function joined(frames: OiFrame[]): OiFrame[] {
  const out: OiFrame[] = []
  for (const frame of frames) {
    const last = out.at(-1)
    if (last && typeof last.content === 'string' && typeof frame.content === 'string' && last.role === frame.role && last.type === frame.type && last.format === frame.format) {
      out[out.length - 1] = { ...last, content: last.content + frame.content }
    } else out.push({ ...frame })
  }
  return out
}

t.test('live output is framed as Open Interpreter frames it', async (t) => {
  const { events, pieces } = turn()
  const framer = new OiFramer({ event: 0, open: null })
  const frames: OiFrame[] = []
  for (const event of events) {
    const m = event.data as LmcMessage
    if (event.type === 'message' && pieces.has(m.id)) for (const piece of pieces.get(m.id)!) frames.push(...framer.text(m, piece).map((f) => f.body))
    frames.push(...framer.event(event).map((f) => f.body))
  }
  t.same(joined(frames), [
    { role: 'assistant', type: 'message', start: true },
    { role: 'assistant', type: 'message', content: 'Let me plot it. ' },
    { role: 'assistant', type: 'message', end: true },
    { role: 'assistant', type: 'code', format: 'python', start: true },
    { role: 'assistant', type: 'code', format: 'python', content: 'print(1)\nprint(2)' },
    { role: 'assistant', type: 'code', format: 'python', end: true },
    { role: 'computer', type: 'console', start: true },
    { role: 'computer', type: 'console', format: 'output', content: '1\nTraceback\n' },
    { role: 'computer', type: 'console', format: 'active_line', content: null },
    { role: 'computer', type: 'console', end: true },
    { role: 'computer', type: 'image', format: 'base64.png', start: true },
    { role: 'computer', type: 'image', format: 'base64.png', content: 'iVBORw0KGgo=' },
    { role: 'computer', type: 'image', format: 'base64.png', end: true },
    COMPLETE,
    { role: 'assistant', type: 'message', start: true },
    { role: 'assistant', type: 'message', content: 'Done.' },
    { role: 'assistant', type: 'message', end: true },
    COMPLETE,
    { role: 'server', type: 'error', content: 'The model did not answer in time' },
    COMPLETE,
  ])
})

t.test('from the position after any frame, the log gives exactly the frames that follow', async (t) => {
  const { events, pieces } = turn()
  const live = new OiFramer({ event: 0, open: null })
  const all: { body: OiFrame; after: OiPosition }[] = []
  for (const event of events) {
    const m = event.data as LmcMessage
    if (event.type === 'message' && pieces.has(m.id)) for (const piece of pieces.get(m.id)!) all.push(...live.text(m, piece))
    all.push(...live.event(event))
  }
  for (let k = 0; k < all.length; k++) {
    const replay = new OiFramer(all[k]!.after)
    const rest = events.flatMap((event) => replay.event(event).map((f) => f.body))
    t.same(joined(rest), joined(all.slice(k + 1).map((f) => f.body)), `after frame ${k}`)
  }
})

t.test('history stored outside a run (posted to /settings, imported) is not output', async (t) => {
  const framer = new OiFramer({ event: 0, open: null })
  const said = { id: 1, type: 'message', createdAt: at, data: message('assistant', 'message', 'text', 'Understood.') }
  t.same(framer.event(said), [])
})

t.test('chunks build user messages as upstream accumulates them, bounded', async (t) => {
  const input = new OiInput(30)
  input.start({ role: 'user', start: true })
  input.add({ role: 'user', type: 'message', content: 'Does this ' })
  input.add({ role: 'user', type: 'message', content: 'exist?' })
  input.add({ role: 'user', type: 'file', format: 'path', content: '/a.txt' })
  t.same(input.take(), [
    { role: 'user', type: 'message', content: 'Does this exist?' },
    { role: 'user', type: 'file', format: 'path', content: '/a.txt' },
  ])
  t.throws(() => input.add({ role: 'user', type: 'message', content: 'x' }), { code: 'invalid_message' }, 'content before a start')
  input.start({ role: 'user', type: 'message', start: true })
  t.throws(() => input.add({ role: 'user', type: 'message', content: 'x'.repeat(31) }), { message: 'A message may hold at most 30 characters' })
  t.throws(() => input.add({ role: 'user', type: 'message', content: { not: 'text' } }), { code: 'invalid_message' })
})

t.test('GET /settings/messages shows messages in Open Interpreter shape', async (t) => {
  t.same(
    oiMessages([
      message('user', 'message', undefined, 'hi'),
      message('assistant', 'code', 'python', 'print(1)'),
      message('computer', 'confirmation', 'execution', { type: 'code' }),
      { ...message('computer', 'console', 'output', '1\n'), stream: 'stdout' },
      message('assistant', 'message', 'text', 'one'),
    ]),
    [
      { role: 'user', type: 'message', content: 'hi' },
      { role: 'assistant', type: 'code', format: 'python', content: 'print(1)' },
      { role: 'computer', type: 'console', format: 'output', content: '1\n' },
      { role: 'assistant', type: 'message', content: 'one' },
    ],
  )
})

t.test('active lines open the console block, stay inside it, and are not part of a position', async (t) => {
  const framer = new OiFramer({ event: 1, open: { role: 'assistant', type: 'code', format: 'python' }, run: true })
  const bodies = (frames: { body: OiFrame }[]) => frames.map((f) => f.body)
  t.same(bodies(framer.line(1)), [
    { role: 'assistant', type: 'code', format: 'python', end: true },
    { role: 'computer', type: 'console', start: true },
    { role: 'computer', type: 'console', format: 'active_line', content: 1 },
  ], 'the first line closes the code block and opens the console block')
  const output = message('computer', 'console', 'output', '3\n')
  t.same(bodies(framer.text(output, '3\n')), [{ role: 'computer', type: 'console', format: 'output', content: '3\n' }], 'output joins the open console block')
  const positioned = framer.line(2)
  t.same(bodies(positioned), [{ role: 'computer', type: 'console', format: 'active_line', content: 2 }])
  t.same(positioned[0]?.after.message, { id: output.id, chars: 2 }, 'a line leaves the position in the output where it was')
  t.same(bodies(framer.close()), [
    { role: 'computer', type: 'console', format: 'active_line', content: null },
    { role: 'computer', type: 'console', end: true },
  ])
})
