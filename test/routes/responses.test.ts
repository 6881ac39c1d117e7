import { join } from 'node:path'
import OpenAI from 'openai'
import t from 'tap'
import { ADMIN_TENANT } from '../../services/auth.js'
import { createSqliteStore } from '../../services/store/index.js'
import { httpError, text, toolCall } from '../fakes/upstream.js'
import { ADMIN_KEY, auth, tempDir } from '../helpers/build.js'
import { listeningServer } from '../helpers/openai-server.js'
import type { Tap } from '../helpers/build.js'
import { parseSse } from '../helpers/sse.js'

/** The server on loopback and the real OpenAI SDK pointed at it, unmodified. */
async function setup(t: Tap, env: Record<string, string> = {}) {
  const server = await listeningServer(t, env)
  return { ...server, client: new OpenAI({ baseURL: server.baseURL, apiKey: server.apiKey, maxRetries: 0 }) }
}

const CODE_INTERPRETER = { type: 'code_interpreter', container: { type: 'auto' } } as const

/** `ai` pins @ai-sdk/provider-utils 4.0.65 and @ai-sdk/openai 4.0.66: the same tool, typed by two copies. */
type AiTool = NonNullable<Parameters<typeof import('ai').generateText>[0]['tools']>[string]

/** The error a promise rejects with (tap's rejects() compares fields, not classes). */
const failure = (p: Promise<unknown>) => p.then(() => undefined, (err: unknown) => err)

t.test('responses.create with the code interpreter: code_interpreter_call with logs, then the message', async (t) => {
  const { client, upstream, app } = await setup(t)
  upstream.script(
    toolCall({ language: 'python', code: 'print(2 ** 100)' }, { usage: { prompt_tokens: 10, completion_tokens: 5, total_tokens: 15 } }),
    text('2**100 is 1267650600228229401496703205376.', { usage: { prompt_tokens: 20, completion_tokens: 7, total_tokens: 27 } }),
  )
  const { data: response, response: raw } = await client.responses
    .create({ model: 'gpt-4o-mini', instructions: 'Be brief.', input: 'What is 2**100?', tools: [CODE_INTERPRETER] })
    .withResponse()
  t.equal(response.object, 'response')
  t.match(response.id, /^resp_[0-9a-f]{48}$/)
  t.equal(response.status, 'completed')
  t.equal(response.model, 'gpt-4o-mini')
  t.equal(response.error, null)
  const sessionId = raw.headers.get('x-session-id')!
  t.match(sessionId, /^[0-9a-f-]{36}$/)
  t.equal(response.output.length, 2)
  const [call, message] = response.output
  t.match(call, { type: 'code_interpreter_call', status: 'completed', code: 'print(2 ** 100)', container_id: sessionId })
  t.match(call?.id, /^ci_/)
  t.same(call?.type === 'code_interpreter_call' && call.outputs, [{ type: 'logs', logs: '1267650600228229401496703205376\n' }])
  t.match(message, { type: 'message', role: 'assistant', status: 'completed' })
  t.equal(response.output_text, '2**100 is 1267650600228229401496703205376.')
  t.same(response.usage, {
    input_tokens: 30,
    input_tokens_details: { cached_tokens: 0 },
    output_tokens: 12,
    output_tokens_details: { reasoning_tokens: 0 },
    total_tokens: 42,
  })
  t.same(response.tools, [{ type: 'code_interpreter', container: sessionId }], 'the auto container is reported as the session it became')
  t.equal(upstream.requests[0]!.body.messages[0].content, 'Be brief.', 'instructions are the system message')
  t.equal(upstream.requests[0]!.body.tools[0].function.name, 'execute', 'the code tool is offered')

  const stored = await client.responses.retrieve(response.id)
  t.same(stored.output, response.output, 'GET returns the stored response')
  const session = (await app.inject({ url: `/v1/sessions/${sessionId}/messages`, headers: auth() })).json()
  t.same(
    session.messages.map((m: { role: string; type: string }) => `${m.role}.${m.type}`),
    ['user.message', 'assistant.code', 'computer.console', 'assistant.message'],
    'the turn is stored in the session like any other',
  )
})

t.test('without the code_interpreter tool no code tool is offered and no code runs', async (t) => {
  const { client, upstream } = await setup(t)
  upstream.script(text('```python\nprint(1)\n```\nJust text.'))
  const response = await client.responses.create({ model: 'gpt-4o-mini', input: [{ role: 'user', content: 'Hi' }] })
  t.equal(response.status, 'completed')
  t.same(
    response.output.map((item) => item.type),
    ['message'],
  )
  t.equal(response.output_text, '```python\nprint(1)\n```\nJust text.', 'a fenced block is just text')
  t.equal(upstream.requests[0]!.body.tools, undefined)
  t.equal(upstream.requests.length, 1)
  t.same(
    upstream.requests[0]!.body.messages.map((m: { role: string }) => m.role),
    ['user'],
    'no system prompt about code when there are no instructions',
  )
})

