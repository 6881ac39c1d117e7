import OpenAI from 'openai'
import t from 'tap'
import type { LmcChunk, LmcMessage } from '../../schemas/lmc.js'
import { capForModel } from '../../services/agent/cap.js'
import { buildMessages, toolCallId } from '../../services/agent/context.js'
import { FenceSplitter, languageFromTag } from '../../services/agent/fences.js'
import { type Executor, runTurn, type TurnOptions } from '../../services/agent/loop.js'
import { PartialJsonStrings } from '../../services/agent/partial-json.js'
import { ApiError } from '../../services/errors.js'
import type { ExecResult, KernelOutput } from '../../services/kernels/types.js'
import { MessageCollector, OutputWriter } from '../../services/output-writer.js'
import { httpError, startFakeUpstream, text, toolCall } from '../fakes/upstream.js'

const UPSTREAM_KEY = 'sk-test-upstream-key-0123456789'

const upstream = await startFakeUpstream()
t.teardown(() => upstream.close())
t.beforeEach(() => upstream.reset())

const ok = (over: Partial<ExecResult> = {}): ExecResult => ({
  exitCode: 0,
  durationMs: 3,
  timedOut: false,
  stateLost: false,
  truncated: false,
  interrupted: false,
  ...over,
})

let seq = 0
function lmc(fields: Omit<LmcMessage, 'id' | 'created_at'>): LmcMessage {
  seq++
  return { id: `00000000-0000-4000-8000-${String(seq).padStart(12, '0')}`, created_at: '2024-01-01T00:00:00.000Z', ...fields }
}
const user = (content: string) => lmc({ role: 'user', type: 'message', format: 'text', content })

function setup(overrides: Partial<TurnOptions> = {}) {
  const chunks: LmcChunk[] = []
  const persisted: LmcMessage[] = []
  const log: string[] = []
  const runs: { language: string; code: string }[] = []
  const execute: Executor = async (language, code, onOutput) => {
    runs.push({ language, code })
    onOutput({ type: 'stream', stream: 'stdout', text: '42\n' })
    return ok()
  }
  const opts: TurnOptions = {
    client: new OpenAI({ baseURL: upstream.url, apiKey: UPSTREAM_KEY, maxRetries: 0, timeout: 5_000 }),
    model: 'fake-model',
    temperature: 0.2,
    maxTokens: 512,
    maxIterations: 5,
    history: [user('What is 6 * 7?')],
    languages: ['python', 'shell'],
    tools: true,
    autoRun: true,
    execute,
    persist: async (message) => {
      log.push(`persist:${message.id}`)
      persisted.push(message)
    },
    emit: (chunk) => {
      if (chunk.start) log.push(`start:${chunk.id}`)
      if (chunk.end) log.push(`end:${chunk.id}`)
      chunks.push(chunk)
    },
    redact: (s) => s,
    signal: new AbortController().signal,
    maxOutputChars: 2800,
    ...overrides,
  }
  return { opts, chunks, persisted, log, runs }
}

/** The streamed content of one message, joined back. */
const streamed = (chunks: LmcChunk[], id: string) =>
  chunks
    .filter((c) => c.id === id && !c.start && !c.end)
    .map((c) => c.content)
    .join('')

const kinds = (messages: LmcMessage[]) => messages.map((m) => `${m.role}/${m.type}/${m.format ?? ''}`)

t.test('a plain answer streams one assistant message', async (t) => {
  upstream.script(text('Hello there, how can I help?', { usage: { prompt_tokens: 11, completion_tokens: 7, total_tokens: 18 } }))
  const { opts, chunks, persisted } = setup()
  const result = await runTurn(opts)

  t.equal(result.stopped, false)
  t.same(kinds(result.messages), ['assistant/message/text'])
  t.equal(result.final.content, 'Hello there, how can I help?')
  t.same(result.usage, { prompt_tokens: 11, completion_tokens: 7, total_tokens: 18 })
  t.same(persisted, result.messages)
  t.ok(chunks[0].start)
  t.ok(chunks.at(-1)?.end)
  t.ok(chunks.filter((c) => c.content !== undefined).length > 1, 'content arrives in several chunks')
  for (const c of chunks) {
    t.equal(c.id, result.final.id)
    t.equal(c.created_at, result.final.created_at)
  }
  t.equal(streamed(chunks, result.final.id), result.final.content)

  const body = upstream.requests[0].body
  t.equal(body.model, 'fake-model')
  t.equal(body.stream, true)
  t.same(body.stream_options, { include_usage: true })
  t.equal(body.temperature, 0.2)
  t.equal(body.max_tokens, 512)
  t.equal(body.tools[0].function.name, 'execute')
  t.same(body.tools[0].function.parameters.properties.language.enum, ['python', 'shell'])
  t.equal(body.messages[0].role, 'system')
  t.match(body.messages[0].content, /execute/)
  t.match(body.messages[0].content, /\/workspace/)
  t.match(body.messages[0].content, /python, shell/)
  t.same(body.messages[1], { role: 'user', content: 'What is 6 * 7?' })
  t.equal(upstream.requests[0].headers.authorization, `Bearer ${UPSTREAM_KEY}`)
})

