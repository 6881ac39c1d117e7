import { createOpenAICompatible } from '@ai-sdk/openai-compatible'
import { generateObject, generateText, stepCountIs, streamText, tool } from 'ai'
import t from 'tap'
import { z } from 'zod'
import { text, toolCall } from '../fakes/upstream.js'
import { listeningServer } from '../helpers/openai-server.js'

/** The Vercel AI SDK's OpenAI-compatible provider (`.chatModel()`: Chat Completions), unmodified. */
async function setup(t: Parameters<typeof listeningServer>[0]) {
  const server = await listeningServer(t)
  const provider = createOpenAICompatible({ name: 'oi-server', baseURL: server.baseURL, apiKey: server.apiKey })
  return { ...server, model: provider.chatModel('gpt-4o-mini') }
}

const weatherTool = (calls: string[]) =>
  tool({
    description: 'The weather in a city',
    inputSchema: z.object({ city: z.string() }),
    execute: async ({ city }) => {
      calls.push(city)
      return { city, sky: 'sunny', celsius: 24 }
    },
  })

t.test('generateText with a tool: the execute callback runs once and the final text comes back (stopWhen: stepCountIs(3))', async (t) => {
  const { model, upstream, chatCalls, sessionCount } = await setup(t)
  upstream.script(toolCall({ name: 'get_weather', arguments: '{"city":"Paris"}' }), text('Sunny, 24 C in Paris.'))
  const calls: string[] = []
  const result = await generateText({
    model,
    tools: { get_weather: weatherTool(calls) },
    stopWhen: stepCountIs(3),
    prompt: 'What is the weather in Paris?',
    maxRetries: 0,
  })
  t.same(calls, ['Paris'])
  t.equal(result.text, 'Sunny, 24 C in Paris.')
  t.equal(result.steps.length, 2)
  t.equal(result.steps[0]!.finishReason, 'tool-calls')
  t.equal(result.finishReason, 'stop')
  t.equal(chatCalls(), 2)
  t.equal(await sessionCount(), 1, 'the resent history continued the session of the tool call')
  t.match(upstream.requests[1]!.body.messages.slice(-2), [
    { role: 'assistant', tool_calls: [{ type: 'function', function: { name: 'get_weather' } }] },
    { role: 'tool', content: /sunny/ },
  ])
})

t.test("toolChoice: 'required' reaches the upstream and is answered with a tool call", async (t) => {
  const { model, upstream } = await setup(t)
  upstream.script(toolCall({ name: 'get_weather', arguments: '{"city":"Oslo"}' }))
  const calls: string[] = []
  const result = await generateText({ model, tools: { get_weather: weatherTool(calls) }, toolChoice: 'required', prompt: 'Oslo', maxRetries: 0 })
  t.equal(upstream.requests[0]!.body.tool_choice, 'required')
  t.same(calls, ['Oslo'])
  t.equal(result.finishReason, 'tool-calls')
})

t.test('streamText with a tool: streamed tool-call deltas are assembled and the loop finishes', async (t) => {
  const { model, upstream } = await setup(t)
  upstream.script(toolCall({ name: 'get_weather', arguments: '{"city":"Rome"}' }), text('Rome is sunny.'))
  const calls: string[] = []
  const result = streamText({ model, tools: { get_weather: weatherTool(calls) }, stopWhen: stepCountIs(3), prompt: 'Rome?', maxRetries: 0 })
  t.equal(await result.text, 'Rome is sunny.')
  t.same(calls, ['Rome'])
})

t.test('generateObject: the object parses the first time, one agent run', async (t) => {
  const { model, upstream, chatCalls, sessionCount } = await setup(t)
  upstream.script(toolCall({ language: 'python', code: 'print(6 * 7)' }), text('{"answer":42}'))
  const { object } = await generateObject({ model, schema: z.object({ answer: z.number() }), prompt: 'Compute 6*7 with code; JSON answer', maxRetries: 0 })
  t.same(object, { answer: 42 })
  t.equal(chatCalls(), 2)
  t.equal(await sessionCount(), 1)
  t.match(upstream.requests[0]!.body.response_format, { type: /^json_/ }, 'response_format reached the upstream')
})
