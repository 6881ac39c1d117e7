import { AIMessage, type AIMessageChunk, HumanMessage, type ToolMessage } from '@langchain/core/messages'
import { tool } from '@langchain/core/tools'
import { ChatOpenAI } from '@langchain/openai'
import t from 'tap'
import { z } from 'zod'
import { text, toolCall } from '../fakes/upstream.js'
import { listeningServer } from '../helpers/openai-server.js'

/** LangChain's ChatOpenAI, unmodified, against the server (which runs over the fake upstream). */
async function setup(t: Parameters<typeof listeningServer>[0]) {
  const server = await listeningServer(t)
  const model = new ChatOpenAI({ model: 'gpt-4o-mini', apiKey: server.apiKey, configuration: { baseURL: server.baseURL } })
  return { ...server, model }
}

const getWeather = tool(async ({ city }: { city: string }) => `sunny and 24 C in ${city}`, {
  name: 'get_weather',
  description: 'The weather in a city',
  schema: z.object({ city: z.string() }),
})

t.test('bindTools round trip: the tool call comes back, the tool result goes in, the final answer comes out', async (t) => {
  const { model, upstream, chatCalls, sessionCount } = await setup(t)
  upstream.script(toolCall({ name: 'get_weather', arguments: '{"city":"Paris"}' }), text('It is sunny and 24 C in Paris.'))
  const withTools = model.bindTools([getWeather])
  const question = new HumanMessage('What is the weather in Paris?')
  const first = await withTools.invoke([question])
  t.type(first, AIMessage)
  t.equal(first.tool_calls?.length, 1)
  t.match(first.tool_calls![0], { name: 'get_weather', args: { city: 'Paris' }, id: /^call_/ })
  t.equal(first.response_metadata.finish_reason, 'tool_calls')

  const result = (await getWeather.invoke(first.tool_calls![0]!)) as ToolMessage
  const final = await withTools.invoke([question, first, result])
  t.equal(final.content, 'It is sunny and 24 C in Paris.')
  t.same(final.tool_calls, [])
  t.equal(chatCalls(), 2, 'one upstream call per step')
  t.equal(await sessionCount(), 1, 'the stateless history continued the same session')
  const sent = upstream.requests[1]!.body.messages
  t.match(sent.slice(-2), [
    { role: 'assistant', tool_calls: [{ id: first.tool_calls![0]!.id, type: 'function', function: { name: 'get_weather', arguments: '{"city":"Paris"}' } }] },
    { role: 'tool', tool_call_id: first.tool_calls![0]!.id, content: 'sunny and 24 C in Paris' },
  ])
  t.same(upstream.requests[0]!.body.tools.map((t: { function: { name: string } }) => t.function.name), ['execute', 'get_weather'])
})

t.test('withStructuredOutput (zod, default jsonSchema method): parses the first time, exactly one agent run', async (t) => {
  const { model, upstream, chatCalls, sessionCount } = await setup(t)
  upstream.script(toolCall({ language: 'python', code: 'print(6 * 7)' }), text('{"answer": 42, "unit": "none"}'))
  const structured = model.withStructuredOutput(z.object({ answer: z.number(), unit: z.string() }))
  const parsed = await structured.invoke('Compute 6*7 with code and answer in JSON')
  t.same(parsed, { answer: 42, unit: 'none' })
  t.equal(chatCalls(), 2, 'one turn: the code step and the answer')
  t.equal(await sessionCount(), 1, 'one agent run, no retry')
  t.match(upstream.requests[0]!.body.response_format, { type: 'json_schema', json_schema: { schema: { properties: { answer: { type: 'number' } } } } })
})

t.test('withStructuredOutput by function calling: the forced tool call is returned and parsed, exactly one agent run', async (t) => {
  const { model, upstream, chatCalls, sessionCount } = await setup(t)
  upstream.script(toolCall({ name: 'extract', arguments: '{"answer":42}' }))
  const structured = model.withStructuredOutput(z.object({ answer: z.number() }), { name: 'extract', method: 'functionCalling' })
  t.same(await structured.invoke('What is 6*7?'), { answer: 42 })
  t.equal(chatCalls(), 1)
  t.equal(await sessionCount(), 1)
  t.match(upstream.requests[0]!.body.tool_choice, { type: 'function', function: { name: 'extract' } }, 'tool_choice reaches the upstream')
})

t.test('streaming with bindTools: the tool call chunks assemble into one call', async (t) => {
  const { model, upstream } = await setup(t)
  upstream.script(toolCall({ name: 'get_weather', arguments: '{"city":"Rome"}' }))
  let message: AIMessageChunk | undefined
  for await (const chunk of await model.bindTools([getWeather]).stream('Weather in Rome?')) message = message ? message.concat(chunk) : chunk
  t.match(message?.tool_calls, [{ name: 'get_weather', args: { city: 'Rome' } }])
})