t.test('system message override and custom instructions', async (t) => {
  upstream.script(text('ok'))
  const { opts } = setup({ systemMessage: 'You are terse.', customInstructions: 'Answer in French.' })
  await runTurn(opts)
  t.equal(upstream.requests[0].body.messages[0].content, 'You are terse.\n\nAnswer in French.')
})

t.test('a tool call runs and its result goes back to the model', async (t) => {
  const code = 'x = 6 * 7\nprint(x)'
  upstream.script(toolCall({ language: 'python', code }, { text: 'Let me compute that.' }), text('The answer is 42.'))
  const { opts, chunks, persisted, runs } = setup()
  const result = await runTurn(opts)

  t.same(runs, [{ language: 'python', code }])
  t.same(kinds(result.messages), ['assistant/message/text', 'assistant/code/python', 'computer/console/output', 'assistant/message/text'])
  const [intro, codeMessage, output, answer] = result.messages
  t.equal(intro.content, 'Let me compute that.')
  t.equal(codeMessage.content, code)
  t.equal(output.content, '42\n')
  t.equal(output.stream, 'stdout')
  t.equal(answer.content, 'The answer is 42.')
  t.equal(result.final.id, answer.id)
  t.same(persisted, result.messages)
  t.equal(streamed(chunks, codeMessage.id), code)

  t.equal(upstream.requests.length, 2)
  const second = upstream.requests[1].body.messages
  const id = toolCallId(codeMessage.id)
  t.same(second.slice(1), [
    { role: 'user', content: 'What is 6 * 7?' },
    {
      role: 'assistant',
      content: 'Let me compute that.',
      tool_calls: [{ id, type: 'function', function: { name: 'execute', arguments: JSON.stringify({ language: 'python', code }) } }],
    },
    { role: 'tool', tool_call_id: id, content: '42\n' },
  ])
})

t.test('code is emitted while the arguments stream in', async (t) => {
  const code = Array.from({ length: 40 }, (_, i) => `print("line ${i}")`).join('\n')
  upstream.script(toolCall({ language: 'python', code }, { chunkMs: 20 }), text('done'))
  const { opts, chunks } = setup()
  const upstreamDone = new Map<LmcChunk, boolean>()
  const emit = opts.emit
  opts.emit = (chunk) => {
    upstreamDone.set(chunk, upstream.requests.at(-1)?.finished ?? true)
    emit(chunk)
  }
  const result = await runTurn(opts)
  const codeMessage = result.messages.find((m) => m.type === 'code')
  const pieces = chunks.filter((c) => c.id === codeMessage?.id && c.content !== undefined)
  t.ok(pieces.length > 1, `code came in ${pieces.length} chunks`)
  t.equal(streamed(chunks, codeMessage?.id ?? ''), code)
  const end = chunks.find((c) => c.id === codeMessage?.id && c.end)
  t.equal(upstreamDone.get(pieces[0]!), false, 'the first code piece came while the upstream was still sending')
  t.ok(end, 'the code message was closed')
})

t.test('arguments with the language after the code, and language aliases', async (t) => {
  upstream.script(toolCall({ arguments: '{"code": "echo hi", "language": "bash"}' }), text('done'))
  const { opts, runs, persisted } = setup()
  await runTurn(opts)
  t.same(runs, [{ language: 'shell', code: 'echo hi' }])
  t.equal(persisted[0].format, 'shell')
})

t.test('several tool calls in one answer run in order, each followed by its output', async (t) => {
  upstream.script(
    toolCall([
      { language: 'python', code: 'print(1)' },
      { language: 'shell', code: 'echo 2' },
    ]),
    text('both ran'),
  )
  const { opts, runs } = setup()
  const result = await runTurn(opts)
  t.same(runs, [
    { language: 'python', code: 'print(1)' },
    { language: 'shell', code: 'echo 2' },
  ])
  t.same(kinds(result.messages), [
    'assistant/code/python',
    'computer/console/output',
    'assistant/code/shell',
    'computer/console/output',
    'assistant/message/text',
  ])
  const sent = upstream.requests[1].body.messages
  t.same(
    sent.map((m: { role: string }) => m.role),
    ['system', 'user', 'assistant', 'tool', 'assistant', 'tool'],
  )
  t.equal(sent[2].tool_calls[0].id, sent[3].tool_call_id)
  t.equal(sent[4].tool_calls[0].id, sent[5].tool_call_id)
})

t.test('bad tool calls are explained to the model instead of run', async (t) => {
  upstream.script(
    toolCall([{ language: 'ruby', code: 'puts 1' }, { arguments: '{"language": "python", "code": "print(' }]),
    text('sorry'),
  )
  const { opts, runs } = setup()
  const result = await runTurn(opts)
  t.same(runs, [])
  const errors = result.messages.filter((m) => m.type === 'console')
  t.equal(errors.length, 2)
  t.match(errors[0].content, /"ruby" is not available/)
  t.match(errors[1].content, /not valid JSON/)
  t.ok(errors.every((m) => m.stream === 'stderr'))
})

