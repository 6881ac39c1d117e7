import OpenAI from 'openai'
import t from 'tap'
import { startFakeUpstream, text, toolCall } from '../fakes/upstream.js'
import { ADMIN_KEY, build, tempDir } from '../helpers/build.js'
import { listeningServer } from '../helpers/openai-server.js'
import type { Tap } from '../helpers/build.js'

/** The server on loopback and the real OpenAI SDK pointed at it, unmodified. */
async function setup(t: Tap, env: Record<string, string> = {}) {
  const server = await listeningServer(t, env)
  return { ...server, client: new OpenAI({ baseURL: server.baseURL, apiKey: server.apiKey, maxRetries: 0 }) }
}

const weather: OpenAI.ChatCompletionFunctionTool = {
  type: 'function',
  function: {
    name: 'get_weather',
    description: 'The weather in a city',
    parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] },
  },
}

const failure = (promise: Promise<unknown>) =>
  promise.then(
    () => {
      throw new Error('expected a failure')
    },
    (err: unknown) => err as InstanceType<typeof OpenAI.APIError>,
  )

const chatCalls = (upstream: Awaited<ReturnType<typeof startFakeUpstream>>) => upstream.requests.filter((r) => r.path.endsWith('/chat/completions'))

t.test('a client tool round trip: tool_calls with finish_reason tool_calls, then the tool result resumes the turn; the upstream gets real tool messages', async (t) => {
  const { client, upstream, app } = await setup(t)
  upstream.script(toolCall({ name: 'get_weather', arguments: '{"city":"Paris"}' }), text('It is sunny in Paris.'))
  const messages: OpenAI.ChatCompletionMessageParam[] = [{ role: 'user', content: 'Weather in Paris?' }]
  const first = await client.chat.completions.create({ model: 'gpt-4o-mini', messages, tools: [weather], tool_choice: 'auto', parallel_tool_calls: false })
  const choice = first.choices[0]!
  t.equal(choice.finish_reason, 'tool_calls')
  t.equal(choice.message.content, null, 'no text: content is null, as OpenAI sends it')
  t.equal(choice.message.tool_calls?.length, 1)
  const call = choice.message.tool_calls![0] as OpenAI.ChatCompletionMessageFunctionToolCall
  t.match(call, { id: /^call_/, type: 'function', function: { name: 'get_weather', arguments: '{"city":"Paris"}' } })
  const sessionId = (first as unknown as { session_id: string }).session_id
  t.match((first as unknown as { pending: unknown }).pending, { type: 'tool_calls', tool_calls: [{ id: call.id }] })
  t.same(upstream.requests[0]!.body.tools, [
    upstream.requests[0]!.body.tools[0],
    weather,
  ])
  t.equal(upstream.requests[0]!.body.tools[0].function.name, 'execute', "the server's code tool is offered beside the client's")
  t.equal(upstream.requests[0]!.body.tool_choice, 'auto')
  t.equal(upstream.requests[0]!.body.parallel_tool_calls, false)
  t.equal(app.runs.size, 0, 'the suspended turn holds no run')

  // A stateless client: the whole history again, without a session id.
  messages.push(choice.message, { role: 'tool', tool_call_id: call.id, content: '{"sky":"sunny","celsius":24}' })
  const second = await client.chat.completions.create({ model: 'gpt-4o-mini', messages, tools: [weather] })
  t.equal((second as unknown as { session_id: string }).session_id, sessionId, 'the tool call id binds the request to its session')
  t.equal(second.choices[0]!.finish_reason, 'stop')
  t.equal(second.choices[0]!.message.content, 'It is sunny in Paris.')
  const sent = upstream.requests[1]!.body.messages
  t.same(sent.slice(1), [
    { role: 'user', content: 'Weather in Paris?' },
    { role: 'assistant', content: null, tool_calls: [{ id: call.id, type: 'function', function: { name: 'get_weather', arguments: '{"city":"Paris"}' } }] },
    { role: 'tool', tool_call_id: call.id, content: '{"sky":"sunny","celsius":24}' },
  ])
  t.same(upstream.requests[1]!.body.tools.map((tool: { function: { name: string } }) => tool.function.name), ['execute', 'get_weather'])
  const stored = (await app.inject({ url: `/v1/sessions/${sessionId}/messages?limit=100`, headers: { authorization: `Bearer ${ADMIN_KEY}` } })).json()
  t.same(
    stored.messages.map((m: { role: string; type: string }) => `${m.role}/${m.type}`),
    ['user/message', 'assistant/tool_call', 'computer/tool_result', 'assistant/message'],
    'each message stored once',
  )
  const again = await failure(client.chat.completions.create({ model: 'gpt-4o-mini', messages, tools: [weather] }, { headers: { 'X-Session-Id': sessionId } }))
  t.equal(again.status, 400, 'the same results twice: that call no longer waits')
  t.match(again.error, { code: 'unknown_tool_call', param: /^messages\[\d+\]\.tool_call_id$/ })
})

