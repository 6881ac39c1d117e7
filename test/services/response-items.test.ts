import { randomUUID } from 'node:crypto'
import t from 'tap'
import type { LmcChunk, LmcMessage } from '../../schemas/lmc.js'
import { fromResponseInput, ResponseItems, type StreamEvent } from '../../services/agent/response-items.js'
import { ApiError } from '../../services/errors.js'

const at = new Date().toISOString()

/** The chunks one LMC message streams as: start, its content in pieces, end. */
function message(fields: Pick<LmcChunk, 'role' | 'type' | 'format'>, ...pieces: string[]): LmcChunk[] {
  const head = { id: randomUUID(), ...fields, created_at: at }
  return [{ ...head, start: true }, ...pieces.map((content) => ({ ...head, content })), { ...head, end: true }]
}

const code = (...pieces: string[]) => message({ role: 'assistant', type: 'code', format: 'python' }, ...pieces)
const console_ = (...pieces: string[]) => message({ role: 'computer', type: 'console', format: 'output' }, ...pieces)
const image = (data: string) => message({ role: 'computer', type: 'image', format: 'base64.png' }, data)
const say = (...pieces: string[]) => message({ role: 'assistant', type: 'message', format: 'text' }, ...pieces)

function record(answerOnly = false) {
  const events: StreamEvent[] = []
  const items = new ResponseItems('session-1', (event) => events.push(event), answerOnly)
  return { items, events, types: () => events.map((e) => e.type) }
}

t.test('a code call collects its console and image output until the model speaks again', async (t) => {
  const { items, events, types } = record()
  for (const chunk of [...code('print(1)\n', 'print(2)'), ...console_('1\n'), ...console_('2\n'), ...image('AAAA'), ...console_('after'), ...say('Done ', 'here.')]) {
    items.push(chunk)
  }
  const output = items.finish()
  t.same(types(), [
    'response.output_item.added',
    'response.code_interpreter_call.in_progress',
    'response.code_interpreter_call_code.delta',
    'response.code_interpreter_call_code.delta',
    'response.code_interpreter_call_code.done',
    'response.code_interpreter_call.interpreting',
    'response.code_interpreter_call.completed',
    'response.output_item.done',
    'response.output_item.added',
    'response.content_part.added',
    'response.output_text.delta',
    'response.output_text.delta',
    'response.output_text.done',
    'response.content_part.done',
    'response.output_item.done',
  ])
  t.same(
    events.map((e) => e.sequence_number),
    events.map((_, i) => i),
  )
  t.match(output, [
    {
      type: 'code_interpreter_call',
      status: 'completed',
      code: 'print(1)\nprint(2)',
      container_id: 'session-1',
      language: 'python',
      outputs: [
        { type: 'logs', logs: '1\n2\n' },
        { type: 'image', url: 'data:image/png;base64,AAAA' },
        { type: 'logs', logs: 'after' },
      ],
    },
    { type: 'message', role: 'assistant', status: 'completed', content: [{ type: 'output_text', text: 'Done here.', annotations: [] }] },
  ])
  const added = events[0] as StreamEvent & { item: { status: string; outputs: unknown[] } }
  t.equal(added.item.status, 'in_progress', 'the added item is a snapshot, not the live object')
  t.same(added.item.outputs, [])
  t.same(events.at(-1), { type: 'response.output_item.done', sequence_number: events.length - 1, output_index: 1, item: output[1] })
})

t.test('a call still open at the end is completed; a cancelled turn leaves its items incomplete', async (t) => {
  const finished = record()
  for (const chunk of [...code('x = 1'), ...console_('ok')]) finished.items.push(chunk)
  t.match(finished.items.finish(), [{ status: 'completed', outputs: [{ logs: 'ok' }] }])
  t.equal(finished.types().at(-1), 'response.output_item.done')

  const cancelled = record()
  for (const chunk of [...code('import time\ntime.sleep(60)'), ...console_('started\n')]) cancelled.items.push(chunk)
  t.match(cancelled.items.finish({ incomplete: true }), [{ type: 'code_interpreter_call', status: 'incomplete', outputs: [{ logs: 'started\n' }] }])
  t.notOk(cancelled.types().includes('response.code_interpreter_call.completed'), 'no completed event for a call cut short')

  const cut = record()
  const [head, first] = say('half an ans', 'wer')
  cut.items.push(head!)
  cut.items.push(first!)
  t.match(cut.items.finish({ incomplete: true }), [{ type: 'message', status: 'incomplete', content: [{ text: 'half an ans' }] }])
  t.same(cut.types().slice(-3), ['response.output_text.done', 'response.content_part.done', 'response.output_item.done'])
})