t.test('responses.stream(): events in order with sequence numbers, and finalResponse()', async (t) => {
  const { client, upstream } = await setup(t)
  upstream.script(toolCall({ language: 'python', code: 'x = 6 * 7\nprint(x)' }), text('The answer is 42.'))
  const stream = client.responses.stream({ model: 'gpt-4o-mini', input: 'Compute 6*7', tools: [CODE_INTERPRETER] })
  const events: { type: string; sequence_number: number }[] = []
  stream.on('event', (event) => events.push(event))
  const final = await stream.finalResponse()
  t.same(
    events.map((e) => e.sequence_number),
    events.map((_, i) => i),
    'sequence numbers count from 0 without gaps',
  )
  const types = events.map((e) => e.type).filter((type, i, all) => !(type.endsWith('.delta') && all[i - 1] === type))
  t.same(types, [
    'response.created',
    'response.in_progress',
    'response.output_item.added',
    'response.code_interpreter_call.in_progress',
    'response.code_interpreter_call_code.delta',
    'response.code_interpreter_call_code.done',
    'response.code_interpreter_call.interpreting',
    'response.code_interpreter_call.completed',
    'response.output_item.done',
    'response.output_item.added',
    'response.content_part.added',
    'response.output_text.delta',
    'response.output_text.done',
    'response.content_part.done',
    'response.output_item.done',
    'response.completed',
  ])
  t.equal(final.status, 'completed')
  t.equal(final.output_text, 'The answer is 42.')
  const call = final.output[0]
  t.match(call, { type: 'code_interpreter_call', code: 'x = 6 * 7\nprint(x)', status: 'completed', outputs: [{ type: 'logs', logs: '42\n' }] })
  // The SDK adds its parse results (parsed, output_parsed) to what it accumulated.
  t.match(final, await client.responses.retrieve(final.id), 'the stored response is what the stream ended with')
})

t.test('previous_response_id continues the session: a Python variable survives', async (t) => {
  const { client, upstream } = await setup(t)
  upstream.script(toolCall({ language: 'python', code: 'secret = 7 * 6' }), text('Stored it.'))
  const first = await client.responses.create({ model: 'gpt-4o-mini', input: 'Remember 42 in `secret`', tools: [CODE_INTERPRETER] })
  upstream.script(toolCall({ language: 'python', code: 'print(secret)' }), text('It is 42.'))
  const second = await client.responses.create({
    model: 'gpt-4o-mini',
    input: 'What is secret?',
    previous_response_id: first.id,
    tools: [CODE_INTERPRETER],
  })
  t.equal(second.previous_response_id, first.id)
  const call = second.output.find((item) => item.type === 'code_interpreter_call')
  t.match(call, { outputs: [{ type: 'logs', logs: '42\n' }] }, 'the kernel kept the variable')
  t.equal(
    call?.type === 'code_interpreter_call' && call.container_id,
    first.output[0]?.type === 'code_interpreter_call' && first.output[0].container_id,
    'same container',
  )
  const sent = upstream.requests[2]!.body.messages.map((m: { role: string; content: unknown }) => m.role)
  t.same(sent, ['system', 'user', 'assistant', 'tool', 'assistant', 'user'], 'the model sees the first response as context')
})

t.test('previous_response_id: branches keep their own context', async (t) => {
  const { client, upstream } = await setup(t)
  upstream.script(text('one'), text('two'), text('branch'))
  const first = await client.responses.create({ model: 'gpt-4o-mini', input: 'first' })
  await client.responses.create({ model: 'gpt-4o-mini', input: 'second', previous_response_id: first.id })
  await client.responses.create({ model: 'gpt-4o-mini', input: 'other', previous_response_id: first.id })
  const contents = upstream.requests[2]!.body.messages.map((m: { content: string }) => m.content)
  t.same(contents, ['first', 'one', 'other'])
})

t.test('store: false keeps no response and no session of its own', async (t) => {
  const { client, upstream, app, baseURL } = await setup(t)
  upstream.script(toolCall({ language: 'python', code: 'print(1)' }), text('done'))
  const { data, response } = await client.responses.create({ model: 'gpt-4o-mini', input: 'x', store: false, tools: [CODE_INTERPRETER] }).withResponse()
  t.equal(data.status, 'completed')
  t.equal((data as { store?: boolean }).store, false)
  const err = (await failure(client.responses.retrieve(data.id))) as InstanceType<typeof OpenAI.NotFoundError>
  t.equal(err.status, 404)
  const sessionId = response.headers.get('x-session-id')
  t.equal((await app.inject({ url: `/v1/sessions/${sessionId}`, headers: auth() })).statusCode, 404, 'the session made for it is gone')
  const followUp = await fetch(`${baseURL}/responses`, {
    method: 'POST',
    headers: { authorization: `Bearer ${ADMIN_KEY}`, 'content-type': 'application/json' },
    body: JSON.stringify({ input: 'y', previous_response_id: data.id }),
  })
  t.equal(followUp.status, 404)
  t.match(await followUp.json(), { error: { code: 'previous_response_not_found', param: 'previous_response_id' } })

  const session = (await app.inject({ method: 'POST', url: '/v1/sessions', headers: auth() })).json()
  upstream.script(text('in a named container'))
  const named = await client.responses.create({ input: 'z', store: false, tools: [{ type: 'code_interpreter', container: session.session_id }] })
  t.equal(named.status, 'completed')
  const messages = (await app.inject({ url: `/v1/sessions/${session.session_id}/messages`, headers: auth() })).json()
  t.equal(messages.messages.length, 2, 'the named session keeps its messages')
})

t.test('matplotlib figures come back as image outputs', async (t) => {
  const { client, upstream } = await setup(t)
  const code = 'import matplotlib.pyplot as plt\nprint("plotting")\nplt.plot([1, 3, 2])\nplt.show()'
  upstream.script(toolCall({ language: 'python', code }), text('Here is the plot.'))
  const response = await client.responses.create({ model: 'gpt-4o-mini', input: 'Plot 1, 3, 2', tools: [CODE_INTERPRETER] })
  const call = response.output[0]
  if (call?.type !== 'code_interpreter_call') throw new Error('expected a code_interpreter_call first')
  t.equal(call.outputs?.length, 2)
  t.match(call.outputs?.[0], { type: 'logs', logs: /plotting\n$/ })
  const image = call.outputs?.[1]
  t.equal(image?.type, 'image')
  const url = image?.type === 'image' ? image.url : ''
  t.match(url, /^data:image\/png;base64,/)
  const png = Buffer.from(url.slice('data:image/png;base64,'.length), 'base64')
  t.ok(png.subarray(0, 8).equals(Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a])), 'a PNG')
  t.equal(response.output_text, 'Here is the plot.')
})

