import { isUtf8 } from 'node:buffer'
import { Readable } from 'node:stream'
import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox'
import { McpServer } from '@modelcontextprotocol/sdk/server/mcp.js'
import { StreamableHTTPServerTransport } from '@modelcontextprotocol/sdk/server/streamableHttp.js'
import type { CallToolResult } from '@modelcontextprotocol/sdk/types.js'
import { z } from 'zod'
import { principal } from '../plugins/auth.js'
import { errors } from '../schemas/common.js'
import { ApiError, invalidRequest } from '../services/errors.js'
import { resolveLanguage } from '../services/kernels/manager.js'
import type { KernelOutput } from '../services/kernels/types.js'
import { VERSION } from '../services/version.js'

const MIME = { 'base64.png': 'image/png', 'base64.jpeg': 'image/jpeg' } as const

const json = (value: unknown): CallToolResult => ({ content: [{ type: 'text', text: JSON.stringify(value, null, 2) }], structuredContent: value as Record<string, unknown> })

/**
 * The MCP server (Model Context Protocol, Streamable HTTP transport, spec 2025-03-26 and later)
 * at `/mcp`, in the protected scope: the bearer key picks the tenant, as on every route.
 * Stateless: each POST carries one JSON-RPC request and gets its answer (an SSE stream when the
 * tool sends progress notifications first); there is no MCP session to resume, so GET and DELETE
 * answer 405 (the not-found handler's, with `Allow: POST`). Tools use the same services as the REST routes.
 */
