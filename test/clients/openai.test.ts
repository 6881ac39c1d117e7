import OpenAI from 'openai'
import { zodFunction, zodResponseFormat } from 'openai/helpers/zod'
import t from 'tap'
import { z } from 'zod'
import { httpError, text, toolCall } from '../fakes/upstream.js'
import { listeningServer } from '../helpers/openai-server.js'

const admin = (apiKey: string) => ({ authorization: `Bearer ${apiKey}` })

t.test('runTools: the function runs on the client, its result goes back, the final content comes out', async (t) => {
  const { baseURL, apiKey, upstream, chatCalls, sessionCount } = await listeningServer(t)
  const client = new OpenAI({ baseURL, apiKey, maxRetries: 0 })
  upstream.script(toolCall({ name: 'get_weather', arguments: '{"city":"Paris"}' }), text('Paris: sunny, 24 C.'))
  const calls: string[] = []
  const runner = client.chat.completions.runTools({
    model: 'gpt-4o-mini',
    messages: [{ role: 'user', content: 'Weather in Paris?' }],
    tools: [
      zodFunction({
        name: 'get_weather',
        parameters: z.object({ city: z.string() }),
        function: ({ city }) => {
          calls.push(city)
          return { sky: 'sunny', celsius: 24 }
        },
      }),
    ],
  })
  t.equal(await runner.finalContent(), 'Paris: sunny, 24 C.')
  t.same(calls, ['Paris'])
  t.equal(chatCalls(), 2)
  t.equal(await sessionCount(), 1, 'the resent history continued its session')
  t.match(upstream.requests[1]!.body.messages.at(-1), { role: 'tool', content: '{"sky":"sunny","celsius":24}' })
})

t.test('chat.completions.parse with a zod response format parses the final answer', async (t) => {
  const { baseURL, apiKey, upstream, chatCalls } = await listeningServer(t)
  const client = new OpenAI({ baseURL, apiKey, maxRetries: 0 })
  upstream.script(toolCall({ language: 'python', code: 'print(6 * 7)' }), text('{"answer":42,"steps":["multiply"]}'))
  const parsed = await client.chat.completions.parse({
    model: 'gpt-4o-mini',
    messages: [{ role: 'user', content: 'Compute 6*7' }],
    response_format: zodResponseFormat(z.object({ answer: z.number(), steps: z.array(z.string()) }), 'answer'),
  })
  t.same(parsed.choices[0]!.message.parsed, { answer: 42, steps: ['multiply'] })
  t.equal(chatCalls(), 2)
})

t.test("an SDK retry (x-stainless-retry-count > 0) of a request whose answer was lost replays it: the code runs once, the user message is stored once", async (t) => {
  const { app, baseURL, apiKey, upstream, chatCalls, sessionCount } = await listeningServer(t)
  const seen: { retry: string | null; replayed: string | null; status: number }[] = []
  // The first answer is read in full, then the connection "drops": the SDK sees a network error
  // after the server finished, as when a proxy cuts the response, and retries.
  const lossy: typeof fetch = async (input, init) => {
    const response = await fetch(input, init)
    const retry = new Headers(init?.headers).get('x-stainless-retry-count')
    seen.push({ retry, replayed: response.headers.get('idempotent-replayed'), status: response.status })
    if (seen.length === 1) {
      await response.text()
      throw new TypeError('fetch failed: the connection was reset')
    }
    return response
  }
  const client = new OpenAI({ baseURL, apiKey, fetch: lossy, maxRetries: 2 })
  upstream.script(toolCall({ language: 'python', code: "open('runs.txt', 'a').write('ran\\n')" }), text('Counted.'))
  const { data, response } = await client.chat.completions.create({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'count once' }] }).withResponse()
  t.equal(data.choices[0]!.message.content?.endsWith('Counted.'), true)
  t.same(
    seen.map((s) => [s.retry, s.replayed]),
    [
      ['0', null],
      ['1', 'true'],
    ],
    'the retry was answered from the first attempt',
  )
  const sessionId = response.headers.get('x-session-id')!
  t.equal((await app.inject({ url: `/v1/sessions/${sessionId}/files/content?path=runs.txt`, headers: admin(apiKey) })).body, 'ran\n', 'the code ran once')
  const stored = (await app.inject({ url: `/v1/sessions/${sessionId}/messages?limit=100`, headers: admin(apiKey) })).json().messages
  t.same(stored.filter((m: { role: string }) => m.role === 'user').map((m: { content: string }) => m.content), ['count once'])
  t.equal(chatCalls(), 2)
  t.equal(await sessionCount(), 1)

  // Asking the same thing again on purpose is a first attempt: it runs.
  upstream.script(text('Asked again.'))
  const plain = new OpenAI({ baseURL, apiKey, maxRetries: 0 })
  const again = await plain.chat.completions.create({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'count once' }] })
  t.equal(again.choices[0]!.message.content, 'Asked again.')
  t.equal(await sessionCount(), 2)
})

