import type { ChatCompletionFunctionTool, ChatCompletionMessageParam } from 'openai/resources/chat/completions'
import type { LmcMessage } from '../../schemas/lmc.js'
import type { Language } from '../kernels/types.js'

export const EXECUTE_TOOL = 'execute'
const WORKSPACE_DIR = '/workspace'

export interface ContextOptions {
  /** What code may run in; empty when the turn runs no code at all. */
  languages: Language[]
  /** Offer the `execute` tool; without it code travels as fenced blocks in the text. */
  tools: boolean
  /** Replaces the default system prompt. */
  systemMessage?: string
  customInstructions?: string
  maxOutputChars: number
  capForModel: (text: string, maxChars: number) => string
  redact: (text: string) => string
}

export function defaultSystemMessage(languages: Language[], tools: boolean): string {
  const how = tools
    ? `Run code with the \`${EXECUTE_TOOL}\` tool: give it a \`language\` and the \`code\`.`
    : `To run code, write it in a fenced block tagged with its language (${languages.map((l) => `\`\`\`${l}`).join(', ')}). The first such block in your reply runs as soon as it is closed and its output comes back in the next message, so write one block at a time and stop after it.`
  return [
    'You are Open Interpreter, a world-class programmer who can complete any goal by writing and running code.',
    how,
    `Available languages: ${languages.join(', ')}.`,
    `Code runs on the user's machine in a sandbox, in one persistent session per language: variables, imports, the current directory and exported variables survive between runs. The working directory is ${WORKSPACE_DIR}; files the user shares are there, and files you create there are the user's.`,
    'First write a short plan, then work in small steps: run code, read its output, fix errors before moving on. Prefer printing what you need to see. The user sees your code and its output.',
    'When the goal is reached, or when no code is needed, answer plainly in Markdown without running code.',
  ].join('\n\n')
}

export function executeTool(languages: Language[]): ChatCompletionFunctionTool {
  return {
    type: 'function',
    function: {
      name: EXECUTE_TOOL,
      description: `Runs code in a persistent session on the user's machine (working directory ${WORKSPACE_DIR}) and returns its output.`,
      parameters: {
        type: 'object',
        properties: {
          language: { type: 'string', enum: languages, description: 'The language of the code.' },
          code: { type: 'string', description: 'The code to run.' },
        },
        required: ['language', 'code'],
      },
    },
  }
}

/** Stable across rebuilds so the same history always yields the same request. */
export function toolCallId(messageId: string): string {
  return `call_${messageId.replaceAll('-', '')}`
}

type Block =
  | { kind: 'user'; message: LmcMessage }
  | { kind: 'text'; text: string }
  | { kind: 'code'; id: string; language: string; code: string; outputs: string[]; confirmationAsked: boolean; result?: string }
  | { kind: 'orphan'; output: string }
  | { kind: 'client'; id: string; name: string; arguments: string }
  | { kind: 'result'; id: string; content: string }

const NO_OUTPUT = 'No output.'
const NOT_APPROVED = 'The code was not run: the user did not approve it.'
const INTERRUPTED = 'The code was interrupted before it produced any output.'
const NO_RESULT = 'The client returned no result for this tool call.'

/**
 * Turns the stored LMC history into the upstream `messages`. Every code message becomes one tool
 * call immediately followed by its result, which upstreams require even when the code never ran:
 * then the result says why (declined, interrupted), read from what the history shows. Calls to
 * the client's tools (`tool_call`) become real `tool_calls`, each followed by the `tool` message
 * of its `tool_result` wherever that was stored (or a note that none came); a result whose call
 * is unknown is shown as user text.
 */
export function buildMessages(history: LmcMessage[], opts: ContextOptions): ChatCompletionMessageParam[] {
  // Without languages no code can run, and the default prompt, which is all about code, would mislead.
  const defaultSystem = opts.languages.length > 0 ? defaultSystemMessage(opts.languages, opts.tools) : undefined
  const system = [opts.systemMessage ?? defaultSystem, opts.customInstructions].filter((part) => part?.trim()).join('\n\n')
  const messages: ChatCompletionMessageParam[] = system ? [{ role: 'system', content: opts.redact(system) }] : []
  const blocks = toBlocks(history)
  const results = new Map<string, string>()
  for (const block of blocks) if (block.kind === 'result' && !results.has(block.id)) results.set(block.id, block.content)
  const answered = new Set<string>()
  const output = (block: Extract<Block, { kind: 'code' }>) =>
    opts.redact(block.result ?? opts.capForModel(block.outputs.join(''), opts.maxOutputChars))

  let assistant: { text: string[]; call?: Extract<Block, { kind: 'code' }>; clients: Extract<Block, { kind: 'client' }>[] } | undefined
  const clientCalls = (clients: Extract<Block, { kind: 'client' }>[]) =>
    clients.map((c) => ({ id: c.id, type: 'function' as const, function: { name: c.name, arguments: opts.redact(c.arguments) } }))
  const clientResults = (clients: Extract<Block, { kind: 'client' }>[]) => {
    for (const c of clients) {
      answered.add(c.id)
      messages.push({ role: 'tool', tool_call_id: c.id, content: opts.redact(results.get(c.id) ?? NO_RESULT) })
    }
  }
  const flush = () => {
    if (!assistant) return
    const { text, call, clients } = assistant
    assistant = undefined
    if (clients.length > 0) {
      // The turn order puts the server's call (and its output) before the client's calls.
      messages.push({ role: 'assistant', content: text.length > 0 ? opts.redact(text.join('\n\n')) : null, tool_calls: clientCalls(clients) })
      clientResults(clients)
      return
    }
    if (!opts.tools) {
      const parts = [...text.map((part) => part.trim()), ...(call ? [fence(call.language, call.code)] : [])]
      messages.push({ role: 'assistant', content: opts.redact(parts.join('\n\n')) })
      if (call) messages.push({ role: 'user', content: `Code output:\n${fence('output', output(call))}` })
      return
    }
    const content = text.length > 0 ? opts.redact(text.join('\n\n')) : null
    if (!call) {
      messages.push({ role: 'assistant', content })
      return
    }
    const id = toolCallId(call.id)
    messages.push({
      role: 'assistant',
      content,
      tool_calls: [
        {
          id,
          type: 'function',
          function: { name: EXECUTE_TOOL, arguments: opts.redact(JSON.stringify({ language: call.language, code: call.code })) },
        },
      ],
    })
    messages.push({ role: 'tool', tool_call_id: id, content: output(call) })
  }

  for (const block of blocks) {
    if (block.kind === 'text') {
      if (assistant?.call || assistant?.clients.length) flush()
      assistant ??= { text: [], clients: [] }
      assistant.text.push(block.text)
    } else if (block.kind === 'code') {
      if (assistant?.call || assistant?.clients.length) flush()
      assistant ??= { text: [], clients: [] }
      assistant.call = block
    } else if (block.kind === 'client') {
      if (assistant?.call) flush()
      assistant ??= { text: [], clients: [] }
      assistant.clients.push(block)
    } else if (block.kind === 'result') {
      flush()
      if (!answered.has(block.id)) messages.push({ role: 'user', content: opts.redact(`Result of tool call ${block.id}:\n${block.content}`) })
    } else {
      flush()
      if (block.kind === 'user') messages.push(userMessage(block.message, opts.redact))
      else messages.push({ role: 'user', content: opts.redact(`Computer output:\n${opts.capForModel(block.output, opts.maxOutputChars)}`) })
    }
  }
  flush()
  return messages
}