t.test('the AI SDK default model (Responses API): generateText and streamText with the code interpreter', async (t) => {
  const { createOpenAI } = await import('@ai-sdk/openai')
  const { generateText, streamText } = await import('ai')
  const { upstream, baseURL } = await setup(t)
  const provider = createOpenAI({ baseURL, apiKey: ADMIN_KEY })

  upstream.script(toolCall({ language: 'python', code: 'print(sum(range(10)))' }), text('The sum is 45.'))
  const generated = await generateText({
    model: provider('gpt-4o-mini'),
    prompt: 'Sum 0..9',
    tools: { code_interpreter: provider.tools.codeInterpreter() as AiTool },
    maxRetries: 0,
  })
  t.equal(generated.text, 'The sum is 45.')
  t.equal(generated.finishReason, 'stop')
  t.ok(generated.usage.totalTokens && generated.usage.totalTokens > 0)
  t.equal(upstream.requests.at(-1)!.path, '/v1/chat/completions')
  const call = generated.toolCalls.find((c) => c.toolName === 'code_interpreter')
  t.match(call, { providerExecuted: true, input: { code: 'print(sum(range(10)))' } })
  const result = generated.toolResults.find((r) => r.toolName === 'code_interpreter')
  t.match(result?.output, { outputs: [{ type: 'logs', logs: '45\n' }] })

  upstream.script(text('Plain streamed words.'))
  const streamed = streamText({ model: provider('gpt-4o-mini'), prompt: 'Say something', maxRetries: 0 })
  const pieces: string[] = []
  for await (const piece of streamed.textStream) pieces.push(piece)
  t.ok(pieces.length > 1, 'text arrives in pieces')
  t.equal(pieces.join(''), 'Plain streamed words.')
  t.equal(await streamed.finishReason, 'stop')
  t.ok((await streamed.usage).totalTokens! > 0)

  upstream.script(toolCall({ language: 'python', code: 'print(7 * 6)' }), text('Streamed: 42.'))
  const withCode = streamText({
    model: provider('gpt-4o-mini'),
    prompt: 'Compute 7*6',
    tools: { code_interpreter: provider.tools.codeInterpreter() as AiTool },
    maxRetries: 0,
  })
  const parts: { type: string }[] = []
  for await (const part of withCode.fullStream) parts.push(part)
  t.equal(await withCode.text, 'Streamed: 42.')
  t.match(
    parts.find((p) => p.type === 'tool-call'),
    { toolName: 'code_interpreter', providerExecuted: true, input: { code: 'print(7 * 6)' } },
  )
  t.match(parts.find((p) => p.type === 'tool-result'), { toolName: 'code_interpreter', output: { outputs: [{ type: 'logs', logs: '42\n' }] } })
  t.notOk(parts.some((p) => p.type === 'error'), 'no stream part failed to parse')
})

const WEATHER_LANGCHAIN = {
  type: 'function',
  function: { name: 'get_weather', description: 'The weather in a city', parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] } },
} as const

t.test('LangChain ChatOpenAI with useResponsesApi: invoke, the code interpreter, a function tool round trip, stream', async (t) => {
  const { ChatOpenAI } = await import('@langchain/openai')
  const { upstream, baseURL } = await setup(t)
  const model = new ChatOpenAI({ model: 'gpt-4o-mini', apiKey: ADMIN_KEY, useResponsesApi: true, maxRetries: 0, configuration: { baseURL } })

  upstream.script(text('Hello from the agent.'))
  const plain = await model.invoke('Hi')
  t.equal(plain.text, 'Hello from the agent.')
  t.match(plain.response_metadata, { model: 'gpt-4o-mini', status: 'completed' })
  t.ok(plain.usage_metadata && plain.usage_metadata.total_tokens > 0)

  upstream.script(toolCall({ language: 'python', code: 'print(3 * 14)' }), text('It is 42.'))
  const withTool = model.bindTools([{ type: 'code_interpreter', container: { type: 'auto' } }])
  const answer = await withTool.invoke('What is 3*14?')
  t.equal(answer.text, 'It is 42.')
  t.match(JSON.stringify(answer.additional_kwargs), /code_interpreter_call/, 'LangChain keeps the code interpreter call')

  upstream.script(toolCall({ name: 'get_weather', arguments: '{"city":"Kyiv"}' }))
  const withFunction = model.bindTools([WEATHER_LANGCHAIN])
  const asked = await withFunction.invoke('Weather in Kyiv?')
  t.match(asked.tool_calls, [{ name: 'get_weather', args: { city: 'Kyiv' } }])
  const { ToolMessage, HumanMessage } = await import('@langchain/core/messages')
  upstream.script(text('It is 5 °C in Kyiv.'))
  const answered = await withFunction.invoke([
    new HumanMessage('Weather in Kyiv?'),
    asked,
    new ToolMessage({ tool_call_id: asked.tool_calls![0]!.id!, content: '5 °C' }),
  ])
  t.equal(answered.text, 'It is 5 °C in Kyiv.')
  t.match(upstream.requests.at(-1)!.body.messages.find((m: { role: string }) => m.role === 'tool'), { content: '5 °C' })

  upstream.script(text('Streaming through LangChain works.'))
  const chunks: string[] = []
  for await (const chunk of await model.stream('Stream please')) chunks.push(chunk.text)
  t.ok(chunks.length > 1)
  t.equal(chunks.join(''), 'Streaming through LangChain works.')
})

