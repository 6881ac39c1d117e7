import OpenAI from 'openai'
import t from 'tap'
import { httpError, startFakeUpstream, text, toolCall } from '../fakes/upstream.js'
import { ADMIN_KEY, auth, build } from '../helpers/build.js'
import type { Tap } from '../helpers/build.js'
import { parseSse } from '../helpers/sse.js'

/** The server on loopback and the real OpenAI SDK pointed at it, unmodified. */
async function setup(t: Tap, env: Record<string, string> = {}) {
  const upstream = await startFakeUpstream()
  t.teardown(() => upstream.close())
  const app = await build(t, { LLM_BASE_URL: upstream.url, SANDBOX: 'none', ...env })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as { port: number }
  const baseURL = `http://127.0.0.1:${port}/v1`
  const client = new OpenAI({ baseURL, apiKey: ADMIN_KEY, maxRetries: 0 })
  return { app, upstream, client, baseURL }
}

const CODE_INTERPRETER = { type: 'code_interpreter', container: { type: 'auto' } } as const

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
  t.equal(data.store, false)
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