function toBlocks(history: LmcMessage[]): Block[] {
  const blocks: Block[] = []
  let call: Extract<Block, { kind: 'code' }> | undefined
  for (const message of history) {
    if (message.type === 'tool_call' || message.type === 'tool_result') {
      if (call) settle(call, false)
      call = undefined
      const block = clientBlock(message)
      if (block) blocks.push(block)
      continue
    }
    if (message.role === 'computer') {
      if (message.type === 'confirmation') {
        if (call) call.confirmationAsked = true
        continue
      }
      const text = outputText(message)
      if (text === undefined) continue
      if (call) call.outputs.push(separated(call.outputs, text))
      else blocks.push({ kind: 'orphan', output: text })
      continue
    }
    if (message.type === 'confirmation') continue
    if (call) settle(call, message.role === 'user')
    call = undefined
    if (message.role === 'user') blocks.push({ kind: 'user', message })
    else if (message.type === 'code') {
      call = { kind: 'code', id: message.id, language: message.format ?? 'python', code: stringContent(message), outputs: [], confirmationAsked: false }
      blocks.push(call)
    } else if (message.type === 'message') {
      const text = stringContent(message)
      if (text.trim()) blocks.push({ kind: 'text', text })
    }
  }
  if (call) settle(call, false)
  return blocks
}

/** A stored client tool call or result; a malformed one (hand-made LMC) is left out. */
function clientBlock(message: LmcMessage): Block | undefined {
  const content = typeof message.content === 'object' ? message.content : {}
  if (message.type === 'tool_call') {
    const { id, name } = content
    const args = content.arguments
    return typeof id === 'string' && typeof name === 'string' ? { kind: 'client', id, name, arguments: typeof args === 'string' ? args : '{}' } : undefined
  }
  const id = content.tool_call_id
  return typeof id === 'string' ? { kind: 'result', id, content: typeof content.content === 'string' ? content.content : JSON.stringify(content.content ?? '') } : undefined
}

/**
 * Decides what the model is told for code that left no output. When the turn went on the code
 * simply printed nothing; when a user message comes next the turn ended there.
 */
function settle(call: Extract<Block, { kind: 'code' }>, turnEnded: boolean): void {
  if (call.outputs.length > 0) return
  if (call.confirmationAsked && turnEnded) call.result = NOT_APPROVED
  else if (turnEnded) call.result = INTERRUPTED
  else call.result = NO_OUTPUT
}

function outputText(message: LmcMessage): string | undefined {
  if (message.type === 'image') return '[image output]'
  if (message.type === 'console' && message.format === 'active_line') return undefined
  if (message.type === 'file') return `[file: ${stringContent(message)}]`
  return stringContent(message)
}

/** Console pieces arrive split at stream switches; results and notices start on their own line. */
function separated(previous: string[], text: string): string {
  const last = previous.at(-1)
  return last && !last.endsWith('\n') ? `\n${text}` : text
}

function userMessage(message: LmcMessage, redact: (text: string) => string): ChatCompletionMessageParam {
  if (message.type === 'image') {
    const mime = message.format === 'base64.jpeg' ? 'image/jpeg' : 'image/png'
    return { role: 'user', content: [{ type: 'image_url', image_url: { url: `data:${mime};base64,${stringContent(message)}` } }] }
  }
  if (message.type === 'file') return { role: 'user', content: redact(`[file: ${stringContent(message)}]`) }
  return { role: 'user', content: redact(stringContent(message)) }
}

function stringContent(message: LmcMessage): string {
  return typeof message.content === 'string' ? message.content : JSON.stringify(message.content)
}

/** A fence longer than any backtick run inside, so the content cannot close it early. */
function fence(tag: string, body: string): string {
  const longest = Math.max(0, ...(body.match(/`+/g) ?? []).map((run) => run.length))
  const ticks = '`'.repeat(Math.max(3, longest + 1))
  return `${ticks}${tag}\n${body}\n${ticks}`
}