t.test('responses.parse with a json_schema text format: output_text is the final answer only', async (t) => {
  const { zodTextFormat } = await import('openai/helpers/zod')
  const { z } = await import('zod')
  const { client, upstream } = await setup(t)
  upstream.script(toolCall({ language: 'python', code: 'print(6 * 7)' }, { text: 'Let me compute that.' }), text('{"answer": 42}'))
  const parsed = await client.responses.parse({
    model: 'gpt-4o-mini',
    input: 'What is 6*7?',
    tools: [CODE_INTERPRETER],
    text: { format: zodTextFormat(z.object({ answer: z.number() }), 'result') },
  })
  t.same(parsed.output_parsed, { answer: 42 })
  t.same(
    parsed.output.map((item) => item.type),
    ['code_interpreter_call', 'message'],
    'prose before the code is not part of the answer',
  )
  t.match(upstream.requests[0]!.body.response_format, { type: 'json_schema', json_schema: { name: 'result', strict: true } })
})

t.test('input_items lists the input with ids; DELETE removes the response', async (t) => {
  const { client, upstream, app } = await setup(t)
  upstream.script(text('ok'))
  const response = await client.responses.create({
    model: 'gpt-4o-mini',
    input: [
      { role: 'developer', content: 'Answer in one word.' },
      { role: 'user', content: [{ type: 'input_text', text: 'first' }] },
      { type: 'message', role: 'user', content: 'second' },
    ],
  })
  t.equal(upstream.requests[0]!.body.messages[0].content, 'Answer in one word.', 'developer messages are the system message')
  const items = []
  for await (const item of client.responses.inputItems.list(response.id, { order: 'asc' })) items.push(item)
  t.equal(items.length, 3)
  t.same(
    items.map((item) => item.type === 'message' && item.role),
    ['developer', 'user', 'user'],
  )
  t.ok(items.every((item) => typeof item.id === 'string' && item.id.startsWith('msg_')))
  const page = (await app.inject({ url: `/v1/responses/${response.id}/input_items?limit=1`, headers: auth() })).json()
  t.match(page, { object: 'list', has_more: true, first_id: items[2]!.id, last_id: items[2]!.id }, 'newest first by default')
  const next = (await app.inject({ url: `/v1/responses/${response.id}/input_items?limit=5&after=${page.last_id}`, headers: auth() })).json()
  t.same(
    next.data.map((item: { id: string }) => item.id),
    [items[1]!.id, items[0]!.id],
  )
  t.equal(next.has_more, false)
  const unknownAfter = await app.inject({ url: `/v1/responses/${response.id}/input_items?after=msg_nope`, headers: auth() })
  t.equal(unknownAfter.statusCode, 400)
  t.equal(unknownAfter.json().error.param, 'after')

  t.match(await client.responses.delete(response.id), { id: response.id, deleted: true })
  const gone = await app.inject({ url: `/v1/responses/${response.id}`, headers: auth() })
  t.equal(gone.statusCode, 404)
  t.match(gone.json(), { error: { type: 'not_found_error', code: 'response_not_found' } })
  t.equal((await app.inject({ method: 'DELETE', url: `/v1/responses/${response.id}`, headers: auth() })).statusCode, 404)
})

t.test('tenants own their responses and containers', async (t) => {
  const { client, upstream, app, baseURL } = await setup(t)
  const { key } = (await app.inject({ method: 'POST', url: '/v1/keys', headers: auth(), payload: { name: 'other tenant' } })).json()
  const other = new OpenAI({ baseURL, apiKey: key, maxRetries: 0 })
  upstream.script(toolCall({ language: 'python', code: 'print(1)' }), text('mine'))
  const mine = await client.responses.create({ model: 'gpt-4o-mini', input: 'x', tools: [CODE_INTERPRETER] })
  const container = mine.output[0]?.type === 'code_interpreter_call' ? mine.output[0].container_id : ''
  const statuses = async (...calls: Promise<unknown>[]) =>
    (await Promise.all(calls.map(failure))).map((err) => (err as { status?: number } | undefined)?.status)
  t.same(
    await statuses(
      other.responses.retrieve(mine.id),
      other.responses.delete(mine.id),
      other.responses.cancel(mine.id),
      other.responses.inputItems.list(mine.id),
      other.responses.create({ input: 'y', previous_response_id: mine.id }),
      other.responses.create({ input: 'y', tools: [{ type: 'code_interpreter', container }] }),
    ),
    [404, 404, 404, 404, 404, 404],
  )
  t.equal(upstream.requests.length, 2, 'the other tenant reached no model')
  t.equal((await client.responses.retrieve(mine.id)).id, mine.id, 'the owner still has it')
})