t.test('streamed: tool-call deltas as OpenAI streams them (index, id, type, name, then argument fragments)', async (t) => {
  const { client, upstream } = await setup(t)
  const long = JSON.stringify({ city: 'Paris', note: 'x'.repeat(100), emoji: '🌤️🌤️🌤️' })
  upstream.script(toolCall([{ name: 'get_weather', arguments: long }, { name: 'get_weather', arguments: '{"city":"Rome"}' }]))
  const stream = await client.chat.completions.create({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'Paris and Rome?' }], tools: [weather], stream: true })
  const chunks: OpenAI.ChatCompletionChunk[] = []
  for await (const chunk of stream) chunks.push(chunk)
  const deltas = chunks.flatMap((c) => c.choices[0]?.delta.tool_calls ?? [])
  const heads = deltas.filter((d) => d.id)
  t.same(
    heads.map((d) => [d.index, d.type, d.function?.name, d.function?.arguments]),
    [
      [0, 'function', 'get_weather', ''],
      [1, 'function', 'get_weather', ''],
    ],
  )
  const fragments = deltas.filter((d) => !d.id && d.index === 0).map((d) => d.function!.arguments!)
  t.ok(fragments.length > 2, 'the arguments arrive in several fragments')
  t.equal(fragments.join(''), long)
  t.equal(chunks.findLast((c) => c.choices[0]?.finish_reason)?.choices[0]!.finish_reason, 'tool_calls')

  upstream.script(toolCall({ name: 'get_weather', arguments: '{"city":"Oslo"}' }))
  const runner = client.chat.completions.stream({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'Oslo?' }], tools: [weather] })
  const final = await runner.finalChatCompletion()
  t.match(final.choices[0]!.message.tool_calls, [{ type: 'function', function: { name: 'get_weather', arguments: '{"city":"Oslo"}' } }], "the SDK's stream helper assembles the call")
  t.equal(final.choices[0]!.finish_reason, 'tool_calls')
})