const mcp: FastifyPluginAsyncTypebox<{ maxFileBytes: number }> = async (app, opts) => {
  const language = async (name: string) => {
    const sandbox = await app.sandboxStatus()
    if (!sandbox.ok) throw new ApiError(503, 'unavailable_error', 'kernel_unavailable', `No code can run: the sandbox does not work on this host (${sandbox.reason})`)
    const resolved = resolveLanguage(name)
    const info = (await app.kernels.languages()).find((l) => l.name === resolved)
    if (!resolved || !info?.available) throw invalidRequest(`Language '${name}' is not available on this server`, 'language')
    return resolved
  }

  /** The tools, bound to one caller. */
  const serverFor = (tenantId: string) => {
    const server = new McpServer({ name: 'oi-server', version: VERSION })
    const owned = async (id: string) => (await app.sessions.get(tenantId, id)).id
    const SessionId = z.string().max(128).describe('A session id (from create_session or list_sessions)')
    const Path = z.string().max(4096).describe('Relative to the session workspace')

    server.registerTool(
      'create_session',
      { description: 'Create a session: a workspace and kernels of its own (Python, shell, JavaScript).', inputSchema: { title: z.string().max(200).optional() } },
      async ({ title }) => {
        const session = await app.sessions.create(tenantId, { title: title ?? null, metadata: { source: 'mcp' } })
        return json({ session_id: session.id, created_at: session.createdAt, title: session.title })
      },
    )
    server.registerTool(
      'list_sessions',
      { description: 'List sessions, newest first.', inputSchema: { limit: z.number().int().min(1).max(100).optional(), cursor: z.string().max(512).optional() } },
      async ({ limit, cursor }) => {
        const page = await app.sessions.list(tenantId, { limit: limit ?? 20, ...(cursor ? { cursor } : {}) })
        return json({
          sessions: page.items.map((s) => ({ session_id: s.id, title: s.title, created_at: s.createdAt, updated_at: s.updatedAt, message_count: s.messageCount })),
          next_cursor: page.nextCursor,
        })
      },
    )
    server.registerTool(
      'delete_session',
      { description: 'Delete a session: its kernels stop and its workspace is removed.', inputSchema: { session_id: SessionId }, annotations: { destructiveHint: true } },
      async ({ session_id }) => {
        await app.sessions.delete(tenantId, session_id)
        return json({ deleted: true })
      },
    )
    server.registerTool(
      'execute',
      {
        description:
          'Run code in the session kernel; variables, imports and the working directory persist between calls. Output streams as progress notifications when the request has a progress token; the result holds the output as text and figures as images.',
        inputSchema: {
          session_id: SessionId,
          language: z.string().max(32).describe('python, shell or javascript (aliases: py, bash, sh, js, node)'),
          code: z.string().max(1_000_000),
          timeout_ms: z.number().int().min(1).optional().describe('capped at EXEC_TIMEOUT_MS'),
        },
      },
      async ({ session_id, language: name, code, timeout_ms }, extra) => {
        const sessionId = await owned(session_id)
        const lang = await language(name)
        const token = extra._meta?.progressToken
        const outputs: KernelOutput[] = []
        let sent = 0
        const result = await app.execution.run({
          tenantId,
          sessionId,
          language: lang,
          code,
          ...(timeout_ms ? { timeoutMs: timeout_ms } : {}),
          signal: extra.signal,
          onOutput: (output) => {
            if (output.type === 'active_line') return
            outputs.push(output)
            if (token === undefined) return
            sent++
            void extra
              .sendNotification({
                method: 'notifications/progress',
                params: { progressToken: token, progress: sent, message: output.type === 'image' ? `[${output.format} image]` : output.text },
              })
              .catch(() => {})
          },
        })
        const content: CallToolResult['content'] = []
        let text = ''
        for (const output of outputs) {
          if (output.type === 'image') content.push({ type: 'image', data: output.data, mimeType: MIME[output.format] })
          else if (output.type !== 'active_line') text += output.text
        }
        if (result.error) text += `${text && !text.endsWith('\n') ? '\n' : ''}${result.error.traceback || `${result.error.name}: ${result.error.value}`}`
        if (result.timedOut) text += `\n[timed out after ${result.durationMs} ms${result.stateLost ? '; the kernel was restarted and its state is lost' : ''}]`
        else if (result.interrupted) text += '\n[interrupted]'
        if (result.truncated) text += '\n[output cut at EXEC_OUTPUT_LIMIT_BYTES]'
        content.unshift({ type: 'text', text })
        return { content, isError: Boolean(result.error) || result.timedOut }
      },
    )
    server.registerTool(
      'interrupt',
      { description: "Interrupt the code running in the session's kernels.", inputSchema: { session_id: SessionId } },
      async ({ session_id }) => json({ interrupted: await app.kernels.interrupt(await owned(session_id)) }),
    )
    server.registerTool(
      'list_files',
      { description: 'List a directory of the session workspace.', inputSchema: { session_id: SessionId, path: Path.optional() } },
      async ({ session_id, path }) => {
        const page = await app.workspaces.list(await owned(session_id), path ?? '', { limit: 1000 })
        return json({ entries: page.entries, next_cursor: page.nextCursor })
      },
    )
    server.registerTool(
      'read_file',
      { description: 'Read a file of the session workspace: text as text, PNG and JPEG as images, other bytes as a base64 blob.', inputSchema: { session_id: SessionId, path: Path } },
      async ({ session_id, path }) => {
        const { stream } = await app.workspaces.readStream(await owned(session_id), path)
        const parts: Buffer[] = []
        for await (const part of stream) parts.push(part as Buffer)
        const bytes = Buffer.concat(parts)
        if (/\.png$/i.test(path)) return { content: [{ type: 'image', data: bytes.toString('base64'), mimeType: 'image/png' }] }
        if (/\.jpe?g$/i.test(path)) return { content: [{ type: 'image', data: bytes.toString('base64'), mimeType: 'image/jpeg' }] }
        if (isUtf8(bytes)) return { content: [{ type: 'text', text: bytes.toString('utf8') }] }
        const uri = `oi-server://sessions/${session_id}/files/${encodeURI(path)}`
        return { content: [{ type: 'resource', resource: { uri, mimeType: 'application/octet-stream', blob: bytes.toString('base64') } }] }
      },
    )
    server.registerTool(
      'write_file',
      {
        description: 'Write a file in the session workspace (parents are created).',
        inputSchema: { session_id: SessionId, path: Path, content: z.string(), encoding: z.enum(['utf8', 'base64']).optional() },
      },
      async ({ session_id, path, content, encoding }) => {
        const bytes = Buffer.from(content, encoding === 'base64' ? 'base64' : 'utf8')
        if (bytes.length > opts.maxFileBytes) throw new ApiError(413, 'validation_error', 'payload_too_large', `Files are limited to ${opts.maxFileBytes} bytes`)
        const size = await app.workspaces.write(await owned(session_id), path, Readable.from([bytes]))
        return json({ path, size })
      },
    )
    return server
  }

  const schema = {
    tags: ['mcp'],
    description:
      'Model Context Protocol, Streamable HTTP transport, stateless: POST one JSON-RPC message (Accept: application/json, text/event-stream); the answer is JSON or an SSE stream with progress notifications. Tools: create_session, list_sessions, delete_session, execute, interrupt, list_files, read_file, write_file.',
    response: errors(401, 429),
  }

  app.post('/mcp', { schema: { ...schema, operationId: 'mcp', summary: 'MCP server (Streamable HTTP)' } }, async (request, reply) => {
    const server = serverFor(principal(request).tenantId)
    const transport = new StreamableHTTPServerTransport({ sessionIdGenerator: undefined })
    // The transport writes the response itself; the headers the hooks set (request id, rate limit, CORS) go with it.
    for (const [name, value] of Object.entries(reply.getHeaders())) if (value !== undefined) reply.raw.setHeader(name, value)
    reply.hijack()
    reply.raw.on('close', () => {
      void transport.close()
      void server.close()
    })
    await server.connect(transport)
    await transport.handleRequest(request.raw, reply.raw, request.body)
  })
}

export default mcp