t.test('answerOnly holds text back and sends only the final answer, whole, at the end', async (t) => {
  const { items, types } = record(true)
  for (const chunk of [...say('Let me compute.'), ...code('print(42)'), ...console_('42\n'), ...say('{"answer": ', '42}')]) items.push(chunk)
  t.notOk(types().includes('response.output_text.delta'), 'nothing of the text before the end')
  const final: LmcMessage = { id: randomUUID(), role: 'assistant', type: 'message', format: 'text', content: '{"answer": 42}', created_at: at }
  const output = items.finish({ final })
  t.same(
    output.map((item) => item.type),
    ['code_interpreter_call', 'message'],
  )
  t.match(output[1], { content: [{ text: '{"answer": 42}' }] })
  t.equal(types().filter((type) => type === 'response.output_text.delta').length, 1)
})

t.test('user messages, confirmations and active lines are not output items', async (t) => {
  const { items, events } = record()
  for (const chunk of [
    ...message({ role: 'user', type: 'message', format: 'text' }, 'hi'),
    ...message({ role: 'computer', type: 'console', format: 'active_line' }, '3'),
    ...console_('orphan output with no call'),
  ]) {
    items.push(chunk)
  }
  t.same(items.finish(), [])
  t.same(events, [])
})

t.test('fromResponseInput: strings, messages, parts, earlier output items', async (t) => {
  const simple = fromResponseInput('hello')
  t.same(simple.inputs, [{ role: 'user', type: 'message', format: 'text', content: 'hello' }])
  t.match(simple.items, [{ type: 'message', role: 'user', content: [{ type: 'input_text', text: 'hello' }], id: /^msg_[0-9a-f]{48}$/ }])

  const parsed = fromResponseInput([
    { role: 'system', content: 'Be brief.' },
    { type: 'message', role: 'developer', content: [{ type: 'input_text', text: 'Use Python.' }] },
    { role: 'user', content: [{ type: 'input_text', text: 'look:' }, { type: 'input_image', image_url: 'data:image/jpeg;base64,/9j/' }, { type: 'input_text', text: 'what is it?' }] },
    { id: 'msg_old', type: 'message', role: 'assistant', content: [{ type: 'output_text', text: 'A cat.', annotations: [] }] },
    { type: 'code_interpreter_call', id: 'ci_1', code: 'echo hi', language: 'shell', outputs: [{ type: 'logs', logs: 'hi\n' }, { type: 'image', url: 'data:image/png;base64,AAAA' }] },
    { type: 'function_call', call_id: 'call_1', name: 'lookup', arguments: '{"q":1}' },
    { type: 'function_call_output', call_id: 'call_1', output: 'found' },
    { type: 'reasoning', id: 'rs_1', summary: [] },
  ])
  t.same(parsed.system, ['Be brief.', 'Use Python.'])
  t.same(parsed.inputs, [
    { role: 'user', type: 'message', format: 'text', content: 'look:' },
    { role: 'user', type: 'image', format: 'base64.jpeg', content: '/9j/' },
    { role: 'user', type: 'message', format: 'text', content: 'what is it?' },
    { role: 'assistant', type: 'message', format: 'text', content: 'A cat.' },
    { role: 'assistant', type: 'code', format: 'shell', content: 'echo hi' },
    { role: 'computer', type: 'console', format: 'output', content: 'hi\n' },
    { role: 'computer', type: 'image', format: 'base64.png', content: 'AAAA' },
    { role: 'assistant', type: 'tool_call', content: { id: 'call_1', name: 'lookup', arguments: '{"q":1}' } },
    { role: 'computer', type: 'tool_result', content: { tool_call_id: 'call_1', content: 'found' } },
  ])
  t.equal(parsed.items.length, 8, 'every item is listed, with an id')
  t.same(parsed.sources, [2, 2, 2, 3, 4, 4, 4, 5, 6], 'each input knows its item')
  t.equal(parsed.items[3]!.id, 'msg_old', 'ids the client gave are kept')
})

t.test('fromResponseInput refuses what it cannot honour, naming the field', async (t) => {
  const refused = (input: unknown[]) => {
    try {
      fromResponseInput(input)
    } catch (err) {
      return err instanceof ApiError ? [err.statusCode, err.param, err.code] : err
    }
    return 'accepted'
  }
  t.same(refused(['text']), [400, 'input[0]', 'invalid_input'])
  t.same(refused([{ role: 'user', content: [{ type: 'input_image', file_id: 'file-1' }] }]), [400, 'input[0].content[0].image_url', 'invalid_input'])
  t.same(refused([{ role: 'user', content: [{ type: 'input_audio' }] }]), [400, 'input[0].content[0].type', 'invalid_input'])
  t.same(refused([{ role: 'user', content: 7 }]), [400, 'input[0].content', 'invalid_input'])
  t.same(refused([{ role: 'assistant', content: [{ type: 'input_image' }] }]), [400, 'input[0].content[0]', 'invalid_input'])
  t.same(refused([{ type: 'code_interpreter_call', code: 'x', outputs: [{ type: 'image', url: 'https://example.com/a.png' }] }]), [400, 'input[0].outputs[0]', 'invalid_input'])
  t.same(refused([{ type: 'item_reference', id: 'msg_1' }]), [400, 'input[0].type', 'invalid_input'], 'references are resolved before, never converted')
})