t.test('the server runs its own code first when the model calls execute and a client tool in one reply', async (t) => {
  const { client, upstream, app } = await setup(t)
  upstream.script(
    toolCall([{ language: 'python', code: "open('ran.txt', 'a').write('x'); print(6 * 7)" }, { name: 'get_weather', arguments: '{"city":"Paris"}' }], { text: 'Let me check.' }),
    text('42, and sunny.'),
  )
  const first = await client.chat.completions.create({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'Both please' }], tools: [weather] })
  const message = first.choices[0]!.message
  t.equal(first.choices[0]!.finish_reason, 'tool_calls')
  t.match(message.content, /Let me check\.\n\n```python\n.*print\(6 \* 7\)\n```\n\n```output\n42\n```/s, 'the code ran and its transcript is the content')
  t.same(message.tool_calls!.map((c) => (c as OpenAI.ChatCompletionMessageFunctionToolCall).function.name), ['get_weather'], "only the client's call is returned")
  const sessionId = (first as unknown as { session_id: string }).session_id
  const call = message.tool_calls![0]!
  const second = await client.chat.completions.create(
    { model: 'gpt-4o-mini', messages: [{ role: 'tool', tool_call_id: call.id, content: 'sunny' }], tools: [weather] },
    { headers: { 'X-Session-Id': sessionId } },
  )
  t.equal(second.choices[0]!.message.content, '42, and sunny.')
  const sent = upstream.requests[1]!.body.messages
  t.match(sent.slice(2), [
    { role: 'assistant', content: 'Let me check.', tool_calls: [{ function: { name: 'execute' } }] },
    { role: 'tool', content: '42\n' },
    { role: 'assistant', content: null, tool_calls: [{ id: call.id, function: { name: 'get_weather' } }] },
    { role: 'tool', tool_call_id: call.id, content: 'sunny' },
  ])
  const ran = await app.inject({ url: `/v1/sessions/${sessionId}/files/content?path=ran.txt`, headers: { authorization: `Bearer ${ADMIN_KEY}` } })
  t.equal(ran.body, 'x', 'the code ran once')
})

t.test('refused before anything runs: a tool named like the server tool, bad tools, unknown tool_choice, functions, missing or unknown results', async (t) => {
  const { client, upstream, app } = await setup(t)
  const ask = (body: Partial<OpenAI.ChatCompletionCreateParamsNonStreaming> & Record<string, unknown>, headers: Record<string, string> = {}) =>
    failure(client.chat.completions.create({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'hi' }], ...body } as OpenAI.ChatCompletionCreateParamsNonStreaming, { headers }))
  const cases: [string, Record<string, unknown>, Record<string, unknown>][] = [
    ['execute clash', { tools: [weather, { type: 'function', function: { name: 'execute', parameters: { type: 'object' } } }] }, { code: 'tool_name_reserved', param: 'tools[1].function.name' }],
    ['duplicate', { tools: [weather, weather] }, { param: 'tools[1].function.name' }],
    ['bad name', { tools: [{ type: 'function', function: { name: 'has space' } }] }, { param: 'tools[0].function.name' }],
    ['custom tool', { tools: [{ type: 'custom', custom: { name: 'x' } }] }, { code: 'unsupported_parameter', param: 'tools[0].type' }],
    ['parameters not an object', { tools: [{ type: 'function', function: { name: 'f', parameters: [] } }] }, { param: 'tools[0].function.parameters' }],
    ['tool_choice unknown', { tools: [weather], tool_choice: { type: 'function', function: { name: 'nope' } } }, { param: 'tool_choice.function.name' }],
    ['tool_choice shape', { tools: [weather], tool_choice: 'sometimes' }, { code: 'unsupported_parameter', param: 'tool_choice' }],
    ['legacy functions', { functions: [{ name: 'f' }] }, { code: 'unsupported_parameter', param: 'functions' }],
    ['tool message without id', { messages: [{ role: 'user', content: 'x' }, { role: 'tool', content: 'r' }] }, { param: 'messages[1].tool_call_id' }],
  ]
  for (const [name, body, error] of cases) {
    const err = await ask(body)
    t.equal(err.status, 400, name)
    t.match(err.error, error, name)
  }
  t.equal(chatCalls(upstream).length, 0, 'nothing reached the upstream')
  t.equal((await app.inject({ url: '/v1/sessions', headers: { authorization: `Bearer ${ADMIN_KEY}` } })).json().sessions.length, 0, 'no session was left behind')

  upstream.script(toolCall([{ name: 'get_weather', arguments: '{"city":"A"}' }, { name: 'get_weather', arguments: '{"city":"B"}' }]))
  const first = await client.chat.completions.create({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'A and B' }], tools: [weather] })
  const sessionId = (first as unknown as { session_id: string }).session_id
  const [a] = first.choices[0]!.message.tool_calls!
  const missing = await ask({ messages: [{ role: 'tool', tool_call_id: a!.id, content: 'a' }], tools: [weather] }, { 'X-Session-Id': sessionId })
  t.equal(missing.status, 400)
  t.match(missing.error, { code: 'tool_results_missing', param: 'messages' })
  const unknown = await ask({ messages: [{ role: 'tool', tool_call_id: 'call_forged', content: 'a' }], tools: [weather] }, { 'X-Session-Id': sessionId })
  t.match(unknown.error, { code: 'unknown_tool_call', param: 'messages[0].tool_call_id' })
  t.equal(chatCalls(upstream).length, 1, 'refused resumes asked nothing upstream')

  // Moving on without answering ends the waiting turn; the model is told the calls got no result.
  upstream.script(text('Never mind then.'))
  const moved = await client.chat.completions.create({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'forget it' }] }, { headers: { 'X-Session-Id': sessionId } })
  t.equal(moved.choices[0]!.message.content, 'Never mind then.')
  t.match(upstream.requests[1]!.body.messages.slice(-4), [
    { role: 'assistant', tool_calls: [{}, {}] },
    { role: 'tool', content: /no result/ },
    { role: 'tool', content: /no result/ },
    { role: 'user', content: 'forget it' },
  ])
})

