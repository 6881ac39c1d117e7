import type { ChatMessage, ToolCallLLMMessageOptions } from '@llamaindex/core/llms'
import { FunctionTool } from '@llamaindex/core/tools'
import { OpenAI } from '@llamaindex/openai'
import t from 'tap'
import { z } from 'zod'
import { text, toolCall } from '../fakes/upstream.js'
import { listeningServer } from '../helpers/openai-server.js'

/** LlamaIndex's OpenAI LLM (`@llamaindex/openai`, Chat Completions), unmodified. */
t.test('chat with a tool: the tool call comes back, its result goes in, the final answer comes out (streamed too)', async (t) => {
  const { baseURL, apiKey, upstream, chatCalls, sessionCount } = await listeningServer(t)
  const llm = new OpenAI({ model: 'gpt-4o-mini', apiKey, baseURL, maxRetries: 0 })
  t.equal(llm.supportToolCall, true)
  const weather = FunctionTool.from(({ city }: { city: string }) => `sunny in ${city}`, {
    name: 'get_weather',
    description: 'The weather in a city',
    parameters: z.object({ city: z.string() }),
  })
  upstream.script(toolCall({ name: 'get_weather', arguments: '{"city":"Paris"}' }), text('Paris is sunny.'))
  const messages: ChatMessage<ToolCallLLMMessageOptions>[] = [{ role: 'user', content: 'Weather in Paris?' }]
  const first = await llm.chat({ messages, tools: [weather] })
  const calls = first.message.options && 'toolCall' in first.message.options ? first.message.options.toolCall : []
  t.match(calls, [{ name: 'get_weather', id: /^call_/ }])
  const call = calls[0]!
  const input = typeof call.input === 'string' ? JSON.parse(call.input) : call.input
  t.same(input, { city: 'Paris' })
  const output = await weather.call(input)
  messages.push(first.message, { role: 'user', content: String(output), options: { toolResult: { id: call.id, result: String(output), isError: false } } })
  const final = await llm.chat({ messages, tools: [weather] })
  t.equal(final.message.content, 'Paris is sunny.')
  t.equal(chatCalls(), 2)
  t.equal(await sessionCount(), 1)
  t.match(upstream.requests[1]!.body.messages.at(-1), { role: 'tool', tool_call_id: call.id, content: 'sunny in Paris' })

  upstream.script(toolCall({ name: 'get_weather', arguments: '{"city":"Rome"}' }))
  let streamed: unknown[] = []
  for await (const chunk of await llm.chat({ messages: [{ role: 'user', content: 'Rome?' }], tools: [weather], stream: true })) {
    if (chunk.options && 'toolCall' in chunk.options) streamed = chunk.options.toolCall
  }
  t.match(streamed, [{ name: 'get_weather', input: { city: 'Rome' } }], 'the streamed call is assembled')
})
