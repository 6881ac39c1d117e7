import t from 'tap'
import type { LmcChunk, LmcMessage } from '../../schemas/lmc.js'
import {
  buildCompletion,
  clientToolsOf,
  CompletionChunks,
  completionId,
  fromChatMessages,
  renderContent,
} from '../../services/agent/openai-compat.js'

let seq = 0
function lmc(fields: Omit<LmcMessage, 'id' | 'created_at'>): LmcMessage {
  seq++
  return { id: `00000000-0000-4000-8000-${String(seq).padStart(12, '0')}`, created_at: '2024-01-01T00:00:00.000Z', ...fields }
}

/** The chunks the agent loop would emit for these messages, content cut into small pieces. */
function toChunks(messages: LmcMessage[], size = 3): LmcChunk[] {
  return messages.flatMap((m) => {
    const frame: LmcChunk = {
      id: m.id,
      role: m.role,
      type: m.type,
      ...(m.format ? { format: m.format } : {}),
      ...(m.stream ? { stream: m.stream } : {}),
      created_at: m.created_at,
    }
    const pieces: LmcChunk[] = []
    if (typeof m.content === 'string' && m.type !== 'image') {
      for (let i = 0; i < m.content.length; i += size) pieces.push({ ...frame, content: m.content.slice(i, i + size) })
    } else pieces.push({ ...frame, content: m.content })
    return [{ ...frame, start: true }, ...pieces, { ...frame, end: true }]
  })
}

const turn: LmcMessage[] = [
  lmc({ role: 'user', type: 'message', format: 'text', content: 'Plot it' }),
  lmc({ role: 'assistant', type: 'message', format: 'text', content: 'Let me run this.' }),
  lmc({ role: 'assistant', type: 'code', format: 'python', content: 'print(6 * 7)\nplot()' }),
  lmc({ role: 'computer', type: 'console', format: 'output', stream: 'stdout', content: '42\n' }),
  lmc({ role: 'computer', type: 'console', format: 'output', stream: 'stderr', content: 'warning: slow\n' }),
  lmc({ role: 'computer', type: 'image', format: 'base64.png', content: 'iVBORw0KGgo=' }),
  lmc({ role: 'assistant', type: 'code', format: 'shell', content: 'ls\n' }),
  lmc({ role: 'computer', type: 'confirmation', format: 'execution', content: { type: 'code', format: 'shell', content: 'ls' } }),
  lmc({ role: 'computer', type: 'console', format: 'output', stream: 'stdout', content: 'a.txt' }),
  lmc({ role: 'computer', type: 'console', format: 'output', stream: 'stdout', content: '<result>' }),
  lmc({ role: 'assistant', type: 'message', format: 'text', content: 'The answer is **42**.' }),
]

const RENDERED = [
  'Let me run this.',
  '',
  '```python',
  'print(6 * 7)',
  'plot()',
  '```',
  '',
  '```output',
  '42',
  'warning: slow',
  '```',
  '',
  '![image](data:image/png;base64,iVBORw0KGgo=)',
  '',
  '```shell',
  'ls',
  '```',
  '',
  '```output',
  'a.txt',
  '<result>',
  '```',
  '',
  'The answer is **42**.',
].join('\n')

t.test('fromChatMessages: OpenAI roles and content shapes', async (t) => {
  const { inputs, systemMessage } = fromChatMessages([
    { role: 'system', content: 'Be brief.' },
    { role: 'developer', content: [{ type: 'text', text: 'Use Python.' }] },
    { role: 'user', content: 'Hi', name: 'ann', unknown_field: true },
    {
      role: 'user',
      content: [
        { type: 'text', text: 'What is in' },
        { type: 'text', text: 'this picture?' },
        { type: 'image_url', image_url: { url: 'data:image/jpeg;base64,/9j/4AAQ', detail: 'low' } },
      ],
    },
    {
      role: 'assistant',
      content: null,
      tool_calls: [{ id: 'call_1', type: 'function', function: { name: 'execute', arguments: '{"language":"py","code":"print(1)"}' } }],
    },
    { role: 'tool', tool_call_id: 'call_1', content: '1\n' },
    { role: 'assistant', content: [{ type: 'text', text: 'It printed 1.' }] },
  ])
  t.equal(systemMessage, 'Be brief.\n\nUse Python.')
  t.same(inputs, [
    { role: 'user', type: 'message', format: 'text', content: 'Hi' },
    { role: 'user', type: 'message', format: 'text', content: 'What is in\nthis picture?' },
    { role: 'user', type: 'image', format: 'base64.jpeg', content: '/9j/4AAQ' },
    { role: 'assistant', type: 'code', format: 'python', content: 'print(1)' },
    { role: 'computer', type: 'console', format: 'output', content: '1\n' },
    { role: 'assistant', type: 'message', format: 'text', content: 'It printed 1.' },
  ])
})