t.test('tools with structured output: response_format and a client tool in one conversation', async (t) => {
  const { client, upstream } = await setup(t)
  upstream.script(toolCall({ name: 'get_weather', arguments: '{"city":"Paris"}' }, { text: 'Looking it up.' }), text('{"sky":"sunny"}'))
  const format = { type: 'json_object' as const }
  const first = await client.chat.completions.create({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'JSON weather' }], tools: [weather], response_format: format })
  t.equal(first.choices[0]!.message.content, null, 'no final answer yet: content is null rather than a transcript')
  const call = first.choices[0]!.message.tool_calls![0]!
  const second = await client.chat.completions.create({
    model: 'gpt-4o-mini',
    messages: [{ role: 'user', content: 'JSON weather' }, first.choices[0]!.message, { role: 'tool', tool_call_id: call.id, content: 'sunny' }],
    tools: [weather],
    response_format: format,
  })
  t.same(JSON.parse(second.choices[0]!.message.content!), { sky: 'sunny' })
})

t.test('a turn waiting for tool results survives a restart: a new app on the same data directory resumes it', async (t) => {
  const upstream = await startFakeUpstream()
  t.teardown(() => upstream.close())
  const env = { LLM_BASE_URL: upstream.url, SANDBOX: 'none', DATA_DIR: tempDir(t) }
  const headers = { authorization: `Bearer ${ADMIN_KEY}` }
  const before = await build(t, env)
  upstream.script(toolCall({ name: 'get_weather', arguments: '{"city":"Paris"}' }), text('Sunny.'))
  const first = await before.inject({ method: 'POST', url: '/v1/chat/completions', headers, payload: { messages: [{ role: 'user', content: 'Paris?' }], tools: [weather] } })
  const { session_id: sessionId, choices } = first.json()
  const call = choices[0].message.tool_calls[0]
  await before.close()

  const after = await build(t, env)
  const resumed = await after.inject({
    method: 'POST',
    url: '/v1/chat/completions',
    headers: { ...headers, 'x-session-id': sessionId },
    payload: { messages: [{ role: 'tool', tool_call_id: call.id, content: 'sunny' }], tools: [weather] },
  })
  t.equal(resumed.statusCode, 200)
  t.equal(resumed.json().choices[0].message.content, 'Sunny.')
  t.match(upstream.requests[1]!.body.messages.slice(-2), [{ role: 'assistant', tool_calls: [{ id: call.id }] }, { role: 'tool', tool_call_id: call.id, content: 'sunny' }])
})