t.test('usage is summed over every upstream call', async (t) => {
  upstream.script(
    toolCall({ language: 'python', code: 'print(42)' }, { usage: { prompt_tokens: 10, completion_tokens: 5, total_tokens: 15 } }),
    text('42', { usage: { prompt_tokens: 20, completion_tokens: 7, total_tokens: 27 } }),
  )
  const { opts } = setup()
  const result = await runTurn(opts)
  t.same(result.usage, { prompt_tokens: 30, completion_tokens: 12, total_tokens: 42 })
})

t.test('the iteration limit ends the turn with a message saying so', async (t) => {
  upstream.script(toolCall({ language: 'python', code: 'print(1)' }), toolCall({ language: 'python', code: 'print(2)' }), text('never'))
  const { opts, runs } = setup({ maxIterations: 2 })
  const result = await runTurn(opts)
  t.equal(runs.length, 2)
  t.equal(upstream.requests.length, 2)
  t.equal(result.stopped, false)
  t.match(result.final.content, /iteration limit/)
  t.equal(result.messages.at(-1)?.id, result.final.id)
})

t.test('without tools, fenced blocks in the answer are run', async (t) => {
  upstream.script(
    text('Sure:\n\n```json\n{"a": 1}\n```\n\n```python\nx = 6 * 7\nprint(x)\n```\nThis prints 43, I guess.'),
    text('It is 42.'),
  )
  const { opts, runs, chunks } = setup({ tools: false })
  const result = await runTurn(opts)

  t.same(runs, [{ language: 'python', code: 'x = 6 * 7\nprint(x)' }])
  t.same(kinds(result.messages), ['assistant/message/text', 'assistant/code/python', 'computer/console/output', 'assistant/message/text'])
  t.equal(result.messages[0].content, 'Sure:\n\n```json\n{"a": 1}\n```\n\n')
  t.notOk(
    chunks.some((c) => typeof c.content === 'string' && c.content.includes('I guess')),
    'the guess after the block is dropped',
  )
  t.notOk(upstream.requests[0].body.tools)
  t.match(upstream.requests[0].body.messages[0].content, /```python/)
  const sent = upstream.requests[1].body.messages
  t.equal(sent[2].role, 'assistant')
  t.equal(sent[2].content, 'Sure:\n\n```json\n{"a": 1}\n```\n\n```python\nx = 6 * 7\nprint(x)\n```')
  t.same(sent[3], { role: 'user', content: 'Code output:\n```output\n42\n\n```' })
})

t.test('auto_run false: the turn suspends at the confirmation, and an approving resume runs the code', async (t) => {
  upstream.script(toolCall({ language: 'python', code: 'print(42)' }), text('42'))
  const { opts, runs, chunks } = setup({ autoRun: false })
  const first = await runTurn(opts)
  t.same(runs, [], 'nothing ran yet')
  t.equal(upstream.requests.length, 1)
  t.same(kinds(first.messages), ['assistant/code/python', 'computer/confirmation/execution'])
  t.same(first.suspended, {
    iterations: 1,
    confirmation: { messageId: first.messages[0].id, language: 'python', code: 'print(42)' },
    calls: [],
    toolCalls: [],
    trailing: '',
  })
  t.same(first.messages[1].content, { type: 'code', format: 'python', content: 'print(42)' })
  t.ok(chunks.some((c) => c.type === 'confirmation' && c.end), 'the confirmation is emitted')

  // The suspension is plain data: it goes through JSON (the store) and back.
  const suspension = JSON.parse(JSON.stringify(first.suspended))
  const { opts: again, runs: ran } = setup({ autoRun: false, history: [user('What is 6 * 7?'), ...first.messages], resume: { suspension, approve: true } })
  const second = await runTurn(again)
  t.same(ran, [{ language: 'python', code: 'print(42)' }])
  t.equal(second.suspended, undefined)
  t.same(kinds(second.messages), ['computer/console/output', 'assistant/message/text'])
  const sent = upstream.requests[1].body.messages
  t.same(
    sent.map((m: { role: string }) => m.role),
    ['system', 'user', 'assistant', 'tool'],
    'confirmation messages are not sent upstream',
  )
  t.equal(sent[3].content, '42\n')
})

t.test('auto_run false: a declined run is fed back to the model', async (t) => {
  upstream.script(toolCall({ language: 'shell', code: 'rm -rf /tmp/x' }), text('Okay, I will not.'))
  const { opts } = setup({ autoRun: false })
  const first = await runTurn(opts)
  const { opts: again, runs } = setup({ autoRun: false, history: [user('What is 6 * 7?'), ...first.messages], resume: { suspension: first.suspended!, approve: false } })
  const result = await runTurn(again)
  t.same(runs, [])
  t.same(kinds([...first.messages, ...result.messages]), ['assistant/code/shell', 'computer/confirmation/execution', 'computer/console/output', 'assistant/message/text'])
  t.match(result.messages[0].content, /declined/)
  const tool = upstream.requests[1].body.messages.find((m: { role: string }) => m.role === 'tool')
  t.match(tool.content, /declined/)
})

t.test('auto_run false with several calls in one reply: each is asked in turn, in order, and the client calls come last', async (t) => {
  upstream.script(
    toolCall([
      { language: 'python', code: 'print(1)' },
      { name: 'lookup', arguments: '{"q":"x"}' },
      { language: 'python', code: 'print(2)' },
    ]),
    text('done'),
  )
  const clientTools = { tools: [{ type: 'function' as const, function: { name: 'lookup', parameters: { type: 'object' } } }] }
  let history = [user('go')]
  const { opts } = setup({ autoRun: false, clientTools, history })
  const first = await runTurn(opts)
  t.match(first.suspended, { confirmation: { code: 'print(1)' }, calls: [{ name: 'execute' }], toolCalls: [{ name: 'lookup', arguments: '{"q":"x"}' }] })
  t.same(kinds(first.messages), ['assistant/code/python', 'computer/confirmation/execution'], 'the second code is not shown before the first ran')
  history = [...history, ...first.messages]
  const { opts: second, runs } = setup({ autoRun: false, clientTools, history, resume: { suspension: first.suspended!, approve: true } })
  const two = await runTurn(second)
  t.same(runs.map((r) => r.code), ['print(1)'])
  t.match(two.suspended, { confirmation: { code: 'print(2)' }, calls: [], toolCalls: [{ name: 'lookup' }] })
  t.same(kinds(two.messages), ['computer/console/output', 'assistant/code/python', 'computer/confirmation/execution'])
  history = [...history, ...two.messages]
  const { opts: third, runs: ran } = setup({ autoRun: false, clientTools, history, resume: { suspension: two.suspended!, approve: true } })
  const three = await runTurn(third)
  t.same(ran.map((r) => r.code), ['print(2)'])
  t.same(kinds(three.messages), ['computer/console/output', 'assistant/tool_call/'])
  t.match(three.suspended, { confirmation: undefined, toolCalls: [{ name: 'lookup', arguments: '{"q":"x"}' }] })
  t.equal(upstream.requests.length, 1, 'the model was not asked again while the calls of its reply were pending')
})

t.test('kernel output: streams, images, results, tracebacks and notices', async (t) => {
  upstream.script(toolCall({ language: 'python', code: 'plot()' }), text('see above'))
  const execute: Executor = async (_language, _code, onOutput) => {
    onOutput({ type: 'stream', stream: 'stdout', text: 'step 1\n' })
    onOutput({ type: 'stream', stream: 'stdout', text: 'step 2\n' })
    onOutput({ type: 'stream', stream: 'stderr', text: 'warning: slow\n' })
    onOutput({ type: 'image', format: 'base64.png', data: 'iVBORw0KGgo=' })
    onOutput({ type: 'result', text: '<Figure>' })
    return ok({ exitCode: 1, error: { name: 'ValueError', value: 'bad', traceback: 'Traceback (most recent call last):\nValueError: bad' } })
  }
  const { opts } = setup({ execute })
  const result = await runTurn(opts)
  const outputs = result.messages.slice(1, -1)
  t.same(
    outputs.map((m) => [m.type, m.format, m.stream ?? null, m.content]),
    [
      ['console', 'output', 'stdout', 'step 1\nstep 2\n'],
      ['console', 'output', 'stderr', 'warning: slow\n'],
      ['image', 'base64.png', null, 'iVBORw0KGgo='],
      ['console', 'output', 'stdout', '<Figure>'],
      ['console', 'output', 'stderr', 'Traceback (most recent call last):\nValueError: bad'],
    ],
  )
  const tool = upstream.requests[1].body.messages.find((m: { role: string }) => m.role === 'tool')
  t.equal(tool.content, 'step 1\nstep 2\nwarning: slow\n[image output]\n<Figure>\nTraceback (most recent call last):\nValueError: bad')
})

t.test('kernel output streams as written, as through /execute: dots without a newline are three chunks', async (t) => {
  upstream.script(toolCall({ language: 'python', code: 'dots()' }), text('done'))
  const chunksBefore: number[] = []
  const { opts, chunks } = setup()
  opts.execute = async (_language, _code, onOutput) => {
    for (let i = 0; i < 3; i++) {
      onOutput({ type: 'stream', stream: 'stdout', text: '.' })
      // The writer's chain runs on microtasks: one turn lets it hand the piece on.
      await new Promise((r) => setImmediate(r))
      chunksBefore.push(chunks.filter((c) => c.type === 'console' && c.content === '.').length)
    }
    return ok()
  }
  const result = await runTurn(opts)
  t.same(chunksBefore, [1, 2, 3], 'each dot went out before the next was written')
  const console = result.messages.find((m) => m.type === 'console')!
  t.equal(console.content, '...')
})

t.test('/execute and the agent write the same messages for the same output', async (t) => {
  const outputs: KernelOutput[] = [
    { type: 'stream', stream: 'stdout', text: 'a' },
    { type: 'stream', stream: 'stderr', text: 'b\n' },
    { type: 'stream', stream: 'stdout', text: 'c' },
    { type: 'result', text: '42' },
  ]
  const end = ok({ exitCode: 130, interrupted: true, error: { name: 'KeyboardInterrupt', value: 'Interrupted', traceback: '' } })
  upstream.script(toolCall({ language: 'python', code: 'x()' }), text('ok'))
  const { opts } = setup({
    execute: async (_language, _code, onOutput) => {
      for (const output of outputs) onOutput(output)
      return end
    },
  })
  const agent = (await runTurn(opts)).messages.filter((m) => m.role === 'computer')
  const collector = new MessageCollector()
  const writer = new OutputWriter(collector)
  for (const output of outputs) writer.push(output)
  await writer.finish(end)
  const shape = (messages: LmcMessage[]) => messages.map((m) => [m.type, m.stream ?? null, m.content])
  t.same(shape(agent), shape(collector.messages))
  t.same(shape(collector.messages).slice(-2), [
    ['console', 'stderr', 'KeyboardInterrupt: Interrupted'],
    ['console', 'stderr', 'Execution was interrupted.'],
  ], 'the same end-of-run notes')
})

t.test('a timed-out run says the state was lost', async (t) => {
  upstream.script(toolCall({ language: 'python', code: 'while True: pass' }), text('it hung'))
  const execute: Executor = async () => ok({ exitCode: null, timedOut: true, stateLost: true, durationMs: 30_000 })
  const { opts } = setup({ execute })
  const result = await runTurn(opts)
  t.match(result.messages[1].content, /timed out after 30 s.*variables and imports are lost/)
})

t.test('abort while the answer streams: stopped, partial kept, upstream socket closed', async (t) => {
  upstream.script(text('word '.repeat(60), { chunkMs: 150 }))
  const controller = new AbortController()
  const { opts, persisted, chunks } = setup({ signal: controller.signal })
  const emit = opts.emit
  opts.emit = (chunk) => {
    emit(chunk)
    if (chunk.content !== undefined && !controller.signal.aborted) controller.abort()
  }
  const result = await runTurn(opts)
  t.equal(result.stopped, true)
  t.equal(upstream.requests.at(-1)?.finished, false, 'returns without waiting for the stream')
  t.equal(persisted.length, 1)
  t.equal(persisted[0].type, 'message')
  t.ok(String(persisted[0].content).length > 0)
  t.equal(result.final.id, persisted[0].id)
  t.ok(chunks.at(-1)?.end, 'the open message is closed')
  await upstream.settled()
  t.equal(upstream.requests[0].aborted, true)
})

t.test('abort while code runs: the executor gets the signal and the turn stops', async (t) => {
  upstream.script(toolCall({ language: 'python', code: 'import time; time.sleep(60)' }), text('never'))
  const controller = new AbortController()
  const execute: Executor = (_language, _code, onOutput, signal) =>
    new Promise((resolve) => {
      onOutput({ type: 'stream', stream: 'stdout', text: 'sleeping\n' })
      signal.addEventListener('abort', () => resolve(ok({ exitCode: null, interrupted: true })))
      setTimeout(() => controller.abort(), 20)
    })
  const { opts } = setup({ signal: controller.signal, execute })
  const result = await runTurn(opts)
  t.equal(result.stopped, true)
  t.equal(upstream.requests.length, 1)
  t.same(kinds(result.messages), ['assistant/code/python', 'computer/console/output', 'computer/console/output'])
  t.match(result.messages[2].content, /interrupted/)
  t.equal(result.final.content, '')
})

t.test('abort while the approved code of a resumed turn runs', async (t) => {
  upstream.script(toolCall({ language: 'python', code: 'print(1)' }))
  const { opts } = setup({ autoRun: false })
  const first = await runTurn(opts)
  const controller = new AbortController()
  const { opts: again } = setup({
    signal: controller.signal,
    resume: { suspension: first.suspended!, approve: true },
    execute: async (_language, _code, _onOutput, signal) => {
      controller.abort()
      t.ok(signal.aborted)
      return ok({ interrupted: true })
    },
  })
  const result = await runTurn(again)
  t.equal(result.stopped, true)
  t.equal(upstream.requests.length, 1, 'a stopped turn asks nothing more')
})

t.test('upstream errors become ApiError 502 without leaking the key', async (t) => {
  upstream.script(httpError(500, 'The server had an error while processing your request.'))
  const { opts } = setup()
  await t.rejects(runTurn(opts), { statusCode: 502, type: 'upstream_error', code: 'llm_error', message: /500.*server had an error/ })

  upstream.script(httpError(401, `Incorrect API key provided: ${UPSTREAM_KEY}. You can find your API key at https://example.com.`, { type: 'invalid_request_error', code: 'invalid_api_key' }))
  const err = await runTurn(setup().opts).catch((e: unknown) => e)
  t.ok(err instanceof ApiError)
  t.match(err, { statusCode: 502, code: 'llm_auth_failed', retryable: false, message: /401: Incorrect API key provided/ })
  t.notMatch((err as Error).message, /0123456789/)
})

t.test('an unreachable upstream is a 502', async (t) => {
  const { opts } = setup({ client: new OpenAI({ baseURL: 'http://127.0.0.1:9/v1', apiKey: UPSTREAM_KEY, maxRetries: 0 }) })
  await t.rejects(runTurn(opts), { statusCode: 502, code: 'llm_error', message: /Could not reach the model/ })
})

t.test('a slow upstream is a 504', async (t) => {
  const client = new OpenAI({ baseURL: upstream.url, apiKey: UPSTREAM_KEY, maxRetries: 0, timeout: 150 })
  upstream.script(text('late', { firstByteMs: 1_000 }))
  await t.rejects(runTurn(setup({ client }).opts), { statusCode: 504, type: 'upstream_error', code: 'llm_timeout' })
  upstream.script(text('stalls between chunks', { chunkMs: 1_000 }))
  await t.rejects(runTurn(setup({ client }).opts), { statusCode: 504, code: 'llm_timeout' }, 'a stream that stalls')
  await upstream.settled()
})

t.test('a stream that breaks mid-way is a 502 and keeps what was persisted', async (t) => {
  upstream.script(toolCall({ language: 'python', code: 'print(1)' }, { text: 'Running it now.', breakAfterChunks: 6 }))
  const { opts, persisted, chunks } = setup()
  await t.rejects(runTurn(opts), { statusCode: 502, type: 'upstream_error', code: 'llm_error' })
  t.ok(persisted.length >= 1)
  t.equal(persisted[0].content, 'Running it now.')
  const starts = chunks.filter((c) => c.start).map((c) => c.id)
  const ends = chunks.filter((c) => c.end).map((c) => c.id)
  t.same(ends, starts, 'every started message is ended')
})

t.test('redact masks secrets in what the model, the stream and the store see', async (t) => {
  const secret = 'tok_9f8e7d6c5b4a'
  upstream.script(toolCall({ language: 'shell', code: 'echo $API_TOKEN' }, { text: `Using ${secret} now.` }), text(`Done with ${secret}.`))
  const execute: Executor = async (_language, _code, onOutput) => {
    onOutput({ type: 'stream', stream: 'stdout', text: `${secret}\n` })
    return ok()
  }
  const { opts, chunks, persisted } = setup({
    history: [user(`My token is ${secret}, keep it safe.`)],
    execute,
    redact: (s) => s.replaceAll(secret, '[secret]'),
  })
  await runTurn(opts)
  for (const request of upstream.requests) t.notMatch(JSON.stringify(request.body), secret)
  t.notMatch(JSON.stringify(chunks), secret)
  t.notMatch(JSON.stringify(persisted), secret)
  t.match(upstream.requests[1].body.messages[1].content, 'My token is [secret], keep it safe.')
  t.match(persisted[0].content, 'Using [secret] now.')
})

t.test('persist is called once per message, right after it ends, in order', async (t) => {
  upstream.script(toolCall({ language: 'python', code: 'print(42)' }, { text: 'Computing.' }), text('42'))
  const { opts, log, persisted } = setup()
  const result = await runTurn(opts)
  t.same(
    persisted.map((m) => m.id),
    result.messages.map((m) => m.id),
  )
  t.equal(new Set(persisted.map((m) => m.id)).size, persisted.length)
  t.same(
    log,
    result.messages.flatMap((m) => [`start:${m.id}`, `end:${m.id}`, `persist:${m.id}`]),
  )
})

t.test('context: tool calls stay paired when code was declined or interrupted', async (t) => {
  const opts = { languages: ['python' as const], tools: true, maxOutputChars: 2800, capForModel, redact: (s: string) => s }
  const declinedCode = lmc({ role: 'assistant', type: 'code', format: 'python', content: 'rm()' })
  const brokenCode = lmc({ role: 'assistant', type: 'code', format: 'python', content: 'loop()' })
  const quietCode = lmc({ role: 'assistant', type: 'code', format: 'python', content: 'x = 1' })
  const history = [
    user('first'),
    declinedCode,
    lmc({ role: 'computer', type: 'confirmation', format: 'execution', content: { type: 'code', format: 'python', content: 'rm()' } }),
    user('second'),
    brokenCode,
    user('third'),
    quietCode,
    lmc({ role: 'assistant', type: 'message', format: 'text', content: 'Set x.' }),
    lmc({ role: 'computer', type: 'image', format: 'base64.png', content: 'AAAA' }),
  ]
  const messages = buildMessages(history, opts)
  t.same(
    messages.map((m) => m.role),
    ['system', 'user', 'assistant', 'tool', 'user', 'assistant', 'tool', 'user', 'assistant', 'tool', 'assistant', 'user'],
  )
  t.match(messages[3], { tool_call_id: toolCallId(declinedCode.id), content: /did not approve/ })
  t.match(messages[6], { tool_call_id: toolCallId(brokenCode.id), content: /interrupted/ })
  t.match(messages[9], { tool_call_id: toolCallId(quietCode.id), content: 'No output.' })
  t.match(messages[11], { content: /\[image output\]/ })
})

t.test('context: long output is capped for the model', async (t) => {
  const code = lmc({ role: 'assistant', type: 'code', format: 'python', content: 'print("x" * 10000)' })
  const output = lmc({ role: 'computer', type: 'console', format: 'output', content: `HEAD${'x'.repeat(10_000)}TAIL` })
  const messages = buildMessages([user('go'), code, output], {
    languages: ['python'],
    tools: true,
    maxOutputChars: 500,
    capForModel,
    redact: (s) => s,
  })
  const tool = messages.at(-1) as { content: string }
  t.ok(tool.content.length <= 500)
  t.match(tool.content, /^HEAD/)
  t.match(tool.content, /TAIL$/)
  t.match(tool.content, /characters cut/)
})

t.test('capForModel', async (t) => {
  t.equal(capForModel('short', 2800), 'short')
  const capped = capForModel('a'.repeat(1000) + 'b'.repeat(5000), 2800)
  t.ok(capped.length <= 2800)
  t.match(capped, /^a{1000}b*\n\[… \d+ characters cut …\]\nb+$/)
})

t.test('partial JSON strings grow as fragments arrive', async (t) => {
  const reader = new PartialJsonStrings()
  const seen: string[] = []
  const json = JSON.stringify({ n: 1, nested: { code: 'no' }, language: 'python', code: 'print("héllo\\n")\n\tx = "\u00e9\ud83d\ude00"' })
  for (let i = 0; i < json.length; i += 3) {
    reader.feed(json.slice(i, i + 3))
    seen.push(reader.values.get('code') ?? '')
  }
  t.equal(reader.values.get('code'), 'print("héllo\\n")\n\tx = "é😀"')
  t.equal(reader.values.get('language'), 'python')
  t.ok(reader.complete.has('code'))
  t.notOk(reader.values.has('n'))
  t.ok(new Set(seen).size > 5, 'the value grew step by step')
  for (let i = 1; i < seen.length; i++) t.ok(seen[i].startsWith(seen[i - 1]) || seen[i - 1].endsWith('\ud83d'))

  const escaped = new PartialJsonStrings()
  for (const piece of ['{"code": "a\\', 'u00', '41b\\', 'nc"}']) escaped.feed(piece)
  t.equal(escaped.values.get('code'), 'aAb\nc')

  const notObject = new PartialJsonStrings()
  notObject.feed('print(1)')
  t.equal(notObject.objectLike, false)
})

t.test('fence splitter', async (t) => {
  const split = (pieces: string[]) => {
    const splitter = new FenceSplitter((tag) => languageFromTag(tag))
    const events = pieces.flatMap((p) => splitter.feed(p))
    return [...events, ...splitter.finish()]
  }
  const text = 'Run:\n```py\nfor i in range(2):\n\n    print(i)\n```\nafter'
  const join = (events: ReturnType<typeof split>) =>
    events.map((e) => (e.kind === 'text' || e.kind === 'code' ? `${e.kind}:${e.text}` : e.kind === 'codeStart' ? `start:${e.language}` : 'end'))
  const whole = split([text])
  const byChar = split([...text])
  const merge = (events: ReturnType<typeof split>) =>
    join(events).reduce<string[]>((acc, e) => {
      const [kind] = e.split(':')
      const last = acc.at(-1)
      if (last && (kind === 'text' || kind === 'code') && last.startsWith(`${kind}:`)) acc[acc.length - 1] = last + e.slice(kind.length + 1)
      else acc.push(e)
      return acc
    }, [])
  t.same(merge(whole), ['text:Run:\n', 'start:python', 'code:for i in range(2):\n\n    print(i)', 'end', 'text:after'])
  t.same(merge(byChar), merge(whole))
  t.same(merge(split(['```bash\necho 1'])), ['start:shell', 'code:echo 1', 'end'], 'an unclosed block still counts')
  t.same(merge(split(['see ```python inline```'])), ['text:see ```python inline```'])
})

t.test('the fake upstream also answers without streaming and lists models', async (t) => {
  const client = new OpenAI({ baseURL: upstream.url, apiKey: UPSTREAM_KEY, maxRetries: 0 })
  upstream.script(toolCall({ language: 'python', code: 'print(1)' }, { text: 'Running.' }))
  const withTool = await client.chat.completions.create({ model: 'm', messages: [{ role: 'user', content: 'hi' }] })
  t.equal(withTool.object, 'chat.completion')
  t.equal(withTool.choices[0].finish_reason, 'tool_calls')
  t.match(withTool.choices[0].message, {
    content: 'Running.',
    tool_calls: [{ type: 'function', function: { name: 'execute', arguments: '{"language":"python","code":"print(1)"}' } }],
  })
  const plain = await client.chat.completions.create({ model: 'm', messages: [{ role: 'user', content: 'hi' }] })
  t.equal(plain.choices[0].message.content, 'ok', 'the default answer when nothing is scripted')
  t.ok(plain.usage && plain.usage.total_tokens > 0)
  const models = await client.models.list()
  t.ok(models.data.some((m) => m.id === 'fake-model'))
  t.equal(upstream.requests.at(-1)?.path, '/v1/models')
})

t.test("client tools: offered beside execute, a call suspends the turn, and the resumed turn sends real tool_calls and tool messages", async (t) => {
  const weather = { type: 'function' as const, function: { name: 'get_weather', description: 'Weather for a city', parameters: { type: 'object', properties: { city: { type: 'string' } } } } }
  const clientTools = { tools: [weather], toolChoice: 'auto' as const, parallelToolCalls: false }
  upstream.script(
    toolCall([{ language: 'python', code: 'print(6 * 7)' }, { name: 'get_weather', arguments: '{"city":"Paris"}' }], { text: 'Checking.' }),
    text('It is 42 and sunny in Paris.'),
  )
  const { opts, runs, chunks } = setup({ clientTools })
  const first = await runTurn(opts)
  const asked = upstream.requests[0].body
  t.same(asked.tools.map((tool: { function: { name: string } }) => tool.function.name), ['execute', 'get_weather'])
  t.same(asked.tools[1], weather, "the client's tool goes upstream as it was given")
  t.equal(asked.tool_choice, 'auto')
  t.equal(asked.parallel_tool_calls, false)
  t.same(runs, [{ language: 'python', code: 'print(6 * 7)' }], "the server's own call ran first")
  t.same(kinds(first.messages), ['assistant/message/text', 'assistant/code/python', 'computer/console/output', 'assistant/tool_call/'])
  t.equal(first.finishReason, 'tool_calls')
  const call = first.suspended!.toolCalls[0]!
  t.match(call, { id: /^call_/, name: 'get_weather', arguments: '{"city":"Paris"}' })
  t.same(first.messages[3].content, call)
  t.ok(chunks.some((c) => c.type === 'tool_call' && c.end), 'the call is emitted as an LMC message')

  const result = lmc({ role: 'computer', type: 'tool_result', content: { tool_call_id: call.id, content: 'sunny, 24 C' } })
  const { opts: again } = setup({ clientTools, history: [user('What is 6 * 7?'), ...first.messages, result], resume: { suspension: first.suspended! } })
  const second = await runTurn(again)
  t.equal(second.suspended, undefined)
  t.equal(second.final.content, 'It is 42 and sunny in Paris.')
  const sent = upstream.requests[1].body.messages
  t.same(
    sent.slice(1).map((m: { role: string; tool_calls?: { function: { name: string } }[] }) => [m.role, m.tool_calls?.map((c) => c.function.name) ?? []]),
    [
      ['user', []],
      ['assistant', ['execute']],
      ['tool', []],
      ['assistant', ['get_weather']],
      ['tool', []],
    ],
  )
  t.same(sent[4], { role: 'assistant', content: null, tool_calls: [{ id: call.id, type: 'function', function: { name: 'get_weather', arguments: '{"city":"Paris"}' } }] })
  t.same(sent[5], { role: 'tool', tool_call_id: call.id, content: 'sunny, 24 C' })
})

t.test('client tools: a call left unanswered is told so; a result with no call is shown as text', async (t) => {
  const history = [
    user('one'),
    lmc({ role: 'assistant', type: 'tool_call', content: { id: 'call_a', name: 'f', arguments: '{}' } }),
    user('two'),
    lmc({ role: 'computer', type: 'tool_result', content: { tool_call_id: 'call_zzz', content: 'stray' } }),
  ]
  const sent = buildMessages(history, { languages: ['python'], tools: true, maxOutputChars: 1000, capForModel, redact: (s) => s })
  t.same(sent.slice(1), [
    { role: 'user', content: 'one' },
    { role: 'assistant', content: null, tool_calls: [{ id: 'call_a', type: 'function', function: { name: 'f', arguments: '{}' } }] },
    { role: 'tool', tool_call_id: 'call_a', content: 'The client returned no result for this tool call.' },
    { role: 'user', content: 'two' },
    { role: 'user', content: 'Result of tool call call_zzz:\nstray' },
  ])
})

t.test('client tools with fenced code (no execute tool): the client tools are still offered and their calls suspend', async (t) => {
  upstream.script(toolCall({ name: 'lookup', arguments: '{"q":"a"}' }))
  const { opts } = setup({ tools: false, clientTools: { tools: [{ type: 'function', function: { name: 'lookup' } }] } })
  const result = await runTurn(opts)
  t.same(upstream.requests[0].body.tools.map((tool: { function: { name: string } }) => tool.function.name), ['lookup'])
  t.match(result.suspended, { toolCalls: [{ name: 'lookup', arguments: '{"q":"a"}' }] })
})