t.test('401, 404 and bad input get the error envelope, and make nothing', async (t) => {
  const { upstream, app } = await setup(t)
  const post = (payload: unknown, headers: Record<string, string> = auth()) =>
    app.inject({ method: 'POST', url: '/v1/responses', headers, payload: payload as Record<string, unknown> })

  const missing = await post({ input: 'x' }, {})
  t.equal(missing.statusCode, 401)
  t.match(missing.json(), { error: { type: 'auth_error', code: 'missing_api_key' } })
  t.equal((await post({ input: 'x' }, auth('wrong'))).statusCode, 401)
  t.equal((await app.inject({ url: '/v1/responses/resp_x', headers: auth('wrong') })).statusCode, 401)

  for (const url of ['/v1/responses/resp_nope', `/v1/responses/resp_${'0'.repeat(48)}`, '/v1/responses/%00']) {
    const res = await app.inject({ url, headers: auth() })
    t.equal(res.statusCode, 404, url)
    t.match(res.json(), { error: { code: 'response_not_found', param: 'response_id' } })
  }

  const cases: [unknown, string, string][] = [
    [{}, 'input', 'invalid_request'],
    [{ input: { role: 'user' } }, 'input', 'invalid_request'],
    [{ input: [{ type: 'wat' }] }, 'input[0].type', 'invalid_input'],
    [{ input: [{ role: 'user', content: [{ type: 'input_image', image_url: 'http://169.254.169.254/x.png' }] }] }, 'input[0].content[0].image_url', 'invalid_input'],
    [{ input: [{ role: 'user', content: [{ type: 'input_file', file_id: 'file-1' }] }] }, 'input[0].content[0].type', 'invalid_input'],
    [{ input: [{ role: 'tyrant', content: 'x' }] }, 'input[0].role', 'invalid_input'],
    [{ input: [{ role: 'user', content: 'x' }, { type: 'item_reference', id: 'msg_1' }] }, 'input[1].id', 'item_not_found'],
    [{ input: 'x', tools: [{ type: 'web_search' }] }, 'tools[0].type', 'unsupported_parameter'],
    [{ input: 'x', tools: [CODE_INTERPRETER, CODE_INTERPRETER] }, 'tools[1]', 'invalid_request'],
    [{ input: 'x', tools: [{ type: 'code_interpreter' }] }, 'tools[0].container', 'invalid_request'],
    [{ input: 'x', tools: [{ type: 'code_interpreter', container: { type: 'auto', file_ids: ['file-1'] } }] }, 'tools[0].container.file_ids', 'unsupported_parameter'],
    [{ input: 'x', tools: [{ type: 'code_interpreter', container: 'not-a-session' }] }, 'tools[0].container', 'container_not_found'],
    [{ input: 'x', tool_choice: 'required' }, 'tool_choice', 'unsupported_parameter'],
    [{ input: 'x', text: { format: { type: 'json_schema' } } }, 'text.format', 'invalid_request'],
    [{ input: 'x', temperature: 3 }, 'temperature', 'invalid_request'],
    [{ input: [{ role: 'user', content: [{ type: 'input_text', text: { nested: true } }] }] }, 'input[0].content[0].text', 'invalid_input'],
    [{ input: 'x', metadata: { ['k'.repeat(65)]: 'v' } }, 'metadata', 'invalid_request'],
    [{ input: 'x', metadata: Object.fromEntries(Array.from({ length: 17 }, (_, i) => [`k${i}`, 'v'])) }, 'metadata', 'invalid_request'],
    [{ input: 'x', previous_response_id: 'resp_nope' }, 'previous_response_id', 'previous_response_not_found'],
    [{ input: 'x', store: false, background: true }, 'background', 'invalid_request'],
    [{ input: 'x', conversation: 'conv_1' }, 'conversation', 'unsupported_parameter'],
  ]
  for (const [payload, param, code] of cases) {
    const res = await post(payload)
    t.ok([400, 404].includes(res.statusCode), `${JSON.stringify(payload).slice(0, 80)}: ${res.statusCode}`)
    t.match(res.json(), { error: { param, code } }, JSON.stringify(payload).slice(0, 80))
  }
  t.equal(upstream.requests.length, 0, 'no upstream call')
  t.same((await app.inject({ url: '/v1/sessions', headers: auth() })).json().sessions, [], 'no session made')
})

t.test('an upstream refusal before any output is a plain HTTP error and leaves nothing behind', async (t) => {
  const { client, upstream, app } = await setup(t)
  upstream.script(httpError(429, 'Slow down', { code: 'rate_limit_exceeded', headers: { 'retry-after': '7' } }))
  const err = (await failure(client.responses.create({ model: 'gpt-4o-mini', input: 'x', stream: true }))) as InstanceType<typeof OpenAI.RateLimitError>
  t.equal(err.status, 429)
  t.equal(err.headers?.get('retry-after'), '7')
  upstream.script(httpError(400, 'Too long', { code: 'context_length_exceeded', param: 'messages' }))
  const bad = (await failure(client.responses.create({ model: 'gpt-4o-mini', input: 'x' }))) as InstanceType<typeof OpenAI.BadRequestError>
  t.equal(bad.status, 400)
  t.equal(bad.code, 'context_length_exceeded')
  t.same((await app.inject({ url: '/v1/sessions', headers: auth() })).json().sessions, [], 'no session made')
})

t.test('a failure after code ran: the stream ends with response.failed, the stored response says failed', async (t) => {
  const { client, upstream } = await setup(t)
  upstream.script(toolCall({ language: 'python', code: 'print("ran")' }), text('never finished', { breakAfterChunks: 2 }))
  const stream = client.responses.stream({ model: 'gpt-4o-mini', input: 'x', tools: [CODE_INTERPRETER] })
  const types: string[] = []
  stream.on('event', (event) => types.push(event.type))
  const final = await stream.finalResponse()
  t.equal(types.at(-1), 'response.failed')
  t.equal(final.status, 'failed')
  t.match(final.error, { code: 'llm_error', message: /broke/ })
  t.match(final.output[0], { type: 'code_interpreter_call', outputs: [{ type: 'logs', logs: 'ran\n' }] })
  t.equal((await client.responses.retrieve(final.id)).status, 'failed')

  upstream.script(toolCall({ language: 'python', code: 'print("ran")' }), text('never finished', { breakAfterChunks: 2 }))
  const plain = (await failure(client.responses.create({ model: 'gpt-4o-mini', input: 'x', tools: [CODE_INTERPRETER] }))) as InstanceType<typeof OpenAI.APIError>
  t.equal(plain.status, 502)
  t.equal(plain.headers?.get('x-should-retry'), 'false', 'code ran: not to be retried')
})