t.test('fromChatMessages: LMC-style messages pass through', async (t) => {
  const { inputs, systemMessage } = fromChatMessages([
    { role: 'user', type: 'message', content: 'Run it' },
    { role: 'assistant', type: 'code', format: 'shell', content: 'ls' },
    { role: 'computer', type: 'console', format: 'output', content: 'a.txt\n' },
  ])
  t.equal(systemMessage, undefined)
  t.same(inputs, [
    { role: 'user', type: 'message', content: 'Run it' },
    { role: 'assistant', type: 'code', format: 'shell', content: 'ls' },
    { role: 'computer', type: 'console', format: 'output', content: 'a.txt\n' },
  ])
})

t.test('fromChatMessages: bad input is a 400 naming the field', async (t) => {
  const invalid = (param: string) => ({ statusCode: 400, type: 'validation_error', code: 'invalid_message', param })
  t.throws(() => fromChatMessages([{ role: 'robot', content: 'x' }]), invalid('messages[0].role'))
  t.throws(
    () => fromChatMessages([{ role: 'user', content: 'ok' }, { role: 'user', content: [{ type: 'image_url', image_url: { url: 'http://10.0.0.1/x.png' } }] }]),
    invalid('messages[1].content[0].image_url.url'),
  )
  t.throws(() => fromChatMessages([{ role: 'user', content: [{ type: 'input_audio' }] }]), invalid('messages[0].content[0]'))
  t.throws(() => fromChatMessages([{ role: 'user', content: 42 }]), invalid('messages[0].content'))
  t.throws(() => fromChatMessages([{ role: 'user', type: 'message', format: 'docx', content: 'x' }]), invalid('messages[0].format'))
  t.throws(() => fromChatMessages([{ role: 'robot', type: 'message', content: 'x' }]), invalid('messages[0].role'))
  t.same(fromChatMessages([{ role: 'system', type: 'message', content: 'Be brief.' }]), { inputs: [], systemMessage: 'Be brief.' })
})

t.test('renderContent: code and output as fenced blocks', async (t) => {
  t.equal(renderContent(turn), RENDERED)
  t.equal(renderContent([turn[0]]), '', 'user messages are not part of the answer')
})

t.test('renderContent: a fence longer than backticks inside the code', async (t) => {
  const messages = [lmc({ role: 'assistant', type: 'code', format: 'python', content: 'print("```")' })]
  t.equal(renderContent(messages), '````python\nprint("```")\n````')
})

t.test('buildCompletion', async (t) => {
  const id = completionId()
  t.match(id, /^chatcmpl-[\w-]+$/)
  const usage = { prompt_tokens: 5, completion_tokens: 3, total_tokens: 8 }
  t.same(buildCompletion({ id, created: 1_700_000_000, model: 'gpt-4o-mini' }, 'Hello', usage), {
    id,
    object: 'chat.completion',
    created: 1_700_000_000,
    model: 'gpt-4o-mini',
    choices: [{ index: 0, message: { role: 'assistant', content: 'Hello', refusal: null }, logprobs: null, finish_reason: 'stop' }],
    usage,
  })
})

t.test('CompletionChunks: streamed deltas add up to the rendered content', async (t) => {
  const meta = { id: completionId(), created: 1_700_000_000, model: 'gpt-4o-mini' }
  const chunks = new CompletionChunks(meta)
  const first = chunks.start()
  const deltas = toChunks(turn).flatMap((c) => chunks.push(c))
  const last = chunks.finish()
  const usage = chunks.usage({ prompt_tokens: 5, completion_tokens: 3, total_tokens: 8 })
  const all = [first, ...deltas, ...last, usage]

  for (const chunk of all) {
    t.equal(chunk.id, meta.id)
    t.equal(chunk.created, meta.created)
    t.equal(chunk.model, meta.model)
    t.equal(chunk.object, 'chat.completion.chunk')
  }
  t.same(first.choices, [{ index: 0, delta: { role: 'assistant', content: '' }, logprobs: null, finish_reason: null }])
  t.ok(deltas.length > 10, 'content arrives in many deltas')
  t.ok(deltas.every((c) => c.choices[0].finish_reason === null && c.choices[0].delta.role === undefined))
  const text = [...deltas, ...last].map((c) => c.choices[0]?.delta.content ?? '').join('')
  t.equal(text, RENDERED)
  t.same(last.at(-1)?.choices, [{ index: 0, delta: {}, logprobs: null, finish_reason: 'stop' }])
  t.same(usage.choices, [])
  t.same(usage.usage, { prompt_tokens: 5, completion_tokens: 3, total_tokens: 8 })
})

t.test('CompletionChunks: fences open at the code start and close at its end', async (t) => {
  const chunks = new CompletionChunks({ id: 'chatcmpl-x', created: 1, model: 'm' })
  const [start, ...rest] = toChunks([turn[2]], 100)
  const content = (c: LmcChunk) => chunks.push(c).map((chunk) => chunk.choices[0].delta.content)
  t.same(content(start), ['```python\n'])
  t.same(content(rest[0]), ['print(6 * 7)\nplot()'])
  t.same(content(rest[1]), ['\n```'])

  const output = toChunks([turn[3]], 100)
  t.same(output.flatMap(content), ['\n\n```output\n', '42'], 'an output fence stays open for more output')
  t.same(
    chunks.finish().map((c) => c.choices[0].delta.content),
    ['\n```', undefined],
  )
})

