import { spawnSync } from 'node:child_process'
import { Client } from '@modelcontextprotocol/sdk/client/index.js'
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js'
import type { CallToolResult } from '@modelcontextprotocol/sdk/types.js'
import t, { type Test } from 'tap'
import { ADMIN_KEY, auth, build } from '../helpers/build.js'

const noMatplotlib = spawnSync('/usr/bin/python3', ['-c', 'import matplotlib'], { timeout: 20_000 }).status === 0 ? false : 'matplotlib is not installed for /usr/bin/python3'

/** The SDK's own client over Streamable HTTP, with the bearer key as every client sends it. */
async function connect(t: Test, url: string, key = ADMIN_KEY) {
  const client = new Client({ name: 'oi-server-test', version: '1.0.0' })
  const transport = new StreamableHTTPClientTransport(new URL(`${url}/mcp`), { requestInit: { headers: { authorization: `Bearer ${key}` } } })
  await client.connect(transport)
  t.teardown(() => client.close())
  return client
}

async function listening(t: Test) {
  const app = await build(t, { SANDBOX: 'none' })
  const url = await app.listen({ host: '127.0.0.1', port: 0 })
  return { app, url }
}

const texts = (result: CallToolResult) => result.content.filter((c) => c.type === 'text').map((c) => (c as { text: string }).text)

t.test('the MCP SDK client lists the tools, runs print(6*7) with progress and reads a file back', async (t) => {
  const { url } = await listening(t)
  const client = await connect(t, url)
  const tools = (await client.listTools()).tools.map((tool) => tool.name).sort()
  t.same(tools, ['create_session', 'delete_session', 'execute', 'interrupt', 'list_files', 'list_sessions', 'read_file', 'write_file'])

  const created = (await client.callTool({ name: 'create_session', arguments: { title: 'mcp' } })) as CallToolResult
  const sessionId = (created.structuredContent as { session_id: string }).session_id
  const progress: string[] = []
  const ran = (await client.callTool(
    { name: 'execute', arguments: { session_id: sessionId, language: 'python', code: 'print(6*7)\nopen("out.txt", "w").write("forty-two")' } },
    undefined,
    { onprogress: (p) => progress.push(p.message ?? '') },
  )) as CallToolResult
  t.notOk(ran.isError)
  t.match(texts(ran)[0], /^42\n/)
  // the trailing expression's value (write() returned 9) is shown as in Jupyter
  t.equal(texts(ran)[0], '42\n9')
  t.equal(progress.join(''), '42\n9', 'the output came as progress notifications first')

  const read = (await client.callTool({ name: 'read_file', arguments: { session_id: sessionId, path: 'out.txt' } })) as CallToolResult
  t.same(read.content, [{ type: 'text', text: 'forty-two' }])
  await client.callTool({ name: 'write_file', arguments: { session_id: sessionId, path: 'dir/in.bin', content: Buffer.from([0, 255]).toString('base64'), encoding: 'base64' } })
  const listed = (await client.callTool({ name: 'list_files', arguments: { session_id: sessionId } })) as CallToolResult
  t.same((listed.structuredContent as { entries: { name: string }[] }).entries.map((e) => e.name), ['dir', 'out.txt'])
  const blob = (await client.callTool({ name: 'read_file', arguments: { session_id: sessionId, path: 'dir/in.bin' } })) as CallToolResult
  t.match(blob.content[0], { type: 'resource', resource: { blob: Buffer.from([0, 255]).toString('base64') } })

  const failed = (await client.callTool({ name: 'execute', arguments: { session_id: sessionId, language: 'python', code: '1/0' } })) as CallToolResult
  t.ok(failed.isError)
  t.match(texts(failed)[0], /ZeroDivisionError/)
  const escape = (await client.callTool({ name: 'read_file', arguments: { session_id: sessionId, path: '../../etc/passwd' } })) as CallToolResult
  t.ok(escape.isError, 'paths cannot leave the workspace')

  const listedSessions = (await client.callTool({ name: 'list_sessions', arguments: {} })) as CallToolResult
  t.equal((listedSessions.structuredContent as { sessions: { session_id: string }[] }).sessions[0]?.session_id, sessionId)
  const deleted = (await client.callTool({ name: 'delete_session', arguments: { session_id: sessionId } })) as CallToolResult
  t.notOk(deleted.isError)
  const gone = (await client.callTool({ name: 'execute', arguments: { session_id: sessionId, language: 'python', code: '1' } })) as CallToolResult
  t.ok(gone.isError)
  t.match(texts(gone)[0], /Session not found/)
})

t.test('a matplotlib figure comes back as MCP image content', { skip: noMatplotlib }, async (t) => {
  const { url } = await listening(t)
  const client = await connect(t, url)
  const created = (await client.callTool({ name: 'create_session', arguments: {} })) as CallToolResult
  const sessionId = (created.structuredContent as { session_id: string }).session_id
  const code = 'import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()'
  const ran = (await client.callTool({ name: 'execute', arguments: { session_id: sessionId, language: 'python', code } })) as CallToolResult
  const image = ran.content.find((c) => c.type === 'image') as { data: string; mimeType: string } | undefined
  t.equal(image?.mimeType, 'image/png')
  t.same([...Buffer.from(image?.data ?? '', 'base64').subarray(0, 4)], [0x89, 0x50, 0x4e, 0x47])
})

t.test('tenancy and auth: another key sees none of the sessions; no key is 401; GET is 405', async (t) => {
  const { app, url } = await listening(t)
  const admin = await connect(t, url)
  const created = (await admin.callTool({ name: 'create_session', arguments: {} })) as CallToolResult
  const sessionId = (created.structuredContent as { session_id: string }).session_id
  const key = (await app.inject({ method: 'POST', url: '/v1/keys', headers: auth(), payload: { name: 'other' } })).json().key
  const other = await connect(t, url, key)
  const theirs = (await other.callTool({ name: 'list_sessions', arguments: {} })) as CallToolResult
  t.same((theirs.structuredContent as { sessions: unknown[] }).sessions, [])
  const foreign = (await other.callTool({ name: 'read_file', arguments: { session_id: sessionId, path: 'x' } })) as CallToolResult
  t.ok(foreign.isError)
  t.match(texts(foreign)[0], /Session not found/)

  const anonymous = await fetch(`${url}/mcp`, { method: 'POST', headers: { 'content-type': 'application/json', accept: 'application/json, text/event-stream' }, body: '{"jsonrpc":"2.0","id":1,"method":"tools/list"}' })
  t.equal(anonymous.status, 401)
  t.equal(((await anonymous.json()) as { error: { code: string } }).error.code, 'missing_api_key')
  const get = await fetch(`${url}/mcp`, { headers: auth() })
  t.equal(get.status, 405)
  t.equal(get.headers.get('allow'), 'POST')
})