t.test('cancel a running response: its code is interrupted and the stream ends cancelled', async (t) => {
  const { client, upstream, baseURL } = await setup(t)
  upstream.script(toolCall({ language: 'python', code: 'import time\nprint("started", flush=True)\ntime.sleep(60)' }), text('never asked'))
  const stream = client.responses.stream({ model: 'gpt-4o-mini', input: 'x', tools: [CODE_INTERPRETER] })
  const types: string[] = []
  let id = ''
  let cancelled: Promise<OpenAI.Responses.Response> | undefined
  for await (const event of stream) {
    types.push(event.type)
    if (event.type === 'response.created') id = event.response.id
    if (event.type === 'response.code_interpreter_call.interpreting') cancelled = client.responses.cancel(id)
  }
  const final = await stream.finalResponse()
  t.equal(types.at(-1), 'response.incomplete')
  t.equal(final.status, 'cancelled')
  t.match(final.output[0], { type: 'code_interpreter_call', status: 'incomplete' })
  const answer = await cancelled!
  t.equal(answer.status, 'cancelled', 'cancel answers the response as it ended')
  t.equal(upstream.requests.length, 1, 'the model was not asked again')
  t.equal((await client.responses.retrieve(final.id)).status, 'cancelled')
  t.equal((await client.responses.cancel(final.id)).status, 'cancelled', 'cancelling again answers it again')

  upstream.script(text('done'))
  const done = await client.responses.create({ model: 'gpt-4o-mini', input: 'y' })
  const res = await fetch(`${baseURL}/responses/${done.id}/cancel`, { method: 'POST', headers: { authorization: `Bearer ${ADMIN_KEY}` } })
  t.equal(res.status, 400)
  t.match(await res.json(), { error: { code: 'response_not_running' } })
})

t.test('background: answered at once, polled until done, cancellable', async (t) => {
  const { client, upstream } = await setup(t)
  upstream.script(toolCall({ language: 'python', code: 'print(5 + 5)' }), text('Ten.'))
  const started = await client.responses.create({ model: 'gpt-4o-mini', input: 'x', background: true, tools: [CODE_INTERPRETER] })
  t.equal(started.status, 'in_progress')
  t.equal(started.background, true)
  let polled = await client.responses.retrieve(started.id)
  while (polled.status === 'in_progress') {
    await new Promise((resolve) => setTimeout(resolve, 20))
    polled = await client.responses.retrieve(started.id)
  }
  t.equal(polled.status, 'completed')
  t.equal(polled.output_text, 'Ten.')

  upstream.script(toolCall({ language: 'python', code: 'import time\ntime.sleep(60)' }), text('never asked'))
  const slow = await client.responses.create({ model: 'gpt-4o-mini', input: 'y', background: true, previous_response_id: started.id, tools: [CODE_INTERPRETER] })
  const cancelled = await client.responses.cancel(slow.id)
  t.equal(cancelled.status, 'cancelled')
  t.equal((await client.responses.retrieve(slow.id)).status, 'cancelled')
})

t.test('Idempotency-Key: a retried create runs once and gets the same response', async (t) => {
  const { client, upstream } = await setup(t)
  upstream.script(toolCall({ language: 'python', code: 'print("once")' }), text('Done once.'))
  const body = { model: 'gpt-4o-mini', input: 'x', tools: [CODE_INTERPRETER] }
  const first = await client.responses.create(body, { headers: { 'Idempotency-Key': 'key-1' } }).withResponse()
  const again = await client.responses.create(body, { headers: { 'Idempotency-Key': 'key-1' } }).withResponse()
  t.equal(again.data.id, first.data.id)
  t.equal(again.response.headers.get('idempotent-replayed'), 'true')
  t.equal(upstream.requests.length, 2, 'the model was asked for one turn only')
})

t.test('the raw stream: every event named after its type, X-Session-Id, no data: [DONE]', async (t) => {
  const { baseURL, upstream } = await setup(t)
  upstream.script(toolCall({ language: 'shell', code: 'echo hi' }), text('Said hi.'))
  const res = await fetch(`${baseURL}/responses`, {
    method: 'POST',
    headers: { authorization: `Bearer ${ADMIN_KEY}`, 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'gpt-4o-mini', input: 'say hi in the shell', stream: true, tools: [CODE_INTERPRETER] }),
  })
  t.equal(res.status, 200)
  t.match(res.headers.get('content-type'), /^text\/event-stream/)
  t.match(res.headers.get('x-session-id'), /^[0-9a-f-]{36}$/)
  const events = parseSse(await res.text())
  t.ok(events.every((e) => e.event === JSON.parse(e.data).type), 'event: names the type')
  t.notOk(events.some((e) => e.data === '[DONE]'))
  const last = JSON.parse(events.at(-1)!.data)
  t.equal(last.type, 'response.completed')
  t.match(last.response.output[0], { type: 'code_interpreter_call', language: 'shell', code: 'echo hi', outputs: [{ type: 'logs', logs: 'hi\n' }] })
})

const WEATHER = {
  type: 'function',
  name: 'get_weather',
  description: 'The weather in a city',
  parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'], additionalProperties: false },
  strict: true,
} as const