t.test("fromChatMessages: the client's tool calls and results become tool_call and tool_result; execute results stay console output", async (t) => {
  const { inputs } = fromChatMessages(
    [
      { role: 'user', content: 'go' },
      {
        role: 'assistant',
        content: null,
        tool_calls: [
          { id: 'call_x', type: 'function', function: { name: 'execute', arguments: '{"language":"python","code":"1"}' } },
          { id: 'call_w', type: 'function', function: { name: 'get_weather', arguments: '{"city":"Paris"}' } },
          { id: 'call_p', type: 'function', function: { name: 'python', arguments: '{"code":"2"}' } },
        ],
      },
      { role: 'tool', tool_call_id: 'call_x', content: '1' },
      { role: 'tool', tool_call_id: 'call_w', content: [{ type: 'text', text: 'sunny' }] },
      { role: 'tool', tool_call_id: 'call_p', content: 'two' },
    ],
    new Set(['get_weather', 'python']),
  )
  t.same(inputs.slice(1), [
    { role: 'assistant', type: 'code', format: 'python', content: '1' },
    { role: 'assistant', type: 'tool_call', content: { id: 'call_w', name: 'get_weather', arguments: '{"city":"Paris"}' } },
    { role: 'assistant', type: 'tool_call', content: { id: 'call_p', name: 'python', arguments: '{"code":"2"}' } },
    { role: 'computer', type: 'console', format: 'output', content: '1' },
    { role: 'computer', type: 'tool_result', content: { tool_call_id: 'call_w', content: 'sunny' } },
    { role: 'computer', type: 'tool_result', content: { tool_call_id: 'call_p', content: 'two' } },
  ], 'a client tool named like a language stays the client\'s')
})

const refusal = (fn: () => unknown) => {
  try {
    fn()
  } catch (err) {
    return err
  }
  return undefined
}

t.test('clientToolsOf: function tools pass as given, choice and parallel kept; nothing when there are none', async (t) => {
  t.equal(clientToolsOf({}), undefined)
  t.equal(clientToolsOf({ tools: [], tool_choice: null }), undefined)
  const tool = { type: 'function', function: { name: 'f', description: 'd', parameters: { type: 'object' }, strict: true, extra: 1 } }
  t.same(clientToolsOf({ tools: [tool], tool_choice: { type: 'function', function: { name: 'f' } }, parallel_tool_calls: false }), {
    tools: [{ type: 'function', function: { name: 'f', description: 'd', parameters: { type: 'object' }, strict: true } }],
    toolChoice: { type: 'function', function: { name: 'f' } },
    parallelToolCalls: false,
  })
  t.same(clientToolsOf({ tool_choice: 'required' }), { tools: [], toolChoice: 'required' }, 'forcing the server tool needs no client tool')
  t.match(refusal(() => clientToolsOf({ tools: 'f' })), { statusCode: 400, param: 'tools' })
  t.match(refusal(() => clientToolsOf({ tools: [null] })), { statusCode: 400, param: 'tools[0].type' })
  t.match(refusal(() => clientToolsOf({ tools: [{ type: 'function', function: { name: 'x'.repeat(65) } }] })), { param: 'tools[0].function.name' })
  t.match(refusal(() => clientToolsOf({ tools: [{ type: 'function', function: { name: 'f', description: 3 } }] })), { param: 'tools[0].function.description' })
  t.match(refusal(() => clientToolsOf({ function_call: 'auto' })), { code: 'unsupported_parameter', param: 'function_call' })
})

t.test('CompletionChunks.toolCalls: a head delta per call, then argument fragments that never split a surrogate pair', async (t) => {
  const chunks = new CompletionChunks({ id: 'chatcmpl-1', created: 1, model: 'm' })
  const args = `{"s":"${'a'.repeat(30)}🌤️${'b'.repeat(40)}"}`
  const out = chunks.toolCalls([
    { id: 'call_1', name: 'f', arguments: args },
    { id: 'call_2', name: 'g', arguments: '{}' },
  ])
  const deltas = out.map((c) => c.choices[0]!.delta.tool_calls![0]!)
  t.same(deltas[0], { index: 0, id: 'call_1', type: 'function', function: { name: 'f', arguments: '' } })
  const fragments = deltas.filter((d) => d.index === 0 && !d.id).map((d) => d.function!.arguments!)
  t.equal(fragments.join(''), args)
  for (const fragment of fragments) t.notMatch(fragment, /[\uD800-\uDBFF]$|^[\uDC00-\uDFFF]/, 'no lone surrogate at an edge')
  t.match(deltas.find((d) => d.index === 1 && d.id), { id: 'call_2', function: { name: 'g' } })
})