t.test('a failure after code ran carries x-should-retry: false, so the SDK does not retry it: the code runs once', async (t) => {
  const { app, baseURL, apiKey, upstream, chatCalls } = await listeningServer(t)
  const retries: string[] = []
  const client = new OpenAI({
    baseURL,
    apiKey,
    fetch: async (input, init) => {
      retries.push(new Headers(init?.headers).get('x-stainless-retry-count') ?? '')
      return fetch(input, init)
    },
  })
  upstream.script(toolCall({ language: 'python', code: "open('runs.txt', 'a').write('ran\\n')" }), httpError(500, 'exploded'), httpError(500, 'exploded'))
  const err = await client.chat.completions.create({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'count' }] }).then(
    () => undefined,
    (e: unknown) => e as InstanceType<typeof OpenAI.APIError>,
  )
  t.equal(err?.status, 502)
  t.equal(err?.headers?.get('x-should-retry'), 'false')
  t.same(retries, ['0'], 'no retry was sent')
  const sessionId = err!.headers!.get('x-session-id')!
  t.equal((await app.inject({ url: `/v1/sessions/${sessionId}/files/content?path=runs.txt`, headers: admin(apiKey) })).body, 'ran\n')
  t.equal(chatCalls(), 3, 'the server retried the upstream 5xx once itself, nothing more')
})

t.test('an SDK attempt abandoned before its answer (a client timeout) is not run again by the retry', async (t) => {
  const { baseURL, apiKey, upstream, chatCalls, sessionCount, app } = await listeningServer(t)
  upstream.script(text('too late', { firstByteMs: 60_000 }))
  const body = JSON.stringify({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'slow one' }] })
  const headers = { ...admin(apiKey), 'content-type': 'application/json' }
  const controller = new AbortController()
  const first = fetch(`${baseURL}/chat/completions`, { method: 'POST', body, headers: { ...headers, 'x-stainless-retry-count': '0' }, signal: controller.signal }).catch(() => undefined)
  while (upstream.requests.length === 0) await new Promise((resolve) => setImmediate(resolve))
  controller.abort()
  await first
  // Until the abandoned attempt has written its answer a retry gets 409, which the SDKs retry.
  let retry: Response
  let attempt = 0
  do {
    attempt++
    retry = await fetch(`${baseURL}/chat/completions`, { method: 'POST', body, headers: { ...headers, 'x-stainless-retry-count': String(attempt) } })
    if (retry.status === 409) t.match(await retry.json(), { error: { code: 'idempotency_in_progress' } })
  } while (retry.status === 409)
  t.equal(retry.headers.get('idempotent-replayed'), 'true', 'the retry got what the abandoned attempt ended with')
  t.equal(chatCalls(), 1, 'the upstream was asked once')
  t.equal(await sessionCount(), 1)
  const sessionId = retry.headers.get('x-session-id')!
  const stored = (await app.inject({ url: `/v1/sessions/${sessionId}/messages?limit=100`, headers: admin(apiKey) })).json().messages
  t.same(stored.filter((m: { role: string }) => m.role === 'user').map((m: { content: string }) => m.content), ['slow one'])
  await upstream.settled()
})