t.test('a function tool round trip: function_call out, function_call_output with previous_response_id resumes the turn', async (t) => {
  const { client, upstream, app } = await setup(t)
  upstream.script(toolCall({ name: 'get_weather', arguments: '{"city":"Paris"}' }))
  const first = await client.responses.create({ model: 'gpt-4o-mini', input: 'Weather in Paris?', tools: [WEATHER, CODE_INTERPRETER] })
  t.equal(first.status, 'completed')
  t.equal(first.output.length, 1, JSON.stringify(first.output))
  const call = first.output[0]
  if (call?.type !== 'function_call') throw new Error('expected a function_call')
  t.match(call, { type: 'function_call', name: 'get_weather', arguments: '{"city":"Paris"}', status: 'completed', id: /^fc_/ })
  t.match(call.call_id, /^call_/)
  const offered = upstream.requests[0]!.body.tools.map((tool: { function: { name: string } }) => tool.function.name)
  t.same(offered, ['execute', 'get_weather'], 'the function is offered beside the code tool')
  t.same(upstream.requests[0]!.body.tools[1].function, { name: 'get_weather', description: 'The weather in a city', parameters: WEATHER.parameters, strict: true })

  upstream.script(toolCall({ language: 'python', code: 'print(18 * 9 / 5 + 32)' }), text('18 °C, which is 64.4 °F.'))
  const second = await client.responses.create({
    model: 'gpt-4o-mini',
    previous_response_id: first.id,
    input: [{ type: 'function_call_output', call_id: call.call_id, output: '{"celsius": 18}' }],
    tools: [WEATHER, CODE_INTERPRETER],
  })
  t.equal(second.status, 'completed')
  t.equal(second.output_text, '18 °C, which is 64.4 °F.')
  t.match(second.output[0], { type: 'code_interpreter_call', outputs: [{ type: 'logs', logs: '64.4\n' }] })
  const sent = upstream.requests[1]!.body.messages
  const toolMessage = sent.find((m: { role: string }) => m.role === 'tool')
  t.same(toolMessage, { role: 'tool', tool_call_id: call.call_id, content: '{"celsius": 18}' }, 'the upstream gets a real tool message')
  const assistant = sent.find((m: { tool_calls?: unknown }) => m.tool_calls)
  t.match(assistant.tool_calls, [{ id: call.call_id, function: { name: 'get_weather', arguments: '{"city":"Paris"}' } }])
  const events = (await app.inject({ url: `/v1/sessions/${second.tools[1]?.type === 'code_interpreter' ? (second.tools[1].container as string) : ''}/events?limit=100`, headers: auth() })).json()
  t.same(
    events.events.map((e: { type: string }) => e.type).filter((type: string) => type.startsWith('run_')),
    ['run_started', 'run_suspended', 'run_started', 'run_finished'],
    'one turn, suspended and resumed',
  )
})

t.test('a function tool round trip without previous_response_id: the history carries the call', async (t) => {
  const { client, upstream } = await setup(t)
  upstream.script(toolCall({ name: 'get_weather', arguments: '{"city":"Oslo"}' }))
  const first = await client.responses.create({ model: 'gpt-4o-mini', input: 'Weather in Oslo?', tools: [WEATHER], store: false })
  const call = first.output[0]
  if (call?.type !== 'function_call') throw new Error('expected a function_call')
  upstream.script(text('It is 3 °C in Oslo.'))
  const second = await client.responses.create({
    model: 'gpt-4o-mini',
    input: [{ role: 'user', content: 'Weather in Oslo?' }, call, { type: 'function_call_output', call_id: call.call_id, output: '3 °C' }],
    tools: [WEATHER],
  })
  t.equal(second.output_text, 'It is 3 °C in Oslo.')
  t.same(
    upstream.requests[1]!.body.messages.map((m: { role: string }) => m.role),
    ['user', 'assistant', 'tool'],
  )
  t.equal(upstream.requests[1]!.body.tools.length, 1, 'only the function: no code interpreter was asked for')
})

t.test('a streamed function call: arguments delta and done, then the response completes', async (t) => {
  const { client, upstream } = await setup(t)
  upstream.script(toolCall({ name: 'get_weather', arguments: '{"city":"Rome"}' }))
  const stream = client.responses.stream({ model: 'gpt-4o-mini', input: 'Weather in Rome?', tools: [WEATHER] })
  const types: string[] = []
  stream.on('event', (event) => types.push(event.type))
  const final = await stream.finalResponse()
  t.same(types, [
    'response.created',
    'response.in_progress',
    'response.output_item.added',
    'response.function_call_arguments.delta',
    'response.function_call_arguments.done',
    'response.output_item.done',
    'response.completed',
  ])
  t.match(final.output, [{ type: 'function_call', name: 'get_weather', arguments: '{"city":"Rome"}', status: 'completed' }])
})

t.test('function tools: refusals name the field in the Responses request', async (t) => {
  const { upstream, app } = await setup(t)
  const post = (payload: unknown) => app.inject({ method: 'POST', url: '/v1/responses', headers: auth(), payload: payload as Record<string, unknown> })
  const cases: [unknown, string, string][] = [
    [{ input: 'x', tools: [CODE_INTERPRETER, { ...WEATHER, name: 'execute' }] }, 'tools[1].name', 'tool_name_reserved'],
    [{ input: 'x', tools: [CODE_INTERPRETER, { ...WEATHER, name: 'bad name!' }] }, 'tools[1].name', 'invalid_request'],
    [{ input: 'x', tools: [WEATHER], tool_choice: { type: 'function', name: 'nope' } }, 'tool_choice.name', 'invalid_request'],
    [{ input: 'x', tools: [CODE_INTERPRETER], tool_choice: 'required' }, 'tool_choice', 'unsupported_parameter'],
    [{ input: [{ role: 'user', content: 'x' }, { type: 'function_call_output', call_id: 'call_nope', output: '1' }], tools: [WEATHER] }, 'input[1].call_id', 'unknown_tool_call'],
    [{ input: [{ type: 'function_call_output', output: '1' }] }, 'input[0].call_id', 'invalid_input'],
  ]
  for (const [payload, param, code] of cases) {
    const res = await post(payload)
    t.equal(res.statusCode, 400, JSON.stringify(payload).slice(0, 100))
    t.match(res.json(), { error: { param, code } }, JSON.stringify(payload).slice(0, 100))
  }
  t.equal(upstream.requests.length, 0, 'no upstream call')
  t.same((await app.inject({ url: '/v1/sessions', headers: auth() })).json().sessions, [], 'no session made')
})

t.test('the AI SDK runs a function tool over two steps and sends the earlier items back', async (t) => {
  const { createOpenAI } = await import('@ai-sdk/openai')
  const { generateText, stepCountIs, tool } = await import('ai')
  const { z } = await import('zod')
  const { upstream, baseURL } = await setup(t)
  const provider = createOpenAI({ baseURL, apiKey: ADMIN_KEY })
  upstream.script(toolCall({ name: 'get_weather', arguments: '{"city":"Lima"}' }, { text: 'Let me check.' }), text('It is 20 °C in Lima.'))
  const cities: string[] = []
  const result = await generateText({
    model: provider('gpt-4o-mini'),
    prompt: 'Weather in Lima?',
    tools: {
      get_weather: tool({
        description: 'The weather in a city',
        inputSchema: z.object({ city: z.string() }),
        execute: async ({ city }) => {
          cities.push(city)
          return { celsius: 20 }
        },
      }),
    },
    stopWhen: stepCountIs(3),
    maxRetries: 0,
  })
  t.same(cities, ['Lima'])
  t.equal(result.text, 'It is 20 °C in Lima.')
  t.equal(result.steps.length, 2)
  const tool_ = upstream.requests[1]!.body.messages.find((m: { role: string }) => m.role === 'tool')
  t.match(tool_, { content: /"celsius":20/ })
  t.match(
    upstream.requests[1]!.body.messages.map((m: { role: string; content: unknown }) => m.role),
    ['user', 'assistant', 'tool'],
  )
})

t.test('auto_run: false stops the response before its code runs; the session confirm endpoint resumes it', async (t) => {
  const { client, upstream, app } = await setup(t)
  await app.inject({ method: 'PATCH', url: '/v1/settings', headers: auth(), payload: { auto_run: false } })
  upstream.script(toolCall({ language: 'python', code: 'print("approved")' }), text('It ran.'))
  const response = await client.responses.create({ model: 'gpt-4o-mini', input: 'x', tools: [CODE_INTERPRETER] })
  t.equal(response.status, 'incomplete')
  t.same(response.incomplete_details, { reason: 'confirmation_required' })
  t.match(response.output, [{ type: 'code_interpreter_call', code: 'print("approved")', status: 'incomplete', outputs: [] }])
  t.equal(upstream.requests.length, 1)
  const sessionId = response.output[0]?.type === 'code_interpreter_call' ? response.output[0].container_id : ''
  const confirmed = await app.inject({ method: 'POST', url: `/v1/sessions/${sessionId}/confirm`, headers: auth(), payload: { approve: true } })
  t.equal(confirmed.statusCode, 200)
  const messages = (await app.inject({ url: `/v1/sessions/${sessionId}/messages`, headers: auth() })).json().messages
  t.match(messages.at(-1), { role: 'assistant', content: 'It ran.' })
  t.ok(messages.some((m: { type: string; content: string }) => m.type === 'console' && m.content === 'approved\n'), 'the code ran once approved')
})

t.test('the per-session rate limit counts responses against the session they name', async (t) => {
  const { client, upstream } = await setup(t, { SESSION_RATE_LIMIT_PER_MINUTE: '1' })
  upstream.script(text('one'), text('two'), text('three'))
  const first = await client.responses.create({ model: 'gpt-4o-mini', input: 'a', tools: [CODE_INTERPRETER] })
  const container = (first.tools[0] as { container: string }).container
  await client.responses.create({ model: 'gpt-4o-mini', input: 'b', previous_response_id: first.id })
  const limited = (await failure(client.responses.create({ model: 'gpt-4o-mini', input: 'c', previous_response_id: first.id }))) as InstanceType<typeof OpenAI.RateLimitError>
  t.equal(limited.status, 429, 'named by previous_response_id')
  const byContainer = (await failure(client.responses.create({ model: 'gpt-4o-mini', input: 'd', tools: [{ type: 'code_interpreter', container }] }))) as InstanceType<typeof OpenAI.RateLimitError>
  t.equal(byContainer.status, 429, 'named by the container')
  t.equal((await client.responses.create({ model: 'gpt-4o-mini', input: 'e' })).status, 'completed', 'a new session is not limited')
})

t.test('shutting down cancels a background response and stores it as cancelled', async (t) => {
  const dataDir = tempDir(t)
  const { client, upstream, app } = await setup(t, { DATA_DIR: dataDir })
  upstream.script(toolCall({ language: 'python', code: 'import time\nprint("working", flush=True)\ntime.sleep(60)' }), text('never asked'))
  const started = await client.responses.create({ model: 'gpt-4o-mini', input: 'x', background: true, tools: [CODE_INTERPRETER] })
  // Shut down once the code has started running.
  const container = (started.tools[0] as { container: string }).container
  await new Promise<void>((resolve) => {
    const stop = app.bus.subscribe(container, (event) => {
      if (event.type !== 'execution_started') return
      stop()
      resolve()
    })
  })
  await app.close()
  const store = createSqliteStore(join(dataDir, 'oi-server.db'))
  t.teardown(() => store.close())
  const stored = await store.getResponse(ADMIN_TENANT, started.id)
  t.equal(stored?.status, 'cancelled')
  t.match(stored?.response, { status: 'cancelled', output: [{ type: 'code_interpreter_call', status: 'incomplete' }] })
})
